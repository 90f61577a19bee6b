"""Where a method loses against NMAR on the real-anatomy set (issue 25, observation only: nothing is chosen from
these numbers). Reads the ``images.npz`` of ``ray_jobs/evaluate_real.py --save-images`` and prints, per method, the
RMSE (HU) inside the reference's body outside the metal split by distance from the metal (mm), by whether the pixel
lies on a streak (|X_ma − X_ref| above ``--streak`` HU) and by tissue (the reference's HU: fat, soft tissue, bone),
with the number of cases on which the method's error in that part is above NMAR's.

    python bench/real_anatomy_errors.py outputs/real/images.npz [--pixel-mm 1.6] [--json out.json]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from dudocrop.atomic import write_json
from dudocrop.metrics.image import body_mask

#: distance bands from the metal, mm
BANDS = ((0, 10), (10, 25), (25, 50), (50, 1e9))
#: tissue classes of the reference, HU
TISSUES = {"fat (<-30)": (-900, -30), "soft tissue (-30..150)": (-30, 150), "bone (>150)": (150, 1e9)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images")
    ap.add_argument("--geometry", default="small")
    ap.add_argument("--streak", type=float, default=50.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from dudocrop.ct.geometry import get_geometry

    px = get_geometry(a.geometry).pixel_size
    d = np.load(a.images)
    ref, xma, metal = d["X_ref"], d["X_ma"], d["metal_mask"] > 0
    methods = [k for k in d.files if k not in ("case_id", "X_ref", "X_ma", "metal_mask", "uncorrected")]
    body = body_mask(torch.from_numpy(ref)[:, None]).numpy()[:, 0] & ~metal
    dist = np.stack([ndimage.distance_transform_edt(~m) * px for m in metal])
    streak = np.abs(xma - ref) > a.streak
    parts = {f"{lo:g}-{hi:g} mm" if hi < 1e8 else f">{lo:g} mm": (dist >= lo) & (dist < hi) for lo, hi in BANDS}
    parts.update({f"streak (|X_ma-X_ref|>{a.streak:g})": streak, "off streaks": ~streak})
    parts.update({k: (ref >= lo) & (ref < hi) for k, (lo, hi) in TISSUES.items()})
    out = {}
    for name, sel in parts.items():
        sel = sel & body
        row = {}
        for m in methods:
            per = np.array([np.sqrt(np.mean((d[m][i] - ref[i])[sel[i]] ** 2)) if sel[i].any() else np.nan
                            for i in range(len(ref))])
            row[m] = per
        nm = row["NMAR"]
        out[name] = {m: {"rmse": float(np.nanmean(v)), "worse_than_nmar": int(np.nansum(v > nm)),
                         "pixels": int(sel.sum())} for m, v in row.items()}
        print(f"{name:28s} " + "  ".join(f"{m} {out[name][m]['rmse']:.1f} ({out[name][m]['worse_than_nmar']})"
                                         for m in methods), flush=True)
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
