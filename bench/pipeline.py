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
    python bench/pipeline.py --json --device cuda --precision fp32,bf16,bf16+compile --batch 1,4 --inputs slices.npz

``--precision`` times the U-Nets in float32 (on CUDA its convolutions use TF32, PyTorch's default), under bf16
autocast (``PipelineConfig.precision``) and through ``torch.compile`` (``PipelineConfig.compile``); on CUDA the default
is bf16+compile beside eager bf16 (H200: 3.56 vs 8.46 s per slice at 100 steps, README, GPU); ``--inputs`` times
your own slices (an .npz with ``x_ma`` in HU, (N, H, W) or (N, 1, H, W), and optionally ``y_ma``, line integrals)
instead of a simulated one. Each row also gives the U-Nets' achieved TFLOP/s (FLOPs counted once per network with
FlopCounterMode, times the steps).

Timing uses networks of the stated architecture with untrained weights (cost does not depend on the weights);
``--models`` times a trained model folder instead. No quality number here comes from untrained weights: quality is
the evaluation table of a trained run, read from its report.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from dudocrop.atomic import write_json
from dudocrop.clip.model import DuDoCLIP
from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.phantoms import random_phantom
from dudocrop.ct.simulate import simulate
from dudocrop.ct.units import hu_to_mu
from dudocrop.pipeline.model import DuDoCROP
from dudocrop.sde.config import get_sde_config, get_unet_config
from dudocrop.sde.irsde import IRSDE
from dudocrop.sde.train import SDEModel
from dudocrop.sde.unet import build_unet, count_parameters, tflop_per_eval

PAPER_SECONDS_PER_SLICE = 125.0  # Table V, full DuDoCROP
GPU_TARGET_SECONDS = 5.0  # issue target at 100 steps on a GPU


