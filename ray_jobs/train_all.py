"""Train DuDoCROP end to end (paper Algorithm 1, Eq. 17) and evaluate it.

    python ray_jobs/train_all.py                                   # embedded default: tiny preset, local Ray
    python ray_jobs/train_all.py --preset small --out outputs/small
    ray job submit --working-dir . -- python ray_jobs/train_all.py --preset paper --set root=/mnt/ct-mar \\
        --out s3://bucket/dudocrop-paper       # or a shared folder (NFS)

Stages: prepare (shards) -> caption -> clip (stage 1, Eq. 3) -> embed -> [tune_lambda: λ of Eq. 4-6 chosen with Ray
Tune, ``--set tune_lambda=true``] -> sde_image, sde_sinogram (stage 2, Eq. 9;
independent, concurrent when the cluster has room) -> priors (X_p, X'_p over the training split, Eq. 10-12) ->
sde_residual (stage 3, Eq. 16) -> fusion (k, α, β of Eq. 13-15 chosen with Ray Tune on the val split) -> evaluate
(Tables III-V, figures). Each stage is skipped when its marker
``<out>/stages/<stage>.json`` records the same arguments and is newer than the markers of the stages it reads
(``DEPS``), so a re-run resumes where the last one stopped and redoes what a changed stage invalidated; inside a
stage, training resumes from its latest Ray Train checkpoint. One MLflow parent run holds a child run per stage.
With ``--out s3://...`` the shards and Ray's checkpoints live on the URI and the driver's files in a local mirror
pushed after every stage (:mod:`dudocrop.storage`), so a re-run anywhere resumes from the bucket.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, fields

from dudocrop.atomic import write_json
from dudocrop.checks import parse_assignments
from dudocrop.config import RUN_PRESETS, RunPreset, get_run_preset
from dudocrop.lock import folder_lock
from dudocrop.storage import Mirror, is_remote, remote_path
from ray_jobs import common

STAGES = ("prepare", "caption", "clip", "embed", "tune_lambda", "sde_image", "sde_sinogram", "priors", "sde_residual",
          "sde_image_plain", "sde_sinogram_plain", "fusion", "evaluate")
#: what each stage reads: a stage whose input stage finished after it is stale and runs again (as make does).
DEPS = {"caption": ("prepare",), "clip": ("caption",), "embed": ("clip",), "tune_lambda": ("embed",),
        "sde_image": ("embed", "tune_lambda"), "sde_sinogram": ("embed", "tune_lambda"),
        "priors": ("sde_image", "sde_sinogram"), "sde_residual": ("priors",),
        "sde_image_plain": ("prepare",), "sde_sinogram_plain": ("prepare",), "fusion": ("sde_residual",),
        "evaluate": ("fusion", "sde_image_plain", "sde_sinogram_plain")}
#: stages a preset may leave out (the "+ DuDoCLIP" ablation models, RunPreset.guidance_ablation; the λ sweep,
#: RunPreset.tune_lambda).
OPTIONAL = ("sde_image_plain", "sde_sinogram_plain", "tune_lambda")
#: the model files the parent MLflow run logs under ``models/`` (so ``DuDoCROP.load("runs:/<id>/models")`` works).
MODEL_ARTIFACTS = ("dudoclip.pt", "sde_image.pt", "sde_sinogram.pt", "sde_residual.pt", "pipeline.json",
                   "tuned_sde.json")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(RUN_PRESETS))
    ap.add_argument("--out", default="outputs/train_all", help="output folder (shared storage on a cluster)")
    ap.add_argument("--config", help="JSON file of RunPreset fields overriding the preset")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override one RunPreset field (Python literal, JSON or plain string); repeatable")
    ap.add_argument("--root", help="data root for --set source=aapm|clinical")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--force", default="", help="comma-separated stages to re-run even if complete")
    ap.add_argument("--address", default=None, help="Ray address (default: join a running cluster, else local)")
    return ap.parse_args(argv)


def resolve_preset(a: argparse.Namespace) -> RunPreset:
    overrides: dict = {}
    if a.config:
        with open(a.config) as f:
            overrides.update(json.load(f))
    try:
        overrides.update(parse_assignments(a.set))
    except ValueError as e:
        raise SystemExit(f"train_all: {e}") from e
    tuples = {f.name for f in fields(RunPreset) if "tuple" in str(f.type)}
    for k in tuples & set(overrides):
        overrides[k] = tuple(overrides[k]) if isinstance(overrides[k], list | tuple) else (overrides[k],)
    try:
        return get_run_preset(a.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"train_all: bad preset override: {e}") from e


# ---- the stages' command lines ----------------------------------------------------------------------------------


def stage_argv(p: RunPreset, out: str, root: str | None, data: str | None = None) -> dict[str, list[str]]:
    """The exact argument list each stage job gets (its fingerprint decides whether it must run again). With
    ``p.gpu`` every stage that runs a model gets the GPU: the trainers, the caption VLM, embed, priors, fusion and
    evaluate. ``data`` (default ``<out>/data``) may be a URI. A preset that still lacks a user-given field
    (``RunPreset.missing``) raises ValueError naming it."""
    need = p.missing()
    if need:
        raise ValueError(f"preset {p.name!r} needs " + "; ".join(need) + " (--set FIELD=VALUE)")
    data, models = data or f"{out}/data", f"{out}/models"
    gpu = ["--gpu"] if p.gpu else []
    res = ["--workers", str(p.workers), "--cpus-per-worker", str(p.cpus_per_worker),
           "--max-failures", str(p.max_failures), *gpu]
    sets = lambda items: [x for s in items for x in ("--set", s)]  # noqa: E731
    prep = ["--source", p.source, "--geometry", p.geometry, "--out", data, "--n-patients", str(p.n_patients),
            "--slices-per-patient", str(p.slices_per_patient), "--shard-slices", str(p.shard_slices),
            "--simulation", p.simulation]
    prep += ["--phantom", p.phantom] if p.source == "synthetic" and p.phantom != "ellipse" else []
    prep += ["--clinical-references"] if p.source == "clinical" and p.clinical_references else []
    if root:
        prep += ["--root", root]
    if p.source == "aapm":
        prep += ["--anatomy", p.anatomy]
        prep += ["--patient-regex", p.patient_regex] if p.patient_regex is not None else []
        prep += ["--test-split", p.test_split] if p.test_split else []
    caption = ["--data", data, "--engine", p.caption_engine]
    if p.caption_engine != "template":
        caption += ["--model", p.caption_model] + (["--gpus-per-actor", "1"] if p.gpu else [])
        caption += ["--device", "cuda"] if p.gpu and p.caption_engine == "transformers" else []
    sde = ["--data", data, "--out", models, "--preset", p.sde_preset, *res]
    plain = ["--data", data, "--out", f"{out}/models_plain", "--preset", p.sde_preset, "--no-embeddings", *res]
    tuned = ["--tuned", f"{models}/tuned_sde.json"] if p.tune_lambda else []  # λ chosen by the tune_lambda stage
    argv = {
        "prepare": prep,
        "caption": caption,
        "clip": ["--data", data, "--out", models, "--preset", p.clip_preset, "--storage", f"{models}/ray_train",
                 *res, *sets(p.clip_set)],
        "embed": ["--data", data, "--model", f"{models}/dudoclip.pt", *gpu],
        # one Train worker per trial on CPUs (the global batch is the same; trials go side by side as CPUs allow):
        # a trial of p.workers 1-CPU workers + its trial function would not fit a p.workers-CPU node at all
        "tune_lambda": ["--data", data, "--out", f"{out}/tune_sde", "--models", models, "--preset", p.sde_preset,
                        "--domain", "image", *(res if p.gpu else ["--workers", "1", *res[2:]]), *sets(p.image_set)]
                       + ([] if p.tune_lambda_steps is None else ["--steps", str(p.tune_lambda_steps)]),
        "sde_image": [*sde, "--domain", "image", *sets(p.image_set), *tuned],
        "sde_sinogram": [*sde, "--domain", "sinogram", *sets(p.sinogram_set), *tuned],
        "priors": ["--data", data, "--models", models, "--split", "train,val", *sets(p.pipeline_set), *gpu]
                  + ([] if p.eval_steps is None else ["--steps", str(p.eval_steps)]),
        "sde_residual": [*sde, "--domain", "residual", *sets(p.residual_set)],
        "sde_image_plain": [*plain, "--domain", "image", *sets(p.image_set)],
        "sde_sinogram_plain": [*plain, "--domain", "sinogram", *sets(p.sinogram_set)],
        "fusion": ["--data", data, "--models", models, "--out", f"{out}/fusion", "--split", p.fusion_split,
                   "--max-slices", str(p.eval_slices), "--points", str(p.fusion_points), *gpu]
                  + ([] if p.eval_steps is None else ["--steps", str(p.eval_steps)]),
        "evaluate": ["--data", data, "--models", models, "--out", f"{out}/report", "--split", p.eval_split,
                     "--max-slices", str(p.eval_slices), "--sweeps", p.sweeps, *gpu]
                    + ([] if p.eval_steps is None else ["--steps", str(p.eval_steps)])
                    + (["--baseline-models", f"{out}/models_plain"] if p.guidance_ablation else [])
                    + (["--about", p.about] if p.about else []),
    }
    return argv


def _job(stage: str):
    import importlib

    name = {"prepare": "prepare_data", "caption": "caption", "clip": "train_clip", "embed": "embed",
            "tune_lambda": "tune_sde",
            "sde_image": "train_sde", "sde_sinogram": "train_sde", "priors": "priors",
            "sde_residual": "train_sde", "sde_image_plain": "train_sde", "sde_sinogram_plain": "train_sde",
            "fusion": "tune_fusion", "evaluate": "evaluate"}[stage]
    return importlib.import_module(f"ray_jobs.{name}")


def _fingerprint(argv: list[str]) -> str:
    return hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:16]


def _marker(out: str, stage: str) -> str:
    return os.path.join(out, "stages", f"{stage}.json")


def _done(out: str, stage: str, fp: str) -> bool:
    """The stage's marker records these arguments and is newer than the markers of the stages it reads."""
    try:
        with open(_marker(out, stage)) as f:
            if json.load(f).get("fingerprint") != fp:
                return False
        mine = os.path.getmtime(_marker(out, stage))
    except (OSError, ValueError):
        return False
    ups = [_marker(out, d) for d in DEPS.get(stage, ())]
    return all(os.path.getmtime(u) <= mine for u in ups if os.path.exists(u))


