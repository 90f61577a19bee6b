"""Output folders on shared object storage (``s3://``, ``gs://``, any pyarrow file system URI).

``train_all --out s3://bucket/run`` splits the run folder by who reads it:

* written and read by Ray workers on any node, through pyarrow: the shards and their sidecars (``data/``), the Ray
  Train checkpoints (``*/ray_train/``) and the Ray Tune trials (``fusion/tune/``). These live on the URI directly
  (:func:`remote_path` turns a mirror's local path into the URI that Ray's ``storage_path`` gets).
* written by the driver with ordinary file APIs (torch files, JSON, the report's pictures, the markers, the
  SQLite MLflow store): a :class:`Mirror`, a local working copy of the URI that is pulled when the run starts and
  pushed after every stage. Before Ray tasks read a model folder the driver calls :func:`publish`, and each task
  :func:`ensure_local`, which fetches those files from the URI on a node that lacks them (or holds old ones).

Every object is written whole (an S3 PUT is atomic: readers see the old object or the new one, never a part), so
the atomic-rename rule of :mod:`dudocrop.atomic` holds on object storage without a rename. One writer per URI is
enforced by :func:`remote_lock`, an S3 conditional create (``If-None-Match: *``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pyarrow.fs as pafs

from dudocrop.lock import FolderLockedError

__all__ = ["REMOTE_ONLY", "Mirror", "RemoteLockedError", "ensure_local", "is_remote", "publish", "remote_lock",
           "remote_path", "resolve"]

#: path components whose folders live on the URI only (read by Ray workers on any node), never in a mirror.
REMOTE_ONLY = ("data", "ray_train", "tune")
#: the active mirrors of this process: local root -> URI (so :func:`remote_path` maps a stage's local path).
_mirrors: dict[str, str] = {}
_objects: dict[str, Mirror] = {}  # URI -> the active Mirror (for publish)
#: the mirror's index on the bucket: each file's local modification time (an object's own time is its upload's,
#: to the second), so a pull restores the times train_all orders its stage markers by.
TIMES = ".mirror-times.json"


def is_remote(path: str | os.PathLike) -> bool:
    """``path`` is a URI of a remote file system (``s3://``, ``gs://``, ``hdfs://``), not a local path."""
    p = str(path)
    return "://" in p and not p.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI or local path (the one place that turns output URIs into pyarrow handles)."""
    from dudocrop.data.shards import resolve as _resolve

    return _resolve(uri)


def default_cache(uri: str) -> str:
    """The local working copy of ``uri``: ``$DUDOCROP_CACHE/mirror/<hash>`` (default ``~/.cache/dudocrop``)."""
    root = os.environ.get("DUDOCROP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dudocrop")
    return os.path.join(root, "mirror", hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16])


def _remote_only(rel: str) -> bool:
    """Not mirrored: under a :data:`REMOTE_ONLY` folder, a lock object or file, or a temporary."""
    name = rel.rsplit("/", 1)[-1]
    return (any(part in REMOTE_ONLY for part in rel.split("/")) or name.startswith(".dudocrop.lock")
            or name.endswith(".tmp") or rel == TIMES)


class Mirror:
    """A local working copy of the remote folder ``uri`` (see the module docstring); thread-safe ``push``."""

    def __init__(self, uri: str, local: str | None = None):
        if not is_remote(uri):
            raise ValueError(f"Mirror needs a remote URI (s3://bucket/folder), got {uri!r}")
        self.uri = uri.rstrip("/")
        self.local = os.path.abspath(local or default_cache(self.uri))
        self.fs, self.root = resolve(self.uri)
        self._synced: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) of the local file pushed/pulled
        self._mutex = threading.Lock()

    def remote(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}".rstrip("/")

    def _remote_files(self) -> dict[str, pafs.FileInfo]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        except OSError as e:
            raise OSError(f"cannot list {self.uri}: {e} (check the bucket exists and the AWS_* credentials / "
                          "AWS_ENDPOINT_URL of this process)") from e
        base = self.root.rstrip("/") + "/"
        return {i.path[len(base):]: i for i in infos if i.type == pafs.FileType.File and not _remote_only(
            i.path[len(base):])}

    def pull(self) -> int:
        """Make the local copy exactly the URI's files (outside :data:`REMOTE_ONLY`), with their modification
        times (train_all orders its markers by them); returns the number of files fetched."""
        with self._mutex:
            remote = self._remote_files()
            try:
                with self.fs.open_input_stream(f"{self.root}/{TIMES}") as f:
                    times = json.loads(f.read())
            except (FileNotFoundError, OSError, ValueError):
                times = {}
            if os.path.isdir(self.local):
                shutil.rmtree(self.local)
            os.makedirs(self.local, exist_ok=True)
            self._synced.clear()
            for rel, info in remote.items():
                dst = os.path.join(self.local, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with self.fs.open_input_stream(info.path) as src, open(dst, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 22)
                mtime = times.get(rel, info.mtime_ns)
                if mtime is not None:
                    os.utime(dst, ns=(int(mtime), int(mtime)))
                st = os.stat(dst)
                self._synced[rel] = (st.st_size, st.st_mtime_ns)
            _mirrors[self.local] = self.uri
            _objects[self.uri] = self
            return len(remote)

    def push(self) -> int:
        """Upload the local files changed since the last pull/push and delete the remote copies of files removed
        locally (a dropped stage marker must not come back with the next pull); returns the number uploaded."""
        with self._mutex:
            seen, sent = set(), 0
            for folder, _, names in os.walk(self.local):
                for name in names:
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, self.local).replace(os.sep, "/")
                    if _remote_only(rel):
                        continue
                    seen.add(rel)
                    st = os.stat(path)
                    if self._synced.get(rel) == (st.st_size, st.st_mtime_ns):
                        continue
                    if not isinstance(self.fs, pafs.S3FileSystem):  # S3 has no folders (pyarrow would add markers)
                        self.fs.create_dir(f"{self.root}/{os.path.dirname(rel)}".rstrip("/"), recursive=True)
                    with open(path, "rb") as src, self.fs.open_output_stream(f"{self.root}/{rel}") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
                    self._synced[rel] = (st.st_size, st.st_mtime_ns)
                    sent += 1
            gone = sorted(set(self._synced) - seen)
            for rel in gone:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(f"{self.root}/{rel}")
                del self._synced[rel]
            if sent or gone:
                with self.fs.open_output_stream(f"{self.root}/{TIMES}") as f:
                    f.write(json.dumps({k: v[1] for k, v in sorted(self._synced.items())}).encode())
            return sent

    def delete_remote(self, rel: str) -> None:
        """Remove the remote folder ``rel`` (e.g. a stage's Ray Train run that belongs to old inputs)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(f"{self.root}/{rel.strip('/')}")

    def close(self) -> None:
        _mirrors.pop(self.local, None)
        _objects.pop(self.uri, None)


def remote_path(path: str | os.PathLike) -> str:
    """``path`` itself, or, when it lies inside an active :class:`Mirror` of this process, the same place on the
    mirror's URI: the ``storage_path`` to give Ray Train / Tune, whose workers on other nodes cannot see the
    driver's disk."""
    p = os.path.abspath(str(path)) if not is_remote(path) else str(path)
    for local, uri in _mirrors.items():
        if p == local or p.startswith(local + os.sep):
            return uri + p[len(local):].replace(os.sep, "/")
    return str(path)


def _listing(path: str) -> dict[str, tuple[int, int]]:
    """rel path -> (size, mtime_ns) of the files at ``path`` (a file: the key "")."""
    if os.path.isfile(path):
        st = os.stat(path)
        return {"": (st.st_size, st.st_mtime_ns)}
    out = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if not _remote_only(rel):
                st = os.stat(full)
                out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def publish(path: str) -> dict | None:
    """Driver side, before Ray tasks on any node read the mirror file or folder ``path``: push the mirror it lies
    in and return a reference for :func:`ensure_local` (its URI and the exact files, sizes and times); None when
    ``path`` is in no mirror (a local or shared folder, read as it is)."""
    uri = remote_path(path)
    if uri == str(path) or not is_remote(uri):
        return None
    local = os.path.abspath(path)
    for root, mirror_uri in _mirrors.items():
        if local == root or local.startswith(root + os.sep):
            _objects[mirror_uri].push()
    return {"uri": uri, "files": _listing(local)}


def ensure_local(path: str, ref: dict | None) -> str:
    """Task side: make ``path`` hold exactly the files :func:`publish` recorded, fetching from its URI what this
    node lacks or holds in another version (a Ray task placed on another node than the driver, or a node that
    fetched an older model); returns ``path``. A no-op on the driver's node and for ``ref`` None."""
    if ref is None:
        return path
    want = {k: tuple(v) for k, v in ref["files"].items()}
    have = _listing(path) if os.path.exists(path) else {}
    stale = [rel for rel, sig in want.items() if have.get(rel) != sig]
    if not stale:
        return path
    fs, root = resolve(ref["uri"])
    for rel in stale:
        dst = os.path.join(path, rel) if rel else path
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        tmp = f"{dst}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with fs.open_input_stream(f"{root}/{rel}".rstrip("/")) as src, open(tmp, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 22)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path} is not on this node ({socket.gethostname()}) and "
                                    f"{ref['uri']}/{rel} is missing") from e
        os.utime(tmp, ns=(want[rel][1], want[rel][1]))
        os.replace(tmp, dst)  # atomic: a second task on this node fetching the same file writes the same bytes
    return path


# ---- one writer per remote folder -----------------------------------------------------------------------------


class RemoteLockedError(FolderLockedError):
    """Another run holds the remote output folder's lock object."""


def _s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL") or None)


@contextlib.contextmanager
def remote_lock(uri: str, command: str, lock_name: str = ".dudocrop.lock") -> Iterator[str]:
    """Hold the lock object ``<uri>/<lock_name>`` for the ``with`` block.

    It is created with S3's conditional PUT (``If-None-Match: *``), which exactly one of several concurrent
    writers wins; the others get :class:`RemoteLockedError` naming the holder. Whether a holder on another
    machine is still running cannot be checked from here, so a lock left by a killed run is removed by hand (the
    error names the object). Other URI schemes (gs://, hdfs://) have no such create through pyarrow: there one
    writer per folder is the user's rule (this raises for them, naming it, unless ``DUDOCROP_REMOTE_LOCK=off``).
    """
    uri = uri.rstrip("/")
    key_uri = f"{uri}/{lock_name}"
    if not uri.startswith("s3://"):
        if os.environ.get("DUDOCROP_REMOTE_LOCK") == "off":
            yield key_uri
            return
        raise RemoteLockedError(f"cannot lock {uri}: only s3:// has an exclusive create; make sure one run writes "
                                "there and set DUDOCROP_REMOTE_LOCK=off")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    key = f"{prefix}/{lock_name}".lstrip("/")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    body = json.dumps(me).encode()
    s3 = _s3_client()
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except s3.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
        try:
            holder = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception:  # noqa: BLE001 - removed meanwhile, or unreadable: still taken
            holder = {}
        raise RemoteLockedError(
            f"{uri} is in use by pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}; two runs writing one output folder destroy each other's files. Wait "
            f"for it, or use another --out (if that run is gone, delete {key_uri})") from None
    try:
        yield key_uri
    finally:
        try:
            if s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body:
                s3.delete_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - a lock that cannot be released is reported, not fatal
            print(f"dudocrop: could not release the lock {key_uri}: {e}", file=sys.stderr, flush=True)
