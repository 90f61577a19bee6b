"""Output folders on S3 (dudocrop.storage), against a real S3 API on localhost (moto's server mode): the mirror
round-trips files and their times, drops what was deleted, keeps Ray's folders on the bucket only; the lock object
admits exactly one writer; a node without the driver's files fetches the published ones; and (slow) a tiny
``train_all --out s3://...`` writes everything to the bucket, a second run from another machine's mirror resumes
it, MLflow (a tracking server with SQLite + S3 artifacts) holds its artifacts, and ``DuDoCROP.load("s3://...")``
works."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dudocrop import storage
from dudocrop.lock import FolderLockedError, folder_lock

REPO = Path(__file__).resolve().parents[1]


def _keys(bucket: str, prefix: str = "") -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_mirror_round_trips_files_and_times_and_deletions(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/run"
    a = storage.Mirror(uri, str(tmp_path / "a"))
    assert a.pull() == 0
    (tmp_path / "a" / "stages").mkdir(parents=True)
    (tmp_path / "a" / "stages" / "prepare.json").write_text('{"fingerprint": "1"}')
    time.sleep(0.05)
    (tmp_path / "a" / "stages" / "clip.json").write_text('{"fingerprint": "2"}')
    (tmp_path / "a" / "models").mkdir()
    (tmp_path / "a" / "models" / "m.pt").write_bytes(os.urandom(3000))
    (tmp_path / "a" / "models" / "ray_train").mkdir()  # Ray writes these to the bucket itself: never mirrored
    (tmp_path / "a" / "models" / "ray_train" / "x").write_text("local only")
    (tmp_path / "a" / ".dudocrop.lock").write_text("{}")
    assert a.push() == 3
    assert a.push() == 0  # nothing changed: nothing sent
    keys = _keys(s3_bucket, "run/")
    assert sorted(keys) == ["run/.mirror-times.json", "run/models/m.pt", "run/stages/clip.json",
                            "run/stages/prepare.json"]
    assert keys["run/models/m.pt"] == (tmp_path / "a" / "models" / "m.pt").read_bytes()

    b = storage.Mirror(uri, str(tmp_path / "b"))  # another machine's working copy
    assert b.pull() == 3
    for rel in ("stages/prepare.json", "stages/clip.json", "models/m.pt"):  # train_all orders markers by these
        assert os.stat(tmp_path / "b" / rel).st_mtime_ns == os.stat(tmp_path / "a" / rel).st_mtime_ns, rel
    assert (tmp_path / "b" / "models" / "m.pt").read_bytes() == keys["run/models/m.pt"]

    (tmp_path / "b" / "stages" / "clip.json").unlink()  # an invalidated stage: its marker must not come back
    b.push()
    assert "run/stages/clip.json" not in _keys(s3_bucket, "run/")
    assert storage.Mirror(uri, str(tmp_path / "c")).pull() == 2
    a.close()
    b.close()


def test_remote_path_maps_a_mirror_folder_to_the_bucket(s3_bucket, tmp_path):
    m = storage.Mirror(f"s3://{s3_bucket}/run/", str(tmp_path / "w"))
    assert storage.remote_path(str(tmp_path / "w" / "models" / "ray_train")) == str(tmp_path / "w" / "models" /
                                                                                     "ray_train")  # not yet active
    m.pull()
    try:
        assert storage.remote_path(str(tmp_path / "w" / "models" / "ray_train")) == \
            f"s3://{s3_bucket}/run/models/ray_train"
        assert storage.remote_path(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    finally:
        m.close()
    assert storage.remote_path(str(tmp_path / "w" / "models")) == str(tmp_path / "w" / "models")


def test_a_node_without_the_mirror_fetches_exactly_the_published_files(s3_bucket, tmp_path):
    m = storage.Mirror(f"s3://{s3_bucket}/run", str(tmp_path / "driver"))
    m.pull()
    models = tmp_path / "driver" / "models"
    models.mkdir()
    (models / "sde_image.pt").write_bytes(b"v1" * 100)
    (models / "pipeline.json").write_text("{}")
    try:
        ref = storage.publish(str(models))  # pushes first: pipeline.json was written during the stage
        assert ref["uri"] == f"s3://{s3_bucket}/run/models" and set(ref["files"]) == {"sde_image.pt", "pipeline.json"}
        assert storage.ensure_local(str(models), ref) == str(models)  # the driver's node: nothing fetched
        other = tmp_path / "node2" / "models"  # the same folder as another node sees it: absent
        storage.ensure_local(str(other), ref)
        assert (other / "sde_image.pt").read_bytes() == b"v1" * 100 and (other / "pipeline.json").read_text() == "{}"
        assert os.stat(other / "sde_image.pt").st_mtime_ns == os.stat(models / "sde_image.pt").st_mtime_ns

        time.sleep(0.01)
        (models / "sde_image.pt").write_bytes(b"v2" * 100)  # retrained: the node's copy is old now
        storage.ensure_local(str(other), storage.publish(str(models)))
        assert (other / "sde_image.pt").read_bytes() == b"v2" * 100
        one = storage.publish(str(models / "sde_image.pt"))  # a single file (embed's --model)
        storage.ensure_local(str(tmp_path / "node3" / "dudoclip.pt"), one)
        assert (tmp_path / "node3" / "dudoclip.pt").read_bytes() == b"v2" * 100
    finally:
        m.close()
    assert storage.publish(str(models)) is None  # no active mirror: a shared folder is read as it is


def test_the_s3_lock_admits_exactly_one_writer(s3_bucket):
    uri = f"s3://{s3_bucket}/run"
    won, lost, barrier = [], [], threading.Barrier(6)

    def contend(i):
        barrier.wait()
        try:
            with storage.remote_lock(uri, f"run {i}"):
                won.append(i)
                deadline = time.time() + 60  # held until every other attempt was answered (however slow)
                while len(won) + len(lost) < 6 and time.time() < deadline:
                    time.sleep(0.05)
        except storage.RemoteLockedError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5
    assert all(f"command: run {won[0]}" in e and f"{uri}/.dudocrop.lock" in e for e in lost)
    # released: the next run takes it, through the same folder_lock the jobs use
    with folder_lock(uri, "second") as key:
        assert key == f"{uri}/.dudocrop.lock"
        with pytest.raises(FolderLockedError, match="second"):
            with folder_lock(uri, "third"):
                pass
    assert _keys(s3_bucket, "run/") == {}


def test_a_scheme_without_exclusive_create_is_refused_by_name(monkeypatch):
    with pytest.raises(storage.RemoteLockedError, match="DUDOCROP_REMOTE_LOCK=off"):
        with storage.remote_lock("gs://bucket/run", "x"):
            pass
    monkeypatch.setenv("DUDOCROP_REMOTE_LOCK", "off")
    with storage.remote_lock("gs://bucket/run", "x") as key:
        assert key == "gs://bucket/run/.dudocrop.lock"


def test_mirror_refuses_a_local_path():
    with pytest.raises(ValueError, match="remote URI"):
        storage.Mirror("/tmp/folder")




# ---- end to end (slow): train_all on the bucket, MLflow tracking server with SQLite + S3 artifacts ---------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(db: Path, artifacts: str, env: dict) -> Iterator[str]:
    """``mlflow server`` as on a cluster: a database backend (SQLite here; PostgreSQL/MySQL there) and artifacts
    proxied to the bucket (``--artifacts-destination``); yields its URL."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the server and its workers end together
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not come up (exit {proc.poll()})") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def train_all_cli(out: str, env: dict, cwd: Path, timeout: float = 1500) -> str:
    from test_train_all import SMALLEST

    r = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "train_all.py"), "--out", out, *SMALLEST],
                       env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_train_all_on_s3_writes_everything_there_and_resumes_from_another_machine(s3_bucket, s3_server, tmp_path):
    """Its own Ray (a subprocess, as ``python ray_jobs/train_all.py`` runs): the session cluster's workers were
    started without the S3 endpoint in their environment."""
    out = f"s3://{s3_bucket}/run"
    env = {**os.environ, **s3_server, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg", "RAY_agent_register_timeout_ms": "300000",  # a loaded machine starts Ray slowly
           "RAY_memory_monitor_refresh_ms": "0"}  # and its memory is shared: no kills for other work's use
    env.pop("RAY_ADDRESS", None)
    with mlflow_server(tmp_path / "mlflow.db", f"s3://{s3_bucket}/mlflow", env) as url:
        env["MLFLOW_TRACKING_URI"] = url
        log1 = train_all_cli(out, {**env, "DUDOCROP_CACHE": str(tmp_path / "machine-a")}, tmp_path)
        keys = set(_keys(s3_bucket))
        for k in ("run/data/manifest.json", "run/models/dudoclip.pt", "run/models/sde_image.pt",
                  "run/models/sde_sinogram.pt", "run/models/sde_residual.pt", "run/models/pipeline.json",
                  "run/fusion/fusion.json", "run/report/report.md", "run/report/fig9_methods.png",
                  "run/mlflow_run.json", *(f"run/stages/{s}.json" for s in ("prepare", "caption", "clip", "embed",
                  "sde_image", "sde_sinogram", "priors", "sde_residual", "fusion", "evaluate"))):
            assert k in keys, k
        for run in ("dudoclip", "sde_image", "sde_sinogram", "sde_residual"):  # Ray Train wrote its checkpoints there
            assert any(k.startswith(f"run/models/ray_train/{run}/checkpoint_") for k in keys), run
        assert any(k.startswith("run/fusion/tune/fusion/") for k in keys)  # and Ray Tune its trials
        assert "run/mlflow.db" not in keys and "run/.dudocrop.lock" not in keys  # the server holds the runs
        assert not (tmp_path / "mlruns").exists()

        import mlflow

        client = mlflow.MlflowClient(url)
        parent = json.loads(_keys(s3_bucket, "run/mlflow_run.json")["run/mlflow_run.json"])["run_id"]
        assert {a.path for a in client.list_artifacts(parent, "models")} >= {"models/dudoclip.pt",
                                                                           "models/sde_image.pt"}
        logged = [k for k in keys if k.startswith("mlflow/") and k.endswith("/models/sde_residual.pt")]
        assert logged, "the tracking server did not put the artifacts on the bucket"

        # another machine (an empty mirror) resumes: every stage is complete
        t0 = time.time()
        log2 = train_all_cli(out, {**env, "DUDOCROP_CACHE": str(tmp_path / "machine-b")}, tmp_path)
        assert "train_all: [" in log1 and time.time() - t0 < 300
        done = [line for line in log2.splitlines() if line.startswith("train_all: finished")]
        assert done and "ran" not in done[0].split(":", 2)[2], log2[-2000:]
        assert done[0].count("skipped") == 10

    from dudocrop.pipeline.model import DuDoCROP

    model = DuDoCROP.load(f"{out}/models")
    assert model.geometry.name == "tiny" and model.clip is not None
