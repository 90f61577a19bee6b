"""Data-layer benchmark: slices/s for simulation + shard writing with Ray Data on this machine's CPUs against the
same work in one plain Python process (the baseline), and MB/s read from the shards into the training loader.

    python bench/data.py --json [--geometry tiny] [--slices 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def plain_python(opts, specs, out: str) -> float:
    from dudocrop.data.build import build_shard

    t = time.perf_counter()
    for s in specs:
        build_shard(s, opts, out)
    return time.perf_counter() - t


def subprocess_env() -> dict[str, str]:
    """The job's environment: this one, with Ray's token authentication off only where the user has not chosen
    (as bench/clip.py does); a RAY_AUTH_MODE the user set is kept."""
    return {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def ray_data(args, out: str) -> float:
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "ray_jobs", "prepare_data.py"),
           "--source", "synthetic", "--geometry", args.geometry, "--out", out, "--n-patients", str(args.slices),
           "--slices-per-patient", "1", "--shard-slices", str(args.shard_slices), "--val-fraction", "0",
           "--test-fraction", "0"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    wall = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(f"prepare_data failed:\n{res.stderr[-3000:]}")
    line = next(ln for ln in res.stdout.splitlines() if "slices/s" in ln)
    build_s = float(line.split(" in ")[1].split("s")[0])
    return build_s, wall


def loader_mb_per_s(out: str, geometry: str, epochs: int = 3) -> float:
    """MB/s of array bytes read from the shards through Ray Data into training batches (image domain)."""
    import ray

    from dudocrop.data.loader import CropSpec, TrainingBatches
    from dudocrop.data.normalize import Normalization
    from dudocrop.data.shards import shard_paths

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(shard_paths(out), columns=["X_ma", "X_ref", "metal_mask"])
    norm = Normalization.for_geometry(geometry)
    nbytes = 0

    def counted(batches):
        nonlocal nbytes
        for b in batches:
            nbytes += sum(np.asarray(v).nbytes for v in b.values())
            yield b

    t = time.perf_counter()
    for _ in range(epochs):
        for _batch in TrainingBatches(counted(ds.iter_batches(batch_size=8, batch_format="numpy")), "image", norm,
                                      CropSpec(64, 64)):
            pass
    dt = time.perf_counter() - t
    ray.shutdown()
    return nbytes / dt / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--geometry", default="small")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--shard-slices", type=int, default=4)
    args = ap.parse_args(argv)

    from dudocrop.data.build import SourceOptions, list_case_refs, plan_shards

    opts = SourceOptions(source="synthetic", geometry=args.geometry, n_patients=args.slices, slices_per_patient=1)
    specs = plan_shards(list_case_refs(opts), args.shard_slices, 0.0, 0.0)
    tmp = tempfile.mkdtemp(prefix="dudocrop-bench-data-")
    try:
        plain_python(opts, specs[:1], os.path.join(tmp, "warm"))  # numba compile, BHC table, spectra
        base_s = plain_python(opts, specs, os.path.join(tmp, "plain"))
        ray_build_s, ray_wall_s = ray_data(args, os.path.join(tmp, "ray"))
        mbps = loader_mb_per_s(os.path.join(tmp, "ray"), args.geometry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "geometry": args.geometry, "slices": args.slices, "cpus": os.cpu_count(),
        "baseline_plain_python_slices_per_s": args.slices / base_s,
        "ray_data_slices_per_s": args.slices / ray_build_s,
        "ray_data_speedup_vs_plain": base_s / ray_build_s,
        "ray_data_wall_s_including_ray_start": ray_wall_s,
        "loader_read_mb_per_s": mbps,
    }
    print(json.dumps(out, indent=2) if args.json else out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
