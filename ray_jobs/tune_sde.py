"""Choose the IR-SDE's λ (paper Eq. 4-6, §IV-A-2: λ = 50/255), and optionally the stage's learning rate and T, with
Ray Tune: every trial is a training run of the image-domain IR-SDE (``--domain sinogram`` for the other one).

    python ray_jobs/tune_sde.py --data outputs/train_all/data --out outputs/train_all/tune_sde \\
        --models outputs/train_all/models [--domain image] [--preset tiny] [--lambdas 15,25,35,50,75,110] \\
        [--steps 200 --interval 25] [--lr 1e-3,2e-3] [--T 50,100] [--set FIELD=VALUE] [--gpu]

Each Tune trial launches the existing trainer (``ray_jobs/train_sde.py``'s ``train_loop``, the same checkpoints
and exact resume) as a Ray Train ``TorchTrainer`` inside the trial function, Ray's Train V2 pattern for Tune: the
trainer's ``TuneReportCallback`` forwards rank 0's reports to Tune. Every ``--interval`` steps the loop validates
(val PSNR / SSIM of the prior sampled with the preset's few ``val_steps`` on ``val_slices`` val slices) and
checkpoints, and Tune's ``AsyncHyperBandScheduler`` (ASHA, time attribute ``step``) stops trials whose val PSNR
falls below the rung's cut; a stopped trial's actors end, so the next trial takes its resources.
``max_concurrent_trials`` follows the cluster: GPUs // workers with ``--gpu``, else CPUs // (workers × CPUs each
+ the trial function's 0.01), so on 2 cores one trial of one 1-CPU worker runs at a time.

Fault tolerance: a killed trial worker restarts its worker group (``--max-failures``) and resumes from the trial's
last checkpoint; a killed driver is continued by running the same command again (``Tuner.restore``: finished
trials are kept, not re-run; unfinished ones resume from their checkpoints). MLflow (``--mlflow-uri``, default
``<out>/mlflow.db``): one parent run per sweep, one child run per trial (``MLflowLoggerCallback``).

Outputs in ``--out``: ``trials.csv`` (one row per trial), ``history.csv`` (every report), ``tune_sde.json``
(summary), ``sweep.png`` (val PSNR against step per trial, the ASHA cuts marked; final PSNR against λ); with
``--models``, the chosen values are written to ``<models>/tuned_sde.json`` (``TUNED_FILE``; per domain, with the
record of how they were chosen), which ``train_sde.py --tuned`` (and ``train_all --set tune_lambda=true``) reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dudocrop.atomic import write_json, write_text  # noqa: E402
from dudocrop.sde.config import PAPER_LAMBDA_255  # noqa: E402
from dudocrop.sde.train import TRAIN_PRESETS, get_train_config, normalization_for_data, parse_overrides  # noqa: E402
from ray_jobs import common  # noqa: E402
from tune_spaces.sde import DEFAULT_LAMBDAS_255, sde_space  # noqa: E402

#: the record of the tuned training settings in a model folder: {domain: {"chosen": {...}, ...}}
TUNED_FILE = "tuned_sde.json"
#: what a trial's config may set in SDETrainConfig (lam_255 becomes lam = lam_255 / 255)
TUNED_FIELDS = ("lam", "lr", "T")
#: CPU of a trial function itself (it only waits on its TorchTrainer, whose workers hold the CPUs / GPUs)
TRIAL_CPU = 0.01
#: Tune's metric and time attribute
METRIC, TIME_ATTR = "val_psnr", "step"


def _floats(text: str | None, kind=float) -> list | None:
    if text is None or text == "":
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data folder (train split, val split, embeddings)")
    ap.add_argument("--out", required=True, help="folder for the trials' runs, tables, picture and MLflow store")
    ap.add_argument("--models", default=None, help=f"model folder to record the choice in ({TUNED_FILE})")
    ap.add_argument("--domain", choices=("image", "sinogram"), default="image")
    ap.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="tiny")
    ap.add_argument("--space", choices=("grid", "random"), default="grid")
    ap.add_argument("--lambdas", default=",".join(f"{v:g}" for v in DEFAULT_LAMBDAS_255),
                    help="λ·255 values of the grid (the paper's 50 is always added); random: their range")
    ap.add_argument("--num-samples", type=int, default=8, help="random: number of trials")
    ap.add_argument("--lr", default=None, help="comma-separated learning rates to sweep too (default: preset's)")
    ap.add_argument("--T", default=None, help="comma-separated T values to sweep too (default: preset's, 100)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per trial (default: the preset's)")
    ap.add_argument("--interval", type=int, default=None,
                    help="validate + checkpoint + report every this many steps (default: steps // 8)")
    ap.add_argument("--grace", type=int, default=None, help="ASHA grace period in steps (default: 2 intervals)")
    ap.add_argument("--reduction", type=float, default=2.0, help="ASHA reduction factor")
    ap.add_argument("--no-embeddings", action="store_true", help="plain IR-SDE (no DuDoCLIP sidecar needed)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="SDETrainConfig override")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker")
    ap.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per trial")
    ap.add_argument("--max-concurrent", type=int, default=None, help="default: follows the cluster's GPUs / CPUs")
    ap.add_argument("--mlflow-uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI or O/mlflow.db)")
    ap.add_argument("--mlflow-run-id", default=None, help="parent run to put the sweep under (train_all's child)")
    ap.add_argument("--no-write", action="store_true", help="report the best values, leave --models as is")
    ap.add_argument("--address", default=None)
    a = ap.parse_args(argv)
    try:
        a.lambdas_255 = _floats(a.lambdas)
        a.lr_values = _floats(a.lr)
        a.T_values = _floats(a.T, int)
        a.overrides = parse_overrides(a.set)
    except (ValueError, argparse.ArgumentTypeError) as e:
        ap.error(str(e))
    # --set steps / lr / T are the base the sweep's --steps / --lr / --T replace; λ and the domain are the sweep's
    bad = sorted(set(a.overrides) & {"lam", "domain"})
    if bad:
        ap.error(f"--set {bad}: these are the sweep's own options (--lambdas, --domain)")
    for name in ("workers", "num_samples"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def trial_config(a: argparse.Namespace) -> dict:
    """The SDETrainConfig overrides every trial shares: the sweep's steps, and validate / checkpoint / report every
    ``interval`` steps (so every report carries the val PSNR ASHA compares)."""
    base = get_train_config(a.preset, domain=a.domain, **a.overrides)
    steps = a.steps or base.steps
    # default: the largest divisor of the steps up to steps // 8 (a preset's 300 steps: every 30)
    interval = a.interval or next(i for i in range(max(1, steps // 8), 0, -1) if steps % i == 0)
    if steps % interval:
        raise SystemExit(f"tune_sde: --steps ({steps}) must be a multiple of --interval ({interval})")
    over = {**a.overrides, "domain": a.domain, "steps": steps, "validate_every": interval,
            "checkpoint_every": interval, "log_every": interval}
    if a.no_embeddings:
        over["use_embeddings"] = False
    if base.batch_size % a.workers:
        raise SystemExit(f"tune_sde: batch_size ({base.batch_size}) must be a multiple of --workers ({a.workers})")
    get_train_config(a.preset, **over)  # bad overrides fail here, on the driver
    return over


def _settings(config: dict) -> dict:
    """SDETrainConfig fields of one trial's sampled config."""
    out = {"lam": float(config["lam_255"]) / 255.0}
    if "lr" in config:
        out["lr"] = float(config["lr"])
    if "T" in config:
        out["T"] = int(config["T"])
    return out


