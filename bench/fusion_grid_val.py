"""Issue 19's last point, (b): how many points per factor the fusion grid of ``ray_jobs/tune_fusion.py`` needs,
decided on the val split alone. A grid cannot be judged on the slices it chose on (a finer grid always fits them
at least as well), so val is split in two folds by patient: the factors are chosen on one fold with ``tune_fusion``'s
ranking (``dudocrop.eval.fusion.rank``) and scored on the other, both ways round. The decision rule, fixed before
the numbers: the grid with the highest held-out PSNR (mean of the two folds); within 0.02 dB of it, the coarsest.
Also printed per grid: the factors and PSNR that the whole of val gives (what ``tune_fusion`` writes).

Runs on ``tune_fusion``'s cached priors (``<fusion>/priors.pt``, sampled once), PSNR only while searching
(SSIM of the chosen points at the end):

    python bench/fusion_grid_val.py --cache <fusion>/priors.pt --data <shards> --points 5,11,21 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from dudocrop.atomic import write_json
from dudocrop.eval.fusion import FusionCache
from dudocrop.metrics.image import CT_RANGE_HU, _normalise, image_metrics, psnr
from dudocrop.pipeline.osro import OSROConfig, fuse
from dudocrop.train.rows import load_split
from tune_spaces.fusion import grid_values

#: held-out PSNR within this of the best grid counts as a tie, broken toward the coarser grid
TIE_DB = 0.02


def folds_by_patient(case_ids, patient_ids) -> list[np.ndarray]:
    """Two folds of slice indices, patients alternating in sorted order (no patient in both)."""
    pats = sorted(set(patient_ids))
    fold_of = {p: i % 2 for i, p in enumerate(pats)}
    f = np.array([fold_of[p] for p in patient_ids])
    return [np.flatnonzero(f == 0), np.flatnonzero(f == 1)]


def grid_scores(cache: FusionCache, base: OSROConfig, points: int) -> dict:
    """PSNR per slice (N,) of every (k, α, β) on the grid, and of X̂_p per k (rank's tie-break). Eq. 15 for all
    (α, β) of one k at once on the scored pixels (the metal, whose X_o is X_ma's, is not scored); checked against
    ``metrics.image.psnr`` on a few points."""
    vals = grid_values(points)
    ab = torch.tensor([(a, b) for a in vals for b in vals], dtype=torch.float64)
    keep = (cache.roi & ~(cache.metal_mask > 0))[:, 0]
    ref = _normalise(cache.x_ref_hu.double(), CT_RANGE_HU)[:, 0]
    prime = cache.X_p_prime.double()[:, 0]
    out, refined = {}, {}
    for k in vals:
        x_hat, _ = fuse(cache.X_p, cache.X_p_prime, cache.X_r_hat, cache.region, replace(base, k=k))
        refined[k] = psnr(cache._to_hu(x_hat), cache.x_ref_hu, cache.metal_mask, cache.roi)
        per = torch.empty(len(ab), len(keep), dtype=torch.float64)
        for i in range(len(keep)):
            h, p, r = x_hat.double()[i, 0][keep[i]], prime[i][keep[i]], ref[i][keep[i]]
            x = ab[:, :1] * h[None] + ab[:, 1:] * p[None]  # Eq. 15
            mse = ((_normalise(cache.norm.image_to_hu(x), CT_RANGE_HU) - r[None]) ** 2).mean(1)
            per[:, i] = -10.0 * torch.log10(mse)
        for j, (a, b) in enumerate(ab.tolist()):
            out[(k, round(a, 4), round(b, 4))] = per[j]
    for f in list(out)[:: max(1, len(out) // 4)]:  # the shortcut is the metric
        cfg = replace(base, **dict(zip(("k", "alpha", "beta"), f)))
        want = psnr(cache.output_hu(cfg), cache.x_ref_hu, cache.metal_mask, cache.roi)
        torch.testing.assert_close(out[f], want.double(), rtol=0, atol=1e-4)  # float32 vs float64 round-off
    return {"psnr": out, "refined": refined}


def choose(scores: dict, idx: np.ndarray) -> tuple[float, float, float]:
    """The factors ``tune_fusion`` would pick on slices ``idx``: mean PSNR to 1e-4 dB, then X̂_p's PSNR."""
    sel = torch.as_tensor(idx)
    return max(scores["psnr"], key=lambda f: (round(float(scores["psnr"][f][sel].mean()), 4),
                                              float(scores["refined"][f[0]][sel].mean())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="tune_fusion's priors.pt of the val split")
    ap.add_argument("--data", required=True, help="the shards (for the val split's patient ids)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--points", default="5,11,21")
    ap.add_argument("--norm", default="affine", help="OSROConfig.norm the model uses")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cache = FusionCache.load(a.cache)
    rows = load_split(a.data, a.split, ["case_id", "patient_id"])
    rows = rows.take(np.arange(len(rows)))
    pid = dict(zip([str(c) for c in rows["case_id"]], [str(p) for p in rows["patient_id"]]))
    folds = folds_by_patient(cache.case_ids, [pid[c] for c in cache.case_ids])
    base = OSROConfig(norm=a.norm)
    everything = np.arange(len(cache.case_ids))
    res = {"split": a.split, "slices": len(cache.case_ids), "folds": [[cache.case_ids[i] for i in f] for f in folds],
           "grids": {}}
    for p in [int(v) for v in a.points.split(",")]:
        t0 = time.time()
        sc = grid_scores(cache, base, p)
        held = []
        for i in (0, 1):
            f = choose(sc, folds[i])
            held.append({"chosen_on_fold": i, "factors": f,
                         "psnr_other_fold": float(sc["psnr"][f][torch.as_tensor(folds[1 - i])].mean())})
        full = choose(sc, everything)
        cfg = replace(base, **dict(zip(("k", "alpha", "beta"), full)))
        m = image_metrics(cache.output_hu(cfg), cache.x_ref_hu, cache.metal_mask, cache.roi)
        res["grids"][p] = {"trials": p ** 3, "held_out": held,
                           "held_out_psnr": float(np.mean([h["psnr_other_fold"] for h in held])),
                           "full_val": {"factors": full, "psnr": float(m["psnr"].mean()),
                                        "ssim": float(m["ssim"].mean())},
                           "seconds": round(time.time() - t0, 1)}
        print(p, json.dumps(res["grids"][p]), flush=True)
    best = max(g["held_out_psnr"] for g in res["grids"].values())
    res["decision"] = min(p for p, g in res["grids"].items() if g["held_out_psnr"] >= best - TIE_DB)
    print("decision: points =", res["decision"], flush=True)
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