def _write_marker(out: str, stage: str, record: dict) -> None:
    write_json(_marker(out, stage), record, default=str)


def _invalidate(out: str, stage: str, mirror: Mirror | None = None) -> None:
    """A completed stage that must run again (its inputs or arguments changed, or --force): drop its marker and its
    Ray Train checkpoints, which belong to the old inputs. The marker goes first, so a run interrupted from here on
    resumes the new training instead of deleting it again."""
    marker = _marker(out, stage)
    if not os.path.exists(marker):
        return
    try:
        with open(marker) as f:
            result = json.load(f).get("result") or {}
    except ValueError:  # a damaged marker names no run folder
        result = {}
    os.remove(marker)
    if mirror is not None:
        mirror.push()  # the marker's removal reaches the bucket before the run's checkpoints go
        if result.get("run_dir_rel"):
            mirror.delete_remote(result["run_dir_rel"])
        return
    run_dir = _own_run_dir(out, result)
    if run_dir and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)


def _inside(out: str, path: str) -> bool:
    """``path`` lies strictly inside the folder ``out`` (symbolic links resolved)."""
    out, path = os.path.realpath(out), os.path.realpath(path)
    return path != out and os.path.commonpath([out, path]) == out


def _own_run_dir(out: str, result: dict) -> str | None:
    """The Ray Train run folder a stage's marker names, if it lies inside ``out``; a marker's absolute
    ``run_dir`` outside it (an output folder copied elsewhere still names the original's) is re-rooted by the
    marker's ``run_dir_rel``, or left alone: nothing outside ``--out`` is ever deleted."""
    run_dir, rel = result.get("run_dir"), result.get("run_dir_rel")
    if run_dir and "://" not in run_dir and _inside(out, run_dir):
        return run_dir
    if rel and _inside(out, os.path.join(out, rel)):
        return os.path.join(out, rel)
    if run_dir:
        print(f"train_all: not deleting {run_dir}: it lies outside {out}", flush=True)
    return None


