"""After stage 1: write DuDoCLIP's embeddings e^{I1}_x, e^{I2}_x, e^{I1}_y, e^{I2}_y of every slice into an
``embeddings`` sidecar per shard (paper Fig. 3: the IR-SDEs are guided by them), so the diffusion stages never run
CLIP in their training loop.

    python ray_jobs/embed.py --data outputs/data --model outputs/clip/dudoclip.pt
    ray job submit --working-dir . -- python ray_jobs/embed.py --data s3://b/aapm --model /shared/clip/dudoclip.pt \\
        --gpu --concurrency 4          # the model file must be on a path every node sees (shards may be URIs)

One Ray task per shard (plain tasks: nothing to stream, and no Ray Data read tasks to starve a 2-CPU node,
REFERENCE §6), at most ``--concurrency`` at a time. A shard is skipped when its sidecar is complete and fresh: the
same (case_id, checksum) rows in the same order, made by the same model file (its sha256 travels in the sidecar's
Parquet metadata). Sidecars are written atomically (``dudocrop.data.sidecar.write_sidecar``); readers join them with
``dudocrop.train.load_split(..., sidecars={"embeddings": [...]})``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

KIND = "embeddings"
META_KEY = b"dudoclip_model_sha256"
MANIFEST = "manifest.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder (or URI) with manifest.json and the shards")
    ap.add_argument("--model", required=True, help="the stage-1 model file (<train_clip out>/dudoclip.pt)")
    ap.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="which splits to embed")
    ap.add_argument("--batch-size", type=int, default=32, help="slices per CLIP forward")
    ap.add_argument("--concurrency", type=int, default=1, help="shards embedded at the same time")
    ap.add_argument("--cpus-per-task", type=float, default=1.0)
    ap.add_argument("--gpu", action="store_true", help="one GPU per task")
    ap.add_argument("--force", action="store_true", help="re-embed shards whose sidecar is fresh")
    ap.add_argument("--address", default=None, help="Ray address (default: join a running cluster or start one)")
    return ap.parse_args(list(argv) if argv is not None else None)


def model_sha256(path: str) -> str:
    import pyarrow.fs as pafs

    from dudocrop.data.shards import file_sha256

    return file_sha256(pafs.LocalFileSystem(), os.path.abspath(path))


def is_fresh(data_dir: str, shard_name: str, sha: str) -> bool:
    """The shard's sidecar exists, holds exactly its (case_id, checksum) rows in order and was made by ``sha``."""
    from dudocrop.data.sidecar import is_fresh as sidecar_is_fresh

    return sidecar_is_fresh(data_dir, KIND, shard_name, META_KEY, sha)


_MODELS: dict[tuple[str, str], Any] = {}


def _model(path: str, device: str):
    from dudocrop.clip.train import load_dudoclip

    key = (os.path.abspath(path), device)
    if key not in _MODELS:  # one load per worker process, reused by its later tasks
        _MODELS.clear()
        _MODELS[key] = load_dudoclip(path, device)
    return _MODELS[key]


