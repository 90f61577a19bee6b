"""Evaluation that loses nothing already done: rows are appended to a JSON-lines file as they are made, and a slice
that fails is recorded as failed while the others go on.

A sampler failure (a CUDA error, an out-of-memory batch, one slice whose priors blow up) used to take its whole
batch with it, and the rows of every finished batch lived only in memory until the end of the run.
:func:`run_isolated` runs a batch and, when it raises, each of its slices alone; :class:`RowWriter` appends rows
with a flush and fsync per write, so a killed evaluation leaves every row written so far on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class RowWriter:
    """Append JSON rows to ``path`` (one object per line), each write flushed and fsynced. Opening truncates the
    file: it holds the rows of this run only."""

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = os.fspath(path)
        self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close() / the context manager
        self.count = 0

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for r in rows:
            self._f.write(json.dumps(dict(r), sort_keys=True) + "\n")
            self.count += 1
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a :class:`RowWriter` file (a last line cut short by a kill is dropped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def run_isolated(fn: Callable[[list[int]], T], indices: Sequence[int]
                 ) -> list[tuple[list[int], T | None, str | None]]:
    """``fn(indices)`` as one batch; if it raises, ``fn([i])`` for each index alone, so only the slices that fail
    on their own are lost. Returns ``(indices, result, None)`` per successful call and ``([i], None, error)`` per
    failed slice (``error``: the exception's type and message). KeyboardInterrupt and SystemExit pass through."""
    idx = list(indices)
    if not idx:
        return []
    try:
        return [(idx, fn(idx), None)]
    except Exception as e:  # noqa: BLE001 - any failure of one slice must not take the others with it
        if len(idx) == 1:
            return [(idx, None, f"{type(e).__name__}: {e}")]
    out: list[tuple[list[int], T | None, str | None]] = []
    for i in idx:
        try:
            out.append(([i], fn([i]), None))
        except Exception as e:  # noqa: BLE001
            out.append(([i], None, f"{type(e).__name__}: {e}"))
    return out
