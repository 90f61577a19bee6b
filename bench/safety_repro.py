"""Reproduce the issue-20 findings against whichever dudocrop is on PYTHONPATH (before / after a change): one line
per finding, what happened; ``--json`` prints them as JSON.

    PYTHONPATH=<tree> python bench/safety_repro.py [--json]

Safe to run: the "hostile" payload only touches a file in a temporary folder, and the oversized model file claims
~1.1e9 parameters (a loader that builds before checking allocates ~5 GiB, then fails).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


class Payload:
    """Unpickling it runs ``touch <marker>`` (what a hostile file would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _err(fn) -> str:
    try:
        fn()
        return "no error"
    except Exception as e:  # noqa: BLE001 - the outcome is what is reported
        return f"{type(e).__name__}: {str(e)[:100]}"


def malicious_loaders(root: Path) -> dict[str, str]:
    from dudocrop.clip.train import FILE_FORMAT, load_dudoclip
    from dudocrop.eval.fusion import FusionCache
    from dudocrop.train.state import load_state

    ckpt = root / "checkpoint_000001"
    ckpt.mkdir()
    cases = {
        "load_dudoclip": (root / "dudoclip.pt", lambda m: {"format": FILE_FORMAT, "config": {}, "trainable": {},
                                                           "meta": {"x": Payload(m)}}, load_dudoclip),
        "load_state": (ckpt / "state.pt", lambda m: {"step": 1, "model": Payload(m)},
                       lambda p: load_state(str(Path(p).parent))),
        "FusionCache.load": (root / "priors.pt", lambda m: {"X_p": torch.zeros(1), "norm": Payload(m)},
                             FusionCache.load),
    }
    out = {}
    for name, (path, blob, load) in cases.items():
        marker = root / f"pwned-{name}"
        torch.save(blob(marker), path)
        err = _err(lambda load=load, path=path: load(str(path)))
        out[f"{name} of a file with a pickled os.system"] = f"payload ran: {marker.exists()}; {err}"
    return out


def oversized_sde(root: Path) -> dict[str, str]:
    from dudocrop.sde.train import build_training, get_train_config, load_sde_model, save_sde_model

    cfg = get_train_config("tiny", context_dim=8)
    unet, ema, _, _ = build_training(cfg)
    path = save_sde_model(str(root / "sde.pt"), unet, ema, {"domain": "image"}, sde_config=cfg.sde_config())
    blob = torch.load(path, weights_only=True)
    blob["unet_config"]["nf"] = 1024
    torch.save(blob, root / "huge.pt")
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    err = _err(lambda: load_sde_model(str(root / "huge.pt")))
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024
    size = os.path.getsize(root / "huge.pt") / 1e6
    return {f"SDE file of {size:.1f} MB whose config claims ~1.1e9 parameters":
            f"peak RSS +{grew:.0f} MiB in {time.time() - t0:.1f} s; {err[:70]}"}


def fsync(root: Path) -> dict[str, str]:
    from dudocrop.atomic import write_json

    synced, real = [], os.fsync

    def spy(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    os.fsync = spy
    try:
        write_json(root / "a.json", {"x": 1})
    finally:
        os.fsync = real
    return {"fsync calls of an atomic write": str(synced)}


def second_writer(root: Path) -> dict[str, str]:
    out = root / "data"
    out.mkdir()
    tmp = out / "train-00000.parquet.tmp-0123abcd"
    tmp.write_bytes(b"another run is writing this")
    try:
        import dudocrop.lock  # noqa: F401
    except ImportError:
        from dudocrop.data.shards import cleanup_temporaries

        cleanup_temporaries(str(out))  # what the second prepare_data does first
        return {"second prepare_data into a folder being written": f"no lock; other run's temporary survives: "
                                                                   f"{tmp.exists()}"}
    from ray_jobs import prepare_data

    code = (f"import time\nfrom dudocrop.lock import folder_lock\nwith folder_lock({str(out)!r}, 'the other run'):\n"
            "    print('held', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        err = _err(lambda: prepare_data.run(prepare_data.parse_args(["--out", str(out)])))
    finally:
        holder.kill()
        holder.wait()
    return {"second prepare_data into a folder being written": f"other run's temporary survives: {tmp.exists()}; "
                                                               f"{err[:90]}"}


def invalidate_copy(root: Path) -> dict[str, str]:
    from ray_jobs.train_all import _invalidate

    orig = root / "orig"
    run = orig / "models" / "ray_train" / "sde_image"
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "checkpoint_000001" / "state.pt").write_bytes(b"weights")
    (orig / "stages").mkdir()
    (orig / "stages" / "sde_image.json").write_text(json.dumps({"result": {"run_dir": str(run)}}))
    shutil.copytree(orig, root / "copy")
    _invalidate(str(root / "copy"), "sde_image")
    return {"_invalidate of a stage in a copied output folder": f"original's checkpoints still there: {run.exists()}"}


def swapped_shard(root: Path) -> dict[str, str]:
    from dudocrop.ct.geometry import get_geometry
    from dudocrop.data.build import ShardSpec, SourceOptions, build_shard, list_case_refs
    from dudocrop.data.shards import write_manifest
    from dudocrop.train import load_split

    data = root / "shards"
    opts = SourceOptions(source="synthetic", geometry="tiny", n_patients=3, slices_per_patient=1)
    refs = list_case_refs(opts)
    infos = [build_shard(ShardSpec("train-00000.parquet", "train", tuple(refs[:2])), opts, str(data)),
             build_shard(ShardSpec("val-00000.parquet", "val", tuple(refs[2:])), opts, str(data))]
    write_manifest(str(data), infos, get_geometry("tiny").to_dict(), {})
    shutil.copy(data / "train-00000.parquet", data / "val-00000.parquet")
    got: dict = {}
    err = _err(lambda: got.setdefault("rows", load_split(str(data), "val", ["X_ma", "patient_id"])))
    what = f"read {len(got['rows'])} 'val' rows of training patients" if "rows" in got else err[:90]
    return {"load_split after a train shard was copied over the val shard": what}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="safety-repro-"))
    res: dict[str, str] = {}
    try:
        for i, check in enumerate((malicious_loaders, oversized_sde, fsync, second_writer, invalidate_copy,
                                   swapped_shard)):
            sub = root / str(i)
            sub.mkdir()
            res.update(check(sub))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