#: file in a trial's Ray Train run folder naming the placement group of its worker group (ReleaseStoppedTrials)
PG_FILE = "placement_group.txt"


def _tuned_loop(config: dict) -> None:
    """``train_sde.train_loop`` that first records (rank 0) its worker group's placement group in the run folder:
    when ASHA stops the trial, Tune ends the trial actor and with it the Train controller, whose own clean-up then
    never runs; :class:`ReleaseStoppedTrials` removes the group by this id (Ray's fallback, Train's
    PlacementGroupCleaner, needs the dashboard's state API, which a local test cluster does not start)."""
    import ray

    from ray_jobs.train_sde import train_loop

    pg = ray.util.get_current_placement_group()
    if pg is not None and ray.train.get_context().get_world_rank() == 0:
        os.makedirs(config["pg_dir"], exist_ok=True)
        write_text(os.path.join(config["pg_dir"], PG_FILE), pg.id.hex())
    train_loop({k: v for k, v in config.items() if k != "pg_dir"})


def _release(run_dir: str) -> bool:
    """Remove the placement group named in ``run_dir``'s PG_FILE if it still exists; True if one was removed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    path = os.path.join(run_dir, PG_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        pg = PlacementGroup(PlacementGroupID.from_hex(f.read().strip()))
    try:
        if placement_group_table(pg).get("state") in (None, "REMOVED"):
            return False
        remove_placement_group(pg)
        return True
    except (ray.exceptions.RaySystemError, ValueError, KeyError):  # already gone
        return False


def _release_callback(storage: str):
    from ray import tune

    class ReleaseStoppedTrials(tune.Callback):
        """Give a finished, stopped or failed trial's Ray Train resources back at once (see :func:`_tuned_loop`),
        so the next trial starts."""

        released: int = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.released += _release(os.path.join(storage, f"trial_{trial.trial_id}"))

        def on_trial_error(self, iteration, trials, trial, **info):
            self.on_trial_complete(iteration, trials, trial)

    return ReleaseStoppedTrials()


def _trial(config: dict, job: dict) -> None:
    """One Tune trial: the IR-SDE trained with ``config``'s λ (lr, T) as a Ray Train run (Train V2 inside Tune),
    its reports forwarded to Tune by ``TuneReportCallback``. The run folder is named by the trial id, so a trial
    restarted after a failure or a ``Tuner.restore`` resumes from its own last checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.train_sde import check_resumable, run_identity

    cfg = get_train_config(job["preset"], **{**job["overrides"], **_settings(config)})
    # Ray Train passes this to its controller: a worker group on a loaded small node can take over the default 60 s
    # to start (its processes import torch); after such a timeout it retries, but the first try's placement group
    # may still hold the trial's CPUs
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(job.get("start_timeout_s", 600)))
    trial_id = tune.get_context().get_trial_id()
    identity = run_identity(cfg, job["data"])
    name = f"trial_{trial_id}"
    check_resumable(os.path.join(job["storage"], name), identity)
    loop_cfg = {"data": job["data"], "train": cfg.to_dict(), "identity": identity, "mlflow_uri": None,
                "pg_dir": os.path.join(job["storage"], name),
                "mlflow_run_id": None, "threads_per_worker": max(1, int(job["cpus_per_worker"])),
                **(job.get("extra_config") or {}).get(str(config["lam_255"]), {})}
    result = common.fit(_tuned_loop, loop_cfg, name=name, storage_path=job["storage"], num_workers=job["workers"],
                        use_gpu=job["gpu"], cpus_per_worker=job["cpus_per_worker"],
                        max_failures=job["max_failures"], callbacks=[TuneReportCallback()])
    if result.error is not None:
        raise RuntimeError(f"tune_sde: trial {trial_id} (λ·255 = {config['lam_255']}) failed: {result.error}")


