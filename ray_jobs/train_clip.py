"""Stage 1 of DuDoCROP on Ray Train: fine-tune DuDoCLIP's control nets and temperature by Eq. 3 (paper §III-B-1,
Algorithm 1 "DuDoCLIP model fine-tuning"), then write the final model ``<out>/dudoclip.pt``.

    python ray_jobs/train_clip.py --data outputs/data --out outputs/clip                  # tiny, embedded default
    python ray_jobs/train_clip.py --data D --out O --preset tiny --workers 2 --set epochs=300 --set lr=2e-3
    python ray_jobs/train_clip.py --data s3://b/aapm --out /shared/clip --storage s3://b/ray --preset paper \\
        --workers 4 --gpu --set pretrained=/models/open_clip_vit_b32_laion2b.safetensors
    ray job submit --working-dir . -- python ray_jobs/train_clip.py ...      # unchanged on a cluster

Needs the shards (ray_jobs/prepare_data.py) and their caption sidecars (ray_jobs/caption.py). ``--preset`` picks the
model and the training preset of ``dudocrop.clip.config``; ``--set field=value`` (repeatable, JSON values) replaces
any DuDoCLIPTrainConfig or DuDoCLIPConfig field. The ``tiny`` preset's CLIP towers are RANDOM (no weights exist
for it): the log, the MLflow params and the model file say so, and its retrieval numbers are random-init numbers.

Training: TorchTrainer with DDP (gloo on CPU, NCCL on GPU), bf16 autocast on CUDA only; every rank takes its part
of each global batch by index (``dudocrop.train.batch_indices``), its image embeddings are all-gathered so Eq. 3
runs over the whole global batch on every rank (the same update as one process). AdamW on the controllers and the
temperature only, linear warm-up then cosine. Checkpoints every ``checkpoint_every`` steps and at the end; a killed
worker (FailureConfig) or a re-run with the same ``--name`` resumes exactly from the latest one. Held-out retrieval
on the ``val`` split before training, every ``eval_every`` steps and at the end. Afterwards ``ray_jobs/embed.py``
writes the embeddings the diffusion stages read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dudocrop.checks import parse_assignments  # noqa: E402
from dudocrop.clip.config import (  # noqa: E402
    DuDoCLIPConfig,
    DuDoCLIPTrainConfig,
    get_model_config,
    get_train_config,
)
from dudocrop.clip.train import (  # noqa: E402
    CAPTION_COLUMNS,
    build_dudoclip,
    caption_columns,
    config_from_dict,
    mean_top,
    row_columns,
    save_dudoclip,
)
from dudocrop.lock import folder_lock  # noqa: E402

log = logging.getLogger("train_clip")

MODEL_FILE = "dudoclip.pt"
SUMMARY_FILE = "train_clip.json"
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(DuDoCLIPTrainConfig)}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(DuDoCLIPConfig)}


# ---- configuration ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder (or URI) with manifest.json, the shards and captions/")
    ap.add_argument("--out", default="outputs/clip", help="local (or shared-mount) folder for dudoclip.pt, the "
                                                          "summary and, by default, the Ray results")
    ap.add_argument("--preset", choices=["tiny", "paper"], default="tiny", help="model + training preset")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="replace a DuDoCLIPTrainConfig / DuDoCLIPConfig field (Python literal, JSON or string; "
                         "repeatable)")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before the run fails")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the epochs)")
    ap.add_argument("--log-every", type=int, default=10, help="report training metrics every this many steps")
    ap.add_argument("--name", default="dudoclip", help="Ray Train run name: the same name resumes the same run")
    ap.add_argument("--storage", default=None, help="Ray Train storage (default <out>/ray_results; shared storage "
                                                    "on a multi-node cluster)")
    ap.add_argument("--address", default=None, help="Ray address (default: join a running cluster or start one)")
    ap.add_argument("--mlflow", action="store_true", help="log to MLflow (MLFLOW_TRACKING_URI or <out>/mlflow.db)")
    ap.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (with --mlflow-run-id)")
    ap.add_argument("--mlflow-run-id", default=None, help="log into this existing MLflow run (train_all)")
    # fault injection for the tests (common.maybe_fail)
    ap.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fail-marker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fail-rank", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(list(argv) if argv is not None else None)


def parse_sets(sets: Sequence[str] | Mapping[str, Any]) -> tuple[dict, dict]:
    """``--set`` items → (training overrides, model overrides); unknown fields raise ValueError naming them."""
    items = dict(sets) if isinstance(sets, Mapping) else parse_assignments(sets)
    train, model = {}, {}
    for k, v in items.items():
        v = tuple(v) if isinstance(v, list) else v
        if k in _TRAIN_FIELDS:
            train[k] = v
        elif k in _MODEL_FIELDS:
            model[k] = v
        else:
            raise ValueError(f"--set {k}=...: unknown field; DuDoCLIPTrainConfig has {sorted(_TRAIN_FIELDS)}, "
                             f"DuDoCLIPConfig has {sorted(_MODEL_FIELDS)}")
    return train, model


def _namespace(args: argparse.Namespace | Mapping[str, Any] | Sequence[str] | None) -> argparse.Namespace:
    from ray_jobs import common

    return common.as_namespace(args, parse_args, ("data",))


def _check_data(data: str, domains: Sequence[str]) -> dict[str, int]:
    """Rows per split; fails before any worker starts when the shards or their captions are missing."""
    from dudocrop.captions.captioning import read_captions
    from dudocrop.data.shards import read_manifest

    manifest = read_manifest(data)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {data}: run ray_jobs/prepare_data.py first")
    counts: dict[str, int] = {}
    for s in manifest["shards"]:
        counts[s["split"]] = counts.get(s["split"], 0) + int(s.get("rows", 0))
        if s["split"] in ("train", "val"):
            side = read_captions(data, s["name"], columns=["case_id"])
            if side is None:
                raise FileNotFoundError(f"shard {s['name']} of {data} has no caption sidecar: run "
                                        f"ray_jobs/caption.py --data {data}")
    if not counts.get("train"):
        raise ValueError(f"{data} has no train rows (counts {counts})")
    return counts


# ---- the train loop (runs on every worker) ---------------------------------------------------------------------
class _Gather:
    """Differentiable all-gather in rank order (what Eq. 3 over the global batch needs; see clip_loss)."""

    def __init__(self, world_size: int):
        self.world_size = int(world_size)

    def __call__(self, x):
        import torch
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the replacement API is private in torch 2.13
            return torch.cat(dist_fn.all_gather(x.contiguous()))


def total_steps(n_train: int, batch_size: int, epochs: int, max_steps: int | None = None) -> int:
    """Optimiser steps of a run: ``epochs`` × full global batches per epoch (as batch_indices counts them)."""
    steps = int(epochs) * max(1, int(n_train) // int(batch_size))
    return min(steps, int(max_steps)) if max_steps else steps


def train_loop(cfg: dict) -> None:
    import numpy as np
    import torch

    from dudocrop.clip.train import TextCache, batch_captions, clip_train_step, make_optimizer, retrieval_report
    from dudocrop.train import batch_indices, cosine_lr, load_split
    from ray_jobs import common

    rank, world, device = common.worker()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    mcfg = config_from_dict(cfg["model"])
    tcfg = DuDoCLIPTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["train"].items()})
    domains = tuple(mcfg.domains)
    sidecars = {"captions": caption_columns(domains)}
    rows = load_split(cfg["data"], "train", row_columns(domains), sidecars)
    val = None
    if rank == 0 and tcfg.eval_every >= 0 and cfg["has_val"]:
        val = load_split(cfg["data"], "val", row_columns(domains), sidecars)
        val = val.take(np.arange(len(val)))
    total = total_steps(len(rows), tcfg.batch_size, tcfg.epochs, cfg.get("max_steps"))

    model = build_dudoclip(mcfg, tcfg.seed)
    state = common.resume()
    if state is not None:
        if state.get("fingerprint") != cfg["fingerprint"]:
            raise ValueError(f"the run {cfg['name']!r} under {cfg['storage']} was started with other settings "
                             f"({state.get('fingerprint')}); use another --name or remove that run folder")
        model.load_trainable_state_dict(state["trainable"])
    model = model.to(device)
    import ray.train.torch

    ddp = ray.train.torch.prepare_model(model)
    opt = make_optimizer(ddp, tcfg.lr, tcfg.weight_decay, tcfg.betas, tcfg.eps)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    start = int(state["step"]) if state is not None else 0
    history = list(state["history"]) if state is not None else []
    throughput = dict(state["throughput"]) if state is not None else {"samples": 0, "seconds": 0.0}
    starts = [*state["starts"], start] if state is not None else [0]  # the step each (re)start resumed from
    gather = _Gather(world) if world > 1 else None
    cache = TextCache()
    amp = device.type == "cuda"

    def evaluate(step: int) -> dict:
        if val is None:
            return {}
        r = retrieval_report(model, val)
        history.append({"step": step, **r})
        return {f"val/{k}": v for k, v in r.items()} | {"val/mean_top1": mean_top(r, 1),
                                                         "val/mean_top5": mean_top(r, 5)}

    def snapshot() -> dict:
        return {"trainable": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
                "optimizer": opt.state_dict(), "step": step_done, "history": history, "throughput": throughput,
                "starts": starts,
                "fingerprint": cfg["fingerprint"], "total_steps": total}

    with common.mlflow_run(cfg.get("mlflow_uri"), cfg.get("mlflow_run_id") if rank == 0 else None) as mlf:
        step_done = start
        if start == 0:
            m0 = {"step": 0, **evaluate(0)}  # the untrained model: the baseline of the retrieval numbers
            if mlf is not None:
                mlf.metrics(m0, 0)
            common.report(m0)
        if start >= total:  # a finished run re-run: hand its state back as the result's checkpoint
            common.report({"step": start}, snapshot)
            return
        window_t, window_n = 0.0, 0
        for step in range(start, total):
            t0 = time.perf_counter()
            idx = [batch_indices(len(rows), tcfg.batch_size, step, tcfg.seed, r, world) for r in range(world)]
            local = rows.take(idx[rank])
            global_caps = batch_captions(rows.take(np.concatenate(idx)), domains) if world > 1 else None
            lr = cosine_lr(step, total, tcfg.lr, warmup=tcfg.warmup_steps)
            out = clip_train_step(ddp, opt, local, lr=lr, grad_clip_norm=tcfg.grad_clip_norm, text_cache=cache,
                                  amp=amp, global_captions=global_caps, gather=gather)
            step_done = step + 1
            common.maybe_fail(cfg, step_done)
            dt = time.perf_counter() - t0
            if step_done - start > 2:  # the first steps after a (re)start pay for allocation and caches
                throughput["samples"] += tcfg.batch_size
                throughput["seconds"] += dt
            window_t, window_n = window_t + dt, window_n + tcfg.batch_size
            last = step_done == total
            ckpt = last or (tcfg.checkpoint_every > 0 and step_done % tcfg.checkpoint_every == 0)
            ev = last or (tcfg.eval_every > 0 and step_done % tcfg.eval_every == 0)
            if not (ckpt or ev or step_done % max(1, cfg["log_every"]) == 0):
                continue
            metrics = {"step": step_done, "epoch": step_done / max(1, len(rows) // tcfg.batch_size),
                       "samples_per_s": window_n / max(window_t, 1e-9), **out}
            window_t, window_n = 0.0, 0
            if ev and rank == 0:
                metrics.update(evaluate(step_done))
            if mlf is not None:
                mlf.metrics(metrics, step_done)
            if rank == 0 and (ckpt or ev):
                print(f"train_clip: step {step_done}/{total} loss {out['loss']:.4f} lr {lr:.2e} "
                      + (f"val mean top1 {metrics['val/mean_top1']:.3f}" if "val/mean_top1" in metrics else ""),
                      flush=True)
            common.report(metrics, snapshot if ckpt else None)


# ---- driver -----------------------------------------------------------------------------------------------------
def loop_config(a: argparse.Namespace) -> tuple[dict, DuDoCLIPConfig, DuDoCLIPTrainConfig, dict[str, int]]:
    train_over, model_over = parse_sets(a.set)
    tcfg = get_train_config(a.preset, **train_over)
    mcfg = get_model_config(a.preset, **model_over)
    if a.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {a.workers}")
    if tcfg.batch_size % a.workers:
        raise ValueError(f"batch_size ({tcfg.batch_size}) must be a multiple of --workers ({a.workers})")
    counts = _check_data(a.data, mcfg.domains)
    storage = a.storage or os.path.join(a.out, "ray_results")
    # what must not change when a run with the same --name resumes (the number of workers may: see clip_loss)
    fingerprint = json.dumps({"model": dataclasses.asdict(mcfg),
                              "train": {k: v for k, v in dataclasses.asdict(tcfg).items()
                                        if k in ("batch_size", "lr", "seed", "weight_decay", "betas", "eps",
                                                 "warmup_steps", "grad_clip_norm", "epochs")},
                              "max_steps": a.max_steps, "data": a.data}, sort_keys=True,
                             default=str)
    cfg = {"data": a.data, "model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
           "max_steps": a.max_steps, "log_every": a.log_every, "cpus_per_worker": a.cpus_per_worker,
           "has_val": counts.get("val", 0) > 0, "fingerprint": fingerprint, "name": a.name, "storage": storage,
           "mlflow_uri": a.mlflow_uri, "mlflow_run_id": a.mlflow_run_id,
           "fail_at_step": a.fail_at_step, "fail_marker": a.fail_marker, "fail_rank": a.fail_rank}
    return cfg, mcfg, tcfg, counts


def run(args: argparse.Namespace | Mapping[str, Any] | Sequence[str] | None = None) -> dict:
    """Train stage 1 and write ``<out>/dudoclip.pt``; returns the summary (also ``<out>/train_clip.json``).

    ``args``: parsed CLI options, a mapping of them (``{"data": D, "out": O, "preset": "tiny", "workers": 2,
    "set": {"epochs": 300}, "mlflow_uri": ..., "mlflow_run_id": ...}``; keys as the CLI's with ``_``), or CLI
    words. Starts or joins Ray (``common.init_ray``). Holds ``--out``'s lock (dudocrop.lock) while it runs."""
    a = _namespace(args)
    with folder_lock(a.out, "train_clip " + json.dumps(vars(a), default=str)):
        return _run(a)


def _run(a: argparse.Namespace) -> dict:
    from dudocrop.data.shards import atomic_write_bytes, resolve
    from ray_jobs import common

    t0 = time.time()
    cfg, mcfg, tcfg, counts = loop_config(a)
    random_towers = mcfg.pretrained is None
    towers = ("RANDOM (no pretrained weights: the tiny preset; retrieval numbers are random-init towers)"
              if random_towers else f"pretrained {mcfg.arch} / {mcfg.pretrained}")
    total = total_steps(counts["train"], tcfg.batch_size, tcfg.epochs, a.max_steps)
    print(f"train_clip: preset {a.preset}, {counts['train']} train / {counts.get('val', 0)} val slices, "
          f"{total} steps of {tcfg.batch_size} on {a.workers} worker(s){' with GPU' if a.gpu else ''}; "
          f"CLIP towers {towers}", flush=True)
    if a.mlflow and not a.mlflow_run_id:
        import mlflow

        cfg["mlflow_uri"] = a.mlflow_uri or common.mlflow_uri(a.out)
        mlflow.set_tracking_uri(cfg["mlflow_uri"])
        mlflow.set_experiment("dudocrop-stage1-clip")
        with mlflow.start_run(run_name=a.name) as r:
            cfg["mlflow_run_id"] = r.info.run_id
    params = {"preset": a.preset, "workers": a.workers, "gpu": a.gpu, "towers_random": random_towers,
              "towers": towers, "train_rows": counts["train"], "val_rows": counts.get("val", 0),
              "total_steps": total, "data": a.data,
              **{f"train.{k}": v for k, v in dataclasses.asdict(tcfg).items()},
              **{f"model.{k}": v for k, v in dataclasses.asdict(mcfg).items()}}
    with common.mlflow_run(cfg["mlflow_uri"], cfg["mlflow_run_id"]) as mlf:
        if mlf is not None:
            mlf.params(params)

    cfg["mlflow_uri"] = common.storable_uri(cfg["mlflow_uri"])  # Ray Train stores the loop config: no credentials
    common.init_ray(a.address)
    result = common.fit(train_loop, cfg, name=a.name, storage_path=cfg["storage"], num_workers=a.workers,
                        use_gpu=a.gpu, cpus_per_worker=a.cpus_per_worker, max_failures=a.max_failures)
    if result.error is not None:
        raise RuntimeError(f"train_clip: the Ray Train run failed: {result.error}") from result.error
    state = common.checkpoint_state(result)

    model = build_dudoclip(mcfg, tcfg.seed)
    model.load_trainable_state_dict(state["trainable"])
    history = state["history"]
    before = next((h for h in history if h["step"] == 0), None)
    after = history[-1] if history and history[-1]["step"] == state["step"] else None
    thr = state["throughput"]
    sps = thr["samples"] / thr["seconds"] if thr["seconds"] > 0 else float("nan")
    fs, base = resolve(a.out)
    fs.create_dir(base, recursive=True)
    model_path = os.path.join(a.out, MODEL_FILE)
    meta = {"preset": a.preset, "init_seed": tcfg.seed, "steps": int(state["step"]), "train": dataclasses.asdict(tcfg),
            "data": a.data, "workers": a.workers, "towers_random": random_towers, "retrieval_before": before,
            "retrieval_after": after}
    save_dudoclip(model_path, model, meta)
    summary = {"model_path": model_path, "steps": int(state["step"]), "total_steps": total, "preset": a.preset,
               "towers_random": random_towers, "workers": a.workers, "train_rows": counts["train"],
               "val_rows": counts.get("val", 0), "samples_per_s": sps, "retrieval_before": before,
               "retrieval_after": after, "history": history, "run_dir": result.path, "starts": state["starts"],
               "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)},
               "seconds": time.time() - t0, "mlflow_run_id": cfg["mlflow_run_id"]}
    atomic_write_bytes(fs, f"{base}/{SUMMARY_FILE}", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    with common.mlflow_run(cfg["mlflow_uri"], cfg["mlflow_run_id"]) as mlf:
        if mlf is not None:
            if after:
                mlf.metrics({f"final/{k}": v for k, v in after.items() if k != "step"}, int(state["step"]))
            mlf.metrics({"final/samples_per_s": sps}, int(state["step"]))
            mlf.artifact(model_path)
    b1 = mean_top(before) if before else float("nan")
    a1 = mean_top(after) if after else float("nan")
    print(f"train_clip: done {state['step']}/{total} steps on {a.workers} worker(s), {sps:.1f} samples/s, held-out "
          f"mean top-1 {b1:.3f} -> {a1:.3f} (towers {'RANDOM-init' if random_towers else 'pretrained'}), "
          f"wrote {model_path} in {time.time() - t0:.0f}s", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


__all__ = ["CAPTION_COLUMNS", "MODEL_FILE", "parse_args", "parse_sets", "run", "total_steps", "train_loop"]

if __name__ == "__main__":
    raise SystemExit(main())
