"""Reader for the AAPM CT-MAR Grand Challenge release (REFERENCE §3).

Each case has headerless little-endian float32 ``.raw`` files: images (512, 512) in HU and sinograms
(1000 views, 900 channels) of line integrals after water BHC (their names say 900x1000), for the Target
(no metal) and Baseline (metal-affected) scans, a metal-only mask image (metal where ``mask > 0.5``) and a
metal-info JSON. Body cases use a 400 mm FOV (``aapm_body``), head cases 220.16 mm (``aapm_head``).
Arrays are read in the files' own row-major order, which is the challenge projector's (row 0 at the top, views x
channels); the presets follow that projector's rotation and channel order (``ct/geometry.py``, docs/aapm_geometry.md).

The folder layout is a :class:`AAPMLayout` of path templates relative to the release root, because
re-distributions of the release name files differently; the default is::

    Target/<case>_img.raw     Target/<case>_sino.raw
    Baseline/<case>_img.raw   Baseline/<case>_sino.raw
    Mask/<case>_img.raw       Mask/<case>.json

Cases are discovered from the Baseline images. Anatomy comes from the JSON (``anatomy``/``body_part``) or
from the case id (``head`` in the name), geometry from the anatomy (:func:`geometry_for_anatomy`), so body and
head cases can be read in one run, each with its own FOV (paper §IV-A trains on both).

Patients: the release's case ids carry no patient id that this project could verify against a published
description (the challenge pages describe the sources, DeepLesion and UCLH, not the naming), so
``AAPMLayout.patient_regex`` has no default; :func:`patient_of` then raises, and splitting refuses to run without
either a grouping regex (``r"^(.*)$"`` states explicitly that every case is its own patient) or a named test set
(:func:`read_test_split`: a file of case ids or a folder in the release's layout, e.g. the official test cases).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from dudocrop.ct.geometry import FanBeamGeometry, get_geometry


@dataclass(frozen=True)
class AAPMLayout:
    """Path templates (``{case}`` is the case id) relative to the release root."""

    target_img: str = "Target/{case}_img.raw"
    target_sino: str = "Target/{case}_sino.raw"
    baseline_img: str = "Baseline/{case}_img.raw"
    baseline_sino: str = "Baseline/{case}_sino.raw"
    mask_img: str = "Mask/{case}_img.raw"
    metal_info: str = "Mask/{case}.json"
    #: regex whose group 1 is the patient id of a case id; None: unknown (see the module docstring)
    patient_regex: str | None = None

    @classmethod
    def from_json(cls, path: str) -> AAPMLayout:
        with open(path) as f:
            data = json.load(f)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown AAPM layout keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def patient_of(case: str, layout: AAPMLayout) -> str:
    """The patient id of a case by ``layout.patient_regex``; ValueError when no grouping is set or it does not
    match (a case silently made its own patient could put one patient in train and test)."""
    if layout.patient_regex is None:
        raise ValueError("AAPMLayout.patient_regex is not set: the AAPM case ids carry no known patient id; pass "
                         "--patient-regex (r'^(.*)$' makes every case its own patient) or name the test cases "
                         "with --test-split")
    m = re.match(layout.patient_regex, case)
    if not m or not m.groups():
        raise ValueError(f"AAPM case {case!r} does not match patient_regex {layout.patient_regex!r} (with one "
                         f"group: the patient id)")
    return m.group(1)


def read_test_split(path: str, layout: AAPMLayout = AAPMLayout()) -> tuple[str | None, list[str]]:
    """The test cases a user names: a text file of case ids (one per line, ``#`` comments; they live in the
    training root) -> (None, ids), or a folder in the release's layout (e.g. the official test set) -> (folder,
    its cases). Raises naming the path when it is neither or names no case."""
    if os.path.isdir(path):
        return path, list_cases(path, layout)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"test split {path}: neither a file of case ids nor a folder of cases")
    with open(path) as f:
        ids = [ln.split("#", 1)[0].strip() for ln in f]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"test split {path}: names no case (one case id per line)")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"test split {path}: case ids listed twice: {dup[:5]}")
    return None, ids


def geometry_for_anatomy(anatomy: str) -> FanBeamGeometry:
    """The challenge's reconstruction geometry of a case: 220.16 mm FOV for head, 400 mm otherwise (REFERENCE §3)."""
    return get_geometry("aapm_head" if anatomy == "head" else "aapm_body")


