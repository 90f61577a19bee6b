"""Captions for slice records and shards (paper Algorithm 1 step 2: {X_ma, Y_ma} -> T_1, {X_r, Y_r} -> T_2;
§III-B): which view each prompt is shown, the caption columns, and the sidecar Parquet files that add them to
existing shards without rewriting the arrays.

Per slice, four captions (CLIP-ready, at most 77 tokens, cuts reported):

=================  ======  =========================================  =========================================
column             prompt  view shown (default)                        text
=================  ======  =========================================  =========================================
caption_x_content  P1      X_ref (X_ma when there is no reference)    the captioner's answer A1
caption_x_tuple    P2      X_r = X_ma - X_ref (X_ma without ref.)     QSPD from the mask + D from answer A2
caption_y_content  P3      Y_ref (Y_ma without reference)             the captioner's answer A3
caption_y_tuple    P4      Y_r = Y_ma - Y_ref (Y_ma without ref.)     QSPD from mask and trace + D from A4
=================  ======  =========================================  =========================================

Content captions describe the clean X_ref where it exists (§III-B "the clean image feature is translated as
content description"; Algorithm 1 writes X_ma, which is used for clinical data without a reference).

Sidecars: ``<captions_dir>/<shard stem>.captions.parquet``, one row per shard row, keyed by ``case_id`` and the
shard row's array ``checksum`` (a content hash) plus ``settings_hash`` (engine, prompts, options). A re-run
reuses every row whose key matches and captions only the rest; files are written atomically, a sidecar after
every batch of rows (an interruption loses at most one batch). DuDoCLIP reads a shard joined with its captions
through :func:`read_shard_with_captions` / :func:`iter_captioned_records`; :data:`CAPTION_TEXTS` names A1-A4.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from scipy import ndimage

from dudocrop.captions.analysis import analyse_anatomy
from dudocrop.captions.engine import CaptionEngine, CaptionRequest
from dudocrop.captions.prompts import prompt_texts
from dudocrop.captions.qspd import description_from_reply, image_qspd, render_tuple, sinogram_qspd
from dudocrop.captions.render import window_for
from dudocrop.captions.tokens import CONTEXT_LENGTH, fit_clip_context
from dudocrop.ct.geometry import get_geometry
from dudocrop.data.schema import row_checksum
from dudocrop.data.shards import atomic_write_bytes, iter_records, resolve
from dudocrop.data.sidecar import join_sidecar

log = logging.getLogger(__name__)

CAPTIONS_VERSION = 1
FIELDS = ("x_content", "x_tuple", "y_content", "y_tuple")
PROMPT_OF = {"x_content": "P1", "x_tuple": "P2", "y_content": "P3", "y_tuple": "P4"}
CAPTIONS_DIRNAME = "captions"
CAPTIONS_MANIFEST = "manifest.json"
KEY_COLUMNS = ("case_id", "checksum", "settings_hash")


@dataclass(frozen=True)
class CaptionSettings:
    """Options that change the captions (hashed into every row's key)."""

    qualified: bool = True  # False: prompts without their qualifier (Fig. 6(a) ablation)
    tuple_source: Literal["residual", "ma"] = "residual"  # 'ma': tuples from X_ma / Y_ma (Fig. 6(b) ablation)
    context_length: int = CONTEXT_LENGTH

    def __post_init__(self):
        if self.tuple_source not in ("residual", "ma"):
            raise ValueError(f"tuple_source must be 'residual' or 'ma', got {self.tuple_source!r}")


def settings_hash(engine_settings: dict, settings: CaptionSettings) -> str:
    blob = json.dumps({"engine": engine_settings, "captions": asdict(settings), "prompts": prompt_texts(),
                       "version": CAPTIONS_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- requests ---------------------------------------------------------------------------------------
def record_views(record: dict, tuple_source: str = "residual") -> dict[str, tuple[str, np.ndarray]]:
    """field -> (view name, array) shown for each caption field (table in the module docstring)."""
    has_ref = record.get("X_ref") is not None and record.get("Y_ref") is not None
    xma = np.asarray(record["X_ma"], np.float32)
    yma = np.asarray(record["Y_ma"], np.float32)
    if has_ref:
        xref, yref = np.asarray(record["X_ref"], np.float32), np.asarray(record["Y_ref"], np.float32)
        x_c, y_c = ("X_ref", xref), ("Y_ref", yref)
        residual = tuple_source == "residual"
        x_t = ("X_r", xma - xref) if residual else ("X_ma", xma)
        y_t = ("Y_r", yma - yref) if residual else ("Y_ma", yma)
    else:
        x_c, y_c, x_t, y_t = ("X_ma", xma), ("Y_ma", yma), ("X_ma", xma), ("Y_ma", yma)
    return {"x_content": x_c, "x_tuple": x_t, "y_content": y_c, "y_tuple": y_t}


def build_requests(record: dict, settings: CaptionSettings = CaptionSettings(),
                   fields: Sequence[str] = FIELDS) -> list[CaptionRequest]:
    """The captioner's requests for one record, in ``fields`` order."""
    g = get_geometry(record["geometry"])
    views = record_views(record, settings.tuple_source)
    return [CaptionRequest.create(PROMPT_OF[f], views[f][1], views[f][0], g, record["anatomy"], settings.qualified,
                                  tag=f"{record['case_id']}|{f}") for f in fields]


class ReplayEngine(CaptionEngine):
    """Answers from replies computed elsewhere (the ``ray.data.llm`` route), looked up by request tag; its
    settings are those of the engine that produced them."""

    name = "replay"

    def __init__(self, replies: dict[str, str], settings: dict):
        self.replies, self._settings = replies, settings

    def settings(self) -> dict:
        return self._settings

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        missing = [r.tag for r in requests if r.tag not in self.replies]
        if missing:
            raise KeyError(f"no reply for {len(missing)} requests, e.g. {missing[:3]}")
        return [self.replies[r.tag] for r in requests]


# ---- rows ---------------------------------------------------------------------------------------------
def caption_row(record: dict, replies: dict[str, str], settings: CaptionSettings, key_hash: str) -> dict:
    """One sidecar row: keys, views, raw replies, CLIP-ready captions with token reports, and QSPD fields."""
    g = get_geometry(record["geometry"])
    views = record_views(record, settings.tuple_source)
    mask = np.asarray(record["metal_mask"]) > 0.5
    ref = record.get("X_ref")
    ring = ndimage.binary_dilation(mask, iterations=max(1, round(5.0 / g.pixel_size))) if mask.any() else mask
    anat = analyse_anatomy(ref if ref is not None else record["X_ma"], g, record["anatomy"],
                           exclude=None if ref is not None else ring)
    xq = image_qspd(mask, g, anatomy=anat, description=description_from_reply(replies["x_tuple"]))
    yq = sinogram_qspd(mask, record["metal_trace"], g, anatomy=anat,
                       description=description_from_reply(replies["y_tuple"]))
    row = {"case_id": record["case_id"], "checksum": record.get("checksum") or row_checksum(record),
           "settings_hash": key_hash, "region": anat.region}
    for f in FIELDS:
        reply = replies[f]
        if f.endswith("tuple"):
            rt = render_tuple(xq if f == "x_tuple" else yq, settings.context_length)
            text, rep = rt.text, rt.report
        else:
            text, rep = fit_clip_context(reply, settings.context_length, what=f"{record['case_id']} {f}")
        row.update({f"view_{f}": views[f][0], f"reply_{f}": reply, f"caption_{f}": text,
                    f"tokens_{f}": rep.tokens, f"truncated_{f}": rep.truncated})
    t = yq.trace
    row.update({
        "qspd_quantity": xq.quantity,
        "qspd_areas_mm2": [o.area_mm2 for o in xq.objects],
        "qspd_diameters_mm": [o.diameter_mm for o in xq.objects],
        "qspd_centroids_mm": [list(o.centroid_mm) for o in xq.objects],
        "qspd_positions": [o.position for o in xq.objects],
        "qspd_x_description": xq.description,
        "qspd_y_description": yq.description,
        "qspd_trace_views": t.views_covered,
        "qspd_trace_channel_min": t.channel_min,
        "qspd_trace_channel_max": t.channel_max,
        "qspd_trace_detector_fraction": t.detector_fraction,
        "qspd_trace_mean_width_channels": t.mean_width_channels,
    })
    return row


def caption_schema() -> pa.Schema:
    fields = [pa.field(k, pa.string(), nullable=False) for k in KEY_COLUMNS] + [pa.field("region", pa.string())]
    for f in FIELDS:
        fields += [pa.field(f"view_{f}", pa.string()), pa.field(f"reply_{f}", pa.string()),
                   pa.field(f"caption_{f}", pa.string()), pa.field(f"tokens_{f}", pa.int32()),
                   pa.field(f"truncated_{f}", pa.bool_())]
    fields += [
        pa.field("qspd_quantity", pa.int32()),
        pa.field("qspd_areas_mm2", pa.list_(pa.float32())),
        pa.field("qspd_diameters_mm", pa.list_(pa.float32())),
        pa.field("qspd_centroids_mm", pa.list_(pa.list_(pa.float32(), 2))),
        pa.field("qspd_positions", pa.list_(pa.string())),
        pa.field("qspd_x_description", pa.string()),
        pa.field("qspd_y_description", pa.string()),
        pa.field("qspd_trace_views", pa.int32()),
        pa.field("qspd_trace_channel_min", pa.int32()),
        pa.field("qspd_trace_channel_max", pa.int32()),
        pa.field("qspd_trace_detector_fraction", pa.float32()),
        pa.field("qspd_trace_mean_width_channels", pa.float32()),
    ]
    return pa.schema(fields, metadata={b"dudocrop_captions": json.dumps({"version": CAPTIONS_VERSION}).encode()})


CAPTION_COLUMNS = tuple(f.name for f in caption_schema() if f.name not in ("case_id", "checksum"))


def rows_to_table(rows: list[dict]) -> pa.Table:
    schema = caption_schema()
    return pa.Table.from_pylist(rows, schema=schema)


def caption_records(records: Sequence[dict], engine: CaptionEngine, settings: CaptionSettings = CaptionSettings(),
                    key_hash: str | None = None) -> list[dict]:
    """Caption rows for records: every request of every record goes to the engine in one call (the engine
    batches), then the rows are assembled in record order."""
    key_hash = key_hash or settings_hash(engine.settings(), settings)
    reqs = [rq for r in records for rq in build_requests(r, settings)]
    replies = engine.caption(reqs) if reqs else []
    if len(replies) != len(reqs):
        raise RuntimeError(f"engine {engine.name!r} returned {len(replies)} replies for {len(reqs)} requests")
    rows = []
    for i, r in enumerate(records):
        rep = dict(zip(FIELDS, replies[i * len(FIELDS):(i + 1) * len(FIELDS)]))
        rows.append(caption_row(r, rep, settings, key_hash))
    return rows


# ---- sidecars -----------------------------------------------------------------------------------------
def sidecar_name(shard_name: str) -> str:
    """``train-00000.parquet`` -> ``train-00000.captions.parquet``."""
    stem = shard_name[: -len(".parquet")] if shard_name.endswith(".parquet") else shard_name
    return f"{stem}.captions.parquet"


def captions_dir_of(data_dir: str, captions_dir: str | None = None) -> str:
    return captions_dir or data_dir.rstrip("/") + "/" + CAPTIONS_DIRNAME


def _read_table(uri_dir: str, name: str, columns=None) -> pa.Table | None:
    fs, base = resolve(uri_dir)
    path = base.rstrip("/") + "/" + name
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_captions(data_dir: str, shard_name: str, captions_dir: str | None = None,
                  columns: Sequence[str] | None = None) -> pa.Table | None:
    """A shard's caption sidecar (None when it does not exist)."""
    return _read_table(captions_dir_of(data_dir, captions_dir), sidecar_name(shard_name), columns)


def pending_rows(data_dir: str, shard_name: str, key_hash: str, captions_dir: str | None = None) -> int:
    """How many rows of a shard have no caption row with a matching key; reads only key columns."""
    fs, base = resolve(data_dir)
    keys = pq.read_table(base.rstrip("/") + "/" + shard_name, filesystem=fs, columns=["case_id", "checksum"])
    try:
        side = read_captions(data_dir, shard_name, captions_dir, columns=list(KEY_COLUMNS))
    except Exception as e:  # noqa: BLE001 - an unreadable sidecar is redone, not trusted
        log.warning("caption sidecar of %s unreadable (%s): redoing it", shard_name, e)
        side = None
    done = _done_keys(side, key_hash)
    return sum(1 for c, k in zip(keys["case_id"].to_pylist(), keys["checksum"].to_pylist()) if (c, k) not in done)


def _done_keys(side: pa.Table | None, key_hash: str) -> dict[tuple[str, str], int]:
    if side is None:
        return {}
    out = {}
    for i, (c, k, h) in enumerate(zip(*(side[n].to_pylist() for n in KEY_COLUMNS))):
        if h == key_hash:
            out[(c, k)] = i
    return out


@dataclass(frozen=True)
class SidecarInfo:
    shard: str
    sidecar: str
    rows: int
    reused: int
    captioned: int
    sha256: str
    truncated: int  # captions cut to fit the CLIP context (all four fields)
    empty_replies: int
    seconds: float


def _shard_state(data_dir: str, shard_name: str, key_hash: str, captions_dir: str | None):
    """(rows reused from the sidecar or None, [(row index, record) still to caption])."""
    fs, base = resolve(data_dir)
    table = pq.read_table(base.rstrip("/") + "/" + shard_name, filesystem=fs)
    try:
        old = read_captions(data_dir, shard_name, captions_dir)
    except Exception as e:  # noqa: BLE001 - an unreadable sidecar is redone, not trusted
        log.warning("caption sidecar of %s unreadable (%s): redoing it", shard_name, e)
        old = None
    done = _done_keys(old, key_hash)
    old_rows = old.to_pylist() if old is not None and done else []
    rows: list[dict | None] = []
    todo: list[tuple[int, dict]] = []
    for i, rec in enumerate(iter_records(table)):
        j = done.get((rec["case_id"], rec["checksum"]))
        rows.append(old_rows[j] if j is not None else None)
        if j is None:
            todo.append((i, rec))
    return rows, todo


def pending_requests(data_dir: str, shard_name: str, key_hash: str, settings: CaptionSettings = CaptionSettings(),
                     captions_dir: str | None = None) -> list[CaptionRequest]:
    """The requests of a shard's rows that have no caption yet (tagged ``<case_id>|<field>``)."""
    _, todo = _shard_state(data_dir, shard_name, key_hash, captions_dir)
    return [rq for _, rec in todo for rq in build_requests(rec, settings)]


def caption_shard(data_dir: str, shard_name: str, engine: CaptionEngine,
                  settings: CaptionSettings = CaptionSettings(), captions_dir: str | None = None,
                  batch_rows: int = 64, key_hash: str | None = None) -> SidecarInfo:
    """Caption one shard into its sidecar (atomic writes); rows whose key already matches are reused.

    The shard file is only read. ``batch_rows`` bounds how many slices are in memory per engine call, and the
    sidecar is rewritten (atomically) after every such batch with the rows done so far: an interruption loses at
    most one batch, and the next call captions only the rows still missing. ``key_hash`` overrides the settings
    hash (a driver that hashed the settings without loading the engine)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    t0 = time.time()
    key_hash = key_hash or settings_hash(engine.settings(), settings)
    rows, todo = _shard_state(data_dir, shard_name, key_hash, captions_dir)
    cfs, cbase = resolve(captions_dir_of(data_dir, captions_dir))
    cfs.create_dir(cbase, recursive=True)
    path = cbase.rstrip("/") + "/" + sidecar_name(shard_name)

    def write() -> tuple[pa.Table, bytes]:
        # a partial sidecar holds only finished rows, in shard order; readers see it complete or not at all
        table = rows_to_table([r for r in rows if r is not None])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        blob = sink.getvalue().to_pybytes()
        atomic_write_bytes(cfs, path, blob)
        return table, blob

    out, data = (None, b"") if todo else write()
    for k in range(0, len(todo), batch_rows):
        part = todo[k:k + batch_rows]
        for (i, _), row in zip(part, caption_records([r for _, r in part], engine, settings, key_hash)):
            rows[i] = row
        out, data = write()
        log.info("captions: %s: %d/%d rows to caption done", shard_name, min(k + batch_rows, len(todo)), len(todo))
    info = _info(shard_name, out, data, reused=len(rows) - len(todo), captioned=len(todo), seconds=time.time() - t0)
    log.info("captions: %s -> %s: %d rows (%d reused, %d captioned, %d truncated) in %.1fs", shard_name,
             info.sidecar, info.rows, info.reused, info.captioned, info.truncated, info.seconds)
    return info


def _info(shard_name: str, table: pa.Table, data: bytes, reused: int, captioned: int, seconds: float) -> SidecarInfo:
    trunc = sum(int(pc.sum(table[f"truncated_{f}"]).as_py() or 0) for f in FIELDS)
    empty = sum(sum(1 for t in table[f"reply_{f}"].to_pylist() if not t) for f in FIELDS)
    return SidecarInfo(shard_name, sidecar_name(shard_name), table.num_rows, reused, captioned,
                       hashlib.sha256(data).hexdigest(), trunc, empty, round(seconds, 3))


def sidecar_info(data_dir: str, shard_name: str, captions_dir: str | None = None) -> SidecarInfo:
    """Info of an existing sidecar (for a manifest written after a run that skipped it)."""
    cfs, cbase = resolve(captions_dir_of(data_dir, captions_dir))
    path = cbase.rstrip("/") + "/" + sidecar_name(shard_name)
    with cfs.open_input_stream(path) as f:
        data = f.read()
    table = pq.read_table(pa.BufferReader(data))
    return _info(shard_name, table, data, reused=table.num_rows, captioned=0, seconds=0.0)


def write_captions_manifest(data_dir: str, infos: Sequence[SidecarInfo], engine_settings: dict,
                            settings: CaptionSettings, captions_dir: str | None = None,
                            geometries: Sequence[str] = (), extra: dict | None = None) -> dict:
    """``<captions_dir>/manifest.json``: engine and settings, prompts, windows, per-sidecar checksums and counts."""
    infos = sorted(infos, key=lambda i: i.shard)
    manifest = {
        "captions_version": CAPTIONS_VERSION,
        "engine": engine_settings,
        "settings": asdict(settings),
        "settings_hash": settings_hash(engine_settings, settings),
        "prompts": prompt_texts(),
        "windows": {g: {v: window_for(v, g).describe() for v in ("X_ref", "X_r", "Y_ref", "Y_r")}
                    for g in sorted(set(geometries))},
        "clip_context_length": settings.context_length,
        "totals": {"rows": sum(i.rows for i in infos), "truncated": sum(i.truncated for i in infos),
                   "empty_replies": sum(i.empty_replies for i in infos)},
        "sidecars": [asdict(i) for i in infos],
        **(extra or {}),
    }
    cfs, cbase = resolve(captions_dir_of(data_dir, captions_dir))
    cfs.create_dir(cbase, recursive=True)
    atomic_write_bytes(cfs, cbase.rstrip("/") + "/" + CAPTIONS_MANIFEST,
                       (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


# ---- joining ------------------------------------------------------------------------------------------
def join_captions(shard: pa.Table, captions: pa.Table, allow_missing: bool = False) -> pa.Table:
    """The shard's rows with the caption columns appended, matched by ``case_id`` (row order of the shard).

    A caption row whose ``checksum`` differs from the shard row's is stale (the arrays changed): ValueError.
    Rows without captions raise unless ``allow_missing`` (their caption columns are then null)."""
    return join_sidecar(shard, captions, "captions", allow_missing, remedy="run ray_jobs/caption.py")


def read_shard_with_captions(data_dir: str, shard_name: str, captions_dir: str | None = None,
                             allow_missing: bool = False, columns: Sequence[str] | None = None) -> pa.Table:
    """A shard joined with its caption sidecar (for the DuDoCLIP stage), rows in shard order.

    ``columns``: the shard columns to read (default all; ``case_id`` and ``checksum`` are always read, they
    key the join); every caption and QSPD column of the sidecar is appended. Texts for CLIP:
    :data:`CAPTION_TEXTS` (A1-A4)."""
    fs, base = resolve(data_dir)
    cols = None if columns is None else list(dict.fromkeys(["case_id", "checksum", *columns]))
    shard = pq.read_table(base.rstrip("/") + "/" + shard_name, filesystem=fs, columns=cols)
    caps = read_captions(data_dir, shard_name, captions_dir)
    if caps is None:
        if not allow_missing:
            raise FileNotFoundError(f"no caption sidecar {sidecar_name(shard_name)} for shard {shard_name} in "
                                    f"{captions_dir_of(data_dir, captions_dir)}: run ray_jobs/caption.py")
        caps = rows_to_table([])
    return join_captions(shard, caps, allow_missing)


#: the four CLIP texts per slice (Algorithm 1 step 2): A1 content of the image, A2 image tuple, A3 content of
#: the sinogram, A4 sinogram tuple — each at most 77 CLIP tokens
CAPTION_TEXTS = {"A1": "caption_x_content", "A2": "caption_x_tuple", "A3": "caption_y_content",
                 "A4": "caption_y_tuple"}


def iter_captioned_records(data_dir: str, shard_name: str, captions_dir: str | None = None,
                           columns: Sequence[str] | None = None) -> Iterable[dict]:
    """Slice records (numpy arrays, as :func:`dudocrop.data.shards.iter_records`) with their caption columns;
    every row must be captioned with its current arrays (else ValueError / FileNotFoundError)."""
    yield from iter_records(read_shard_with_captions(data_dir, shard_name, captions_dir, columns=columns))
