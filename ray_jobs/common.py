"""Ray glue shared by the job scripts: joining or starting Ray, MLflow, and Ray Train runs that resume exactly.

A stage's train loop (a function of one ``config`` dict, run on every worker) uses:

    rank, world, device = worker()
    state = resume()                        # the latest checkpoint's state dict, or None
    ...
    report(metrics, state_fn if due else None)   # every worker calls it; rank 0's state becomes the checkpoint
    maybe_fail(config, step)                # fault injection for the tests (a worker dies abruptly once)

and the driver calls :func:`fit`. Ray Train V2 restarts the worker group after a failure
(``FailureConfig(max_failures)``) and :func:`resume` then returns the newest checkpoint written, so a killed
worker costs at most one checkpoint interval. Re-running a finished or interrupted job with the same ``name`` and
``storage_path`` resumes the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dudocrop.serialization import UnsafeFileError
from dudocrop.train.state import load_state, save_state

# ---- job arguments ----------------------------------------------------------------------------------------------


def as_namespace(args, parse_args: Callable, required: Sequence[str]) -> argparse.Namespace:
    """A job's ``run()`` input as parsed options: a Namespace (as is), CLI words / None (parsed), or a mapping of
    options (keys as the CLI's with ``_``) checked against the parser's options; ``required`` are the options the
    parser needs before any other can be set."""
    if isinstance(args, argparse.Namespace):
        return args
    if args is None or (isinstance(args, Sequence) and not isinstance(args, str)):
        return parse_args(args)
    if not isinstance(args, Mapping):
        raise ValueError(f"run() takes an argparse.Namespace, a mapping of CLI options or a list of CLI words, got "
                         f"{type(args).__name__}")
    a = dict(args)
    missing = [k for k in required if k not in a]
    if missing:
        raise ValueError(f"run() needs {missing}")
    ns = parse_args([w for k in required for w in (f"--{k}", str(a[k]))])
    for k, v in a.items():
        k = k.replace("-", "_")
        if not hasattr(ns, k):
            raise ValueError(f"run(): unknown option {k!r}; options are {sorted(vars(ns))}")
        setattr(ns, k, v)
    return ns


# ---- Ray ------------------------------------------------------------------------------------------------------


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster named by ``address`` / ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local
    Ray on this machine (the embedded default). Idempotent."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kw = {"log_to_driver": True}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, **kw)


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


# ---- MLflow ---------------------------------------------------------------------------------------------------


def mlflow_uri(out_dir: str) -> str:
    """``MLFLOW_TRACKING_URI`` if set (a tracking server on a cluster), else a SQLite store under ``out_dir``
    (MLflow refuses bare ``file:`` stores, REFERENCE §6)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    os.makedirs(out_dir, exist_ok=True)
    return "sqlite:///" + os.path.abspath(os.path.join(out_dir, "mlflow.db"))


#: what replaces a credential in a URI that is printed or stored.
REDACTED = "***"
#: query parameters of a tracking URI that hold credentials (tokens, passwords, signed-URL signatures).
_SECRET_PARAM = re.compile(r"token|passw|pwd|secret|key|auth|sig|credential", re.IGNORECASE)


def redact_uri(uri: str | None) -> str | None:
    """``uri`` as it may be printed or stored: the user-info (``user:password@``) and secret-looking query values
    replaced by :data:`REDACTED` (``MLFLOW_TRACKING_URI`` may carry them: http basic auth, a database password, a
    token). The one redaction for every log line, marker and loop config that names a tracking URI."""
    if not uri or "://" not in uri:
        return uri
    from urllib.parse import parse_qsl, urlencode, urlsplit

    parts = urlsplit(uri)
    out = uri
    if "@" in parts.netloc:  # edited in place: urlunsplit would turn sqlite:////abs into sqlite://abs
        out = out.replace(parts.netloc, f"{REDACTED}@{parts.netloc.rsplit('@', 1)[1]}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
            head, _, tail = out.partition("?")
            out = head + "?" + query + tail[len(parts.query):]
    return out


def storable_uri(uri: str | None) -> str | None:
    """The form of a tracking URI to put in a loop config (which Ray Train stores): :func:`redact_uri`. When it held
    credentials, this process's ``MLFLOW_TRACKING_URI`` is set to the full URI, so :func:`tracking_uri` finds them
    here and in the workers of a local Ray started from here (on a cluster: the job's ``runtime_env`` env_vars)."""
    red = redact_uri(uri)
    if red != uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    return red


def tracking_uri(stored: str | None) -> str | None:
    """The URI to connect with for a stored one: as is, or, when its credentials were redacted, the environment's
    ``MLFLOW_TRACKING_URI`` that it came from. ValueError when that is not there (naming what to set)."""
    if not stored or REDACTED not in stored:
        return stored
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and redact_uri(env) == stored:
        return env
    raise ValueError(f"the MLflow tracking URI {stored} had its credentials removed before it was stored: set "
                     "MLFLOW_TRACKING_URI to the full URI in this process's environment (on a Ray cluster, in the "
                     "job's runtime_env env_vars)")


@contextlib.contextmanager
def mlflow_run(tracking_uri: str | None, run_id: str | None) -> Iterator[object | None]:
    """Log into an existing MLflow run from a worker (rank 0) or the driver; a no-op when ``run_id`` is None.
    ``tracking_uri`` may be the redacted form a loop config holds (:func:`storable_uri`)."""
    if not run_id:
        yield None
        return
    import mlflow

    tracking_uri = _connect_uri(tracking_uri)

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    yield _RunLogger(client, run_id)


_connect_uri = tracking_uri  # mlflow_run's argument shadows the function's name


class _RunLogger:
    """Thin wrapper so workers log by run id without touching MLflow's global active-run stack."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, int | float) and v == v:
                self.client.log_metric(self.run_id, k, float(v), step=int(step))

    def params(self, values: Mapping[str, object]) -> None:
        for k, v in values.items():
            self.client.log_param(self.run_id, k, str(v)[:6000])

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)


# ---- inside a train loop ----------------------------------------------------------------------------------------


def worker() -> tuple[int, int, torch.device]:
    """(world rank, world size, device) of this worker."""
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def resume() -> dict | None:
    """The state dict of the newest complete checkpoint of this run (after a restart or a re-run), or None.

    Ray Train V2 registers a reported checkpoint only when its controller next polls the workers, although the
    report has already written it to storage; a worker killed in between would restart from the checkpoint
    BEFORE it and lose a second interval. So the persisted ``checkpoint_*`` folders newer than the registered one
    are considered too, newest first; one that does not load (cut short by the kill) is skipped. The first that
    loads wins, so the registered one is read only when nothing newer is complete."""
    registered = ray.train.get_checkpoint()
    for ckpt in _newer_persisted(registered):
        state = _load_checkpoint(ckpt, missing_ok=True)
        if state is not None:
            return state
    return _load_checkpoint(registered) if registered is not None else None


def _load_checkpoint(ckpt: Checkpoint, missing_ok: bool = False) -> dict | None:
    try:
        with ckpt.as_directory() as d:
            return load_state(d)
    except Exception:  # a folder cut short by the kill: no state.pt, or a truncated one
        if not missing_ok:
            raise
        return None


def _newer_persisted(registered: Checkpoint | None) -> list[Checkpoint]:
    """The run's ``checkpoint_<timestamp>`` folders on its storage newer than ``registered``, newest first."""
    import pyarrow.fs as pafs

    try:
        storage = ray.train.get_context().get_storage()
        fs, root = storage.storage_filesystem, storage.experiment_fs_path
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (AttributeError, NotImplementedError, OSError):
        return []
    after = os.path.basename(registered.path.rstrip("/")) if registered is not None else ""
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name > after), reverse=True)
    return [Checkpoint(path=f"{root.rstrip('/')}/{n}", filesystem=fs) for n in names]