def read_raw(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A headerless little-endian float32 file of the given shape; a size mismatch names the file,
    the expected and the actual byte size."""
    expected = int(np.prod(shape)) * 4
    try:
        actual = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"AAPM file missing: {path}") from None
    if actual != expected:
        raise ValueError(f"{path}: expected {expected} bytes for float32 {shape}, found {actual} bytes")
    return np.fromfile(path, dtype="<f4").reshape(shape).astype(np.float32)


def list_cases(root: str, layout: AAPMLayout = AAPMLayout()) -> list[str]:
    """Case ids found in the release, sorted."""
    pattern = os.path.join(root, layout.baseline_img.format(case="*"))
    prefix, suffix = (os.path.join(root, layout.baseline_img)).split("{case}")
    cases = sorted(p[len(prefix): len(p) - len(suffix)] for p in glob.glob(pattern))
    if not cases:
        raise FileNotFoundError(f"no AAPM cases under {root}: nothing matches {pattern}")
    return cases


def _anatomy(case: str, info: dict) -> str:
    for key in ("anatomy", "body_part", "bodypart"):
        v = str(info.get(key, "")).strip().lower()
        if v:
            return "head" if v.startswith(("head", "neck", "brain")) or v == "h" else "body"
    return "head" if "head" in case.lower() else "body"


def _read_info(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def case_anatomy(root: str, case: str, layout: AAPMLayout = AAPMLayout()) -> str:
    """``body`` or ``head`` for a case, from its metal-info JSON or its id."""
    return _anatomy(case, _read_info(os.path.join(root, layout.metal_info.format(case=case))))


def read_case(root: str, case: str, layout: AAPMLayout = AAPMLayout(),
              geometry: FanBeamGeometry | str | None = None) -> dict:
    """One case as a slice record (see ``dudocrop.data.schema``), arrays in HU / line integrals."""
    p = {f.name: os.path.join(root, getattr(layout, f.name).format(case=case))
         for f in fields(layout) if f.name not in ("patient_regex",)}
    info = _read_info(p["metal_info"])
    anatomy = _anatomy(case, info)
    g = get_geometry(geometry) if geometry is not None else geometry_for_anatomy(anatomy)
    img, sino = g.image_shape, g.sino_shape
    if not os.path.exists(p["mask_img"]):
        raise FileNotFoundError(f"AAPM case {case}: metal mask missing: {p['mask_img']}")
    mask = (read_raw(p["mask_img"], img) > 0.5).astype(np.float32)
    rec = {
        "case_id": case,
        "patient_id": patient_of(case, layout) if layout.patient_regex is not None else case,
        "slice_index": 0,
        "source": "aapm",
        "anatomy": anatomy,
        "geometry": g.name,
        "pixel_spacing_mm": g.pixel_size,
        "X_ma": read_raw(p["baseline_img"], img),
        "Y_ma": read_raw(p["baseline_sino"], sino),
        "X_ref": read_raw(p["target_img"], img),
        "Y_ref": read_raw(p["target_sino"], sino),
        "metal_mask": mask,
    }
    rec.update(metal_descriptors(mask, g, materials=_materials(info)))
    return rec


def _materials(info: dict) -> list[str] | None:
    for key in ("materials", "material", "metal_material", "metal"):
        v = info.get(key)
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return v
    return None


#: metal objects are 8-connected components: a thin oblique rod or wire rasterises to diagonal steps
#: (the perceptual indicator counts objects the same way)
METAL_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def label_metal(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count) of the metal objects (``mask > 0.5``, 8-connected) of an (H, W) mask."""
    return ndimage.label(np.asarray(mask) > 0.5, structure=METAL_CONNECTIVITY)


def metal_descriptors(mask: np.ndarray, geometry: FanBeamGeometry, materials: list[str] | None = None) -> dict:
    """Count, equivalent diameters and centroids (world mm) of the connected metal objects of a mask."""
    lab, n = label_metal(mask)
    xs, ys = geometry.pixel_centres
    diam, cents = [], []
    for k in range(1, n + 1):
        sel = lab == k
        area = float(sel.sum()) * geometry.pixel_size**2
        diam.append(2.0 * np.sqrt(area / np.pi))
        r, c = np.nonzero(sel)
        cents.append([float(xs[c].mean()), float(ys[r].mean())])
    mats = list(materials) if materials else []
    if len(mats) == 1 and n > 1:
        mats = mats * n
    if len(mats) != n:
        mats = ["unknown"] * n
    return {"metal_count": n, "metal_diameters_mm": diam, "metal_materials": mats, "metal_centroids_mm": cents}
