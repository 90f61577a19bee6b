"""``OSROConfig.trust`` (beyond the paper) calibrated on a held-out split: the refined image prior is kept only where
the metal trace crosses a pixel (w = min(1, f / trust), f the share of the pixel's rays on M_s), X'_p elsewhere.
For each value, the PSNR X_o loses against the paper's fusion at the model's factors. The decision rule, fixed
before the numbers: the largest value (the least trust in the image prior far from the metal) whose mean cost on
the split is at most ``--max-cost`` dB. Runs on a fusion cache (``bench/safeguard_val.py`` adds the measurement to
an older one):

    python bench/trust_val.py --cache <fusion>/priors.pt --data <shards> --models <models> --split val \\
        --values 0.01,0.02,0.05,0.1,0.2,0.3,0.4,0.5,0.7,1 --json out.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from dudocrop.atomic import write_json
from dudocrop.metrics.image import image_metrics


def main(argv=None) -> int:
    from bench.safeguard_val import add_cache_args, load_cache, model_osro

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_args(ap)
    ap.add_argument("--values", default="0.01,0.02,0.05,0.1,0.2,0.3,0.4,0.5,0.7,1")
    ap.add_argument("--max-cost", type=float, default=0.2)
    a = ap.parse_args(argv)
    cache = load_cache(a)
    cfg = model_osro(a.models, safeguard=None, trust=None)

    def psnr(c):
        m = image_metrics(cache.output_hu(c), cache.x_ref_hu, cache.metal_mask, cache.roi)
        return m["psnr"]

    p0 = psnr(cfg)
    out = {"split": a.split, "slices": len(cache.case_ids), "paper_psnr": float(p0.mean()), "values": {}}
    for v in [float(x) for x in a.values.split(",")]:
        p = psnr(replace(cfg, trust=v))
        out["values"][v] = {"psnr": float(p.mean()), "cost_db": float((p0 - p).mean())}
        print(v, json.dumps(out["values"][v]), flush=True)
    ok = [v for v, r in out["values"].items() if r["cost_db"] <= a.max_cost]
    out["decision"] = max(ok) if ok else None
    print("paper", out["paper_psnr"], "decision:", out["decision"], flush=True)
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
