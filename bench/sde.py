"""IR-SDE / conditional U-Net benchmark: parameters and FLOPs per network evaluation, seconds per training step,
seconds to restore one 512² image and one 1000x900 sinogram with 100 steps and with the fewest steps (1).

    python bench/sde.py --json            # CPU: tiny timings, FLOPs of tiny and paper (about 1-3 min on 2 cores)
    python bench/sde.py --json --quick    # smaller timing inputs, for a smoke run

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the meta device (no compute; a multiply-add is
2 FLOPs). On CPU only the ``tiny`` preset is timed; ``paper`` is timed when CUDA is available (training at the paper's
batch 16 x 256², REFERENCE §1). Sampling time is linear in the number of network evaluations, so 100-step times on
CPU are extrapolated from runs with 1 and ``--measure-steps`` steps and say so (``"extrapolated": true``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dudocrop.sde import IRSDE, build_unet, count_parameters

EMB = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_eval(preset: str, shapes: list[tuple[int, int]]) -> dict:
    with torch.device("meta"):
        net = build_unet(preset)
    out = {"params": count_parameters(net), "tflop_per_eval": {}}
    for h, w in shapes:
        x = torch.empty(1, 1, h, w, device="meta")
        c = torch.empty(1, EMB, device="meta")
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            net(x, x, torch.full((1,), 50.0, device="meta"), content=c, control=c)
        out["tflop_per_eval"][f"{h}x{w}"] = round(fc.get_total_flops() / 1e12, 4)
    return out


def train_step_seconds(preset: str, batch: int, size: int, device: torch.device, repeat: int) -> dict:
    torch.manual_seed(0)
    net = build_unet(preset).to(device)
    sde = IRSDE()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.9, 0.99))
    x0 = torch.rand(batch, 1, size, size, device=device)
    mu = x0 + 0.1 * torch.randn_like(x0)
    c = torch.randn(batch, EMB, device=device)

    def step():
        loss = sde.training_loss(net, x0, mu, content=c, control=c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        step()
    _sync(device)
    return {"preset": preset, "device": device.type, "batch": batch, "size": size,
            "seconds_per_step": round((time.perf_counter() - t0) / repeat, 4)}


def sampling_seconds(preset: str, shape: tuple[int, int], device: torch.device, measure_steps: int | None,
                     tiled: bool = False) -> list[dict]:
    """Rows for 1 step (the fewest supported) and 100 steps; 100 is measured when ``measure_steps`` is None."""
    torch.manual_seed(0)
    net = build_unet(preset).to(device).eval()
    sde = IRSDE()
    mu = torch.rand(1, 1, *shape, device=device)
    c = torch.randn(1, EMB, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    run = sde.sample_tiled if tiled else sde.sample
    kw = {"tile": 256, "overlap": 32} if tiled else {}

    def timed(steps: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        run(net, mu, c, c, steps=steps, generator=gen, **kw)
        _sync(device)
        return time.perf_counter() - t0

    timed(1)  # warm-up
    t1 = timed(1)
    base = {"preset": preset, "device": device.type, "input": f"{shape[0]}x{shape[1]}",
            "tiled": "256/32" if tiled else None}
    rows = [{**base, "steps": 1, "seconds": round(t1, 3), "extrapolated": False}]
    if measure_steps is None:
        rows.append({**base, "steps": 100, "seconds": round(timed(100), 3), "extrapolated": False})
    else:
        tk = timed(measure_steps)
        per_step = (tk - t1) / (measure_steps - 1)
        rows.append({**base, "steps": 100, "seconds": round(t1 + 99 * per_step, 3), "extrapolated": True,
                     "measured_steps": [1, measure_steps], "seconds_per_step": round(per_step, 4)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="smaller timing inputs (smoke run)")
    ap.add_argument("--measure-steps", type=int, default=3, help="CPU: steps actually run to extrapolate 100")
    args = ap.parse_args(argv)
    if args.measure_steps < 2:
        ap.error("--measure-steps must be >= 2")
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    cpu = torch.device("cpu")
    image, sino = ((128, 128), (250, 225)) if args.quick else ((512, 512), (1000, 900))

    out: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if cuda else None},
        "models": {p: flops_per_eval(p, [(256, 256), (512, 512), (1000, 900)]) for p in ("tiny", "paper")},
        "train_step": [train_step_seconds("tiny", 2 if args.quick else 4, 64 if args.quick else 256, cpu, 2)],
        "sampling": [],
    }
    for shape, tiled in ((image, False), (sino, False), (sino, True)):
        out["sampling"] += sampling_seconds("tiny", shape, cpu, args.measure_steps, tiled)
    if cuda:
        gpu = torch.device("cuda")
        out["train_step"].append(train_step_seconds("paper", 16, 256, gpu, 10))  # REFERENCE §1: batch 16, 256²
        for preset in ("tiny", "paper"):
            for shape, tiled in ((image, False), (sino, False), (sino, True)):
                out["sampling"] += sampling_seconds(preset, shape, gpu, None, tiled)
    out["bench_seconds"] = round(time.perf_counter() - t_start, 1)

    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key in ("machine", "models"):
            print(key, out[key])
        for row in out["train_step"] + out["sampling"]:
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
