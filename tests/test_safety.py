"""Hostile files and concurrent runs (issue 20, Critical / High): loading a file never runs code from it, a
config claiming a huge model fails before allocating, writes are durable, runs do not destroy each other's data."""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest
import torch

from dudocrop.serialization import UnsafeFileError


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile model file would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _check_refused_unrun(load, path, marker):
    with pytest.raises(UnsafeFileError, match=str(path.name)):
        load(str(path))
    assert not marker.exists(), "the loader ran the file's pickled call"
    # the payload is live: an unrestricted torch.load runs it (what the loaders did before)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_dudoclip_loader_does_not_run_a_pickled_call(tmp_path):
    from dudocrop.clip.train import FILE_FORMAT, load_dudoclip

    marker = tmp_path / "pwned"
    path = tmp_path / "dudoclip.pt"
    torch.save({"format": FILE_FORMAT, "config": {}, "trainable": {}, "meta": {"x": _Payload(marker)}}, path)
    _check_refused_unrun(load_dudoclip, path, marker)


def test_training_state_loader_does_not_run_a_pickled_call(tmp_path):
    from dudocrop.train.state import STATE_FILE, load_state, save_state

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    torch.save({"step": 3, "model": _Payload(marker)}, ckpt / STATE_FILE)
    _check_refused_unrun(lambda p: load_state(str(ckpt)), ckpt / STATE_FILE, marker)
    # what the training jobs save still loads (optimizer state, EMA, plain history)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), betas=(0.9, 0.99))
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    good = tmp_path / "good"
    save_state(str(good), {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 1,
                           "history": [{"step": 1, "top1": 0.5}], "config": {"ch_mult": (1, 2)}})
    back = load_state(str(good))
    assert back["step"] == 1 and torch.equal(back["model"]["weight"], net.weight.detach())
    opt.load_state_dict(back["optimizer"])


def test_fusion_cache_loader_does_not_run_a_pickled_call(tmp_path):
    from dudocrop.data.normalize import Normalization
    from dudocrop.eval.fusion import FusionCache

    marker = tmp_path / "pwned"
    path = tmp_path / "priors.pt"
    torch.save({"X_p": torch.zeros(1), "norm": _Payload(marker)}, path)
    _check_refused_unrun(FusionCache.load, path, marker)
    # a real cache round-trips (its Normalization saved as plain data)
    t = torch.rand(2, 1, 4, 4)
    cache = FusionCache(t, t, None, t > 0.5, t, t, t, t > 0.1, Normalization.for_geometry("tiny"), ["a", "b"])
    cache.save(str(tmp_path / "ok.pt"))
    back = FusionCache.load(str(tmp_path / "ok.pt"))
    assert back.norm == cache.norm and back.case_ids == ["a", "b"] and torch.equal(back.X_p, t)


def _tiny_sde_file(tmp_path):
    from dudocrop.sde.train import build_training, get_train_config, save_sde_model

    cfg = get_train_config("tiny", context_dim=8)
    unet, ema, _, _ = build_training(cfg)
    return save_sde_model(str(tmp_path / "sde_image.pt"), unet, ema, {"domain": "image"},
                          sde_config=cfg.sde_config())


def test_sde_loader_refuses_a_pickled_call_and_a_config_larger_than_its_weights(tmp_path):
    from dudocrop.sde.config import UNetConfig
    from dudocrop.sde.train import load_sde_model
    from dudocrop.sde.unet import ConditionalUNet

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"domain": "image", "unet_config": {}, "sde_config": {}, "weights": {}, "meta": _Payload(marker)},
               evil)
    _check_refused_unrun(load_sde_model, evil, marker)

    path = _tiny_sde_file(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["unet_config"]["nf"] = 1024  # the small file's config now claims a model of ~1e9 parameters
    with torch.device("meta"):
        claimed = sum(p.numel() for p in ConditionalUNet(UNetConfig(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in blob["unet_config"].items()})).parameters())
    assert claimed > 5e8
    torch.save(blob, tmp_path / "huge.pt")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ValueError, match="huge.pt: the stored weights do not fit"):
        load_sde_model(str(tmp_path / "huge.pt"))
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grew_mib < 0.1 * claimed * 4 / 2**20, f"the refused load allocated {grew_mib:.0f} MiB"
    assert load_sde_model(path).domain == "image"  # the honest file still loads