def newest_state(run_dir: str) -> dict | None:
    """The state of the newest loadable ``checkpoint_*`` folder of a local Ray Train run folder (None if none),
    read on the driver before a run resumes (train_sde checks it was trained with the same settings)."""
    if "://" in run_dir or not os.path.isdir(run_dir):
        return None
    for name in sorted((n for n in os.listdir(run_dir) if n.startswith("checkpoint_")), reverse=True):
        try:
            return load_state(os.path.join(run_dir, name))
        except UnsafeFileError:
            raise
        except Exception:  # noqa: BLE001 - no state.pt or a truncated one (cut short by a kill): resume() skips it too
            continue
    return None


def report(metrics: Mapping[str, float], state: Callable[[], Mapping] | None = None) -> None:
    """Report metrics from every worker; when ``state`` is given, rank 0 saves ``state()`` as the checkpoint.

    All workers must call this at the same steps (Ray Train synchronises on it)."""
    rank = ray.train.get_context().get_world_rank()
    if state is not None and rank == 0:
        with tempfile.TemporaryDirectory(prefix="dudocrop-ckpt-") as d:
            save_state(d, state())
            ray.train.report(dict(metrics), checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(dict(metrics))


def maybe_fail(config: Mapping, step: int) -> None:
    """Fault injection for tests: with ``fail_at_step`` and ``fail_marker`` set, the worker of rank
    ``fail_rank`` (default 0) exits abruptly at that step the first time only (the marker file records it)."""
    at, marker = config.get("fail_at_step"), config.get("fail_marker")
    if at is None or marker is None or step != int(at):
        return
    if ray.train.get_context().get_world_rank() != int(config.get("fail_rank", 0)) or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(str(step))
    os._exit(1)


# ---- driver -----------------------------------------------------------------------------------------------------


def fit(train_loop: Callable[[dict], None], config: Mapping, *, name: str, storage_path: str, num_workers: int = 1,
        use_gpu: bool = False, cpus_per_worker: float = 1.0, max_failures: int = 2,
        keep_checkpoints: int = 2, callbacks: Sequence | None = None) -> ray.train.Result:
    """Run ``train_loop`` with DDP on ``num_workers`` workers (gloo on CPU, NCCL on GPU) and return the result.
    ``callbacks``: Ray Train ``UserCallback``s (ray_jobs/tune_sde.py forwards the reports to Tune with one).

    The run directory is ``storage_path/name``; running again with the same pair resumes from its latest
    checkpoint. ``storage_path`` must be shared storage (NFS, S3, ...) on a multi-node cluster; a path inside a
    :class:`dudocrop.storage.Mirror` (``train_all --out s3://...``) is given to Ray as its place on the bucket."""
    from dudocrop.storage import remote_path

    storage_path = remote_path(storage_path if "://" in storage_path else os.path.abspath(storage_path))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dict(config),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             callbacks=list(callbacks or [])),
    )
    return trainer.fit()


def checkpoint_state(result: ray.train.Result) -> dict:
    """The state dict of a finished run's latest checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError(f"training run {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return load_state(d)
