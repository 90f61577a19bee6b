"""The AAPM presets against the CT-MAR challenge's own projector and recon (issue 19 §1, docs/aapm_geometry.md).

    python bench/aapm_geometry.py --json                    # FP / FBP figures per preset (about a minute)
    python bench/aapm_geometry.py --json --challenge-recon  # + gecatsim's fdk_equiAngle as AAPMRecon.py sets it up

For ``aapm_body`` and ``aapm_head``, on pydicom's real CT slice stretched over the FOV and on an off-centre
asymmetric ellipse phantom: the relative L2 difference between this project's FP and gecatsim's DD2FanProj called
as AAPMProj.py calls it (views 2 pi/(V-1)) and with the simulator protocol's 2 pi/V views; the same for the old
(convention 1, mirrored) preset; the FBP's HU MAE inside the body for those sinograms. Needs the dev extra
(gecatsim). Prints a table, or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_aapm_geometry import FOV, challenge_fp, off_centre_phantom, rel_l2  # noqa: E402

from dudocrop.ct.geometry import get_geometry  # noqa: E402
from dudocrop.ct.operators import FanBeamOperator  # noqa: E402
from dudocrop.ct.phantoms import body_mask, load_ct_small  # noqa: E402
from dudocrop.ct.units import hu_to_mu, mu_to_hu  # noqa: E402


def _fp(op, hu):
    return op.fp(torch.from_numpy(hu_to_mu(np.ascontiguousarray(hu, np.float32)))[None, None])[0, 0].numpy()


def _fbp_mae(op, sino, hu):
    rec = mu_to_hu(op.fbp(torch.from_numpy(sino)[None, None])[0, 0].numpy())
    return float(np.abs(rec - hu)[body_mask(hu)].mean()), rec


def challenge_recon(sino: np.ndarray, fov: float) -> np.ndarray:
    """HU image by gecatsim's fdk_equiAngle with the settings of AAPMRecon.py (its 'standard' kernel)."""
    from gecatsim.reconstruction.pyfiles.fdk_equiAngle import fdk_equiAngle

    ns = types.SimpleNamespace
    cfg = ns(scanner=ns(sid=550.0, sdd=950.0, detectorColCount=900, detectorColsPerMod=1, detectorRowSize=1.0,
                        detectorColSize=1.0, detectorColOffset=-1.25, detectorRowOffset=0.0, detectorRowCount=1),
             protocol=ns(viewCount=1000, viewsPerRotation=1000, rotationDirection=1),
             recon=ns(fov=fov, imageSize=512, sliceCount=1, sliceThickness=0.579, centerOffset=[0.0, 0.0, 0.0],
                      startAngle=0, kernelType="standard", printReconParameters=False))
    rec = fdk_equiAngle(cfg, sino.reshape(1000, 1, 900).astype(np.float32))  # AAPMRecon.py: [1000, 1, 900]
    return rec[:, :, 0] * (1000 / 0.02) - 1000  # gecatsim's scaleReconData to HU (mu 0.02/mm, offset -1000)


def measure(name: str, with_recon: bool) -> dict:
    g = get_geometry(name)
    op, old = FanBeamOperator(g), FanBeamOperator(replace(g, direction=1, channel_direction=1))
    row: dict = {"preset": name}
    for what, hu in (("slice", load_ct_small(name, keep_spacing=False)), ("phantom", off_centre_phantom(name))):
        t = time.perf_counter()
        ref = challenge_fp(hu_to_mu(hu), FOV[name])
        t_ref = time.perf_counter() - t
        ref_v = challenge_fp(hu_to_mu(hu), FOV[name], spacing="protocol")
        _fp(op, hu)  # warm-up
        t = time.perf_counter()
        ours = _fp(op, hu)
        t_ours = time.perf_counter() - t
        row[what] = {
            "fp_rel_l2_vs_aapmproj": rel_l2(ours, ref), "fp_rel_l2_vs_protocol_views": rel_l2(ours, ref_v),
            "aapmproj_vs_protocol_views": rel_l2(ref, ref_v), "old_fp_rel_l2_vs_aapmproj": rel_l2(_fp(old, hu), ref),
            "fbp_mae_hu_aapmproj": _fbp_mae(op, ref, hu)[0], "fbp_mae_hu_protocol_views": _fbp_mae(op, ref_v, hu)[0],
            "old_fbp_mae_hu_aapmproj": _fbp_mae(old, ref, hu)[0], "dd2fanproj_s": t_ref, "our_fp_s": t_ours,
        }
        if with_recon and what == "slice":
            t = time.perf_counter()
            theirs = challenge_recon(ref, FOV[name])
            body = body_mask(hu)
            ours_rec = _fbp_mae(op, ref, hu)[1]
            row[what].update({
                "challenge_recon_mae_hu": float(np.abs(theirs - hu)[body].mean()),
                "challenge_recon_mae_hu_vs_mirrored": float(np.abs(theirs - hu[:, ::-1])[body].mean()),
                "ours_vs_challenge_recon_mae_hu": float(np.abs(ours_rec - theirs)[body].mean()),
                "challenge_recon_s": time.perf_counter() - t})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--presets", default="aapm_body,aapm_head")
    ap.add_argument("--challenge-recon", action="store_true", help="also run gecatsim's fdk_equiAngle (~1 min each)")
    a = ap.parse_args()
    rows = [measure(n, a.challenge_recon) for n in a.presets.split(",")]
    out = {"rows": rows, "torch_threads": torch.get_num_threads()}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    for r in rows:
        for what in ("slice", "phantom"):
            print(r["preset"], what, " ".join(f"{k}={v:.5g}" for k, v in r[what].items()))


if __name__ == "__main__":
    main()