def check_fits(a: argparse.Namespace) -> None:
    """SystemExit naming the options when one trial (its Train workers + the trial function's TRIAL_CPU) needs more
    CPUs / GPUs than the cluster has: Tune would otherwise wait for the resources forever."""
    cpus, gpus = common.cluster_cpus(), common.cluster_gpus()
    need = a.workers * (0 if a.gpu else a.cpus_per_worker) + TRIAL_CPU
    if need > cpus + 1e-9 or (a.gpu and a.workers > gpus):
        what = f"{a.workers} GPUs" if a.gpu and a.workers > gpus else f"{need:g} CPUs"
        raise SystemExit(f"tune_sde: one trial needs {what} (--workers {a.workers} x --cpus-per-worker "
                         f"{a.cpus_per_worker}{' x 1 GPU' if a.gpu else ''} + {TRIAL_CPU} for the trial function), the "
                         f"cluster has {cpus:g} CPUs / {gpus:g} GPUs: lower --workers or --cpus-per-worker")


def max_concurrent(a: argparse.Namespace) -> int:
    """Trials that fit side by side: GPUs // workers with ``--gpu``, else CPUs // (workers × CPUs per worker)."""
    if a.max_concurrent:
        return a.max_concurrent
    if a.gpu:
        return max(1, int(common.cluster_gpus() // a.workers))
    # each trial also holds TRIAL_CPU for its waiting trial function
    return max(1, int(common.cluster_cpus() // (a.workers * a.cpus_per_worker + TRIAL_CPU)))


def _mlflow_parent(a: argparse.Namespace, out: str, uri: str) -> str:
    """The sweep's parent MLflow run (kept in ``<out>/mlflow_run.json``, so a restored sweep logs under the same
    one), itself a child of ``--mlflow-run-id`` when given (train_all's stage run)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    id_file = os.path.join(out, "mlflow_run.json")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = json.load(f).get("run_id")
        try:
            client.get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 - the store lost it: a new parent
            pass
    exp = client.get_experiment_by_name("dudocrop")
    exp_id = exp.experiment_id if exp else client.create_experiment("dudocrop")
    tags = {"dudocrop.sweep": f"tune_sde-{a.domain}"}
    if a.mlflow_run_id:
        tags["mlflow.parentRunId"] = a.mlflow_run_id
    run = client.create_run(exp_id, run_name=f"tune_sde-{a.domain}", tags=tags)
    for k in ("domain", "preset", "space", "lambdas", "lr", "T", "steps", "interval", "reduction", "workers"):
        client.log_param(run.info.run_id, k, str(getattr(a, k)))
    write_json(id_file, {"run_id": run.info.run_id, "tracking_uri": common.redact_uri(uri)})
    return run.info.run_id


def _fingerprint(a: argparse.Namespace, over: dict) -> dict:
    """What a restored sweep must share with the interrupted one (another space or data is another sweep)."""
    return json.loads(json.dumps({"data": os.path.abspath(a.data), "domain": a.domain, "preset": a.preset,
                                  "space": a.space, "lambdas": a.lambdas_255, "lr": a.lr_values, "T": a.T_values,
                                  "num_samples": a.num_samples, "overrides": over, "reduction": a.reduction,
                                  "grace": a.grace}, default=str))


def run(a: argparse.Namespace, extra_config: dict | None = None) -> dict:
    """Run (or continue) the sweep and write its tables, picture and record; returns the summary dict.
    ``extra_config``: {str(λ·255): loop-config keys} for one trial (the fault-injection tests)."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import AsyncHyperBandScheduler

    over = trial_config(a)
    data = os.path.abspath(a.data)
    normalization_for_data(data)  # a folder without a manifest fails here, naming it
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    uri = a.mlflow_uri or common.mlflow_uri(out)
    common.init_ray(a.address)
    check_fits(a)
    space = sde_space(a.space, a.lambdas_255, a.lr_values, a.T_values)
    steps, interval = over["steps"], over["validate_every"]
    fp = _fingerprint(a, over)
    fp_file = os.path.join(out, "sweep.json")
    exp_path = os.path.join(out, "tune", f"sde_{a.domain}")
    restoring = tune.Tuner.can_restore(exp_path)
    if restoring:
        with open(fp_file) as f:
            old = json.load(f)
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise SystemExit(f"tune_sde: {exp_path} holds a sweep with other settings ({', '.join(diff)}); use "
                             "another --out or remove that folder")
    else:
        write_json(fp_file, fp)
    parent = _mlflow_parent(a, out, uri)
    job = {"data": data, "preset": a.preset, "overrides": over, "storage": os.path.join(out, "ray_train"),
           "workers": a.workers, "gpu": a.gpu, "cpus_per_worker": a.cpus_per_worker,
           "max_failures": a.max_failures, "extra_config": extra_config or {}}
    # Train V2 in Tune: the trial function only waits on its TorchTrainer, whose workers hold the CPUs / GPUs
    trainable = tune.with_resources(tune.with_parameters(_trial, job=job), {"cpu": TRIAL_CPU})
    concurrent = max_concurrent(a)
    t0 = time.time()
    if restoring:
        print(f"tune_sde: continuing the interrupted sweep in {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        # max_t one past the last step: a trial that reaches it ends on its own (its Train run cleans up), ASHA
        # stops only the weak ones at the rungs grace · reduction^k
        scheduler = AsyncHyperBandScheduler(time_attr=TIME_ATTR, max_t=steps + 1, grace_period=a.grace or 2 * interval,
                                            reduction_factor=a.reduction)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                        num_samples=1 if a.space == "grid" else a.num_samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(
                name=f"sde_{a.domain}", storage_path=os.path.join(out, "tune"), verbose=0,
                failure_config=tune.FailureConfig(max_failures=a.max_failures),
                # Tune stores its callbacks: a URI with credentials stays out (MLflow then reads
                # MLFLOW_TRACKING_URI, which common.storable_uri sets)
                callbacks=[_release_callback(job["storage"]),
                           MLflowLoggerCallback(tracking_uri=uri if common.storable_uri(uri) == uri else None,
                                                experiment_name="dudocrop",
                                                tags={"mlflow.parentRunId": parent,
                                                      "dudocrop.sweep": f"tune_sde-{a.domain}"})]))
    results = tuner.fit()
    seconds = time.time() - t0
    # an interrupted fit (Ctrl-C) returns too: its unfinished trials are neither done nor stopped by ASHA
    unfinished = [t.trial_id for t in results._experiment_analysis.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SystemExit(f"tune_sde: the sweep was interrupted with {len(unfinished)} trials unfinished; run the same "
                         f"command again to continue it ({exp_path})")
    return summarise(a, results, out, steps, interval, seconds, parent, uri, restored=restoring,
                     concurrent=concurrent)


def _trial_rows(results, steps: int) -> tuple[list[dict], list[dict]]:
    """(one row per trial, one row per report) from a ResultGrid."""
    trials, history = [], []
    for r in results:
        cfg = r.config or {}
        tid = (r.metrics or {}).get("trial_id") or os.path.basename(r.path)
        df = r.metrics_dataframe
        rep = [] if df is None or METRIC not in df else df[[TIME_ATTR, METRIC] + [
            c for c in ("val_ssim", "val_psnr_input", "resumed_from") if c in df]].dropna(subset=[METRIC]).to_dict(
            "records")
        for h in rep:
            history.append({"trial_id": tid, "lam_255": cfg.get("lam_255"), "lr": cfg.get("lr"), "T": cfg.get("T"),
                            "step": int(h[TIME_ATTR]), "val_psnr": float(h[METRIC]),
                            "val_ssim": float(h.get("val_ssim", math.nan)),
                            "val_psnr_input": float(h.get("val_psnr_input", math.nan)),
                            "resumed_from": int(h.get("resumed_from", 0))})
        last = rep[-1] if rep else {}
        reached = int(last.get(TIME_ATTR, 0))
        trials.append({"trial_id": tid, "lam_255": cfg.get("lam_255"), "lr": cfg.get("lr"), "T": cfg.get("T"),
                       "steps": reached, "val_psnr": float(last.get(METRIC, math.nan)),
                       "val_ssim": float(last.get("val_ssim", math.nan)),
                       "val_psnr_input": float(last.get("val_psnr_input", math.nan)),  # X_ma (train_sde.validate)
                       "stopped_early": r.error is None and reached < steps,
                       "error": None if r.error is None else str(r.error)[:300]})
    return trials, history


def _is_paper(t: dict) -> bool:
    return t["lam_255"] is not None and abs(float(t["lam_255"]) - PAPER_LAMBDA_255) < 1e-9


def summarise(a, results, out: str, steps: int, interval: int, seconds: float, parent: str, uri: str,
              restored: bool = False, concurrent: int | None = None) -> dict:
    """Tables, picture, record and summary of a finished sweep. The choice: the best final val PSNR among the
    trials that ran all ``steps`` (a trial ASHA stopped was measured earlier in training; it is listed, not
    chosen)."""
    import pandas as pd

    from dudocrop.eval.sweep_plots import plot_sde_sweep

    trials, history = _trial_rows(results, steps)
    errors = [t for t in trials if t["error"]]
    if errors:
        raise RuntimeError(f"tune_sde: {len(errors)} trials failed; first: {errors[0]['error']}")
    full = [t for t in trials if not t["stopped_early"] and math.isfinite(t["val_psnr"])]
    if not full:
        raise RuntimeError("tune_sde: no trial ran all its steps with a finite val PSNR")
    best = max(full, key=lambda t: t["val_psnr"])
    paper = next((t for t in trials if _is_paper(t) and t.get("lr") == best.get("lr")
                  and t.get("T") == best.get("T")), None)
    write_text(os.path.join(out, "trials.csv"), pd.DataFrame(trials).sort_values(
        "val_psnr", ascending=False).to_csv(index=False))
    write_text(os.path.join(out, "history.csv"), pd.DataFrame(history).to_csv(index=False))
    picture = plot_sde_sweep(os.path.join(out, "sweep.png"), history, trials, steps, best, a.domain)
    chosen = {k: v for k, v in _settings({k: best[k] for k in ("lam_255", "lr", "T") if best[k] is not None}
                                         ).items()}
    record = {"domain": a.domain, "preset": a.preset, "space": a.space, "steps": steps, "interval": interval,
              "chosen": chosen, "lam_255": float(best["lam_255"]), "val_psnr": best["val_psnr"],
              "val_ssim": best["val_ssim"], "trials": len(trials),
              "stopped_early": sum(t["stopped_early"] for t in trials),
              "paper": None if paper is None else {k: paper[k] for k in ("lam_255", "steps", "val_psnr", "val_ssim",
                                                                          "stopped_early")},
              "seconds": round(seconds, 1), "restored": restored, "max_concurrent_trials": concurrent,
              "mlflow_parent_run_id": parent, "tracking_uri": common.redact_uri(uri), "picture": picture}
    write_json(os.path.join(out, "tune_sde.json"), record)
    if a.models and not a.no_write:
        record_choice(a.models, record)
    import mlflow

    client = mlflow.MlflowClient(uri)
    for k in ("lam_255", "val_psnr", "val_ssim", "trials", "stopped_early", "seconds"):
        client.log_metric(parent, f"best_{k}" if k in ("lam_255", "val_psnr", "val_ssim") else k, float(record[k]))
    client.log_artifact(parent, picture)
    client.set_terminated(parent)
    p = record["paper"]
    print(f"tune_sde: {len(trials)} trials ({record['stopped_early']} stopped early by ASHA) in {seconds:.1f}s; "
          f"best λ·255 = {record['lam_255']:g}: val PSNR {best['val_psnr']:.2f} dB"
          + ("" if p is None else f" (paper's 50: {p['val_psnr']:.2f} dB at step {p['steps']}"
             + (", stopped early)" if p["stopped_early"] else ")"))
          + ("" if not a.models or a.no_write else f"; written to {os.path.join(a.models, TUNED_FILE)}"), flush=True)
    return {**record, "trials_table": trials}


def record_choice(models: str, record: dict) -> str:
    """Write a domain's chosen settings into ``<models>/tuned_sde.json`` (atomically, other domains kept)."""
    path = os.path.join(models, TUNED_FILE)
    os.makedirs(models, exist_ok=True)
    current = {}
    if os.path.isfile(path):
        with open(path) as f:
            current = json.load(f)
    current[record["domain"]] = record
    write_json(path, current)
    return path


def tuned_overrides(path: str, domain: str) -> dict:
    """The SDETrainConfig fields ``tune_sde`` chose for ``domain`` (``{}`` when the record has no such domain);
    ValueError naming the file when it is unreadable or not a record."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tuned {path}: cannot read the tune_sde record: {e}") from e
    if not isinstance(rec, dict) or any(not isinstance(v, dict) or "chosen" not in v for v in rec.values()):
        raise ValueError(f"--tuned {path}: not a tune_sde record ({{domain: {{'chosen': ...}}}})")
    chosen = rec.get(domain, {}).get("chosen", {})
    bad = sorted(set(chosen) - set(TUNED_FIELDS))
    if bad:
        raise ValueError(f"--tuned {path}: unknown fields {bad} for domain {domain!r}")
    return dict(chosen)


def run_args(a: argparse.Namespace) -> dict:
    return run(a)


def main(argv=None) -> int:
    s = run(parse_args(argv))
    print("tune_sde: " + json.dumps({k: v for k, v in s.items() if k != "trials_table"}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
