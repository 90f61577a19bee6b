"""Which Norm_δ(Δ) keeps a good image prior good: Eq. 12 (X_p = Norm_{X'_p}(ε2(X_ma))) by the paper's min-max
(Eq. 11) and by the affine least-squares fit at several smoothing widths (``OSROConfig.norm``, ``norm_sigma``),
scored like the report (PSNR / SSIM outside the metal inside the reference's body) on a held-out split, beside the
raw prior ε2(X_ma), X'_p = FBP(Y_p) and NMAR. The priors are sampled once; each row is only Eq. 12.

    python bench/osro_norm.py --data outputs/small/data --models outputs/small/models --split val --steps 5 --json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from dudocrop.classic.nmar import nmar
from dudocrop.metrics.image import body_mask, image_metrics
from dudocrop.pipeline.model import DuDoCROP, PipelineConfig
from dudocrop.pipeline.osro import OSROConfig, norm, sinogram_prior
from dudocrop.train.rows import load_split

COLUMNS = ["case_id", "X_ma", "X_ref", "Y_ma", "metal_mask", "metal_trace"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--split", default="val", help="a held-out split (not the one you report)")
    ap.add_argument("--max-slices", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sigmas", default="0,2,4,8", help="affine fit smoothing widths to try, px")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    model = DuDoCROP.load(a.models, config=PipelineConfig(steps=a.steps))
    rows = load_split(a.data, a.split, COLUMNS)
    n = min(a.max_slices, len(rows))
    b = rows.take(np.arange(n))
    t = {k: torch.from_numpy(np.ascontiguousarray(b[k]))[:, None] for k in COLUMNS[1:]}
    x, y, mask, trace = model.prepare(t["X_ma"], t["Y_ma"], t["metal_mask"], t["metal_trace"] > 0)
    x_prior, y_prior = model.priors(x, y, mask, trace)
    x_pp = model.fbp_unit(sinogram_prior(y_prior, model.norm.sino(y), trace))
    region = model.region(x, mask)  # the body region (PipelineConfig.osro_region's default)
    ref = t["X_ref"].float()
    roi = body_mask(ref)

    def score(unit=None, hu=None) -> dict:
        hu = model.to_hu(unit, x, mask) if hu is None else torch.where(mask > 0, x, hu)
        m = image_metrics(hu, ref, mask, roi)
        return {"psnr": float(m["psnr"].mean()), "psnr_sd": float(m["psnr"].std()), "ssim": float(m["ssim"].mean()),
                "psnr_per_slice": [round(float(v), 3) for v in m["psnr"]]}

    minmax = OSROConfig(norm="minmax")
    table = {"raw prior ε2(X_ma)": score(x_prior), "X'_p = FBP(Y_p)": score(x_pp),
             "NMAR": score(hu=nmar(y, mask, x, model.op, trace=trace)),
             "Eq. 12, min-max over the whole image (paper)": score(norm(x_prior, x_pp, None, minmax)),
             "Eq. 12, min-max over the body": score(norm(x_prior, x_pp, region, minmax))}
    for s in (float(v) for v in a.sigmas.split(",")):
        cfg = replace(OSROConfig(), norm="affine", norm_sigma=s)
        table[f"Eq. 12, affine, σ = {s:g} px"] = score(norm(x_prior, x_pp, region, cfg))
    out = {"data": a.data, "models": a.models, "split": a.split, "slices": n, "steps": a.steps,
           "seconds": time.time() - t0, "rows": table}
    if a.json:
        print(json.dumps(out, indent=2))
    print(f"{n} slices of {a.split}, {a.steps} steps, {out['seconds']:.0f} s")
    print("| X_p | PSNR (dB) | SSIM |\n| --- | --: | --: |")
    for k, v in table.items():
        print(f"| {k} | {v['psnr']:.2f} ± {v['psnr_sd']:.2f} | {v['ssim']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
