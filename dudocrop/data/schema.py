"""The one record schema for a CT slice, shared by every stage (readers, Ray Data shards, training, evaluation).

A row is one 2-D slice:

==================  =====================================  =============================================
column              type                                   meaning
==================  =====================================  =============================================
case_id             string                                 unique id of the slice (``<patient>/<slice>``)
patient_id          string                                 splits are assigned per patient
slice_index         int32                                  index within the patient's volume
source              string                                 ``aapm`` | ``clinical`` | ``synthetic``
anatomy             string                                 ``body`` | ``head``
geometry            string                                 a ``dudocrop.ct.geometry`` preset name
pixel_spacing_mm    float32                                image pixel size
split               string                                 ``train`` | ``val`` | ``test``
has_reference       bool                                   X_ref / Y_ref exist (false for clinical data)
X_ma, X_ref         fixed_shape_tensor<float32>[H, W]      metal-affected / reference image, HU
Y_ma, Y_ref         fixed_shape_tensor<float32>[V, C]      metal-affected / reference sinogram (line int.)
metal_mask          fixed_shape_tensor<float32>[H, W]      binary image-domain metal mask
metal_trace         fixed_shape_tensor<float32>[V, C]      binary metal trace M_s (paper Eq. 1)
metal_count         int32                                  connected metal objects
metal_diameters_mm  list<float32>                          per-object equivalent diameter
metal_materials     list<string>                           per-object material (``unknown`` if not known)
metal_centroids_mm  list<fixed_size_list<float32, 2>>      per-object (x, y) centroid, world mm
checksum            string                                 sha256 over the array bytes of the row
==================  =====================================  =============================================

References that do not exist (clinical data has no X_ref / Y_ref) are never faked: ``has_reference`` is false
and the two tensors are filled with NaN, which the readers here turn back into ``None`` (pyarrow 25 cannot read
a null fixed-size tensor back from Parquet, and reads null elements as zeros; NaN fails loudly if misused).
Later stages add columns (captions, embeddings) next to these without rewriting the arrays. The schema version and the
geometry travel in the Parquet schema metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from dudocrop.ct.geometry import FanBeamGeometry, get_geometry

SCHEMA_VERSION = 1
IMAGE_FIELDS = ("X_ma", "X_ref", "metal_mask")
SINO_FIELDS = ("Y_ma", "Y_ref", "metal_trace")
ARRAY_FIELDS = ("X_ma", "X_ref", "Y_ma", "Y_ref", "metal_mask", "metal_trace")
SOURCES = ("aapm", "clinical", "synthetic")
ANATOMIES = ("body", "head")
SPLITS = ("train", "val", "test")
META_KEY = b"dudocrop"


def slice_schema(geometry: FanBeamGeometry | str) -> pa.Schema:
    """The Arrow schema of a slice table for one geometry (array shapes are fixed per geometry)."""
    g = get_geometry(geometry)
    img = pa.fixed_shape_tensor(pa.float32(), list(g.image_shape))
    sino = pa.fixed_shape_tensor(pa.float32(), list(g.sino_shape))
    fields = [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("anatomy", pa.string(), nullable=False),
        pa.field("geometry", pa.string(), nullable=False),
        pa.field("pixel_spacing_mm", pa.float32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("has_reference", pa.bool_(), nullable=False),
        *[pa.field(f, img if f in IMAGE_FIELDS else sino) for f in ARRAY_FIELDS],
        pa.field("metal_count", pa.int32(), nullable=False),
        pa.field("metal_diameters_mm", pa.list_(pa.float32())),
        pa.field("metal_materials", pa.list_(pa.string())),
        pa.field("metal_centroids_mm", pa.list_(pa.list_(pa.float32(), 2))),
        pa.field("checksum", pa.string(), nullable=False),
    ]
    meta = {"schema_version": SCHEMA_VERSION, "geometry": g.to_dict()}
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})


def schema_metadata(schema: pa.Schema) -> dict:
    """The dudocrop metadata stored with a shard's schema (raises if absent)."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError("not a dudocrop slice table: the Parquet schema has no 'dudocrop' metadata")
    return json.loads(raw)


