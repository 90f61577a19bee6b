"""Evaluate DuDoCROP against the baselines and its own ablations (paper Tables III-V, Figs. 9 and 13).

    python ray_jobs/evaluate.py --data outputs/train_all/data --models outputs/train_all/models \\
        --out outputs/train_all/report [--split test] [--max-slices 16] [--steps 25]

Methods: uncorrected, LI, NMAR, and every Table V row (``dudocrop.pipeline.ablation``: the image prior with and
without normalisation, the sinogram prior with and without fidelity, fusion, residual refining, DuDoCROP), all
from ONE sampling of the diffusion priors per slice. ``--baseline-models`` adds the priors of models trained
without DuDoCLIP guidance (the "+ DuDoCLIP" rows). PSNR / SSIM in the full CT range outside the metal inside the
body (``dudocrop.metrics``); LPIPS and the perceptual indicators PI_q / PI_s (Eq. 18-19, on simulated metal
sweeps) only with the AlexNet backbone on disk — otherwise reported as unavailable. Output: ``report.md``,
``report.csv``, ``rows.json`` (per slice), PNG panels; seconds per slice per method. ``rows.jsonl`` and
``failed.jsonl`` are written as the run goes (``dudocrop.eval.stream``): a slice that fails (refused by the OSRO
region check, or raising while sampled on its own) is recorded there and in the report's notes, and the others go on.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

from dudocrop.atomic import write_json
from dudocrop.classic.li import li
from dudocrop.classic.nmar import nmar
from dudocrop.eval.report import PANEL_LEGEND, comparison_panel, score_rows, summarize, write_tables
from dudocrop.eval.stream import RowWriter, run_isolated
from dudocrop.eval.sweeps import make_sweeps, sweeps_pi
from dudocrop.metrics.consistency import ConsistencyCheck
from dudocrop.metrics.image import body_mask
from dudocrop.metrics.lpips import LPIPSMetric, LPIPSUnavailable, backbone_note
from dudocrop.pipeline.ablation import ROWS, TABLE_V, ablation_outputs
from dudocrop.pipeline.model import PIPELINE_FILE, DuDoCROP, geometry_batches, save_pipeline_meta
from dudocrop.pipeline.osro import OSROConfig, region_problems
from dudocrop.train.rows import load_split

COLUMNS = ["case_id", "geometry", "X_ma", "X_ref", "Y_ma", "metal_mask", "metal_trace"]
#: columns of the Fig. 9-like panel (baselines vs DuDoCROP) and the Fig. 13-like panel (DuDoCROP's modules).
FIG9 = ("uncorrected", "LI", "NMAR", "dudocrop", "dudocrop_safeguard")
FIG13 = ("image_norm", "sino_fidelity", "refine_norm", "dudocrop")
LABELS = {"uncorrected": "Uncorrected", "LI": "LI", "NMAR": "NMAR", **{r.name: r.label for r in TABLE_V}}
#: short column titles for the panels (Fig. 13's (a)-(d)).
PANEL_TITLES = {"uncorrected": "Uncorrected", "LI": "LI", "NMAR": "NMAR", "image_norm": "Image prior",
                "sino_fidelity": "Sinogram prior", "refine_norm": "Residual refined", "dudocrop": "DuDoCROP",
                "dudocrop_safeguard": "DuDoCROP + safeguard", "dudocrop_completion": "DuDoCROP + completion",
                "dudocrop_eq15": "DuDoCROP, Eq. 15"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", required=True, help="model folder or MLflow URI (runs:/<id>/models)")
    ap.add_argument("--baseline-models", help="models trained without DuDoCLIP guidance (the '+ DuDoCLIP' rows)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--dataset", default=None, help="dataset name in the tables (default: <geometry>-<split>)")
    ap.add_argument("--max-slices", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="reverse-diffusion steps (default: the models' T)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--k", type=float, default=None, help="Eq. 13 factor (default: the model's pipeline.json)")
    ap.add_argument("--alpha", type=float, default=None, help="Eq. 15 factor")
    ap.add_argument("--beta", type=float, default=None, help="Eq. 15 factor")
    ap.add_argument("--sweeps", default="tiny", help="metal-sweep preset for PI_q / PI_s, or 'none'")
    ap.add_argument("--lpips-weights", default=None, help="AlexNet backbone file (default: $TORCH_HOME/hub/...)")
    ap.add_argument("--about", default=None, help="what the run is and is not: the report's first paragraph")
    ap.add_argument("--gpu", action="store_true")
    return ap.parse_args(argv)


def _fusion_note(record: dict | None, given: bool) -> list[str]:
    """Where the OSRO factors came from, when ray_jobs/tune_fusion.py chose them and the command line did not."""
    if not record or given:
        return []
    prev = record["untuned"]
    return [f"k, alpha, beta chosen by ray_jobs/tune_fusion.py on {record['slices']} slices of split "
            f"'{record['split']}' ({record['trials']} trials; PSNR there {record['untuned_psnr']:.2f} dB at "
            f"k={prev['k']}, alpha={prev['alpha']}, beta={prev['beta']} -> {record['psnr']:.2f} dB)."]


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def restore(model: DuDoCROP, x_ma, y_ma, mask, trace, cfg: OSROConfig, baseline: DuDoCROP | None = None):
    """Every method's HU output for a batch and its seconds per slice."""
    n = x_ma.shape[0]
    outs, secs = {"uncorrected": x_ma}, {"uncorrected": 0.0}
    outs["LI"], t = _timed(li, y_ma, mask, x_ma, model.op, trace=trace)
    secs["LI"] = t / n
    outs["NMAR"], t = _timed(nmar, y_ma, mask, x_ma, model.op, trace=trace)
    secs["NMAR"] = t / n
    x, y, m, tr = model.prepare(x_ma, y_ma, mask, trace)
    (x_prior, y_prior), t_img_sino = _timed(model.priors, x, y, m, tr)
    rows, t_rows = _timed(ablation_outputs, model, x, y, m, tr, x_prior, y_prior, cfg)
    for name, v in rows.items():
        outs[name] = v
        # the priors dominate; each row is charged for them plus an equal share of the OSRO work
        secs[name] = (t_img_sino + t_rows / max(1, len(rows))) / n
    if baseline is not None:
        (bx, by), t_b = _timed(baseline.priors, x, y, m, tr)
        brows = ablation_outputs(baseline, x, y, m, tr, bx, by, cfg, rows=(ROWS["image_norm"], ROWS["sino_fidelity"]))
        for name, v in brows.items():
            outs[f"{name}_no_dudoclip"] = v
            secs[f"{name}_no_dudoclip"] = t_b / n
    return outs, secs