# ---- MLflow -----------------------------------------------------------------------------------------------------


class Tracking:
    """One parent run per output folder (its id is kept in ``<out>/mlflow_run.json`` so re-runs continue it) and
    one child run per executed stage."""

    def __init__(self, out: str, preset: RunPreset, artifact_root: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = common.mlflow_uri(out)
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name("dudocrop")
        # with --out on a bucket the run-local SQLite store keeps its artifacts there too (not in the cwd's mlruns)
        self.exp_id = exp.experiment_id if exp else self.client.create_experiment("dudocrop", artifact_root)
        id_file = os.path.join(out, "mlflow_run.json")
        parent = None
        if os.path.exists(id_file):
            with open(id_file) as f:
                parent = json.load(f).get("run_id")
            try:
                self.client.get_run(parent)
            except Exception:  # noqa: BLE001 - a store that lost the run: start a new parent
                parent = None
        if parent is None:
            run = self.client.create_run(self.exp_id, run_name=f"train_all-{preset.name}")
            parent = run.info.run_id
            for k, v in asdict(preset).items():
                self.client.log_param(parent, k, str(v)[:6000])
            write_json(id_file, {"run_id": parent, "tracking_uri": common.redact_uri(self.uri)})
        self.parent = parent

    def log_models(self, folder: str) -> None:
        """The inference files under the parent run's ``models/`` (Ray Train checkpoints stay out)."""
        for name in MODEL_ARTIFACTS:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                self.client.log_artifact(self.parent, path, "models")

    def register_models(self, name: str) -> str | None:
        """A new version of ``name`` in the MLflow Model Registry pointing at the parent run's ``models/`` (what
        ``serve/`` loads as ``models:/<name>/<version>``). Returns the version, or None where the store has no
        registry (printed, not fatal: the model folder and ``runs:/<id>/models`` still serve)."""
        try:
            if not self.client.search_registered_models(f"name = '{name}'"):
                self.client.create_registered_model(name)
            mv = self.client.create_model_version(name, f"runs:/{self.parent}/models", run_id=self.parent)
        except Exception as e:  # noqa: BLE001 - e.g. a tracking server without a registry
            print(f"train_all: model not registered ({type(e).__name__}: {e})", flush=True)
            return None
        print(f"train_all: registered models:/{name}/{mv.version}", flush=True)
        return str(mv.version)

    def child(self, stage: str, argv: list[str]) -> str:
        run = self.client.create_run(self.exp_id, run_name=stage, tags={"mlflow.parentRunId": self.parent,
                                                                         "dudocrop.stage": stage})
        self.client.log_param(run.info.run_id, "argv", " ".join(argv)[:6000])
        return run.info.run_id

    def finish(self, run_id: str, seconds: float, result: dict | None, artifacts: list[str]) -> None:
        self.client.log_metric(run_id, "stage_seconds", seconds)
        for k, v in (result or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v:
                self.client.log_metric(run_id, k, float(v))
        for path in artifacts:
            if os.path.isdir(path):
                self.client.log_artifacts(run_id, path, os.path.basename(path.rstrip("/")))
            elif os.path.isfile(path):
                self.client.log_artifact(run_id, path)
        self.client.set_terminated(run_id)


def _artifacts(stage: str, out: str) -> list[str]:
    models, data = f"{out}/models", f"{out}/data"
    return {
        "prepare": [f"{data}/manifest.json"],
        "caption": [f"{data}/captions/manifest.json"],
        "clip": [f"{models}/dudoclip.pt"],
        "tune_lambda": [f"{out}/tune_sde/tune_sde.json", f"{out}/tune_sde/trials.csv", f"{out}/tune_sde/sweep.png",
                        f"{models}/tuned_sde.json"],
        "sde_image": [f"{models}/sde_image.pt"],
        "sde_sinogram": [f"{models}/sde_sinogram.pt"],
        "sde_residual": [f"{models}/sde_residual.pt"],
        "sde_image_plain": [f"{out}/models_plain/sde_image.pt"],
        "sde_sinogram_plain": [f"{out}/models_plain/sde_sinogram.pt"],
        "fusion": [f"{out}/fusion/fusion.json", f"{out}/fusion/trials.csv", f"{out}/fusion/surface.png",
                   f"{models}/pipeline.json"],
        "evaluate": [f"{out}/report"],
    }.get(stage, [])


# ---- driver -----------------------------------------------------------------------------------------------------


def _run_stage(stage: str, argv: list[str], tracking: Tracking) -> tuple[float, dict | None, str]:
    job = _job(stage)
    run_id = tracking.child(stage, argv)
    extra = (["--mlflow-uri", tracking.uri, "--mlflow-run-id", run_id]
             if stage.startswith(("clip", "sde_", "tune_lambda")) else [])
    t0 = time.time()
    a = job.parse_args(argv + extra)
    result = job.run_args(a) if hasattr(job, "run_args") else job.run(a)
    dt = time.time() - t0
    return dt, (result if isinstance(result, dict) else None), run_id


def run(a: argparse.Namespace) -> dict:
    """Run the wanted stages into ``--out``, holding its lock (dudocrop.lock) so no second run writes there."""
    out = a.out if is_remote(a.out) else os.path.abspath(a.out)
    with folder_lock(out, "train_all " + json.dumps(vars(a), default=str)):
        if not is_remote(out):
            return _run(a)
        mirror = Mirror(out)
        print(f"train_all: {out}: {mirror.pull()} files pulled into the local mirror {mirror.local}", flush=True)
        try:
            return _run(a, mirror)
        finally:
            mirror.push()
            mirror.close()


def _run(a: argparse.Namespace, mirror: Mirror | None = None) -> dict:
    p = resolve_preset(a)
    out = mirror.local if mirror else os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    wanted = [s for s in a.stages.split(",") if s]
    bad = [s for s in wanted + [s for s in a.force.split(",") if s] if s not in STAGES]
    if bad:
        raise SystemExit(f"train_all: unknown stages {bad}; known: {', '.join(STAGES)}")
    force = {s for s in a.force.split(",") if s}
    try:
        argvs = stage_argv(p, out, a.root, data=mirror.remote("data") if mirror else None)
    except ValueError as e:
        raise SystemExit(f"train_all: {e}") from e
    common.init_ray(a.address)
    local_store = mirror is not None and not os.environ.get("MLFLOW_TRACKING_URI")
    tracking = Tracking(out, p, mirror.remote("mlartifacts") if local_store else None)
    t_all = time.time()
    summary: dict[str, dict] = {}
    print(f"train_all: preset {p.name} -> {out} (MLflow {common.redact_uri(tracking.uri)}, parent run "
          f"{tracking.parent})", flush=True)

    def execute(stage: str) -> None:
        argv = argvs[stage]
        # with a mirror, paths count by their place on the bucket: a re-run from another machine (another local
        # mirror folder) resumes instead of redoing every stage
        fp = _fingerprint([remote_path(w) if mirror and w.startswith(out) else w for w in argv])
        if stage not in force and _done(out, stage, fp):
            print(f"train_all: [{stage}] complete, skipped", flush=True)
            summary[stage] = {"status": "skipped"}
            return
        _invalidate(out, stage, mirror)
        print(f"train_all: [{stage}] running: {' '.join(argv)}", flush=True)
        dt, result, run_id = _run_stage(stage, argv, tracking)
        tracking.finish(run_id, dt, result, _artifacts(stage, out))
        run_dir = (result or {}).get("run_dir")
        if run_dir and "://" not in str(run_dir) and _inside(out, run_dir):  # so a copy of out finds its own
            result = {**result, "run_dir_rel": os.path.relpath(os.path.realpath(run_dir), os.path.realpath(out))}
        elif run_dir and mirror is not None and str(run_dir).split("://")[-1].startswith(mirror.root + "/"):
            result = {**result, "run_dir_rel": str(run_dir).split("://")[-1][len(mirror.root) + 1:]}
        _write_marker(out, stage, {"fingerprint": fp, "argv": argv, "seconds": dt, "mlflow_run_id": run_id,
                                   "result": result})
        if mirror is not None:
            mirror.push()
        summary[stage] = {"status": "ran", "seconds": round(dt, 1)}
        print(f"train_all: [{stage}] done in {dt:.1f}s", flush=True)

    order = [s for s in STAGES if s in wanted and (s not in OPTIONAL or (
        p.tune_lambda if s == "tune_lambda" else p.guidance_ablation))]
    i = 0
    while i < len(order):
        s = order[i]
        pair = s == "sde_image" and i + 1 < len(order) and order[i + 1] == "sde_sinogram"
        if pair and p.gpu and common.cluster_gpus() >= 2 * p.workers:
            # the two stage-2 domains are independent (Algorithm 1): train them side by side when GPUs allow
            errors: list[BaseException] = []

            def guarded(stage, errors=errors):
                try:
                    execute(stage)
                except BaseException as e:  # noqa: BLE001 - re-raised below, after both threads finish
                    errors.append(e)

            threads = [threading.Thread(target=guarded, args=(d,)) for d in ("sde_image", "sde_sinogram")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            i += 2
            continue
        execute(s)
        i += 1
    registered = None
    if any(v["status"] == "ran" for v in summary.values()):
        tracking.log_models(os.path.join(out, "models"))
        registered = tracking.register_models(f"dudocrop-{p.name}")
    total = time.time() - t_all
    print(f"train_all: finished in {total:.1f}s: " + ", ".join(f"{k} {v['status']}" + (
        f" {v['seconds']}s" if "seconds" in v else "") for k, v in summary.items()), flush=True)
    report = os.path.join(out, "report", "report.md")
    if os.path.exists(report):
        print(f"train_all: evaluation report {report}", flush=True)
    return {"seconds": total, "stages": summary, "out": mirror.uri if mirror else out,
            "mlflow_run_id": tracking.parent, "registered_version": registered}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
