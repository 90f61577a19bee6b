"""Issue 19's last point, (a): the image IR-SDE's starting point μ (``SDETrainConfig.image_mu``: NMAR's image or
X_ma) re-decided on a held-out split with the trained models. The priors of ``tune_fusion``'s cache (sampled from
the μ the model was trained with) are compared with the image prior sampled from the other μ (same steps, same
seed), both put through Eq. 12 with the cache's X'_p and fused (Eq. 15) at k = 0 (no ε3 resampling: the residual
model's input depends on μ, and the chosen k is 0): μ itself, X_p (Eq. 12), X_o at the model's α, β, and X_o at
the best (α, β) of a 5-point grid (chosen and scored on the same split, the same for both μ). The model was trained
from one μ only, so the other μ is out of its training distribution (docs/val_decisions.md says what that
comparison can and cannot decide).

    python bench/image_mu_val.py --cache <fusion>/priors.pt --data <shards> --models <models> --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace

import numpy as np
import torch

from dudocrop.atomic import write_json
from dudocrop.eval.fusion import FusionCache
from dudocrop.metrics.image import image_metrics, psnr
from dudocrop.pipeline.model import DuDoCROP
from dudocrop.pipeline.osro import fuse, norm
from dudocrop.sde.train import IMAGE_MU, image_mu
from dudocrop.train.rows import load_split

COLUMNS = ["case_id", "X_ma", "X_ref", "Y_ma", "metal_mask", "metal_trace"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="tune_fusion's priors.pt of the split")
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--split", default="val", help="a held-out split (not the one you report)")
    ap.add_argument("--steps", type=int, default=5, help="as the cache was sampled")
    ap.add_argument("--json", default=None, help="write the table here")
    a = ap.parse_args(argv)
    t0 = time.time()
    model = DuDoCROP.load(a.models, steps=a.steps)
    trained = model.models["image"].image_mu
    cache = FusionCache.load(a.cache)
    rows = load_split(a.data, a.split, COLUMNS)
    b = rows.take(np.arange(len(cache.case_ids)))
    if [str(c) for c in b["case_id"]] != cache.case_ids:
        raise SystemExit("image_mu_val: the cache's slices are not the first slices of the split")
    t = {k: torch.from_numpy(np.ascontiguousarray(b[k]))[:, None] for k in COLUMNS[1:]}
    x, y, mask, trace = model.prepare(t["X_ma"], t["Y_ma"], t["metal_mask"], t["metal_trace"])
    base = replace(model.config.osro, k=0.0, safeguard=None)
    grid = [(al, be) for al, be in itertools.product(np.linspace(0, 1, 5), repeat=2)]

    def score(x_hu):
        m = image_metrics(x_hu, cache.x_ref_hu, cache.metal_mask, cache.roi)
        return {"psnr": round(float(m["psnr"].mean()), 3), "ssim": round(float(m["ssim"].mean()), 4),
                "rmse": round(float(m["rmse"].mean()), 2)}

    out = {"split": a.split, "slices": len(cache.case_ids), "steps": a.steps, "trained_image_mu": trained,
           "rows": {}}
    emb = model.embeddings(x, y).get("image")
    for mu_name in IMAGE_MU:
        mu_hu = image_mu(x, y, mask, trace, mu_name, model.op)
        if mu_name == trained:
            x_p = cache.X_p
        else:
            prior = model._sample("image", model.norm.image(mu_hu), emb, 1)  # the seed stream priors() uses
            x_p = norm(prior, cache.X_p_prime, cache.region, base)  # Eq. 12
        fused = {}
        for al, be in grid:
            _, x_o = fuse(x_p, cache.X_p_prime, None, cache.region, replace(base, alpha=float(al), beta=float(be)))
            fused[(float(al), float(be))] = x_o
        best = max(fused, key=lambda f: float(psnr(cache._to_hu(fused[f]), cache.x_ref_hu, cache.metal_mask,
                                                    cache.roi).mean()))
        _, x_model = fuse(x_p, cache.X_p_prime, None, cache.region, base)
        row = {"mu": score(mu_hu), "X_p (Eq. 12)": score(cache._to_hu(x_p)),
               "X_o at the model's alpha, beta": score(cache._to_hu(x_model)),
               "X_o at the best 5-point alpha, beta": score(cache._to_hu(fused[best])), "best alpha, beta": best}
        out["rows"][mu_name] = row
        print(mu_name, json.dumps(row), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
