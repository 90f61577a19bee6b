"""Probe of the measured-data consistency score (docs/consistency.md): scores of faithful and wrong images on
patient-like slices with simulated metal. Usage: python bench/consistency_probe.py [geometry] [n_slices]"""

import sys

import numpy as np
import torch
from scipy import ndimage

from dudocrop.classic.li import li
from dudocrop.classic.nmar import nmar
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.patients import patient_phantom
from dudocrop.ct.simulate import simulate
from dudocrop.data.synthetic import metal_config_for
from dudocrop.metrics.consistency import consistency_score, data_residual
from dudocrop.metrics.image import body_mask


def organ_out(x_ref: np.ndarray, metal: np.ndarray, rng) -> np.ndarray:
    """X_ref with one soft-tissue structure (a connected 30-250 HU region, not touching the metal) replaced by the
    surrounding fat/soft-tissue median: an image prior that erased an organ."""
    soft = (x_ref > 30) & (x_ref < 250) & ~ndimage.binary_dilation(metal > 0, iterations=3)
    lab, n = ndimage.label(ndimage.binary_opening(soft))
    sizes = ndimage.sum_labels(soft, lab, np.arange(1, n + 1))
    k = 1 + int(np.argsort(sizes)[-1 - int(rng.integers(0, min(3, n)))])
    reg = lab == k
    ring = ndimage.binary_dilation(reg, iterations=3) & ~reg
    out = x_ref.copy()
    out[reg] = np.median(x_ref[ring]) - 40.0
    return out


def main(geom="small", n=6):
    op = FanBeamOperator(geom)
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n):
        clean = patient_phantom("body", op.geometry, 100 + s, region="abdomen")
        res = simulate(clean, op, metal_config_for("body", op.geometry), "aapm_like", seed=s)
        m, tr = res.metal_mask, res.metal_trace
        x_nmar = nmar(res.Y_ma, m > 0, res.X_ma, op, trace=tr)
        x_li = li(res.Y_ma, m > 0, res.X_ma, op, trace=tr)
        x_ref = res.X_ref
        wrong = torch.from_numpy(organ_out(x_ref[0, 0].numpy(), m[0, 0].numpy(), rng))[None, None]
        smooth = torch.from_numpy(ndimage.gaussian_filter(x_ref[0, 0].numpy(), 1.0))[None, None]
        cands = {"X_ref": x_ref, "X_ref smoothed": smooth, "LI": x_li, "X_ma": res.X_ma, "organ out": wrong,
                 "0.9 organ out + 0.1 NMAR": 0.9 * wrong + 0.1 * x_nmar}
        d0 = data_residual(x_nmar, res.Y_ma, tr, op, m)
        body = body_mask(x_ref) & (m == 0)
        row = {}
        for k, x in cands.items():
            sc = consistency_score(x, x_nmar, res.Y_ma, tr, op, m, reference_residual=d0).item()
            e = (x - x_ref)[body].pow(2).mean().sqrt().item()
            row[k] = (sc, e)
        row["NMAR"] = (1.0, (x_nmar - x_ref)[body].pow(2).mean().sqrt().item())
        rows.append(row)
        print(s, {k: f"{v[0]:.2f}/{v[1]:.0f}HU" for k, v in row.items()}, flush=True)
    for k in rows[0]:
        sc = [r[k][0] for r in rows]
        print(f"{k:28s} score mean {np.mean(sc):.2f} min {np.min(sc):.2f} max {np.max(sc):.2f}   "
              f"RMSE {np.mean([r[k][1] for r in rows]):.1f} HU")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small", int(sys.argv[2]) if len(sys.argv) > 2 else 6)