def test_dudoclip_loader_compares_shapes_before_building(tmp_path):
    from dudocrop.clip.train import build_dudoclip, load_dudoclip, save_dudoclip

    path = save_dudoclip(str(tmp_path / "dudoclip.pt"), build_dudoclip("tiny", 3), init_seed=3)
    blob = torch.load(path, weights_only=True)
    k = next(iter(blob["trainable"]))
    blob["trainable"][k] = torch.zeros(3, 5)
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"bad.pt: the stored weights do not fit.*{k}"):
        load_dudoclip(str(tmp_path / "bad.pt"))
    assert load_dudoclip(path).meta["init_seed"] == 3


# ---- durable writes ----------------------------------------------------------------------------------------------
def test_atomic_writers_fsync_file_and_folder(tmp_path, monkeypatch):
    import stat

    import pyarrow.fs as pafs

    from dudocrop.atomic import write_json
    from dudocrop.data.shards import atomic_write_bytes

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_json(tmp_path / "a.json", {"x": 1})
    assert synced == [False, True], "file, then its folder"
    synced.clear()
    atomic_write_bytes(pafs.LocalFileSystem(), str(tmp_path / "b.bin"), b"abc")
    assert synced == [False, True] and (tmp_path / "b.bin").read_bytes() == b"abc"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin"]


def test_plain_makes_metadata_loadable_without_unpickling_objects():
    from dudocrop.serialization import plain

    x = plain({"a": np.float32(1.5), "b": (1, 2), 3: np.arange(2), "t": torch.ones(1)})
    assert x["a"] == 1.5 and x["b"] == [1, 2] and x["3"] == [0, 1] and isinstance(x["t"], torch.Tensor)


# ---- shards read against the manifest ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two train slices and one val slice (tiny synthetic) with their manifest."""
    from dudocrop.ct.geometry import get_geometry
    from dudocrop.data.build import ShardSpec, SourceOptions, build_shard, list_case_refs
    from dudocrop.data.shards import write_manifest

    out = tmp_path_factory.mktemp("shards")
    opts = SourceOptions(source="synthetic", geometry="tiny", n_patients=3, slices_per_patient=1)
    refs = list_case_refs(opts)
    infos = [build_shard(ShardSpec("train-00000.parquet", "train", tuple(refs[:2])), opts, str(out)),
             build_shard(ShardSpec("val-00000.parquet", "val", tuple(refs[2:])), opts, str(out))]
    write_manifest(str(out), infos, get_geometry("tiny").to_dict(), {"test": True})
    return out


def test_load_split_refuses_a_shard_replaced_after_the_manifest(shards, tmp_path):
    import shutil

    from dudocrop.data.shards import CorruptShardError
    from dudocrop.train import load_split

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    val = load_split(str(data), "val", ["X_ma", "patient_id"])
    train = load_split(str(data), "train", ["X_ma", "patient_id"])
    assert set(val.columns["patient_id"]).isdisjoint(train.columns["patient_id"])
    # a train shard copied over the val shard: a training patient would be validated on
    shutil.copy(data / "train-00000.parquet", data / "val-00000.parquet")
    with pytest.raises(CorruptShardError, match="val-00000.parquet does not match the manifest"):
        load_split(str(data), "val", ["X_ma"])
    assert len(load_split(str(data), "train", ["X_ma"])) == 2  # untouched shards still read
    (data / "train-00000.parquet").unlink()
    with pytest.raises(CorruptShardError, match="train-00000.parquet named by the manifest is missing"):
        load_split(str(data), "train", ["X_ma"])


# ---- runs that must not destroy each other's data ------------------------------------------------------------------
def test_invalidate_deletes_only_inside_out(tmp_path):
    import json
    import shutil

    from ray_jobs.train_all import _invalidate, _marker

    orig = tmp_path / "orig"
    run = orig / "models" / "ray_train" / "sde_image"
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "checkpoint_000001" / "state.pt").write_bytes(b"weights")
    (orig / "stages").mkdir()
    result = {"run_dir": str(run), "run_dir_rel": "models/ray_train/sde_image"}
    (orig / "stages" / "sde_image.json").write_text(json.dumps({"fingerprint": "x", "result": result}))
    # an older marker (no run_dir_rel) and one naming an unrelated folder
    old = {"run_dir": str(run)}
    (orig / "stages" / "sde_sinogram.json").write_text(json.dumps({"fingerprint": "x", "result": old}))
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (orig / "stages" / "clip.json").write_text(json.dumps({"fingerprint": "x", "result": {"run_dir": str(victim)}}))
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)

    _invalidate(str(copy), "sde_image")  # the copy's marker names the ORIGINAL's absolute run folder
    assert (run / "checkpoint_000001" / "state.pt").exists(), "the original's checkpoints were deleted"
    assert not (copy / "models" / "ray_train" / "sde_image").exists()  # the copy's own were
    assert not os.path.exists(_marker(str(copy), "sde_image"))
    _invalidate(str(copy), "sde_sinogram")
    _invalidate(str(copy), "clip")
    assert run.exists() and victim.exists()
    _invalidate(str(orig), "sde_image")  # inside its own --out it still cleans up
    assert not run.exists()


