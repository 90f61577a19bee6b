"""Pipeline benchmark: the evaluation table of the last ``small`` run, and seconds per 512² AAPM slice for the
whole DuDoCROP pipeline (DuDoCLIP + image and sinogram IR-SDE priors + OSRO with the residual IR-SDE) with 100
reverse-diffusion steps and with the fewest useful (3), against the paper's 125 s per slice (Table V, RTX A6000).

Fewest useful, not fewest accepted: the IR-SDE takes any 1 <= steps <= T, but with 1 step the prior is F̂_0 read off
at t = T, where Eq. 6 multiplies the network's error by e^{θ̄_T} (200x): on the small run's val split the image /
sinogram priors gave 6.5 / 9.4 dB with 1 step, 28.2 / 40.9 dB with 3 and 30.2 / 41.0 dB with 25. Step counts above
``--max-timed-steps`` (CPU default 5) come from a straight line fitted to the timed counts (the cost is a fixed
part, CLIP + FP/FBP + OSRO, plus the same U-Net evaluations per step) and are marked ``measured: false``.

    python bench/pipeline.py --json                       # CPU: tiny U-Nets; CUDA when available: paper U-Nets
    python bench/pipeline.py --json --unet paper --device cuda --report outputs/small/report/report.csv

Timing uses networks of the stated architecture with untrained weights (cost does not depend on the weights);
``--models`` times a trained model folder instead. No quality number here comes from untrained weights: quality is
the evaluation table of a trained run, read from its report.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import torch

from dudocrop.clip.model import DuDoCLIP
from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.phantoms import random_phantom
from dudocrop.ct.simulate import simulate
from dudocrop.pipeline.model import DuDoCROP, PipelineConfig
from dudocrop.sde.config import get_sde_config, get_unet_config
from dudocrop.sde.irsde import IRSDE
from dudocrop.sde.train import SDEModel
from dudocrop.sde.unet import build_unet, count_parameters

PAPER_SECONDS_PER_SLICE = 125.0  # Table V, full DuDoCROP
GPU_TARGET_SECONDS = 5.0  # issue target at 100 steps on a GPU


def untrained_pipeline(geometry: str, unet: str, clip_preset: str, device: str) -> DuDoCROP:
    clip = DuDoCLIP.from_config(clip_preset)
    ctx = clip.embed_dim
    slots = {d: SDEModel(build_unet(get_unet_config(unet, context_dim=ctx, use_embeddings=d != "residual")),
                         IRSDE(get_sde_config("paper")), d, d != "residual", None)
             for d in ("image", "sinogram", "residual")}
    return DuDoCROP(geometry, slots["image"], slots["sinogram"], slots["residual"], clip, device=device)


def time_pipeline(model: DuDoCROP, x_ma, y_ma, steps: int, repeats: int) -> dict:
    model.config = PipelineConfig(**{**model.config.__dict__, "steps": steps})
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    model(x_ma[:1], y_ma[:1])  # warm-up (kernels, allocator, numba)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(x_ma, y_ma)
    sync()
    return {"steps": steps, "seconds_per_slice": (time.perf_counter() - t0) / (repeats * x_ma.shape[0])}


def timings(model: DuDoCROP, x_ma, y_ma, steps: list[int], repeats: int, max_timed: int | None) -> list[dict]:
    """Seconds per slice for each step count: measured up to ``max_timed``; larger counts from a least-squares line
    through the measured counts (1 and ``max_timed`` are always among them then, to spread the fit). Every measured
    count is listed, so the fit can be checked."""
    timed = {s for s in steps if max_timed is None or s <= max_timed}
    if max_timed is not None and any(s > max_timed for s in steps):
        timed |= {1, max_timed}
    measured = {s: time_pipeline(model, x_ma, y_ma, s, repeats) for s in sorted(timed)}
    rows = [dict(r, measured=True) for r in measured.values()]
    if len(measured) >= 2:
        xs = torch.tensor(list(measured), dtype=torch.float64)
        ys = torch.tensor([r["seconds_per_slice"] for r in measured.values()], dtype=torch.float64)
        slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
        fixed = float(ys.mean() - slope * xs.mean())
        for s in steps:
            if s not in measured:
                rows.append({"steps": s, "seconds_per_slice": fixed + slope * s, "measured": False,
                             "fit": {"fixed_s": fixed, "per_step_s": slope, "from_steps": sorted(measured)}})
    return sorted(rows, key=lambda r: r["steps"])


def read_report(path: str) -> dict:
    if not os.path.isfile(path):
        return {"available": False, "reason": f"no report at {path}: run "
                "`python ray_jobs/train_all.py --preset small --out outputs/small` first"}
    with open(path) as f:
        return {"available": True, "path": path, "rows": list(csv.DictReader(f))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--unet", default=None, help="U-Net preset to time (default: paper on CUDA, tiny on CPU)")
    ap.add_argument("--clip", default=None, help="DuDoCLIP preset (default: paper arch on CUDA, tiny on CPU)")
    ap.add_argument("--models", default=None, help="time a trained model folder instead of untrained networks")
    ap.add_argument("--geometry", default="aapm_body")
    ap.add_argument("--steps", default="100,3")
    ap.add_argument("--max-timed-steps", type=int, default=None,
                    help="extrapolate larger step counts (default: 5 on CPU, none on CUDA)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--report", default="outputs/small/report/report.csv")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    unet = a.unet or ("paper" if cuda else "tiny")
    clip = a.clip or ("paper-random" if cuda else "tiny")
    g = get_geometry(a.geometry)
    torch.manual_seed(0)
    if a.models:
        model, what = DuDoCROP.load(a.models, device=a.device), f"trained models {a.models}"
    else:
        if clip == "paper-random":
            from dudocrop.clip.config import get_model_config

            clip_cfg = get_model_config("paper", pretrained=None)  # ViT-B-32 shape, untrained: timing only
        else:
            clip_cfg = clip
        model = untrained_pipeline(g.name, unet, "tiny", a.device)
        model.clip = DuDoCLIP.from_config(clip_cfg).to(a.device)
        what = f"untrained {unet} U-Nets + {clip} DuDoCLIP (timing only)"
    clean = torch.stack([torch.from_numpy(random_phantom("body", g, s))[None] for s in range(a.batch)])
    sim = simulate(clean, g, metal="aapm_like", seed=0)
    x_ma, y_ma = sim.X_ma.to(a.device), sim.Y_ma.to(a.device)
    rows = timings(model, x_ma, y_ma, [int(s) for s in a.steps.split(",")], a.repeats,
                   a.max_timed_steps if a.max_timed_steps is not None else (None if cuda else 5))
    params = count_parameters(model.models["image"].unet)
    for r in rows:
        r["vs_paper"] = PAPER_SECONDS_PER_SLICE / r["seconds_per_slice"]
    out = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "geometry": g.name, "image": list(g.image_shape), "sinogram": list(g.sino_shape), "what": what,
        "unet_parameters": params, "timing": rows,
        "baseline": f"paper: {PAPER_SECONDS_PER_SLICE} s per slice (Table V); "
                    f"GPU target {GPU_TARGET_SECONDS} s at 100 steps",
        "evaluation_small": read_report(a.report),
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for r in rows:
            how = "" if r["measured"] else f" (fitted to steps {r['fit']['from_steps']})"
            print(f"{out['device']} {what}: {r['steps']:>3} steps {r['seconds_per_slice']:.2f} s/slice{how} "
                  f"({r['vs_paper']:.1f}x the paper's {PAPER_SECONDS_PER_SLICE:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
