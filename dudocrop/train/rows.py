"""The rows a training stage reads: one split of the slice shards, only the columns it needs, with sidecars joined.

Each worker of a data-parallel run holds the split in memory (the columns of one domain: 3 MB per 512² slice) and
takes its part of every global batch by index (:func:`batch_indices`): a deterministic function of
``(seed, step)``, so all ranks agree on the batch without communication and a resumed run replays the same order.
This is the "equivalent" of Ray Data's ``get_dataset_shard`` that exact resume needs, and it avoids the Ray Data
read tasks that starve on small nodes (REFERENCE §6).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dudocrop.data.schema import ARRAY_FIELDS, SPLITS
from dudocrop.data.shards import CorruptShardError, read_manifest, resolve
from dudocrop.data.sidecar import KEY_COLUMNS, join_sidecar, read_sidecar


@dataclass
class SliceRows:
    """Columns of a split: arrays stacked as numpy (N, ...), other columns as lists."""

    columns: dict[str, np.ndarray | list]
    shard_of_row: list[str]

    def __len__(self) -> int:
        return len(self.shard_of_row)

    def take(self, idx: Sequence[int] | np.ndarray) -> dict[str, np.ndarray | list]:
        idx = np.asarray(idx, dtype=np.int64)
        return {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in self.columns.items()}


def _to_columns(table: pa.Table) -> dict[str, np.ndarray | list]:
    out: dict[str, np.ndarray | list] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if isinstance(col.type, pa.FixedShapeTensorType):
            out[name] = col.to_numpy_ndarray().astype(np.float32, copy=False)
        elif pa.types.is_fixed_size_list(col.type) or (pa.types.is_list(col.type) and name.startswith("e_")):
            out[name] = np.asarray(col.to_pylist(), dtype=np.float32)
        else:
            out[name] = col.to_pylist()
    return out


def _read_verified(fs, path: str, sha256: str | None) -> pa.BufferReader:
    """The shard's bytes, after checking them against the manifest's sha256 (refused when it records none)."""
    if not sha256:
        raise CorruptShardError(f"the manifest records no sha256 for shard {path}: re-run ray_jobs/prepare_data.py")
    try:
        with fs.open_input_file(path) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise CorruptShardError(f"shard {path} named by the manifest is missing") from e
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise CorruptShardError(f"shard {path} does not match the manifest (sha256 {got[:12]}… != {sha256[:12]}…): "
                                "it was replaced or damaged after prepare_data wrote it; re-run prepare_data")
    return pa.BufferReader(data)


def load_split(data_dir: str, split: str, columns: Sequence[str],
               sidecars: Mapping[str, Sequence[str]] | None = None) -> SliceRows:
    """Rows of ``split`` with the shard ``columns`` and, per sidecar kind, its listed columns joined by case_id.

    Each shard's bytes are checked against the manifest's sha256 as they are read (one read, hashed, then parsed
    from memory), so a shard replaced after the manifest was written (a train shard copied over a val shard puts a
    training patient into validation) raises :class:`~dudocrop.data.shards.CorruptShardError` naming the file.

    Raises FileNotFoundError when the data folder has no manifest, ValueError for an unknown split or columns a
    shard does not have, and the sidecar join's errors for missing or stale derived data."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {data_dir}: run ray_jobs/prepare_data.py first")
    fs, base = resolve(data_dir)
    want = list(dict.fromkeys([*KEY_COLUMNS, *columns]))
    tables, shard_of_row = [], []
    for s in manifest["shards"]:
        if s["split"] != split:
            continue
        path = f"{base}/{s['name']}"
        buf = _read_verified(fs, path, s.get("sha256"))
        have = pq.read_schema(buf).names
        bad = [c for c in want if c not in have]
        if bad:
            raise ValueError(f"shard {path} has no columns {bad} (it has {have})")
        t = pq.read_table(buf, columns=want)
        for kind, cols in (sidecars or {}).items():
            side = read_sidecar(data_dir, kind, s["name"], list(cols))
            if side is None:
                raise FileNotFoundError(f"no {kind} sidecar for shard {s['name']} under {data_dir}/{kind}")
            t = join_sidecar(t, side, kind)
        tables.append(t)
        shard_of_row += [s["name"]] * t.num_rows
    if not tables:
        raise ValueError(f"{data_dir} has no rows in split {split!r} (counts: {manifest.get('counts')})")
    cols = _to_columns(pa.concat_tables(tables))
    for f in ARRAY_FIELDS:
        a = cols.get(f)
        if isinstance(a, np.ndarray) and np.isnan(a).all(axis=tuple(range(1, a.ndim))).any():
            raise ValueError(f"split {split!r} of {data_dir} has rows without {f} (clinical data has no references): "
                             "supervised training needs them")
    return SliceRows(cols, shard_of_row)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Row indices of rank ``rank``'s part of the global batch of ``step``.

    Epoch ``e`` visits a permutation drawn from ``(seed, e)``; a global batch is ``batch_size`` consecutive
    entries of it (the tail that does not fill a batch is dropped; a split smaller than a batch is repeated) and
    rank ``r`` of ``world`` takes every ``world``-th entry from ``r``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < world or batch_size % world:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of the number of workers ({world})")
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(int(step), per_epoch)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), epoch]))
    reps = -(-batch_size // n)
    perm = np.concatenate([rng.permutation(n) for _ in range(reps)])
    glob = perm[k * batch_size:(k + 1) * batch_size]
    return glob[rank::world]
