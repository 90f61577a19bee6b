"""The speed/quality curve of the reverse sampler: val PSNR / SSIM of DuDoCROP's output X_o (Eq. 15) and seconds
per slice for 1, 2, 3, 5, 10, 25, 50, 100 reverse steps, so a user picks the point they need.

    python ray_jobs/steps_sweep.py --data outputs/train_all/data --models outputs/train_all/models \\
        --out outputs/train_all/steps [--split val] [--max-slices 8] [--steps 1,2,3,5,10,25,50,100]

For every setting the three IR-SDE priors (Eq. 10-12, 16) are sampled again with that many steps
(``dudocrop.eval.fusion.FusionCache``, the same sampling ``tune_fusion`` does) and fused (Eq. 13-15) twice: with the
factors k, α, β in ``pipeline.json`` (``psnr``, ``ssim``: what the served model gives at that setting) and with the
factors re-chosen on these priors from a 5-point grid (``psnr_refit``: how much re-tuning the factors would add).
``seconds_per_slice`` is the wall time of the sampling divided by the slices (this machine, ``--gpu`` or not);
``cpu_seconds_per_slice`` is the process's CPU time over the same span (``time.process_time``), which other
processes on a shared host do not inflate the way they inflate wall time. On the CPU the sweep runs torch on
``--threads`` threads (default 1), so that CPU time is the work itself, not idle threads spinning.

Writes ``<models>/steps.json`` (``STEPS_FILE``, the table the Serve app can quote: ``{"split", "slices",
"device", "threads", "rows": [{"steps", "psnr", "ssim", "psnr_refit", "seconds_per_slice",
"cpu_seconds_per_slice"}, ...]}``), ``<out>/steps.csv``
and ``<out>/steps.png``. Settings above the models' T are left out (the sampler has at most T steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dudocrop.atomic import write_json, write_text  # noqa: E402

#: the table of the speed/quality curve in a model folder
STEPS_FILE = "steps.json"
#: the settings the issue asks for (1 .. the paper's T = 100)
DEFAULT_STEPS = (1, 2, 3, 5, 10, 25, 50, 100)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", required=True, help=f"model folder (its {STEPS_FILE} is written)")
    ap.add_argument("--out", required=True, help="folder for steps.csv and steps.png")
    ap.add_argument("--split", default="val", help="held-out split (not the one you report)")
    ap.add_argument("--max-slices", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="comma-separated step counts")
    ap.add_argument("--no-write", action="store_true", help=f"leave <models>/{STEPS_FILE} as is")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU time is then the work itself)")
    a = ap.parse_args(argv)
    try:
        a.step_list = sorted({int(s) for s in a.steps.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--steps must be comma-separated integers, got {a.steps!r}")
    if not a.step_list or a.step_list[0] < 1:
        ap.error(f"--steps must hold integers >= 1, got {a.steps!r}")
    if a.max_slices < 1:
        ap.error("--max-slices must be >= 1")
    if a.threads < 1:
        ap.error("--threads must be >= 1")
    return a


def run(a: argparse.Namespace) -> dict:

    from dudocrop.eval.sweep_plots import plot_steps_sweep
    from dudocrop.pipeline.model import PIPELINE_FILE, DuDoCROP, pipeline_config_from_dict
    from ray_jobs.tune_fusion import build_cache
    from tune_spaces.fusion import FACTORS, grid_candidates

    meta_path = os.path.join(a.models, PIPELINE_FILE)
    if not os.path.isfile(meta_path):
        raise SystemExit(f"steps_sweep: {meta_path} is missing: run ray_jobs/priors.py and tune_fusion.py first")
    with open(meta_path) as f:
        stored = pipeline_config_from_dict(json.load(f).get("pipeline", {}))
    base = replace(stored.osro, normalize=True, fidelity=True, residual_refine=True, fusion=True)
    grid = grid_candidates(5)
    device = "cuda" if a.gpu else "cpu"
    if not a.gpu:
        import torch

        torch.set_num_threads(a.threads)
    cache_args = argparse.Namespace(data=a.data, split=a.split, max_slices=a.max_slices, batch_size=a.batch_size)
    rows = []
    T = None
    for steps in a.step_list:
        model = DuDoCROP.load(a.models, device=device, steps=None)
        T = T or min(m.sde.config.T for m in model.models.values() if m is not None)
        if steps > T:
            print(f"steps_sweep: {steps} steps > T = {T}: left out", flush=True)
            continue
        model = DuDoCROP.load(a.models, device=device, steps=steps)
        t0, c0 = time.perf_counter(), time.process_time()
        cache = build_cache(cache_args, model)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = cache.score(base)
        _, refit = cache.best(base, grid)
        rows.append({"steps": steps, "psnr": m["psnr"], "ssim": m["ssim"], "psnr_refit": refit["psnr"],
                     "seconds_per_slice": dt / len(cache.case_ids), "cpu_seconds_per_slice": cpu / len(cache.case_ids)})
        print(f"steps_sweep: {steps:3d} steps: PSNR {m['psnr']:.2f} dB (factors re-chosen {refit['psnr']:.2f}), SSIM "
              f"{m['ssim']:.4f}, {rows[-1]['seconds_per_slice']:.3f} s/slice (CPU "
              f"{rows[-1]['cpu_seconds_per_slice']:.3f} s)", flush=True)
    if not rows:
        raise SystemExit(f"steps_sweep: no setting of --steps {a.steps} is within the models' T = {T}")
    os.makedirs(a.out, exist_ok=True)
    table = {"split": a.split, "slices": len(cache.case_ids), "device": device, "threads": None if a.gpu else a.threads,
             "factors": {f: getattr(base, f) for f in FACTORS}, "rows": rows}
    header = list(rows[0])
    write_text(os.path.join(a.out, "steps.csv"), "\n".join([",".join(header)] + [
        ",".join(f"{r[h]:.6g}" for h in header) for r in rows]) + "\n")
    table["picture"] = plot_steps_sweep(os.path.join(a.out, "steps.png"), rows)
    write_json(os.path.join(a.out, STEPS_FILE), table)
    if not a.no_write:
        write_json(os.path.join(a.models, STEPS_FILE), table)
    return table


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