def run(a: argparse.Namespace) -> dict:
    device = "cuda" if a.gpu else "cpu"
    model = DuDoCROP.load(a.models, device=device, steps=a.steps)
    base = model.config.osro
    cfg = replace(base, k=base.k if a.k is None else a.k, alpha=base.alpha if a.alpha is None else a.alpha,
                  beta=base.beta if a.beta is None else a.beta)
    baseline = None
    if a.baseline_models:
        if not os.path.isfile(os.path.join(a.baseline_models, PIPELINE_FILE)):
            save_pipeline_meta(a.baseline_models, model.geometry)
        baseline = DuDoCROP.load(a.baseline_models, device=device, steps=a.steps)
    rows_in = load_split(a.data, a.split, COLUMNS)
    n = min(a.max_slices, len(rows_in))
    dataset = a.dataset or f"{model.geometry.name}-{a.split}"
    os.makedirs(a.out, exist_ok=True)
    notes = [f"{n} slices of split '{a.split}' of {a.data}; {a.steps or 'T'} reverse-diffusion steps per prior; "
             f"OSRO k={cfg.k}, alpha={cfg.alpha}, beta={cfg.beta}.",
             *_fusion_note(model.fusion, given=any(v is not None for v in (a.k, a.alpha, a.beta))),
             "PSNR / SSIM over the full CT range [-1024, 3072] HU, outside the metal, inside the body of the "
             "reference (dudocrop.metrics.image).", PANEL_LEGEND]
    if cfg.completion:
        notes.append("The full pipeline's rows (residual refining + fusion, its min-max variant, the safeguard) end "
                     "with the measured sinogram's completion (OSROConfig.completion, beyond the paper: X_o decides "
                     "only the metal trace); the \"Eq. 15 output\" row is the same pipeline without it.")
    try:
        lp = LPIPSMetric(a.lpips_weights, device=device)
        notes.append(backbone_note(lp.weights_path))
    except LPIPSUnavailable as e:
        lp = None
        notes.append(f"LPIPS and PI unavailable: {e}")
    if any(getattr(m, "is_random", False) for m in [model.clip] if m is not None):
        notes.append("DuDoCLIP towers were randomly initialised (tiny preset): its guidance is learned from scratch, "
                     "not the pretrained CLIP of the paper.")
    rows, failed, t0 = [], [], time.time()
    first = None
    # rows and failures go to disk as they are made: a killed run keeps every finished slice
    writer, fail_writer = RowWriter(os.path.join(a.out, "rows.jsonl")), RowWriter(os.path.join(a.out, "failed.jsonl"))

    def fail(case_id: str, error: str) -> None:
        failed.append({"case_id": case_id, "error": error})
        fail_writer.write([failed[-1]])
        print(f"evaluate: slice {case_id} failed: {error}", flush=True)

    done = 0
    # each slice in its own geometry (AAPM head slices among body slices: DuDoCROP.at)
    for geom, idx in geometry_batches(rows_in.columns["geometry"][:n], n, a.batch_size):
        b = rows_in.take(idx)
        gmodel, gbase = model.at(geom), None if baseline is None else baseline.at(geom)
        t = {k: torch.from_numpy(np.ascontiguousarray(b[k]))[:, None].to(device)
             for k in ("X_ma", "X_ref", "Y_ma", "metal_mask", "metal_trace")}
        ids = [str(c) for c in b["case_id"]]
        # slices OSRO cannot use are refused before any sampling; the rest of the batch goes on without them
        problems = region_problems(t["X_ma"], t["metal_mask"], gmodel.geometry, model.config.metal_region_dilation)
        for j, why in enumerate(problems):
            if why:
                fail(ids[j], why)

        def evaluate_slices(js: list[int], t=t, ids=ids, gmodel=gmodel, gbase=gbase) -> tuple[dict, dict, list[dict]]:
            s = {k: v[js] for k, v in t.items()}
            outs, secs = restore(gmodel, s["X_ma"], s["Y_ma"], s["metal_mask"], s["metal_trace"] > 0, cfg, gbase)
            roi = body_mask(s["X_ref"])
            # measured-data consistency of every method's image against NMAR's (issue 25 §2)
            chk = ConsistencyCheck.build(outs["NMAR"], s["Y_ma"], s["metal_trace"], gmodel.op, s["metal_mask"])
            r_nmar = chk.size(chk.residual(outs["NMAR"]))
            new = []
            for name, x in outs.items():
                new += score_rows(name, dataset, [ids[j] for j in js], x, s["X_ref"], s["metal_mask"], secs[name],
                                  lp, roi, consistency=chk.score(x, r_nmar))
            return outs, s, new

        for js, res, err in run_isolated(evaluate_slices, [j for j, why in enumerate(problems) if why is None]):
            if err is not None:
                fail(ids[js[0]], err)
                continue
            outs, s, new = res
            writer.write(new)
            rows += new
            if first is None:
                first = {k: v[:1].cpu() for k, v in outs.items()}, s["X_ref"][:1].cpu(), s["metal_mask"][:1].cpu()
        done += len(idx)
        print(f"evaluate: {done}/{n} slices | {time.time() - t0:.1f}s", flush=True)
    writer.close()
    fail_writer.close()
    if not rows:
        raise RuntimeError(f"evaluate: every one of the {n} slices failed: " + "; ".join(
            f"{f['case_id']}: {f['error']}" for f in failed[:5]))
    if failed:
        notes.append(f"{len(failed)} of {n} slices failed and are left out of the tables (listed with the reason "
                     f"in failed.jsonl): " + ", ".join(f["case_id"] for f in failed[:10]) +
                     (" ..." if len(failed) > 10 else ""))

    pi = None
    if lp is not None and a.sweeps != "none":
        pi = sweep_indicators(model, cfg, lp, a.sweeps, dataset)
    names = [r["method"] for r in rows]
    ordered = list(dict.fromkeys(names))
    for r in rows:
        r["method"] = LABELS.get(r["method"], r["method"])
    if pi is not None:
        pi = {(ds, LABELS.get(m, m)): v for (ds, m), v in pi.items()}
    paths = write_tables(rows, a.out, stem="report", pi=pi, title="DuDoCROP evaluation", notes=notes,
                         preamble=[a.about] if a.about else [])
    write_json(os.path.join(a.out, "rows.json"), rows)
    outs, ref, mask = first
    for fig, cols in (("fig9_methods.png", FIG9), ("fig13_modules.png", FIG13)):
        keep = {PANEL_TITLES[c]: outs[c] for c in cols if c in outs}
        comparison_panel(os.path.join(a.out, fig), keep, ref, mask, lpips=lp)
    summary = summarize(rows, pi)
    result = {"slices": n, "failed": len(failed), "seconds": time.time() - t0}
    for s in summary:
        key = next((k for k in ordered if LABELS.get(k, k) == s.method), s.method)
        result[f"psnr_{key}"] = s.psnr.mean
        result[f"ssim_{key}"] = s.ssim.mean
    print(f"evaluate: wrote {paths['markdown']} and {paths['csv']} ({n} slices, {len(ordered)} methods)", flush=True)
    print(open(paths["markdown"]).read(), flush=True)
    return result


def sweep_indicators(model: DuDoCROP, cfg: OSROConfig, lp, preset: str, dataset: str) -> dict:
    """PI_q and PI_s (Eq. 18-19) per method on simulated metal sweeps (same slice, growing count / size)."""
    counts, sizes = make_sweeps(model.op, preset)
    pi: dict[tuple[str, str], dict] = {}
    for kind, sweeps in (("pi_q", counts), ("pi_s", sizes)):
        per_method: dict[str, list[torch.Tensor]] = {}
        for sw in sweeps:
            x_ma, y_ma = sw.stack("X_ma").to(model.device), sw.stack("Y_ma").to(model.device)
            mask, trace = sw.stack("metal_mask").to(model.device), sw.stack("metal_trace").to(model.device) > 0
            outs, _ = restore(model, x_ma, y_ma, mask, trace, cfg)
            for name, x in outs.items():
                per_method.setdefault(name, []).append(x.cpu())
        for name, xs in per_method.items():
            pi.setdefault((dataset, name), {"pi_q": None, "pi_s": None})[kind] = sweeps_pi(sweeps, xs, lp)
    return pi


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
