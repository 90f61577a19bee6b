"""Where a paper-size U-Net evaluation spends its time on a GPU: milliseconds per evaluation of the image (512²)
and sinogram (1000×900) U-Nets for each variant (fp32 = TF32 convolutions, bf16 autocast, channels_last, cuDNN
autotuning), the achieved TFLOP/s, and the top CUDA kernels of one bf16 sinogram evaluation (torch.profiler).

    python bench/unet_gpu.py --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dudocrop.sde.unet import build_unet, tflop_per_eval, with_precision

VARIANTS = ("fp32", "bf16", "bf16+bench", "bf16+bench+cl")


def time_evals(net, shape, variant: str, n: int, device) -> dict:
    """``variant``: fp32 or bf16, plus ``+bench`` (cuDNN autotuning), ``+cl`` (channels_last), ``+compile``
    (torch.compile, mode reduce-overhead: fused kernels replayed as a CUDA graph; its compile time is reported)."""
    torch.backends.cudnn.benchmark = "bench" in variant
    fmt = torch.channels_last if "+cl" in variant else torch.contiguous_format
    net = net.to(memory_format=fmt)
    run = with_precision(net, "bf16" if variant.startswith("bf16") else "fp32")
    compile_s = None
    if "+compile" in variant:
        run = torch.compile(run, mode="reduce-overhead")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(1, 1, *shape, device=device, generator=g)
    mu = torch.rand(1, 1, *shape, device=device, generator=g)
    e = torch.randn(1, net.config.context_dim, device=device, generator=g)
    t = torch.full((1,), 50.0, device=device)
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(3):
            run(x, mu, t, content=e, control=e)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0 if "+compile" in variant else None
        times = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run(x, mu, t, content=e, control=e)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    return {"ms_median": sorted(times)[n // 2], "ms_min": min(times), "warmup_s": compile_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--evals", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--shapes", default="512x512,1000x900")
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    net = build_unet("paper").to(device).eval()
    rows, top = [], None
    for shape in [tuple(int(v) for v in sh.split("x")) for sh in a.shapes.split(",")]:
        tflop = tflop_per_eval(net, shape)
        for v in a.variants.split(","):
            r = time_evals(net, shape, v, a.evals, device)
            rows.append({"shape": list(shape), "variant": v, "tflop": tflop, **r,
                         "tflops_achieved": tflop / (r["ms_median"] / 1e3)})
            print(f"{shape} {v:>14}: {r['ms_median']:.2f} ms  {rows[-1]['tflops_achieved']:.0f} TFLOP/s"
                  + ("" if r["warmup_s"] is None else f" (compile + warm-up {r['warmup_s']:.0f} s)"), flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if a.json:
        print(json.dumps(out, indent=2))
    if a.no_profile:
        return 0
    net = net.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = False
    x = torch.rand(1, 1, 1000, 900, device=device)
    e = torch.zeros(1, net.config.context_dim, device=device)
    run = with_precision(net, "bf16")
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(x, x, torch.full((1,), 50.0, device=device), content=e, control=e)
        torch.cuda.synchronize()
    try:
        top = prof.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=70)
    except (AttributeError, KeyError, ValueError):  # older torch names the key after CUDA
        top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
    print(top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
