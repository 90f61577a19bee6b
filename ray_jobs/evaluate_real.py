"""Evaluate on the "real anatomy" set (issue 25 §3): real CT slices of ``pydicom-data`` with simulated metal.

    python ray_jobs/evaluate_real.py --geometry small --out outputs/real_anatomy                 # LI, NMAR only
    python ray_jobs/evaluate_real.py --models outputs/small/models --out outputs/real_anatomy    # + DuDoCROP

Methods: uncorrected, LI, NMAR and, with ``--models``, the image prior (ε2 output, Table V's "w/o
Normalization" row), X'_p = FBP(Y_p) (the sinogram prior with fidelity), DuDoCROP, DuDoCROP with or
without the measured sinogram's completion (whichever the pipeline does not do; ``OSROConfig.completion``) and
DuDoCROP with the measured-data safeguard. Per method: PSNR / SSIM (full CT range) and RMSE (HU) inside the
reference's body outside the metal, and the consistency score against NMAR (``dudocrop.metrics.consistency``). Writes
``real_anatomy.md`` / ``.csv``, ``rows.json`` (per slice, with a "worse than NMAR" count in the notes) and one
panel PNG per real slice. The slices are reserved for this evaluation (``dudocrop.data.real_anatomy``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import numpy as np
import torch

from dudocrop.atomic import write_json
from dudocrop.classic.li import li
from dudocrop.classic.nmar import nmar
from dudocrop.data.real_anatomy import real_anatomy_cases
from dudocrop.eval.report import comparison_panel, score_rows, summarize, write_tables
from dudocrop.metrics.consistency import ConsistencyCheck
from dudocrop.metrics.image import body_mask

#: table rows (evaluate.restore's names) -> labels
METHODS = {"uncorrected": "Uncorrected", "LI": "LI", "NMAR": "NMAR", "image_raw": "Image prior",
           "sino_fidelity": "X'_p (sinogram prior)", "dudocrop": "DuDoCROP",
           "dudocrop_eq15": "DuDoCROP without completion (Eq. 15)", "dudocrop_completion": "DuDoCROP + completion",
           "dudocrop_safeguard": "DuDoCROP + safeguard"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="trained model folder (default: classical methods only)")
    ap.add_argument("--geometry", default=None, help="grid of the slices (default: the models' geometry, else small)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--draws", type=int, default=6, help="metal draws per real slice")
    ap.add_argument("--steps", type=int, default=None, help="reverse-diffusion steps (default: the models' T)")
    ap.add_argument("--safeguard", type=float, default=None, help="OSROConfig.safeguard bound (default: the "
                    "pipeline's, else osro.default_safeguard)")
    ap.add_argument("--save-images", action="store_true", help="also write every method's image per case (HU) "
                    "with X_ref, X_ma and the metal mask to images.npz, for analysis (bench/real_anatomy_errors.py)")
    return ap.parse_args(argv)


def run(a: argparse.Namespace) -> dict:
    model = None
    if a.models:
        from dudocrop.pipeline.model import DuDoCROP

        model = DuDoCROP.load(a.models, device="cpu", steps=a.steps)
    geometry = a.geometry or (model.geometry.name if model is not None else "small")
    if model is not None and geometry != model.geometry.name:
        raise ValueError(f"--geometry {geometry!r} differs from the models' {model.geometry.name!r}")
    cases = real_anatomy_cases(geometry, n_draws=a.draws)
    os.makedirs(a.out, exist_ok=True)
    rows, panels, images = [], {}, {}
    for rec in cases:
        t = {k: torch.from_numpy(np.ascontiguousarray(rec[k]))[None, None]
             for k in ("X_ma", "X_ref", "Y_ma", "metal_mask", "metal_trace")}
        x_ma, y_ma, mask, trace = t["X_ma"], t["Y_ma"], t["metal_mask"], t["metal_trace"] > 0
        if model is not None:
            from ray_jobs.evaluate import restore

            cfg = model.config.osro
            if a.safeguard is not None:
                cfg = replace(cfg, safeguard=a.safeguard)
            outs, _ = restore(model, x_ma, y_ma, mask, trace, cfg)
        else:
            from dudocrop.ct.operators import FanBeamOperator

            op = FanBeamOperator(geometry)
            outs = {"uncorrected": x_ma, "LI": li(y_ma, mask, x_ma, op, trace=trace),
                    "NMAR": nmar(y_ma, mask, x_ma, op, trace=trace)}
        op = model.op if model is not None else op
        chk = ConsistencyCheck.build(outs["NMAR"], y_ma, t["metal_trace"], op, mask)
        r_nmar = chk.size(chk.residual(outs["NMAR"]))
        roi = body_mask(t["X_ref"])
        for name, label in METHODS.items():
            if name in outs:
                rows += score_rows(label, "real anatomy", [rec["case_id"]], outs[name], t["X_ref"], mask, 0.0, None,
                                   roi, consistency=chk.score(outs[name], r_nmar))
        if a.save_images:
            for k, v in [("X_ref", t["X_ref"]), ("X_ma", x_ma), ("metal_mask", mask), *outs.items()]:
                images.setdefault(k, []).append(v[0, 0].detach().cpu().numpy().astype(np.float32))
        sl = rec["case_id"].split("/")[0]
        if sl not in panels:
            panels[sl] = ({METHODS[k]: outs[k] for k in METHODS if k in outs}, t["X_ref"], mask)
        print(f"evaluate_real: {rec['case_id']} done", flush=True)
    by_case: dict[str, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(r["case_id"], {})[r["method"]] = r["rmse"]
    notes = [f"{len(cases)} cases: real CT slices of pydicom-data (abdomen, head) on the {geometry!r} grid, "
             f"{a.draws} simulated metal draws each (aapm_like: independent noise, beam hardening, scatter); never "
             "used for training or tuning.",
             "PSNR / SSIM over [-1024, 3072] HU and RMSE in HU inside the reference's body outside the metal; "
             "consistency: measured-data residual over NMAR's (dudocrop.metrics.consistency)."]
    for m in [v for v in METHODS.values() if v not in ("NMAR", "Uncorrected")]:
        worse = [c for c, d in by_case.items() if m in d and d[m] > d["NMAR"]]
        if any(m in d for d in by_case.values()):
            notes.append(f"{m}: RMSE above NMAR's on {len(worse)} of {len(by_case)} cases")
    paths = write_tables(rows, a.out, stem="real_anatomy", title="Real anatomy (pydicom-data CT, simulated metal)",
                         notes=notes)
    write_json(os.path.join(a.out, "rows.json"), rows)
    if a.save_images:
        from dudocrop.atomic import atomic_open

        with atomic_open(os.path.join(a.out, "images.npz")) as f:
            np.savez_compressed(f, case_id=np.array([c["case_id"] for c in cases]),
                                **{k: np.stack(v) for k, v in images.items()})
    for sl, (outs, ref, mask) in panels.items():
        comparison_panel(os.path.join(a.out, f"panel_{sl}.png"), outs, ref, mask)
    summary = summarize(rows)
    print(open(paths["markdown"]).read(), flush=True)
    return {s.method: {"psnr": s.psnr.mean, "ssim": s.ssim.mean, "rmse": s.rmse.mean,
                       "consistency": s.consistency.mean} for s in summary}


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
