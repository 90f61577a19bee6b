"""``ray job submit`` on a two-node Ray cluster on this machine, outputs on S3 (moto's server): a head that takes no
work (``--num-cpus=0``) and a worker node with its own CPUs and temp dir. The tiny ``train_all`` runs with every
training worker on the worker node; the worker node is killed in the middle of a training stage (after its first
checkpoint reached the bucket) and a new one joins: the job recovers (Ray Train restarts the worker group, which
resumes from that checkpoint) and succeeds, its logs come back with ``ray job logs`` and its report is on the
bucket. A job that cannot recover must fail with a message, never hang: the test gives up after a deadline and
prints the logs.

    python -m pytest tests/test_multinode.py -m slow -q      # about 10 minutes on 2 cores

Two nodes on one host: each ``ray start`` gets its own ``--temp-dir`` (a short path: Ray's sockets live there
and a Unix socket path is limited to 107 bytes) and node-manager port; the processes are found by their temp dir
and ended by pid (never ``ray stop``, which ends every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
#: the image IR-SDE trains long enough (30 steps, a checkpoint every 3) for the kill to land between checkpoints
LONGER_STAGE_2 = ["--set", 'image_set=["steps=30", "batch_size=4", "checkpoint_every=3", "validate_every=0"]']


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(text: str) -> list[int]:
    """The pids of this machine's processes whose command line contains ``text`` (a node's own temp dir)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.append(int(d))
        except OSError:
            continue
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Node:
    """One ``ray start`` on this machine with its own temp dir; ``kill()`` ends its processes (SIGKILL, like a
    machine that goes away)."""

    def __init__(self, args: list[str], env: dict, port: int):
        self.tmp = tempfile.mkdtemp(prefix="ddcnode", dir="/tmp")
        self.port = port
        # every per-node port of its own: two nodes (and other Ray clusters) on one host collide on the defaults
        ports = [w for flag in ("--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                "--runtime-env-agent-port", "--metrics-export-port") for w in (flag, str(_free_port()))]
        r = subprocess.run([RAY, "start", *args, "--temp-dir", self.tmp, "--node-ip-address", "127.0.0.1",
                            "--node-manager-port", str(port), *ports, "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            self.kill()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise RuntimeError(f"ray start {' '.join(args)} failed: {r.stdout[-2000:]}{r.stderr[-3000:]}")

    def pids(self) -> list[int]:
        # the node's daemons name its temp dir; its worker processes are children of its raylet
        own = set(_pids_with(self.tmp)) | set(_pids_with(f"--node_manager_port={self.port}"))
        children = set()
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) in own:
                            children.add(int(d))
                except (OSError, ValueError, IndexError):
                    continue
        return sorted(own | children)

    def kill(self) -> None:
        for _ in range(3):
            _kill(self.pids())
            time.sleep(0.5)


@pytest.fixture
def cluster(s3_server):
    # a loaded 2-core machine starts a node's agents slowly: give them minutes, not Ray's default seconds
    # and no memory monitor: the machine's memory is shared with other work, whose use would make Ray kill ours
    env = {**os.environ, **s3_server, "RAY_AUTH_MODE": "disabled", "RAY_agent_register_timeout_ms": "300000",
           "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    nodes = []
    try:
        head = ["--head", "--num-cpus=0", "--num-gpus=0", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dash), "--include-dashboard=true",
                "--ray-client-server-port", str(_free_port())]
        nodes.append(Node(head, env, _free_port()))

        def add_worker() -> Node:
            node = Node(["--address", f"127.0.0.1:{gcs}", "--num-cpus=2", "--resources", '{"worker_node": 1}'],
                        env, _free_port())
            nodes.append(node)
            return node

        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "head": nodes[0], "add_worker": add_worker}
    finally:
        for node in reversed(nodes):
            node.kill()
            shutil.rmtree(node.tmp, ignore_errors=True)


def _job_logs(dashboard: str, job: str, env: dict) -> str:
    r = subprocess.run([RAY, "job", "logs", job, "--address", dashboard], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_train_all_job_on_two_nodes_survives_losing_the_worker_node(cluster, s3_bucket, s3_server, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from test_train_all import SMALLEST

    env, dash = cluster["env"], cluster["dashboard"]
    worker = cluster["add_worker"]()
    out = f"s3://{s3_bucket}/run"
    runtime_env = {"env_vars": {**s3_server, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "RAY_AUTH_MODE": "disabled",
                                "DUDOCROP_CACHE": str(tmp_path / "head-cache")}}
    job = f"dudocrop-multinode-{int(time.time())}"
    r = subprocess.run([RAY, "job", "submit", "--address", dash, "--submission-id", job, "--no-wait",
                        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
                        "python", "ray_jobs/train_all.py", "--out", out, *SMALLEST, *LONGER_STAGE_2],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    client = JobSubmissionClient(dash)

    def wait_for(pred, what: str, deadline: float) -> None:
        while not pred():
            status = client.get_job_status(job)
            if status in (JobStatus.FAILED, JobStatus.STOPPED) or time.time() > deadline:
                logs = client.get_job_logs(job)
                stages = "\n".join(line for line in logs.splitlines() if line.startswith("train_all:"))
                pytest.fail(f"{what}: job {status}\n{stages}\n...\n{logs[-6000:]}")
            time.sleep(2)

    # kill the worker node while stage 2 trains on it, once its first checkpoint is on the bucket
    import boto3

    s3 = boto3.client("s3")

    def checkpointed() -> bool:
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="run/models/ray_train/sde_image/checkpoint_")
        return listed.get("KeyCount", 0) > 0

    wait_for(checkpointed, "stage 2 never checkpointed", time.time() + 1200)
    worker.kill()
    t_kill = time.time()
    time.sleep(5)
    cluster["add_worker"]()  # a replacement machine joins
    wait_for(lambda: client.get_job_status(job) == JobStatus.SUCCEEDED, "no recovery", time.time() + 1200)
    recovered = time.time() - t_kill

    logs = _job_logs(dash, job, env)
    assert "train_all: finished" in logs and "train_all: evaluation report" in logs
    report = s3.get_object(Bucket=s3_bucket, Key="run/report/report.md")["Body"].read().decode()
    assert "Dual-domain Priors Fusion" in report
    # the restarted worker group resumed from the checkpoint on the bucket, not from step 0
    marker = json.loads(s3.get_object(Bucket=s3_bucket, Key="run/stages/sde_image.json")["Body"].read())
    assert marker["result"]["steps"] == 30 and marker["result"]["resumed_from"] > 0, marker["result"]

    # every training worker ran on a worker node: the head offers no CPUs
    from ray.util.state import list_actors, list_nodes

    nodes = list_nodes(address=dash, detail=True, limit=100)
    head = [n.node_id for n in nodes if n.is_head_node]
    trainers = list_actors(address=dash, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    assert trainers and len(head) == 1
    assert all(a.node_id != head[0] for a in trainers)
    dead_node_workers = [a for a in trainers if a.state == "DEAD" and a.node_id not in
                         {n.node_id for n in nodes if n.state == "ALIVE"}]
    assert dead_node_workers, "no training worker was on the killed node"
    print(f"multinode: job {job} finished {recovered:.0f}s after the worker node was killed; sde_image resumed "
          f"from step {marker['result']['resumed_from']}; {len(trainers)} training workers, none on the head")
