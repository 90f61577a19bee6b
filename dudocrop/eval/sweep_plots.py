"""Pictures of the Ray Tune sweeps a person reads to see what was chosen and why (PNG, written atomically; matplotlib
through its Agg canvas, no pyplot state):

* :func:`plot_sde_sweep`: ``ray_jobs/tune_sde.py``'s λ sweep (Eq. 4-6): val PSNR against training step per trial,
  where ASHA stopped a trial marked ×, and the final val PSNR against λ·255 (log axis), the paper's 50 and the chosen
  λ marked;
* :func:`plot_fusion_surface`: ``ray_jobs/tune_fusion.py``'s OSRO factors (Eq. 13-15): val PSNR over (α, β) at the
  best k and over k at the best (α, β), the chosen point marked;
* :func:`plot_steps_sweep`: ``ray_jobs/steps_sweep.py``'s speed/quality curve: val PSNR, SSIM and seconds per slice
  against the number of reverse steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dudocrop.atomic import atomic_open

__all__ = ["plot_fusion_surface", "plot_sde_sweep", "plot_steps_sweep"]


def _figure(w: float, h: float, cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    with atomic_open(path, "wb") as f:
        fig.canvas.print_png(f)
    return path


def plot_sde_sweep(path, history: Sequence[Mapping], trials: Sequence[Mapping], steps: int, best: Mapping,
                   domain: str = "image") -> str:
    """``history``: rows {trial_id, lam_255, step, val_psnr}; ``trials``: rows {trial_id, lam_255, steps, val_psnr,
    stopped_early}; ``best``: the chosen trial's row."""
    from dudocrop.sde.config import PAPER_LAMBDA_255 as paper

    fig, (ax1, ax2) = _figure(11, 4.2, 2)
    lams = sorted({float(t["lam_255"]) for t in trials})
    import matplotlib

    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, max(1, len(lams))))
    color = {lam: colors[i] for i, lam in enumerate(lams)}
    for t in sorted(trials, key=lambda t: float(t["lam_255"])):
        rows = sorted((h for h in history if h["trial_id"] == t["trial_id"]), key=lambda h: h["step"])
        if not rows:
            continue
        x, y = [h["step"] for h in rows], [h["val_psnr"] for h in rows]
        lam = float(t["lam_255"])
        extra = "".join(f", {k}={t[k]:g}" for k in ("lr", "T") if t.get(k) is not None and t[k] == t[k])
        label = f"λ·255={lam:g}{extra}" + (" (stopped)" if t["stopped_early"] else "")
        ax1.plot(x, y, "-o", ms=3, color=color[lam], label=label, lw=2.2 if t["trial_id"] == best["trial_id"] else 1.2)
        if t["stopped_early"]:
            ax1.plot(x[-1], y[-1], "x", color="red", ms=10, mew=2)
    ax1.axvline(steps, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("val PSNR (dB)")
    ax1.set_title(f"{domain} IR-SDE: val PSNR per trial (red × = ASHA stop)")
    ax1.legend(fontsize=7)
    for t in trials:
        if not math.isfinite(t["val_psnr"]):
            continue
        ax2.plot(float(t["lam_255"]), t["val_psnr"], "x" if t["stopped_early"] else "o",
                 color="red" if t["stopped_early"] else "black", ms=7)
    done = sorted((t for t in trials if not t["stopped_early"] and math.isfinite(t["val_psnr"])),
                  key=lambda t: float(t["lam_255"]))
    if done:
        ax2.plot([float(t["lam_255"]) for t in done], [t["val_psnr"] for t in done], "-", color="black", lw=0.8)
    ax2.axvline(paper, color="tab:blue", ls="--", lw=1, label=f"paper λ·255 = {paper:g}")
    ax2.plot(float(best["lam_255"]), best["val_psnr"], "*", color="gold", mec="black", ms=16,
             label=f"chosen λ·255 = {float(best['lam_255']):g}")
    ax2.set_xscale("log")
    ax2.set_xticks(lams, [f"{v:g}" for v in lams])
    ax2.minorticks_off()
    ax2.set_xlabel("λ·255 (Eq. 4-6)")
    ax2.set_ylabel("final val PSNR (dB)")
    ax2.set_title("last val PSNR against λ (red ×: stopped by ASHA)")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def plot_fusion_surface(path, trials, chosen: Mapping[str, float]) -> str:
    """``trials``: a DataFrame (or records) with columns k, alpha, beta, psnr; ``chosen``: {k, alpha, beta}."""
    import pandas as pd

    df = pd.DataFrame(trials)
    k0, a0, b0 = (float(chosen[f]) for f in ("k", "alpha", "beta"))
    fig, (ax1, ax2) = _figure(10, 4.2, 2)
    at_k = df[np.isclose(df["k"], k0)]
    grid = at_k.pivot_table(index="beta", columns="alpha", values="psnr", aggfunc="max")
    if grid.size:
        al, be = grid.columns.to_numpy(float), grid.index.to_numpy(float)
        im = ax1.pcolormesh(_edges(al), _edges(be), grid.to_numpy(float), shading="flat", cmap="viridis")
        fig.colorbar(im, ax=ax1, label="val PSNR (dB)")
    ax1.plot(a0, b0, "*", color="red", mec="white", ms=16, label=f"chosen α={a0:g}, β={b0:g}")
    ax1.set_xlabel("α (Eq. 15)")
    ax1.set_ylabel("β (Eq. 15)")
    ax1.set_title(f"val PSNR over (α, β) at the best k = {k0:g}")
    ax1.legend(fontsize=8, loc="upper right")
    line = df[np.isclose(df["alpha"], a0) & np.isclose(df["beta"], b0)].sort_values("k")
    ax2.plot(line["k"], line["psnr"], "-o", color="black")
    chosen_psnr = line[np.isclose(line["k"], k0)]["psnr"]
    if len(chosen_psnr):
        ax2.plot(k0, float(chosen_psnr.iloc[0]), "*", color="red", mec="black", ms=16, label=f"chosen k={k0:g}")
    ax2.set_xlabel("k (Eq. 13)")
    ax2.set_ylabel("val PSNR (dB)")
    ax2.set_title(f"val PSNR over k at α={a0:g}, β={b0:g}")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def _edges(v: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres ``v`` (pcolormesh's 'flat' shading)."""
    if len(v) == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])


def plot_steps_sweep(path, rows: Sequence[Mapping]) -> str:
    """``rows``: {steps, psnr, ssim, seconds_per_slice[, cpu_seconds_per_slice]} per number of reverse steps; the
    cost panel draws the CPU time (black) next to the wall time (grey) when the rows have it."""
    rows = sorted(rows, key=lambda r: r["steps"])
    s = [r["steps"] for r in rows]
    fig, (ax1, ax2, ax3) = _figure(13, 3.8, 3)
    cpu = all("cpu_seconds_per_slice" in r for r in rows)
    if cpu:
        ax3.plot(s, [r["seconds_per_slice"] for r in rows], "--s", color="0.6", label="wall")
    for ax, key, label in ((ax1, "psnr", "val PSNR (dB)"), (ax2, "ssim", "val SSIM"),
                           (ax3, "cpu_seconds_per_slice" if cpu else "seconds_per_slice", "seconds per slice")):
        ax.plot(s, [r[key] for r in rows], "-o", color="black", label="CPU" if ax is ax3 and cpu else None)
        ax.set_xscale("log")
        ax.set_xticks(s)
        ax.set_xticklabels([str(v) for v in s])
        ax.set_xlabel("reverse steps (Eq. 7-8 sampler)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.set_title("X_o quality (priors re-sampled, re-fused)")
    ax3.set_title("cost per slice")
    if cpu:
        ax3.set_yscale("log")
        ax3.legend(fontsize=8)
    return _save(fig, path)
