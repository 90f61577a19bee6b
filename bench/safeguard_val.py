"""The safeguard's bound (``OSROConfig.safeguard``, issue 25 §2) calibrated on a held-out split: for each bound,
the PSNR that X_o loses against the unguarded fusion (the in-distribution cost; bar 0.2 dB) and the share of the
image prior's weight moved to X'_p, at the model's factors k, α, β. The decision rule, fixed before the numbers:
the smallest bound (the most protection) whose mean cost on the split is at most ``--max-cost`` dB.

Runs on ``tune_fusion``'s cached priors (no sampling); a cache written before the safeguard lacks the measurement,
which is read from the split's rows (same slices, same order). ``--build`` samples the priors of the split when the
cache file does not exist yet (the test split, for the report only):

    python bench/safeguard_val.py --cache <fusion>/priors.pt --data <shards> --models <models> --split val \\
        --bounds 1.5,2,3,4,6,10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch

from dudocrop.atomic import write_json
from dudocrop.eval.fusion import FusionCache
from dudocrop.metrics.image import image_metrics
from dudocrop.pipeline.model import DuDoCROP, pipeline_config_from_dict
from dudocrop.pipeline.osro import OSROConfig
from dudocrop.train.rows import load_split

COLUMNS = ["case_id", "X_ma", "X_ref", "Y_ma", "metal_mask", "metal_trace", "geometry"]


def add_cache_args(ap: argparse.ArgumentParser) -> None:
    """The arguments every fusion-cache bench takes (this one, ``trust_val``, ``completion_val``)."""
    ap.add_argument("--cache", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", required=True, help="the model folder (its factors; --build samples with it)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-slices", type=int, default=32)
    ap.add_argument("--json", default=None)


def model_osro(models: str, **changes) -> OSROConfig:
    """The OSRO settings in ``models``' pipeline.json, with ``changes``."""
    with open(os.path.join(models, "pipeline.json")) as f:
        return replace(pipeline_config_from_dict(json.load(f)["pipeline"]).osro, **changes)


def load_cache(a) -> FusionCache:
    rows = load_split(a.data, a.split, COLUMNS)
    if not os.path.isfile(a.cache):
        if not a.build:
            raise SystemExit(f"safeguard_val: {a.cache} does not exist (pass --build to sample it)")
        model = DuDoCROP.load(a.models, steps=a.steps)
        b = rows.take(np.arange(min(a.max_slices, len(rows))))
        t = {k: torch.from_numpy(np.ascontiguousarray(b[k]))[:, None] for k in COLUMNS[1:-1]}
        cache = FusionCache.build(model, t["X_ma"], t["Y_ma"], t["metal_mask"], t["metal_trace"] > 0, t["X_ref"],
                                  b["case_id"], 8, geometries=b["geometry"])
        cache.save(a.cache)
        return cache
    cache = FusionCache.load(a.cache)
    if cache.y_ma is None:
        b = rows.take(np.arange(len(cache.case_ids)))
        if [str(c) for c in b["case_id"]] != cache.case_ids:
            raise SystemExit(f"safeguard_val: the cache's slices are not the first {len(cache.case_ids)} of split "
                             f"{a.split!r}")
        cache.y_ma = torch.from_numpy(np.ascontiguousarray(b["Y_ma"]))[:, None].float()
        cache.trace = (torch.from_numpy(np.ascontiguousarray(b["metal_trace"]))[:, None] > 0).float()
        cache.geometries = [str(g) for g in b["geometry"]]
    return cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_args(ap)
    ap.add_argument("--bounds", default="1.5,2,2.5,3,4,6,10")
    ap.add_argument("--max-cost", type=float, default=0.2, help="dB of PSNR the safeguard may cost on the split")
    ap.add_argument("--factors", default=None, help="k,alpha,beta (default: the model's pipeline.json)")
    a = ap.parse_args(argv)
    t0 = time.time()
    cache = load_cache(a)
    cfg = model_osro(a.models, safeguard=None)
    if a.factors:
        cfg = replace(cfg, **dict(zip(("k", "alpha", "beta"), (float(v) for v in a.factors.split(",")))))

    def scores(c):
        _, x_o, t = cache.fused(c)
        m = image_metrics(cache._to_hu(x_o), cache.x_ref_hu, cache.metal_mask, cache.roi)
        return m, t

    m0, _ = scores(cfg)
    out = {"split": a.split, "slices": len(cache.case_ids), "factors": [cfg.k, cfg.alpha, cfg.beta],
           "unguarded": {"psnr": float(m0["psnr"].mean()), "ssim": float(m0["ssim"].mean()),
                         "rmse": float(m0["rmse"].mean())}, "bounds": {}}
    for b in [float(v) for v in a.bounds.split(",")]:
        m, t = scores(replace(cfg, safeguard=b))
        cost = m0["psnr"] - m["psnr"]
        out["bounds"][b] = {"psnr": float(m["psnr"].mean()), "ssim": float(m["ssim"].mean()),
                            "rmse": float(m["rmse"].mean()), "cost_db": float(cost.mean()),
                            "max_slice_cost_db": float(cost.max()), "fallback_mean": float(t.mean()),
                            "slices_guarded": int((t > 0).sum())}
        print(b, json.dumps(out["bounds"][b]), flush=True)
    ok = [b for b, r in out["bounds"].items() if r["cost_db"] <= a.max_cost]
    out["decision"] = min(ok) if ok else None
    out["seconds"] = round(time.time() - t0, 1)
    print("unguarded", json.dumps(out["unguarded"]), "decision:", out["decision"], flush=True)
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
