"""LI, NMAR and a trained DuDoCROP with independent vs shared noise in the metal and reference scans (issue 25 §1).

    python bench/noise_modes.py [geometry] [n_slices] [--models M --steps 5]

Patient-like body slices (dudocrop.ct.patients) with the anatomy's metal at the AAPM-like settings, simulated
twice per slice from the same seed: independent realisations (the default) and shared noise
(SimulationSettings.shared_noise). PSNR / RMSE inside the body outside the metal, as in the evaluation report.
With ``--models`` also the model's DuDoCROP as its pipeline.json says and, when that completes the measured
sinogram, its Eq. 15 output without the completion. Seeds 500 + i: the shards' seeds are hashes of their case ids.
"""

import argparse
from dataclasses import replace

import numpy as np

from dudocrop.classic.li import li
from dudocrop.classic.nmar import nmar
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.patients import patient_phantom
from dudocrop.ct.simulate import get_settings, simulate
from dudocrop.data.synthetic import metal_config_for
from dudocrop.metrics.image import body_mask, psnr, rmse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("geometry", nargs="?", default="small")
    ap.add_argument("n_slices", nargs="?", type=int, default=12)
    ap.add_argument("--models", default=None, help="a trained model folder of that geometry")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args(argv)
    op = FanBeamOperator(a.geometry)
    model = None
    if a.models:
        from dudocrop.pipeline.model import DuDoCROP

        model = DuDoCROP.load(a.models, steps=a.steps)
    st = get_settings("aapm_like")
    res = {}
    for mode, s in (("independent", st), ("shared", replace(st, shared_noise=True))):
        for i in range(a.n_slices):
            clean = patient_phantom("body", op.geometry, 500 + i)
            r = simulate(clean, op, metal_config_for("body", op.geometry), s, seed=500 + i)
            roi = body_mask(r.X_ref)
            outs = {"uncorrected": r.X_ma, "LI": li(r.Y_ma, r.metal_mask > 0, r.X_ma, op, trace=r.metal_trace),
                    "NMAR": nmar(r.Y_ma, r.metal_mask > 0, r.X_ma, op, trace=r.metal_trace)}
            if model is not None:
                kw = {"metal_mask": r.metal_mask, "trace": r.metal_trace}
                outs["DuDoCROP"] = model(r.X_ma, r.Y_ma, **kw).X_o
                if model.config.osro.completion:
                    eq15 = replace(model.config.osro, completion=False)
                    outs["DuDoCROP, Eq. 15 only"] = model(r.X_ma, r.Y_ma, osro_config=eq15, **kw).X_o
            for name, x in outs.items():
                res.setdefault((mode, name), []).append(
                    (float(psnr(x, r.X_ref, r.metal_mask, roi)[0]), float(rmse(x, r.X_ref, r.metal_mask, roi)[0])))
    print(f"{a.n_slices} patient-like body slices on {a.geometry!r}, aapm_like" +
          (f"; models {a.models}, {a.steps} steps" if model is not None else ""))
    print("| noise | method | PSNR (dB) | RMSE (HU) |\n|---|---|--:|--:|")
    for (mode, name), v in res.items():
        v = np.asarray(v)
        print(f"| {mode} | {name} | {v[:, 0].mean():.2f} ± {v[:, 0].std(ddof=1):.2f} | {v[:, 1].mean():.1f} |")


if __name__ == "__main__":
    main()
