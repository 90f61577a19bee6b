"""Atomic writes on a local (or mounted) file system: a temporary file in the target's folder, then ``os.replace``.

A reader never sees a half-written model, report, picture or state file under its final name, and a killed
writer leaves only a ``.tmp`` file behind (shards on any pyarrow file system use
``dudocrop.data.shards.atomic_write_bytes``, which comes here for local paths). The file is fsynced before the rename
and its folder after it, so the new content (not an empty or half-flushed file) is what survives a power loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kw) -> Iterator[IO]:
    """``with atomic_open(p, "wb") as f: ...``: ``f`` is a temporary file that replaces ``p`` on success."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or creation in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain network mounts) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **kw) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, **kw) + "\n")


def torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)
