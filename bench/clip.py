"""Stage-1 (DuDoCLIP, paper §III-B-1, Eq. 3) evidence: held-out retrieval before and after Ray Train training, per
domain and pair, with chance level, and training samples/s with 1 and 2 workers (the scaling ratio).

    python bench/clip.py --json                          # tiny preset, synthetic tiny shards, template captions
    python bench/clip.py --json --data outputs/data      # prepared + captioned shards (needs a val split)

THE NUMBERS ARE FROM THE ``tiny`` PRESET'S RANDOM-INIT CLIP TOWERS (no pretrained weights exist for it): they show
that Eq. 3 training moves the controlled embeddings towards held-out captions, not what ViT-B-32 reaches.
Retrieval: each held-out (val) slice's image (or sinogram) embedding ranks the DISTINCT captions of the val split;
top-k = its own caption among the k nearest (chance = k / candidates). Samples/s: optimiser steps only (the first
steps after a start, evaluation and checkpoints excluded), global batch per second, on this machine's CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LABEL = ("tiny preset: RANDOM-init CLIP towers (no pretrained weights), synthetic tiny-geometry shards, template "
         "captions; not ViT-B-32 numbers")


def build_data(out: str, train_patients: int, val_patients: int, slices: int = 2) -> str:
    """Synthetic tiny shards (in-process, as ray_jobs/prepare_data.py's tasks) + template captions; reused when
    ``out`` already holds a manifest."""
    from dudocrop.captions import caption_shard, create_engine
    from dudocrop.ct.geometry import get_geometry
    from dudocrop.data.build import ShardSpec, SourceOptions, build_shard, list_case_refs
    from dudocrop.data.shards import read_manifest, write_manifest

    if read_manifest(out) is not None:
        return out
    opts = SourceOptions(source="synthetic", geometry="tiny", n_patients=train_patients + val_patients,
                         slices_per_patient=slices, seed=1)
    refs = list_case_refs(opts)
    n_train = train_patients * slices
    specs = [ShardSpec(f"train-{k // 8:05d}.parquet", "train", tuple(refs[k:min(k + 8, n_train)]))
             for k in range(0, n_train, 8)]
    specs += [ShardSpec(f"val-{k // 8:05d}.parquet", "val", tuple(refs[n_train + k:n_train + k + 8]))
              for k in range(0, len(refs) - n_train, 8)]
    infos = [build_shard(s, opts, out) for s in specs]
    write_manifest(out, infos, get_geometry("tiny").to_dict(), {"bench": "clip"})
    engine = create_engine("template")
    for s in specs:
        caption_shard(out, s.name, engine)
    return out


def _table(before: dict, after: dict) -> dict:
    out: dict = {}
    for d in ("image", "sinogram"):
        for pair, what in (("content", "clean-content caption"), ("control", "metal (QSPD) tuple")):
            e = {"target": what, "candidates": int(before[f"{d}/{pair}/candidates"])}
            for k in (1, 5):
                e[f"top{k}"] = {"before": round(before[f"{d}/{pair}/top{k}"], 4),
                                "after": round(after[f"{d}/{pair}/top{k}"], 4),
                                "chance": round(before[f"{d}/{pair}/chance_top{k}"], 4)}
            out.setdefault(d, {})[pair] = e
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--data", default=None, help="prepared + captioned shards (default: build tiny ones)")
    ap.add_argument("--work", default=None, help="where runs go (default: a temporary folder)")
    # 400 training slices: with 80 the nearly unique QSPD tuples are memorised and tuple retrieval stays at chance
    ap.add_argument("--train-patients", type=int, default=200)
    ap.add_argument("--val-patients", type=int, default=20)
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps of the 2-worker training run")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--speed-steps", type=int, default=30, help="steps of the 1-worker throughput run")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    a = ap.parse_args(argv)

    import ray

    from ray_jobs import train_clip

    t0 = time.time()
    work = a.work or tempfile.mkdtemp(prefix="bench-clip-")
    data = a.data or build_data(os.path.join(work, "data"), a.train_patients, a.val_patients)
    t_data = time.time() - t0
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    common = {"data": data, "preset": "tiny", "cpus_per_worker": a.cpus_per_worker, "log_every": 50,
              "set": {"batch_size": a.batch_size, "lr": a.lr, "epochs": 10 ** 6, "warmup_steps": 10,
                      "eval_every": 0, "checkpoint_every": 0}}
    runs = {}
    for workers, steps in ((2, a.steps), (1, a.speed_steps)):
        with contextlib.redirect_stdout(sys.stderr if a.json else sys.stdout):  # --json: stdout holds only JSON
            runs[workers] = train_clip.run({**common, "out": os.path.join(work, f"clip-{workers}w"),
                                            "workers": workers, "max_steps": steps, "name": f"bench-{workers}w"})
    ray.shutdown()
    main_run = runs[2]
    sps = {w: r["samples_per_s"] for w, r in runs.items()}
    result = {
        "label": LABEL,
        "towers_random": main_run["towers_random"],
        "data": {"path": data, "train_slices": main_run["train_rows"], "val_slices": main_run["val_rows"],
                 "build_and_caption_s": round(t_data, 1)},
        "training": {"workers": 2, "steps": main_run["steps"], "global_batch": a.batch_size, "lr": a.lr,
                     "schedule": "warm-up 10 + cosine", "seconds": round(main_run["seconds"], 1)},
        "retrieval_held_out": _table(main_run["retrieval_before"], main_run["retrieval_after"]),
        "mean_top1": {"before": _mean(main_run["retrieval_before"], 1), "after": _mean(main_run["retrieval_after"], 1)},
        "mean_top5": {"before": _mean(main_run["retrieval_before"], 5), "after": _mean(main_run["retrieval_after"], 5)},
        "samples_per_s": {"1_worker": round(sps[1], 2), "2_workers": round(sps[2], 2),
                          "scaling_ratio": round(sps[2] / sps[1], 3) if sps[1] else None},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "seconds": round(time.time() - t0, 1),
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def _mean(report: dict, k: int) -> float:
    from dudocrop.clip.train import mean_top

    return round(mean_top(report, k), 4)


if __name__ == "__main__":
    raise SystemExit(main())
