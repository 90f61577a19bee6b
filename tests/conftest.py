"""Test-session settings: no hub downloads, no Ray token auth, one Ray cluster per session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# an empty torch hub: no test may pick up a backbone file the developer's machine happens to hold (LPIPS on or off
# would change what the evaluation computes); the LPIPS tests write their own files under their own TORCH_HOME
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="dudocrop-tests-torch-")
atexit.register(shutil.rmtree, os.environ["TORCH_HOME"], True)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster shared by every test that needs it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except Exception:  # noqa: BLE001 - progress bars are cosmetic
        pass
    yield ray
    ray.shutdown()



@pytest.fixture(scope="session")
def s3_server():
    """A local S3 API (moto's server mode: a real HTTP endpoint that boto3, pyarrow, Ray and MLflow all talk to);
    yields the environment that points them at it (what a user sets for MinIO too). Tests set it with
    ``s3_bucket`` (this process) or pass it on (subprocesses, Ray job runtime_env)."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the local S3 API, with this process's AWS_* variables pointing at it; its name."""
    import uuid

    import boto3

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    name = f"dudocrop-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