def row_checksum(record: Mapping) -> str:
    """sha256 over the array payloads (name, shape, bytes) in schema order; null arrays count as absent."""
    h = hashlib.sha256()
    for f in ARRAY_FIELDS:
        a = record.get(f)
        h.update(f.encode())
        if a is None:
            h.update(b"\x00null")
            continue
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def validate_record(record: Mapping, geometry: FanBeamGeometry | str) -> dict:
    """Check one slice record against the schema; returns a normalised copy (float32 arrays, checksum)."""
    g = get_geometry(geometry)
    out = dict(record)
    cid = out.get("case_id", "<no case_id>")
    for key in ("case_id", "patient_id", "source", "anatomy", "split"):
        if not isinstance(out.get(key), str) or not out[key]:
            raise ValueError(f"record {cid}: field {key!r} must be a non-empty string, got {out.get(key)!r}")
    for key, allowed in (("source", SOURCES), ("anatomy", ANATOMIES), ("split", SPLITS)):
        if out[key] not in allowed:
            raise ValueError(f"record {cid}: field {key!r} must be one of {allowed}, got {out[key]!r}")
    # a row may carry another geometry of the same array shapes (AAPM head slices, 220.16 mm FOV, next to body
    # slices, 400 mm): its own FOV is what every FBP / FP of that slice must use
    own = get_geometry(out.get("geometry") or g.name)
    if (own.image_shape, own.sino_shape) != (g.image_shape, g.sino_shape):
        raise ValueError(f"record {cid}: geometry {own.name!r} has other array shapes than the table's {g.name!r}")
    out["geometry"] = own.name
    out.setdefault("slice_index", 0)
    out.setdefault("pixel_spacing_mm", own.pixel_size)
    if (out.get("X_ref") is None) != (out.get("Y_ref") is None):
        raise ValueError(f"record {cid}: X_ref and Y_ref must both be given or both be None")
    out["has_reference"] = out.get("X_ref") is not None
    for f in ARRAY_FIELDS:
        a = out.get(f)
        if a is None:
            if f in ("X_ma", "Y_ma", "metal_mask", "metal_trace"):
                raise ValueError(f"record {cid}: field {f!r} is required")
            out[f] = None
            continue
        a = np.asarray(a)
        want = g.image_shape if f in IMAGE_FIELDS else g.sino_shape
        if a.shape != want:
            raise ValueError(f"record {cid}: field {f!r} must have shape {want} for geometry {g.name!r}, "
                             f"got {a.shape}")
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ValueError(f"record {cid}: field {f!r} contains NaN or inf")
        out[f] = a
    _check_region(out, g, cid)
    diam = list(out.get("metal_diameters_mm") or [])
    out["metal_count"] = int(out.get("metal_count", len(diam)))
    out["metal_diameters_mm"] = [float(d) for d in diam]
    out["metal_materials"] = list(out.get("metal_materials") or ["unknown"] * len(diam))
    out["metal_centroids_mm"] = [[float(c[0]), float(c[1])] for c in (out.get("metal_centroids_mm") or [])]
    out["checksum"] = row_checksum(out)
    return out


def _check_region(rec: dict, g: FanBeamGeometry, cid: str) -> None:
    """A slice OSRO cannot restore (a mask covering the body) is refused when it is written, not
    after the priors have been sampled for it (``dudocrop.pipeline.osro.region_problems``, Eq. 11)."""
    import torch

    from dudocrop.pipeline.osro import region_problems

    x = torch.from_numpy(rec["X_ma"])[None, None]
    m = torch.from_numpy(rec["metal_mask"])[None, None]
    why = region_problems(x, m, g)[0]
    if why:
        raise ValueError(f"record {cid}: {why}")


def records_to_table(records: list[Mapping], geometry: FanBeamGeometry | str) -> pa.Table:
    """Validated records -> an Arrow table with :func:`slice_schema` (rows keep the given order)."""
    g = get_geometry(geometry)
    schema = slice_schema(g)
    rows = [validate_record(r, g) for r in records]
    cols = {}
    for field in schema:
        name = field.name
        if name in ARRAY_FIELDS:
            cols[name] = tensor_column([r[name] for r in rows], field.type)
        else:
            cols[name] = pa.array([r[name] for r in rows], type=field.type)
    return pa.Table.from_pydict(cols, schema=schema)


def tensor_column(arrays: list, typ: pa.FixedShapeTensorType) -> pa.ExtensionArray:
    """A fixed-shape tensor column from arrays of ``typ``'s shape (None: an absent array, stored as NaN)."""
    size = int(np.prod(typ.shape))
    flat = np.concatenate([np.full(size, np.nan, np.float32) if a is None else a.reshape(-1) for a in arrays])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), size)
    return pa.ExtensionArray.from_storage(typ, storage)


def absent_to_none(a: np.ndarray | None) -> np.ndarray | None:
    """A stored tensor, or None where it encodes an absent reference (all NaN)."""
    if a is None or (a.size and np.isnan(a.flat[0]) and np.isnan(a).all()):
        return None
    return a
