"""``OSROConfig.completion`` (beyond the paper) decided on a held-out split: X_o as the prior of NMAR's normalised
interpolation of the measured sinogram (every measured ray off the metal trace kept, the learned image deciding
only the trace; ``classic.nmar.prior_completion``).

Both fusions get their own k, α, β, chosen on the split with ``tune_fusion``'s ranking over the same grid (the
paper's Eq. 15 alone, and Eq. 15 followed by the completion). The decision rule, fixed before the numbers: the
completion is adopted when its val PSNR at its own factors beats the paper fusion's at its own by more than
``--margin`` dB (0.2, the issue's bar for a cost). Then each safeguard bound is scored with the completion on, as
``bench/safeguard_val.py`` does without it. Runs on a fusion cache (no sampling; ``--build`` samples a split's
priors when the file does not exist):

    python bench/completion_val.py --cache <fusion>/priors.pt --data <shards> --models <models> --split val \\
        --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from dudocrop.atomic import write_json
from dudocrop.metrics.image import image_metrics
from tune_spaces.fusion import grid_candidates


def main(argv=None) -> int:
    from bench.safeguard_val import add_cache_args, load_cache, model_osro

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_args(ap)
    ap.add_argument("--points", type=int, default=5, help="grid values per factor (tune_fusion --points)")
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--bounds", default="1.25,1.5,2,3")
    ap.add_argument("--factors", default=None, help="k,alpha,beta for both fusions instead of tuning them "
                    "(a split that only reports, such as test: the factors chosen on val)")
    a = ap.parse_args(argv)
    t0 = time.time()
    cache = load_cache(a)
    base = model_osro(a.models, safeguard=None, trust=None, completion=False)

    def metrics(cfg):
        m = image_metrics(cache.output_hu(cfg), cache.x_ref_hu, cache.metal_mask, cache.roi)
        return {k: float(m[k].mean()) for k in ("psnr", "ssim", "rmse")}

    if a.factors:
        given = dict(zip(("k", "alpha", "beta"), (float(v) for v in a.factors.split(","))))
        chosen = {c: replace(base, completion=c, **given) for c in (False, True)}
    else:
        cands = grid_candidates(a.points)
        chosen = {c: cache.best(replace(base, completion=c), cands)[0] for c in (False, True)}
    out = {"split": a.split, "slices": len(cache.case_ids), "fusions": {}}
    for c, cfg in chosen.items():
        name = "completion" if c else "paper"
        out["fusions"][name] = {"factors": [cfg.k, cfg.alpha, cfg.beta], **metrics(cfg)}
        print(name, json.dumps(out["fusions"][name]), flush=True)
    gain = out["fusions"]["completion"]["psnr"] - out["fusions"]["paper"]["psnr"]
    out["gain_db"] = gain
    out["decision"] = "completion" if gain > a.margin else "paper"
    done = chosen[True]
    out["bounds"] = {}
    p0 = out["fusions"]["completion"]["psnr"]
    for b in [float(v) for v in a.bounds.split(",")]:
        m = metrics(replace(done, safeguard=b))
        out["bounds"][b] = {**m, "cost_db": p0 - m["psnr"]}
        print("safeguard", b, json.dumps(out["bounds"][b]), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    print("decision:", out["decision"], f"(gain {gain:+.3f} dB)", flush=True)
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