def embed_shard(data_dir: str, shard_name: str, model_path: str, *, batch_size: int = 32, sha: str | None = None,
                device: str = "cpu") -> dict:
    """Embed one shard and write its sidecar (plain Python: the Ray task body, callable without Ray)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from dudocrop.clip.train import EMBEDDING_COLUMNS, embed_rows
    from dudocrop.data.shards import resolve
    from dudocrop.data.sidecar import write_sidecar

    t0 = time.time()
    sha = sha or model_sha256(model_path)
    model = _model(model_path, device)
    fs, base = resolve(data_dir)
    t = pq.read_table(f"{base}/{shard_name}", filesystem=fs, columns=["case_id", "checksum", "geometry", "X_ma",
                                                                       "Y_ma"])
    x = t["X_ma"].combine_chunks().to_numpy_ndarray().astype(np.float32, copy=False)
    y = t["Y_ma"].combine_chunks().to_numpy_ndarray().astype(np.float32, copy=False)
    with torch.inference_mode():
        emb = embed_rows(model, x, y, t["geometry"].to_pylist(), batch_size=batch_size)
    cols = {"case_id": t["case_id"], "checksum": t["checksum"]}
    width = None
    for d in model.domains:
        for c in EMBEDDING_COLUMNS[d]:
            a = emb[c]
            width = a.shape[1]
            cols[c] = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), a.shape[1])
    table = pa.table(cols).replace_schema_metadata({META_KEY: sha.encode()})
    path = write_sidecar(data_dir, KIND, shard_name, table)
    return {"shard": shard_name, "sidecar": path, "rows": t.num_rows, "width": width, "skipped": False,
            "seconds": round(time.time() - t0, 3)}


def run(args: argparse.Namespace | Mapping[str, Any] | Sequence[str] | None = None) -> dict:
    """Embed every shard of the chosen splits (skipping fresh ones); returns and writes
    ``<data>/embeddings/manifest.json``. ``args``: parsed options, a mapping (``{"data": D, "model":
    "O/dudoclip.pt", "concurrency": 2}``, keys as the CLI's with ``_``) or CLI words."""
    from dudocrop.data.shards import atomic_write_bytes, read_manifest, resolve
    from dudocrop.data.sidecar import sidecar_dir

    a = _namespace(args)
    t0 = time.time()
    if not os.path.isfile(a.model):
        raise FileNotFoundError(f"--model {a.model}: no such file (ray_jobs/train_clip.py writes <out>/dudoclip.pt)")
    if a.batch_size < 1 or a.concurrency < 1:
        raise ValueError(f"--batch-size and --concurrency must be >= 1, got {a.batch_size}, {a.concurrency}")
    manifest = read_manifest(a.data)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {a.data}: run ray_jobs/prepare_data.py first")
    sha = model_sha256(a.model)
    shards = [s["name"] for s in manifest["shards"] if s["split"] in a.splits]
    todo = [s for s in shards if a.force or not is_fresh(a.data, s, sha)]
    print(f"embed: {len(shards)} shards in {a.splits}, {len(shards) - len(todo)} fresh, {len(todo)} to embed with "
          f"{a.model} (sha256 {sha[:12]})", flush=True)
    infos = {s: {"shard": s, "skipped": True} for s in shards if s not in todo}
    if todo:
        import ray

        from dudocrop.storage import ensure_local, publish
        from ray_jobs import common

        common.init_ray(a.address)
        device = "cuda" if a.gpu else "cpu"
        threads = max(1, int(a.cpus_per_task))
        model_ref = publish(a.model)  # a node without the driver's mirror fetches the model from there

        @ray.remote(num_cpus=a.cpus_per_task, num_gpus=1 if a.gpu else 0, max_retries=2)
        def task(shard: str) -> dict:
            import torch

            torch.set_num_threads(threads)
            ensure_local(a.model, model_ref)
            return embed_shard(a.data, shard, a.model, batch_size=a.batch_size, sha=sha, device=device)

        pending, queue = [], list(todo)
        while queue or pending:
            while queue and len(pending) < a.concurrency:
                pending.append(task.remote(queue.pop(0)))
            ready, pending = ray.wait(pending, num_returns=1)
            info = ray.get(ready[0])
            infos[info["shard"]] = info
            print(f"embed: {info['shard']}: {info['rows']} rows in {info['seconds']:.1f}s", flush=True)
    out = {"model": a.model, "model_sha256": sha, "splits": list(a.splits), "kind": KIND,
           "shards": [infos[s] for s in shards], "embedded": len(todo), "skipped": len(shards) - len(todo),
           "seconds": round(time.time() - t0, 3)}
    fs, base = resolve(sidecar_dir(a.data, KIND))
    fs.create_dir(base, recursive=True)
    atomic_write_bytes(fs, f"{base}/{MANIFEST}", (json.dumps(out, indent=2, default=str) + "\n").encode())
    print(f"embed: done, {len(todo)} shards embedded, {out['skipped']} fresh, in {out['seconds']:.1f}s", flush=True)
    return out


def _namespace(args) -> argparse.Namespace:
    from ray_jobs import common

    return common.as_namespace(args, parse_args, ("data", "model"))


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
