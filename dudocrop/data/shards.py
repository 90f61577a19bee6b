"""Parquet shards and their manifest: atomic writes, verification, deterministic splits.

Every file is written under a temporary name in its final folder and renamed into place, so no half-written
shard or manifest is ever visible under its final name; a crash leaves only ``*.tmp-*`` files, which the next
run removes. Shards are byte-deterministic for the same records (no timestamps anywhere), so an interrupted
and resumed run produces exactly the files of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dudocrop.ct.geometry import CONVENTION_VERSION, check_convention
from dudocrop.data.schema import ARRAY_FIELDS, SCHEMA_VERSION, absent_to_none, row_checksum, schema_metadata

MANIFEST_NAME = "manifest.json"


class CorruptShardError(ValueError):
    """A shard does not read back, or its bytes/rows do not match their recorded checksums."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    rows: int
    sha256: str
    bytes: int


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands (s3://, gs://, hdfs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def atomic_write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name, then rename it to ``path``; on a local file system through
    :func:`dudocrop.atomic.write_bytes` (file and folder fsynced, so it survives a power loss too)."""
    if isinstance(fs, pafs.LocalFileSystem):
        from dudocrop.atomic import write_bytes

        write_bytes(path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_shard(table: pa.Table, out_dir: str, name: str, split: str) -> ShardInfo:
    """Write one shard atomically (zstd Parquet, one row group per shard) and return its info."""
    fs, base = resolve(out_dir)
    fs.create_dir(base, recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, table.num_rows),
                   write_statistics=False, store_schema=True)
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(fs, _join(base, name), data)
    return ShardInfo(name=name, split=split, rows=table.num_rows, sha256=hashlib.sha256(data).hexdigest(),
                     bytes=len(data))


def file_sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_shard(out_dir: str, name: str, sha256: str | None = None, deep: bool = True) -> int:
    """Check a shard: the file hash (when known) and, if ``deep``, every row's array checksum.
    Returns the row count; raises :class:`CorruptShardError` naming the file otherwise."""
    fs, base = resolve(out_dir)
    path = _join(base, name)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise CorruptShardError(f"shard {path} is missing")
    if sha256 is not None:
        got = file_sha256(fs, path)
        if got != sha256:
            raise CorruptShardError(f"shard {path} is corrupted: sha256 {got[:12]}… != manifest {sha256[:12]}…")
    try:
        table = pq.read_table(path, filesystem=fs)
        schema_metadata(table.schema)
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
        raise CorruptShardError(f"shard {path} does not read back as a dudocrop slice table: {e}") from e
    if deep:
        for i, row in enumerate(iter_records(table)):
            if row_checksum(row) != row["checksum"]:
                raise CorruptShardError(f"shard {path} row {i} ({row['case_id']}): array checksum mismatch")
    return table.num_rows


def iter_records(table: pa.Table) -> Iterable[dict]:
    """Rows of a slice table as dicts with numpy arrays (None for null arrays)."""
    cols = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name in ARRAY_FIELDS:
            cols[name] = [absent_to_none(a) for a in col.to_numpy_ndarray()]
        else:
            cols[name] = col.to_pylist()
    for i in range(table.num_rows):
        yield {k: v[i] for k, v in cols.items()}


def cleanup_temporaries(out_dir: str) -> int:
    """Remove leftovers of interrupted atomic writes; returns how many were removed."""
    fs, base = resolve(out_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except FileNotFoundError:
        return 0
    stale = [i.path for i in infos if ".tmp-" in i.base_name
             or (i.base_name.startswith(".") and i.base_name.endswith(".tmp"))]  # dudocrop.atomic's temporaries
    for p in stale:
        fs.delete_file(p)
    return len(stale)


def write_manifest(out_dir: str, shards: list[ShardInfo], geometry: dict, args: dict) -> dict:
    """Write ``manifest.json`` atomically: counts, shard checksums, schema and geometry-convention versions and
    the exact arguments."""
    shards = sorted(shards, key=lambda s: s.name)
    counts: dict[str, int] = {}
    for s in shards:
        counts[s.split] = counts.get(s.split, 0) + s.rows
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "geometry": geometry,
        "geometry_convention": CONVENTION_VERSION,
        "args": args,
        "counts": dict(sorted(counts.items())),
        "total_rows": sum(counts.values()),
        "shards": [asdict(s) for s in shards],
    }
    fs, base = resolve(out_dir)
    fs.create_dir(base, recursive=True)
    atomic_write_bytes(fs, _join(base, MANIFEST_NAME), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def read_manifest(out_dir: str) -> dict | None:
    fs, base = resolve(out_dir)
    path = _join(base, MANIFEST_NAME)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        manifest = json.loads(f.read())
    geometry = manifest.get("geometry")
    if isinstance(geometry, dict) and isinstance(geometry.get("name"), str):
        check_convention(geometry["name"], manifest.get("geometry_convention"), path)
    return manifest


def shard_paths(out_dir: str, split: str | None = None) -> list[str]:
    """Full paths of the manifest's shards (optionally one split), for readers such as Ray Data."""
    m = read_manifest(out_dir)
    if m is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir}: run ray_jobs/prepare_data.py first")
    _, base = resolve(out_dir)
    prefix = out_dir.rstrip("/") if "://" in out_dir else base
    return [_join(prefix, s["name"]) for s in m["shards"] if split is None or s["split"] == split]


def assign_split(patient_id: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """Deterministic split from a hash of the patient id, so a patient never lands in two splits."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
    u = int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
