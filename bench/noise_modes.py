"""LI and NMAR with independent vs shared noise in the metal and reference scans (issue 25 §1).

    python bench/noise_modes.py [geometry] [n_slices]

Patient-like body slices (dudocrop.ct.patients) with the anatomy's metal at the AAPM-like settings, simulated
twice per slice from the same seed: independent realisations (the default) and shared noise
(SimulationSettings.shared_noise). PSNR / RMSE inside the body outside the metal, as in the evaluation report.
"""

import sys
from dataclasses import replace

import numpy as np

from dudocrop.classic.li import li
from dudocrop.classic.nmar import nmar
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.patients import patient_phantom
from dudocrop.ct.simulate import get_settings, simulate
from dudocrop.data.synthetic import metal_config_for
from dudocrop.metrics.image import body_mask, psnr, rmse


def main(geom="small", n=12):
    op = FanBeamOperator(geom)
    st = get_settings("aapm_like")
    res = {}
    for mode, s in (("independent", st), ("shared", replace(st, shared_noise=True))):
        for i in range(n):
            clean = patient_phantom("body", op.geometry, 500 + i)
            r = simulate(clean, op, metal_config_for("body", op.geometry), s, seed=500 + i)
            roi = body_mask(r.X_ref)
            for name, x in (("uncorrected", r.X_ma), ("LI", li(r.Y_ma, r.metal_mask > 0, r.X_ma, op,
                                                                trace=r.metal_trace)),
                            ("NMAR", nmar(r.Y_ma, r.metal_mask > 0, r.X_ma, op, trace=r.metal_trace))):
                res.setdefault((mode, name), []).append(
                    (float(psnr(x, r.X_ref, r.metal_mask, roi)[0]), float(rmse(x, r.X_ref, r.metal_mask, roi)[0])))
    print(f"{n} patient-like body slices on {geom!r}, aapm_like")
    print("| noise | method | PSNR (dB) | RMSE (HU) |\n|---|---|--:|--:|")
    for (mode, name), v in res.items():
        v = np.asarray(v)
        print(f"| {mode} | {name} | {v[:, 0].mean():.2f} ± {v[:, 0].std(ddof=1):.2f} | {v[:, 1].mean():.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small", int(sys.argv[2]) if len(sys.argv) > 2 else 12)