def test_output_folder_lock_names_its_holder_refuses_a_second_run_and_is_taken_over_when_stale(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    from dudocrop.lock import LOCK_NAME, FolderLockedError, folder_lock, lock_holder
    from ray_jobs import prepare_data

    out = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dudocrop.lock import folder_lock\n"
         f"with folder_lock({str(out)!r}, 'the other run'):\n    print('held', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        # the other run's half-written shard: a second prepare_data must not clean it up
        (out / "train-00000.parquet.tmp-0123abcd").write_bytes(b"being written")
        with pytest.raises(FolderLockedError, match=f"in use by pid {holder.pid} on .*command: the other run"):
            prepare_data.run(prepare_data.parse_args(["--out", str(out)]))
        assert (out / "train-00000.parquet.tmp-0123abcd").exists()
        with pytest.raises(FolderLockedError):
            with folder_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
    # its holder was SIGKILLed (and is not reaped yet: a zombie still answers kill(pid, 0)): the lock is stale
    # and the next run takes it over
    for _ in range(100):
        if open(f"/proc/{holder.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    assert lock_holder(out)["pid"] == holder.pid
    with folder_lock(out, "me") as path:
        assert json.loads(open(path).read())["pid"] == os.getpid()
        with folder_lock(out):  # re-entrant within one process (train_all's stages, the stage-2 threads)
            pass
        assert os.path.exists(path)
    assert not (out / LOCK_NAME).exists()
    holder.wait()


def test_prepare_data_rebuilds_shards_built_with_other_options(ray_session, tmp_path, capsys):
    from ray_jobs import prepare_data

    def prep(out, *extra):
        capsys.readouterr()
        m = prepare_data.run(prepare_data.parse_args(["--out", str(out), "--n-patients", "2", "--slices-per-patient",
                                                      "1", "--shard-slices", "1", *extra]))
        return {s["name"]: s["sha256"] for s in m["shards"]}, capsys.readouterr().out

    first, _ = prep(tmp_path / "data", "--seed", "0")
    again, log = prep(tmp_path / "data", "--seed", "0")
    assert again == first and f"{len(first)} already complete, 0 to build" in log
    changed, log = prep(tmp_path / "data", "--seed", "1")  # other phantoms under the same shard names
    assert f"0 already complete, {len(first)} to build" in log and "built from other slices or options" in log
    fresh, _ = prep(tmp_path / "fresh", "--seed", "1")
    assert changed == fresh and set(changed) == set(first) and changed != first


def test_train_sde_refuses_to_resume_checkpoints_of_other_settings_or_data(shards, tmp_path):
    import json
    import shutil

    from dudocrop.data.shards import ShardInfo, write_manifest
    from dudocrop.sde.train import get_train_config
    from dudocrop.train.state import save_state
    from ray_jobs.train_sde import check_resumable, run_identity

    cfg = get_train_config("tiny", domain="image")
    ident = run_identity(cfg, str(shards))
    run_dir = tmp_path / "ray_train" / "sde_image"
    check_resumable(str(run_dir), ident)  # nothing to resume: a fresh start
    save_state(str(run_dir / "checkpoint_000001"), {"step": 4, "identity": ident})
    (run_dir / "checkpoint_000002").mkdir()  # cut short by a kill: skipped, as resume() skips it
    check_resumable(str(run_dir), ident)
    # the same settings with more frequent checkpoints and validation still resume
    check_resumable(str(run_dir), run_identity(get_train_config("tiny", domain="image", checkpoint_every=1,
                                                                validate_every=1), str(shards)))
    with pytest.raises(ValueError, match=r"sde_image were trained with other settings.*config\.lr"):
        check_resumable(str(run_dir), run_identity(get_train_config("tiny", domain="image", lr=cfg.lr * 3),
                                                   str(shards)))
    # another dataset (here: the same slices less the val shard): refused too
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    m = json.loads((other / "manifest.json").read_text())
    write_manifest(str(other), [ShardInfo(**s) for s in m["shards"] if s["split"] == "train"], m["geometry"], m["args"])
    with pytest.raises(ValueError, match="data_shards_sha256"):
        check_resumable(str(run_dir), run_identity(cfg, str(other)))
    # a state saved before identities existed is not silently resumed either
    save_state(str(run_dir / "checkpoint_000003"), {"step": 5, "config": cfg.to_dict()})
    with pytest.raises(ValueError, match="other settings"):
        check_resumable(str(run_dir), ident)
