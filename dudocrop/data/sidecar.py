"""Sidecar tables: columns that later stages add to the slice shards without rewriting their arrays.

A sidecar of kind ``K`` for shard ``S`` lives at ``<data>/<K>/<S>.<K>.parquet`` and holds ``case_id`` and the
shard row's array ``checksum`` plus the new columns (DuDoCLIP embeddings, stage-3 priors, ...). Joining matches by
``case_id`` in the shard's row order and refuses stale rows (whose checksum no longer matches the shard's arrays),
so a re-prepared shard can never be silently paired with old derived data.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dudocrop.data.shards import atomic_write_bytes, resolve

KEY_COLUMNS = ("case_id", "checksum")


def sidecar_dir(data_dir: str, kind: str) -> str:
    if not kind or "/" in kind:
        raise ValueError(f"sidecar kind must be a plain folder name, got {kind!r}")
    return data_dir.rstrip("/") + "/" + kind


def sidecar_file(shard_name: str, kind: str) -> str:
    stem = shard_name[: -len(".parquet")] if shard_name.endswith(".parquet") else shard_name
    return f"{stem}.{kind}.parquet"


def write_sidecar(data_dir: str, kind: str, shard_name: str, table: pa.Table) -> str:
    """Write a sidecar atomically; ``table`` must hold the key columns. Returns its path."""
    missing = [c for c in KEY_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{kind} sidecar for {shard_name} lacks key columns {missing}")
    fs, base = resolve(sidecar_dir(data_dir, kind))
    fs.create_dir(base, recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = f"{base}/{sidecar_file(shard_name, kind)}"
    atomic_write_bytes(fs, path, sink.getvalue().to_pybytes())
    return path


def read_sidecar(data_dir: str, kind: str, shard_name: str, columns: list[str] | None = None) -> pa.Table | None:
    """The sidecar table, or None when it was never written."""
    fs, base = resolve(sidecar_dir(data_dir, kind))
    path = f"{base}/{sidecar_file(shard_name, kind)}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    cols = None if columns is None else list(dict.fromkeys([*KEY_COLUMNS, *columns]))
    return pq.read_table(path, filesystem=fs, columns=cols)


def is_fresh(data_dir: str, kind: str, shard_name: str, meta_key: bytes, made_by: str) -> bool:
    """The shard's ``kind`` sidecar exists, was made by ``made_by`` (its schema metadata under ``meta_key``: the
    sha256 of the models and settings that wrote it) and holds exactly the shard's (case_id, checksum) rows in
    order. An unreadable sidecar is not fresh (it is redone, not trusted)."""
    try:
        side = read_sidecar(data_dir, kind, shard_name, columns=[])
    except Exception:  # noqa: BLE001 - a damaged file is rewritten
        return False
    if side is None or (side.schema.metadata or {}).get(meta_key, b"").decode() != made_by:
        return False
    fs, base = resolve(data_dir)
    shard = pq.read_table(f"{base}/{shard_name}", filesystem=fs, columns=list(KEY_COLUMNS))
    return all(side[c].to_pylist() == shard[c].to_pylist() for c in KEY_COLUMNS)


def join_sidecar(shard: pa.Table, side: pa.Table, kind: str, allow_missing: bool = False,
                 remedy: str = "re-run the stage that writes it") -> pa.Table:
    """``shard`` with the sidecar's columns appended, matched by ``case_id`` (row order of the shard).

    Stale rows (array checksum changed since the sidecar was written) raise ValueError; rows without a sidecar
    row raise unless ``allow_missing`` (their new columns are then null)."""
    index: dict[str, int] = {}
    for i, c in enumerate(side["case_id"].to_pylist()):
        if c in index:
            raise ValueError(f"{kind} sidecar holds case_id {c!r} twice")
        index[c] = i
    side_sum = side["checksum"].to_pylist()
    take, missing, stale = [], [], []
    for c, k in zip(shard["case_id"].to_pylist(), shard["checksum"].to_pylist()):
        j = index.get(c)
        if j is None:
            missing.append(c)
        elif side_sum[j] != k:
            stale.append(c)
        take.append(j)
    if stale:
        raise ValueError(f"{kind} are stale for {len(stale)} rows (array checksum changed), e.g. {stale[:3]}: "
                         f"{remedy}")
    if missing and not allow_missing:
        raise ValueError(f"no {kind} for {len(missing)} rows, e.g. {missing[:3]}: {remedy}")
    idx = pa.array(take, type=pa.int64())
    out = shard
    for name in side.column_names:
        if name in KEY_COLUMNS or name in shard.column_names:
            continue
        out = out.append_column(side.schema.field(name), side[name].take(idx))
    return out
