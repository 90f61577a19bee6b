"""Stage 2 / 3 of DuDoCROP: train one domain's IR-SDE (paper §III-B-2, Eq. 4-9; residual Eq. 16) with DDP on Ray
Train, resuming exactly from the latest checkpoint after a failure or a re-run.

    python ray_jobs/train_sde.py --data D --out O --domain image --preset tiny --workers 2
    python ray_jobs/train_sde.py --data D --out O --domain sinogram --preset paper --workers 4 --gpu
    python ray_jobs/train_sde.py --data D --out O --domain residual --preset paper --set steps=20000

Reads the ``train`` split (and a few ``val`` slices for validation) of the shards in ``D`` with the ``embeddings``
sidecar (image / sinogram; not with ``--no-embeddings``, the Fig. 12 baseline) or the ``priors`` sidecar
(residual), trains with AdamW + cosine LR + EMA (bf16 autocast on CUDA), checkpoints every
``checkpoint_every`` steps under ``O/ray_train/sde_<domain>`` and writes the EMA model to ``O/sde_<domain>.pt``
(dudocrop.sde.train.save_sde_model). One summary line is printed at the end.

The image and sinogram models are independent: on a cluster submit two jobs (``ray job submit ... --domain
image`` and ``... --domain sinogram``), or call :func:`run_domains`, which runs both fits concurrently from threads
of one driver.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dudocrop.data.normalize import Normalization  # noqa: E402
from dudocrop.lock import folder_lock  # noqa: E402
from dudocrop.sde.train import (  # noqa: E402
    SDE_DOMAINS,
    TRAIN_PRESETS,
    SDETrainConfig,
    build_training,
    domain_columns,
    embedding_width,
    geometry_for_data,
    get_train_config,
    normalization_for_data,
    parse_overrides,
    save_sde_model,
    sde_model_from_training,
    train_step,
    validate,
    with_image_mu,
    with_sinogram_mu,
)
from dudocrop.train import SliceRows, load_split, unwrap  # noqa: E402
from ray_jobs import common  # noqa: E402


def _load_val(data: str, cols, side, n: int, derive=lambda rows: rows):
    """The first ``n`` rows of the val split (test split if there is no val split) as columns, passed through
    ``derive`` (SliceRows -> SliceRows), or None when neither split exists."""
    for split in ("val", "test"):
        try:
            rows = load_split(data, split, cols, side)
        except ValueError as e:
            if "has no rows in split" in str(e):
                continue
            raise
        return derive(SliceRows({k: v[:n] for k, v in rows.columns.items()}, rows.shard_of_row[:n])).columns
    return None


#: SDETrainConfig fields a resumed run may change: how often it logs, validates and checkpoints, and the
#: inference tile; every other field (and the data) changes what the weights are.
RESUMABLE_CHANGES = ("checkpoint_every", "validate_every", "val_slices", "val_steps", "log_every", "sample_tile")


def run_identity(cfg: SDETrainConfig, data: str) -> dict:
    """What a checkpoint must share with this run to be resumed: the training config (less RESUMABLE_CHANGES)
    and the sha256 of the data manifest's shard checksums (another dataset, wherever it lies; the folder's path
    is left out so a copied output folder still resumes). Sidecars (embeddings, priors) are not covered:
    train_all re-runs a stage whose inputs changed from scratch."""
    from dudocrop.data.shards import read_manifest

    manifest = read_manifest(data) or {}
    shards = hashlib.sha256(json.dumps([(s.get("name"), s.get("sha256")) for s in manifest.get("shards", [])])
                            .encode()).hexdigest()
    config = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps({"config": config, "data_shards_sha256": shards}, default=str))


def check_resumable(run_dir: str, identity: dict) -> None:
    """Refuse (ValueError naming the folder and the differing settings) to resume the Ray Train run in
    ``run_dir`` when its newest loadable checkpoint was trained with another :func:`run_identity`; a missing or
    empty folder is a fresh start."""
    from ray_jobs.common import newest_state

    state = newest_state(run_dir)
    if state is None or state.get("identity") == identity:
        return
    old = state.get("identity") or {}
    flat = lambda d: {**{f"config.{k}": v for k, v in d.get("config", {}).items()},  # noqa: E731
                      **{k: v for k, v in d.items() if k != "config"}}
    a, b = flat(old), flat(identity)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    raise ValueError(f"train_sde: the checkpoints in {run_dir} were trained with other settings or data "
                     f"({', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in diff[:6])}); resuming them would "
                     "label old weights with the new settings. Use another --out, or remove that run folder")


def train_loop(config: dict) -> None:
    """The Ray Train loop of one domain (every worker). ``config``: {"data", "train": SDETrainConfig dict,
    "mlflow_uri", "mlflow_run_id", fault-injection keys}."""
    import ray.train.torch

    cfg = SDETrainConfig.from_dict(config["train"])
    rank, world, device = common.worker()
    if device.type == "cpu":
        # Several workers share a small node: one intra-op thread each avoids oversubscription.
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    cols, side = domain_columns(cfg.domain, cfg.use_embeddings, cfg.sinogram_mu, cfg.image_mu)
    geometry = geometry_for_data(config["data"])
    norm = Normalization.for_geometry(geometry)  # normalization_for_data without reading the manifest again

    def derive(rows: SliceRows) -> SliceRows:  # an NMAR μ, once per slice (with_sinogram_mu, with_image_mu)
        if cfg.domain == "sinogram":
            return with_sinogram_mu(rows, cfg.sinogram_mu, geometry)
        return with_image_mu(rows, cfg.image_mu, geometry) if cfg.domain == "image" else rows

    rows = derive(load_split(config["data"], "train", cols, side))
    ctx = embedding_width(rows, cfg.domain) if cfg.use_embeddings else None
    val = (_load_val(config["data"], cols, side, cfg.val_slices, derive)
           if rank == 0 and cfg.validate_every else None)

    unet, ema, opt, sde = build_training(cfg, device, ctx)
    start = 0
    state = common.resume()
    if state is not None and state.get("identity") != config["identity"]:
        raise ValueError("train_sde: the checkpoint to resume was trained with other settings or data "
                         "(run_identity); use another --out or remove the run folder")
    if state is not None:
        unet.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
        start = int(state["step"])
    model = ray.train.torch.prepare_model(unet) if world > 1 else unet

    def state_fn(step: int):
        return lambda: {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict(),
                        "step": step, "config": cfg.to_dict(), "identity": config["identity"]}

    t0, seen = time.perf_counter(), 0
    with common.mlflow_run(config.get("mlflow_uri"), config.get("mlflow_run_id") if rank == 0 else None) as log:
        for step in range(start, cfg.steps):
            m = train_step(model, ema, opt, sde, rows, cfg, norm, step, rank, world)
            done = step + 1
            seen += 1
            metrics = {"step": done, "loss": m["loss"], "lr": m["lr"], "resumed_from": start,
                       "seconds_per_step": (time.perf_counter() - t0) / seen}
            if rank == 0 and val is not None and (done % cfg.validate_every == 0 or done == cfg.steps):
                metrics.update(validate(sde_model_from_training(model, ema, cfg, norm), val, n=cfg.val_slices,
                                        steps=cfg.val_steps, seed=cfg.seed, device=device))
            ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if log is not None and (done % cfg.log_every == 0 or ckpt or "val_psnr" in metrics):
                log.metrics({f"{cfg.domain}/{k}": v for k, v in metrics.items()}, done)
            # every report is a sync point of all workers: only on log and checkpoint steps (the same on every rank)
            if done % cfg.log_every == 0 or ckpt:
                common.report(metrics, state_fn(done) if ckpt else None)
            # after the report: a worker killed right after writing a checkpoint is the case resume() must cover
            common.maybe_fail(config, done)


def run(data: str, out: str, domain: str = "image", preset: str = "tiny", **kw) -> dict:
    """:func:`_train` holding ``out``'s lock (dudocrop.lock), so no second run writes the same model files and
    checkpoints; keywords as :func:`_train`'s."""
    with folder_lock(out, f"train_sde --domain {domain} --data {data} --out {out} --preset {preset}"):
        return _train(data, out, domain, preset, **kw)


