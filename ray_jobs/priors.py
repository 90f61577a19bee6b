"""Stage-3 data (paper Algorithm 1, OSRD step 1-2): run the trained stage-2 models over the shards and write the
priors X_p (Eq. 12) and X'_p = FBP(Y_p) (Eq. 10) in HU as a ``priors`` sidecar per shard; the residual IR-SDE then
trains on X_r^in = X_p − X'_p against X_r^ref = X_p − X_ref (Eq. 16).

    python ray_jobs/priors.py --data outputs/train_all/data --models outputs/train_all/models --split train

A Ray Data batch-inference job: one task per shard (GPU when ``--gpu``); shards whose sidecar is complete and
fresh (case_id and array checksum match, made by the same model files, steps and Eq. 10-12 settings:
:func:`provenance`) are
skipped, so an interrupted run resumes and changed models are re-sampled. Progress: a line per shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dudocrop.ct.geometry import get_geometry
from dudocrop.data.schema import tensor_column
from dudocrop.data.shards import read_manifest, resolve
from dudocrop.data.sidecar import is_fresh, write_sidecar
from dudocrop.pipeline.model import (
    MODEL_FILES,
    DuDoCROP,
    check_model_folder,
    geometry_batches,
    pipeline_config_with,
    save_pipeline_meta,
)
from dudocrop.pipeline.osro import OSROConfig, osro
from dudocrop.storage import ensure_local, publish

KIND = "priors"
META_KEY = b"priors_provenance"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", required=True, help="folder with sde_image.pt, sde_sinogram.pt (+ dudoclip.pt)")
    ap.add_argument("--split", default="train,val", help="comma-separated splits to process, or 'all' (the "
                    "residual IR-SDE trains on train and validates on val)")
    ap.add_argument("--steps", type=int, default=None, help="reverse-diffusion steps (default: the models' T)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="inference settings written to pipeline.json (PipelineConfig fields, osro.FIELD for "
                         "OSROConfig, e.g. osro.norm=affine): Eq. 12 here uses them")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--cpus-per-task", type=float, default=1.0)
    ap.add_argument("--address", default=None)
    return ap.parse_args(argv)


def provenance(models: str, steps: int | None, osro: OSROConfig | None = None) -> str:
    """sha256 over the model files the priors come from, the sampler steps and Eq. 10-12's settings: a sidecar
    made otherwise is stale."""
    from dudocrop.data.shards import file_sha256

    local = pafs.LocalFileSystem()
    files = {k: file_sha256(local, os.path.abspath(p)) for k, f in MODEL_FILES.items() if k != "residual"
             and os.path.isfile(p := os.path.join(models, f))}
    osro = osro or OSROConfig()
    eq12 = {f: getattr(osro, f) for f in ("normalize", "fidelity", "norm", "norm_sigma")}
    return hashlib.sha256(json.dumps({"files": files, "steps": steps, "osro": eq12}, sort_keys=True).encode()
                          ).hexdigest()


def shard_priors(data: str, models: str, shard: str, steps: int | None, batch_size: int, device: str,
                 made_by: str) -> int:
    """Compute and write the priors sidecar of one shard; returns its row count."""
    fs, base = resolve(data)
    t = pq.read_table(f"{base}/{shard}", filesystem=fs,
                      columns=["case_id", "checksum", "geometry", "X_ma", "Y_ma", "metal_mask", "metal_trace"])
    model = DuDoCROP.load(models, device=device, steps=steps)
    g = model.geometry
    cols = {k: t[k].combine_chunks().to_numpy_ndarray() for k in ("X_ma", "Y_ma", "metal_mask", "metal_trace")}
    xp = np.zeros((t.num_rows, *g.image_shape), np.float32)
    xpp = np.zeros_like(xp)
    # Eq. 10-12 as pipeline.json says; what acts on Eq. 15's output (safeguard, trust, completion) has no say here
    cfg = replace(model.config.osro, residual_refine=False, safeguard=None, trust=None, completion=False)
    # each slice in its own geometry (AAPM head slices among body slices: DuDoCROP.at)
    for geom, idx in geometry_batches(t["geometry"].to_pylist(), t.num_rows, batch_size):
        m = model.at(geom)
        b = {k: torch.from_numpy(np.ascontiguousarray(v[idx]))[:, None] for k, v in cols.items()}
        x, y, mask, trace = m.prepare(b["X_ma"], b["Y_ma"], b["metal_mask"], b["metal_trace"])
        x_prior, y_prior = m.priors(x, y, mask, trace)
        region = m.region(x, mask)
        res = osro(x_prior, y_prior, m.norm.sino(y), trace, m.fbp_unit, None, region, cfg)
        xp[idx] = m.norm.image_to_hu(res.X_p)[:, 0].cpu().numpy()
        xpp[idx] = m.norm.image_to_hu(res.X_p_prime)[:, 0].cpu().numpy()
    typ = pa.fixed_shape_tensor(pa.float32(), list(g.image_shape))
    side = pa.table({"case_id": t["case_id"], "checksum": t["checksum"],
                     "X_p": tensor_column(list(xp), typ),
                     "X_p_prime": tensor_column(list(xpp), typ)}
                    ).replace_schema_metadata({META_KEY: made_by.encode()})
    write_sidecar(data, KIND, shard, side)
    return t.num_rows


def run(a: argparse.Namespace) -> dict:
    import ray

    from ray_jobs import common

    m = read_manifest(a.data)
    if m is None:
        raise SystemExit(f"no manifest.json in {a.data}: run ray_jobs/prepare_data.py first")
    check_model_folder(a.models, meta=False)
    try:
        config = pipeline_config_with(a.set)
    except ValueError as e:
        raise SystemExit(f"priors: --set: {e}") from e
    # The residual IR-SDE trains on what Eq. 12 makes here, so these settings are the pipeline's from now on (a
    # fusion chosen for other priors is dropped with the old pipeline.json; train_all re-runs it).
    save_pipeline_meta(a.models, get_geometry(m["geometry"]["name"]), config)
    splits = set(a.split.split(","))
    shards = [s["name"] for s in m["shards"] if a.split == "all" or s["split"] in splits]
    made_by = provenance(a.models, a.steps, config.osro)
    todo = [s for s in shards if not is_fresh(a.data, KIND, s, META_KEY, made_by)]
    print(f"priors: {len(shards)} shards in split {a.split}, {len(shards) - len(todo)} complete, {len(todo)} to run",
          flush=True)
    t0 = time.time()
    rows = 0
    if todo:
        common.init_ray(a.address)
        data, models, steps, bs = a.data, a.models, a.steps, a.batch_size
        models_ref = publish(models)  # a node without the driver's mirror fetches the models from there
        device = "cuda" if a.gpu else "cpu"

        def work(row: dict) -> dict:
            torch.set_num_threads(max(1, int(a.cpus_per_task)))
            ensure_local(models, models_ref)
            n = shard_priors(data, models, row["shard"], steps, bs, device, made_by)
            print(f"priors: {row['shard']}: {n} rows", flush=True)
            return {"shard": row["shard"], "rows": n}

        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        out = ds.map(work, num_cpus=a.cpus_per_task, num_gpus=1 if a.gpu else 0).take_all()
        rows = sum(r["rows"] for r in out)
    dt = time.time() - t0
    print(f"priors: wrote {len(todo)} sidecars ({rows} rows) in {dt:.1f}s", flush=True)
    return {"shards_written": len(todo), "rows": rows, "seconds": dt}


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
