"""Evidence for the Ray Tune sweeps (issue 23): the λ sweep with ASHA, its restore after a killed driver, and the
three pictures (λ sweep, fusion surface, steps sweep).

    python bench/tune.py --json --data D --out O [--models M] [--lambdas 15,25,35,50,75,110] [--steps 100]
        [--interval 25] [--grace 50] [--no-restore]

* λ sweep: ``ray_jobs/tune_sde.py`` on ``D`` (image domain, plain IR-SDE unless D has an embeddings sidecar and
  ``--embeddings``), ≥ 6 λ values with ASHA, one Ray Train worker per trial, trials side by side as the CPUs allow;
  reports trials run, trials ASHA stopped, wall time, the best λ and its val PSNR against the paper's 50/255 from
  the same sweep.
* restore: the same sweep (2 λ + the paper's, short) run as a separate driver process on this Ray cluster, killed
  (SIGKILL) once two trials have finished, then continued with ``Tuner.restore``; passes when the two finished
  trials' results are unchanged (not re-run) and every trial ends with all its steps.
* with ``--models M`` (a trained model folder with pipeline.json): ``tune_fusion`` (grid) and ``steps_sweep`` on
  M's val split, for the fusion surface and the steps picture.

Prints one JSON object (``--json``) with every number and the paths of the pictures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dudocrop.config import RUN_PRESETS  # noqa: E402

#: the trials' training settings: the tiny run preset's image-domain recipe (x0 output, standardised inputs, x0 loss
#: on the body; its step count replaced by --steps) but starting from X_ma, the paper's μ (Eq. 12), instead of
#: NMAR, and validation on the tiny data's 4 val slices with 4 sampler steps. From NMAR a short trial says nothing
#: about λ: its first 200 steps only lose PSNR (bench/tune_length.py; docs/sweeps.md).
TRIAL_SET: tuple[str, ...] = (*(s for s in RUN_PRESETS["tiny"].image_set
                                if not s.startswith(("steps=", "validate_every=", "image_mu="))),
                              "image_mu=ma", "val_slices=4", "val_steps=4")


class LoadWatch:
    """The host's 1-minute load average sampled every ``every`` seconds in a thread (the machine may be shared:
    wall times mean little without it)."""

    def __init__(self, every: float = 10.0):
        import threading

        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        s = self.samples + [os.getloadavg()[0]]
        return {"load_avg_1min_mean": round(sum(s) / len(s), 2), "load_avg_1min_min": min(s),
                "load_avg_1min_max": max(s), "samples": len(s), "host_cpus": os.cpu_count()}


def _sweep_argv(a, out: str, lambdas: str, steps: int, interval: int, models: str | None) -> list[str]:
    argv = ["--data", a.data, "--out", out, "--lambdas", lambdas, "--steps", str(steps), "--interval",
            str(interval), "--workers", "1", "--cpus-per-worker", str(a.cpus_per_worker),
            *[w for s in a.set for w in ("--set", s)]]
    if not a.embeddings:
        argv.append("--no-embeddings")
    if models:
        argv += ["--models", models]
    if a.max_concurrent:
        argv += ["--max-concurrent", str(a.max_concurrent)]
    return argv


def _finished(exp: str, steps: int) -> dict[str, str]:
    """{trial folder: result.json text} of the trials in ``exp`` that reported their last step."""
    out = {}
    for d in sorted(os.listdir(exp)) if os.path.isdir(exp) else []:
        f = os.path.join(exp, d, "result.json")
        if os.path.isfile(f):
            text = open(f).read()
            if any(json.loads(x).get("step") == steps for x in text.splitlines() if x.strip()):
                out[d] = text
    return out


def restore_check(a, out: str) -> dict:
    """Kill the sweep's driver after two finished trials, restore, check the finished ones were not re-run."""
    import ray

    from ray_jobs import tune_sde

    steps, interval = a.restore_steps, a.restore_steps // 2
    argv = _sweep_argv(a, out, "25,75", steps, interval, None) + ["--grace", str(steps), "--max-concurrent", "1"]
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ray_jobs", "tune_sde.py"), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    exp = os.path.join(out, "tune", "sde_image")
    while len(_finished(exp, steps)) < 2 and proc.poll() is None and time.time() - t0 < a.restore_timeout:
        time.sleep(2)
    if proc.poll() is not None:
        return {"passed": False, "why": f"the driver ended (rc {proc.returncode}) before two trials finished"}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished(exp, steps)
    killed_after = time.time() - t0
    s = tune_sde.run(tune_sde.parse_args(argv))
    unchanged = all(open(os.path.join(exp, d, "result.json")).read() == text for d, text in before.items())
    complete = all(t["steps"] == steps for t in s["trials_table"])
    return {"passed": bool(s["restored"] and len(before) == 2 and unchanged and complete and s["trials"] == 3),
            "finished_before_kill": len(before), "finished_trials_unchanged": unchanged,
            "all_trials_complete_after_restore": complete, "trials": s["trials"], "killed_after_s": round(killed_after),
            "restore_seconds": s["seconds"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data (train + val splits)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=None, help="trained model folder: also the fusion and steps pictures")
    ap.add_argument("--lambdas", default="15,25,35,50,75,110")
    # 100 steps: from X_ma the tiny image IR-SDE gains 1.4 dB on val by step 50 and 5.1 dB by step 100 (λ·255 = 50,
    # bench/tune_length.py); ASHA's first cut at step 50, where the trials have started to differ
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--interval", type=int, default=25)
    ap.add_argument("--grace", type=int, default=50, help="ASHA grace period (steps)")
    ap.add_argument("--set", action="append", default=list(TRIAL_SET))
    ap.add_argument("--embeddings", action="store_true", help="train the guided IR-SDE (needs the sidecar)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--max-concurrent", type=int, default=None)
    ap.add_argument("--no-restore", action="store_true")
    ap.add_argument("--restore-steps", type=int, default=20)
    ap.add_argument("--restore-timeout", type=float, default=1500)
    ap.add_argument("--max-slices", type=int, default=8, help="fusion / steps sweep: val slices")
    ap.add_argument("--fusion-steps", type=int, default=None, help="tune_fusion's sampler steps (default: models')")
    ap.add_argument("--sweep-steps", default="1,2,3,5,10,25,50,100", help="steps_sweep's settings")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    from ray_jobs import common, tune_sde

    common.init_ray(None)
    out = os.path.abspath(a.out)
    res: dict = {"data": a.data, "cpus": common.cluster_cpus()}
    sweep_models = os.path.join(out, "tuned")  # the bench records its choice here, not in a real model folder
    watch = LoadWatch()
    s = tune_sde.run(tune_sde.parse_args(_sweep_argv(a, os.path.join(out, "lambda"), a.lambdas, a.steps,
                                                     a.interval, sweep_models) + ["--grace", str(a.grace)]))
    res["lambda_sweep"] = {k: s[k] for k in ("trials", "stopped_early", "seconds", "lam_255", "val_psnr", "val_ssim",
                                             "paper", "max_concurrent_trials", "steps", "interval", "picture")}
    res["lambda_sweep"].update(grace=a.grace, settings=a.set, host_load=watch.stop())
    res["lambda_sweep"]["trials_table"] = [{k: t[k] for k in ("lam_255", "steps", "val_psnr", "val_psnr_input",
                                                               "stopped_early")}
                                           for t in s["trials_table"]]
    from dudocrop.atomic import write_json

    write_json(os.path.join(out, "bench.json"), res, default=str)  # each part as it ends
    if not a.no_restore:
        res["restore"] = restore_check(a, os.path.join(out, "restore"))
        write_json(os.path.join(out, "bench.json"), res, default=str)
    if a.models:
        from ray_jobs import steps_sweep, tune_fusion

        fusion = ["--data", a.data, "--models", a.models, "--out", os.path.join(out, "fusion"), "--max-slices",
                  str(a.max_slices), "--no-write"]
        fusion += [] if a.fusion_steps is None else ["--steps", str(a.fusion_steps)]
        f = tune_fusion.run(tune_fusion.parse_args(fusion))
        res["fusion"] = {k: f[k] for k in ("trials", "psnr", "untuned_psnr", "k", "alpha", "beta")}
        res["fusion"]["picture"] = os.path.join(out, "fusion", "surface.png")
        write_json(os.path.join(out, "bench.json"), res, default=str)
        res["steps"] = steps_sweep.run(steps_sweep.parse_args([
            "--data", a.data, "--models", a.models, "--out", os.path.join(out, "steps"), "--max-slices",
            str(a.max_slices), "--steps", a.sweep_steps, "--no-write"]))
        write_json(os.path.join(out, "bench.json"), res, default=str)
    print(json.dumps(res, indent=1 if not a.json else None, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