def _train(data: str, out: str, domain: str = "image", preset: str = "tiny", *, workers: int = 1,
        use_gpu: bool = False, cpus_per_worker: float = 1.0, max_failures: int = 2,
        use_embeddings: bool | None = None, overrides: dict | None = None, mlflow_uri: str | None = None,
        mlflow_run_id: str | None = None, name: str | None = None, extra_config: dict | None = None,
        address: str | None = None) -> dict:
    """Train one domain's IR-SDE on Ray Train and write ``out/sde_<domain>.pt``; returns the summary dict
    {"domain", "model", "steps", "loss", "val_*", "seconds", "resumed_from", "run_dir", "config"}.

    ``use_embeddings`` None means the preset's (True for image / sinogram, False for residual);
    ``overrides`` replace SDETrainConfig fields; ``extra_config`` goes into the loop config (fault injection:
    fail_at_step / fail_marker / fail_rank). Re-running with the same ``out`` and ``name`` resumes."""
    if domain not in SDE_DOMAINS:
        raise ValueError(f"domain must be one of {SDE_DOMAINS}, got {domain!r}")
    over = dict(overrides or {})
    over["domain"] = domain
    if use_embeddings is not None:
        over["use_embeddings"] = use_embeddings
    cfg = get_train_config(preset, **over)
    if cfg.batch_size % workers:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of --workers ({workers})")
    data = data if "://" in data else os.path.abspath(data)
    norm = normalization_for_data(data)  # fails early, on the driver, for a folder without a manifest
    # Ray Train stores the loop config: credentials in the tracking URI stay out of it (before a local Ray starts,
    # so its workers inherit the full URI in MLFLOW_TRACKING_URI: common.storable_uri)
    stored_uri = common.storable_uri(mlflow_uri)
    common.init_ray(address)
    name = name or f"sde_{domain}"
    storage = os.path.join(os.path.abspath(out), "ray_train")
    identity = run_identity(cfg, data)
    check_resumable(os.path.join(storage, name), identity)
    loop_cfg = {"data": data, "train": cfg.to_dict(), "identity": identity,
                "mlflow_uri": stored_uri, "mlflow_run_id": mlflow_run_id,
                "threads_per_worker": max(1, int(cpus_per_worker)), **(extra_config or {})}
    t0 = time.perf_counter()
    with common.mlflow_run(mlflow_uri, mlflow_run_id) as log:
        if log is not None:
            log.params({f"{domain}.{k}": v for k, v in {**cfg.to_dict(), "workers": workers, "gpu": use_gpu}.items()})
        result = common.fit(train_loop, loop_cfg, name=name, storage_path=storage, num_workers=workers,
                            use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=max_failures)
        if result.error is not None:
            raise RuntimeError(f"train_sde ({domain}) failed: {result.error}") from result.error
        state = common.checkpoint_state(result)
        if int(state["step"]) != cfg.steps:
            raise RuntimeError(f"train_sde ({domain}) ended at step {state['step']}, expected {cfg.steps}")
        unet, _, _, _ = build_training(cfg, "cpu", _context_dim(state))
        unet.load_state_dict(state["model"])
        path = os.path.join(os.path.abspath(out), f"sde_{domain}.pt")
        metrics = dict(result.metrics or {})
        meta = {"data": data, "preset": preset, "train_config": cfg.to_dict(), "steps": cfg.steps,
                "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
                "workers": workers, "gpu": use_gpu, "run_dir": result.path}
        save_sde_model(path, unet, state["ema"], meta, domain=domain, sde_config=cfg.sde_config(), normalization=norm)
        if log is not None:
            log.artifact(path, "models")
    summary = {"domain": domain, "model": path, "steps": int(state["step"]), "loss": metrics.get("loss"),
               **{k: v for k, v in metrics.items() if k.startswith("val_")},
               "resumed_from": metrics.get("resumed_from"), "seconds": round(time.perf_counter() - t0, 1),
               "run_dir": result.path, "use_embeddings": cfg.use_embeddings, "config": asdict(cfg)}
    return summary