def untrained_pipeline(geometry: str, unet: str, clip_config, device: str) -> DuDoCROP:
    """Networks of the given architectures with untrained weights: timing only."""
    clip = DuDoCLIP.from_config(clip_config)
    ctx = clip.embed_dim
    slots = {d: SDEModel(build_unet(get_unet_config(unet, context_dim=ctx, use_embeddings=d != "residual")),
                         IRSDE(get_sde_config("paper")), d, d != "residual", None)
             for d in ("image", "sinogram", "residual")}
    return DuDoCROP(geometry, slots["image"], slots["sinogram"], slots["residual"], clip, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pipeline(model: DuDoCROP, x_ma, y_ma, steps: int, repeats: int) -> dict:
    model.config = replace(model.config, steps=steps)
    model(x_ma, y_ma)  # warm-up at the timed batch size (kernels, allocator, numba, cuDNN autotuning, compiling)
    _sync(model.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(x_ma, y_ma)
    _sync(model.device)
    row = {"steps": steps, "seconds_per_slice": (time.perf_counter() - t0) / (repeats * x_ma.shape[0])}
    # Each row as soon as it is measured, so a run cut short (a device lease's time limit) still reports it.
    print(f"[bench] {model.config.precision}{'+compile' if model.config.compile else ''} batch {x_ma.shape[0]} "
          f"{steps} steps: {row['seconds_per_slice']:.3f} s / slice", file=sys.stderr, flush=True)
    return row


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


def unet_tflop_per_step(model: DuDoCROP) -> float:
    """TFLOP of one reverse step per slice: one evaluation of each U-Net at its domain's size."""
    g = model.geometry
    shapes = {"image": g.image_shape, "sinogram": g.sino_shape, "residual": g.image_shape}
    return sum(tflop_per_eval(m.unet, shapes[k]) for k, m in model.models.items() if m is not None)


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
    ap.add_argument("--batch", default="1", help="slices per call, comma-separated (each is a row)")
    ap.add_argument("--precision", default=None, help="U-Net variants to time, comma-separated: fp32, bf16, "
                    "and either with '+cl' (channels_last weights and activations) and/or '+compile' (torch.compile, "
                    "reduce-overhead; the warm-up call compiles), e.g. fp32,bf16,bf16+compile (default: "
                    "bf16+compile,bf16 on CUDA, the fastest and its eager baseline; fp32 on CPU)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape first")
    ap.add_argument("--inputs", default=None, help=".npz with x_ma (HU) and optionally y_ma: time these slices")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--report", default="outputs/small/report/report.csv")
    ap.add_argument("--save", default=None, help="also write the JSON to this file")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    unet = a.unet or ("paper" if cuda else "tiny")
    clip = a.clip or ("paper-random" if cuda else "tiny")
    g = get_geometry(a.geometry)
    batches = [int(b) for b in a.batch.split(",")]
    precisions = (a.precision or ("bf16+compile,bf16" if cuda else "fp32")).split(",")
    torch.manual_seed(0)
    if a.models:
        model, what = DuDoCROP.load(a.models, device=a.device), f"trained models {a.models}"
        g = model.geometry
    else:
        if clip == "paper-random":
            from dudocrop.clip.config import get_model_config

            clip_cfg = get_model_config("paper", pretrained=None)  # ViT-B-32 shape, untrained: timing only
        else:
            clip_cfg = clip
        model = untrained_pipeline(g.name, unet, clip_cfg, a.device)
        what = f"untrained {unet} U-Nets + {clip} DuDoCLIP (timing only)"
    x_ma, y_ma = load_inputs(a.inputs, g, max(batches))
    x_ma, y_ma = x_ma.to(a.device), y_ma.to(a.device)
    base = model.config
    tflop_step = unet_tflop_per_step(model)
    rows = []
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    for precision in precisions:
        for b in batches:
            model.config = replace(base, precision=precision.split("+")[0], channels_last="+cl" in precision,
                                   compile="+compile" in precision)
            model.to(model.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            part = timings(model, x_ma[:b], y_ma[:b], [int(s) for s in a.steps.split(",")], a.repeats,
                           a.max_timed_steps if a.max_timed_steps is not None else (None if cuda else 5))
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            for r in part:
                r.update(precision=precision, batch=b, vs_paper=PAPER_SECONDS_PER_SLICE / r["seconds_per_slice"],
                         unet_tflops_achieved=r["steps"] * tflop_step / r["seconds_per_slice"],
                         peak_gpu_memory_gib=peak)
            rows += part
    params = count_parameters(model.models["image"].unet)
    out = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "tf32": {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "cudnn_benchmark": a.cudnn_benchmark,
        "geometry": g.name, "image": list(g.image_shape), "sinogram": list(g.sino_shape), "what": what,
        "inputs": a.inputs or "simulated body phantom with aapm_like metal",
        "unet_parameters": params, "unet_tflop_per_step": tflop_step, "timing": rows,
        "baseline": f"paper: {PAPER_SECONDS_PER_SLICE} s per slice (Table V); "
                    f"GPU target {GPU_TARGET_SECONDS} s at 100 steps",
        "evaluation_small": read_report(a.report),
    }
    if a.save:
        write_json(a.save, out)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['device']}, {what}, {tflop_step:.4g} U-Net TFLOP per step")
        print("| precision | batch | steps | s / slice | x paper's 125 s | U-Net TFLOP/s | peak GiB |")
        print("| --- | --: | --: | --: | --: | --: | --: |")
        for r in rows:
            how = "" if r["measured"] else f" (fit to {r['fit']['from_steps']})"
            peak = "" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.1f}"
            print(f"| {r['precision']} | {r['batch']} | {r['steps']} | {r['seconds_per_slice']:.3f}{how} | "
                  f"{r['vs_paper']:.0f} | {r['unet_tflops_achieved']:.3g} | {peak} |")
    return 0


def load_inputs(path: str | None, g, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_ma HU, Y_ma) for ``n`` slices: from ``path`` (.npz: x_ma, optional y_ma; slices repeat when it holds
    fewer) or a simulated body phantom with AAPM-like metal."""
    if path is None:
        clean = torch.stack([torch.from_numpy(random_phantom("body", g, s))[None] for s in range(n)])
        sim = simulate(clean, g, metal="aapm_like", seed=0)
        return sim.X_ma, sim.Y_ma
    with np.load(path) as z:
        if "x_ma" not in z:
            raise ValueError(f"{path} must hold an array 'x_ma' (HU), got {sorted(z.files)}")
        x = torch.from_numpy(np.asarray(z["x_ma"], np.float32))
        y = torch.from_numpy(np.asarray(z["y_ma"], np.float32)) if "y_ma" in z else None
    x = x[:, None] if x.ndim == 3 else x
    if tuple(x.shape[1:]) != (1, *g.image_shape):
        raise ValueError(f"{path}: x_ma must be (N, {g.image_shape[0]}, {g.image_shape[1]}) HU for geometry "
                         f"{g.name}, got {tuple(x.shape)}")
    if y is None:
        y = FanBeamOperator(g).fp(hu_to_mu(x).clamp(min=0))
    y = y[:, None] if y.ndim == 3 else y
    if tuple(y.shape) != (x.shape[0], 1, *g.sino_shape):
        raise ValueError(f"{path}: y_ma must be ({x.shape[0]}, {g.sino_shape[0]}, {g.sino_shape[1]}), got "
                         f"{tuple(y.shape)}")
    reps = -(-n // x.shape[0])
    return x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps, 1, 1, 1)[:n]


if __name__ == "__main__":
    raise SystemExit(main())
