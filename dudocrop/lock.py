"""One writer per output folder: a lock file that says who holds it, and is taken over when its holder is gone.

Two runs writing the same folder destroy each other's work (one's cleanup of interrupted temporaries deletes the
other's file mid-write; both resume the same checkpoints). ``with folder_lock(out, "prepare_data"):`` creates
``out/.dudocrop.lock`` exclusively (``O_CREAT | O_EXCL``) holding ``{host, pid, started, command}``. A second run
fails with :class:`FolderLockedError` naming the holder. A lock whose holder was on this host and is no longer
running (killed, crashed; its pid gone or reused by a process started later) is stale and taken over, so a
SIGKILLed run is simply re-run. A holder on another host cannot be checked from here: the error says which file to
remove once that run is known to be gone. The lock is re-entrant within one process (``train_all`` holds ``out``
while its stages lock ``out/models``, and the two stage-2 fits share ``out/models`` from two threads). An
``s3://`` folder is locked by a conditional create of the same object (:func:`dudocrop.storage.remote_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

LOCK_NAME = ".dudocrop.lock"
_held: dict[str, int] = {}  # lock path -> depth, for this process
_mutex = threading.Lock()

__all__ = ["LOCK_NAME", "FolderLockedError", "folder_lock", "lock_holder"]


class FolderLockedError(RuntimeError):
    """Another live run holds the output folder's lock."""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), which tells a reused pid apart; None if unknown."""
    st = _proc_stat(pid)
    return st[19] if st and len(st) > 19 else None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    st = _proc_stat(pid)
    if st and st[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    start = holder.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """The holder record of ``folder``'s lock, or None when it is not locked (or the record is unreadable)."""
    try:
        with open(os.path.join(folder, LOCK_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _describe(h: dict | None) -> str:
    if not h:
        return "an unknown run (unreadable lock record)"
    return (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}, command: "
            f"{h.get('command')}")


def _try_create(path: str, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _acquire(folder: str, path: str, command: str) -> None:
    os.makedirs(folder, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command}
    for _ in range(3):
        if _try_create(path, me):
            return
        # serialise stale takeovers, so two runs cannot both remove the lock and the second a fresh one
        with open(path + ".guard", "a") as g:
            fcntl.flock(g, fcntl.LOCK_EX)
            try:
                holder = lock_holder(folder)
                if holder is None and os.path.exists(path) and time.time() - os.path.getmtime(path) < 10:
                    time.sleep(0.2)  # being written right now
                    continue
                if holder is not None and (holder.get("host") != me["host"] or _alive(holder)):
                    other = holder.get("host") != me["host"]
                    raise FolderLockedError(
                        f"{folder} is in use by {_describe(holder)}; two runs writing one output folder destroy "
                        "each other's files. Wait for it, or use another output folder"
                        + (f" (if that run is gone, remove {path})" if other else ""))
                print(f"dudocrop: taking over the stale lock of {folder} held by {_describe(holder)} (no longer "
                      "running)", file=sys.stderr, flush=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            finally:
                fcntl.flock(g, fcntl.LOCK_UN)
    raise FolderLockedError(f"could not take the lock {path}: another run keeps taking it")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str | None = None) -> Iterator[str | None]:
    """Hold ``folder``'s lock for the ``with`` block (created if absent); yields the lock file's path (None for a
    lock object's URI for a remote folder). ``command`` is recorded for whoever finds the folder locked."""
    folder = str(folder)
    if "://" in folder and not folder.startswith("file://"):
        from dudocrop.storage import remote_lock

        with remote_lock(folder, command or " ".join(sys.argv)) as uri:
            yield uri
        return
    folder = os.path.realpath(folder.removeprefix("file://"))
    path = os.path.join(folder, LOCK_NAME)
    command = command or " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])
    with _mutex:
        if path in _held:
            _held[path] += 1
        else:
            _acquire(folder, path, command)
            _held[path] = 1
    try:
        yield path
    finally:
        with _mutex:
            _held[path] -= 1
            if _held[path] == 0:
                del _held[path]
                holder = lock_holder(folder)
                if holder is not None and holder.get("pid") == os.getpid():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