def _context_dim(state: dict) -> int | None:
    w = state["model"].get("control_mlp.0.weight")
    return None if w is None else int(w.shape[1])


def run_domains(data: str, out: str, domains=("image", "sinogram"), **kw) -> dict[str, dict]:
    """Train several independent domains at the same time (one Ray Train fit per thread of this driver); on a
    cluster the two fits are scheduled side by side when the resources allow. Same keywords as :func:`run`."""
    common.init_ray(kw.get("address"))
    with ThreadPoolExecutor(max_workers=len(domains)) as pool:
        futures = {d: pool.submit(run, data, out, d, **kw) for d in domains}
        return {d: f.result() for d, f in futures.items()}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data folder (manifest.json + shards + sidecars)")
    ap.add_argument("--out", required=True, help="output folder (model file, Ray Train run, mlflow.db)")
    ap.add_argument("--domain", choices=SDE_DOMAINS, default="image")
    ap.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="tiny")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16 autocast)")
    ap.add_argument("--max-failures", type=int, default=2)
    ap.add_argument("--no-embeddings", action="store_true", help="plain IR-SDE (Fig. 12 ablation baseline)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="SDETrainConfig override")
    ap.add_argument("--tuned", default=None, metavar="FILE",
                    help="tune_sde's record (<models>/tuned_sde.json): its chosen λ (lr, T) for --domain, unless --set "
                         "names them")
    ap.add_argument("--mlflow-uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI or O/mlflow.db)")
    ap.add_argument("--mlflow-run-id", default=None, help="log into this MLflow run (train_all passes it)")
    ap.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS or a local Ray)")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error("--workers must be >= 1")
    try:
        a.overrides = parse_overrides(a.set)
        if a.tuned:
            from ray_jobs.tune_sde import tuned_overrides

            a.overrides = {**tuned_overrides(a.tuned, a.domain), **a.overrides}
    except ValueError as e:
        ap.error(str(e))
    return a


def run_args(a: argparse.Namespace) -> dict:
    """:func:`run` from parsed command-line options (what ``train_all`` and :func:`main` call)."""
    uri = a.mlflow_uri or (common.mlflow_uri(a.out) if a.mlflow_run_id else None)
    return run(a.data, a.out, a.domain, a.preset, workers=a.workers, use_gpu=a.gpu, cpus_per_worker=a.cpus_per_worker,
               max_failures=a.max_failures, use_embeddings=False if a.no_embeddings else None, overrides=a.overrides,
               mlflow_uri=uri, mlflow_run_id=a.mlflow_run_id, address=a.address)


def main(argv=None) -> int:
    s = run_args(parse_args(argv))
    brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if k != "config"}
    print("train_sde: " + json.dumps(brief), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
