"""From a data source to shards: list the slices (cheap, on the driver), plan deterministic shards, and build
one shard (read or simulate every slice, derive the metal trace, validate, write atomically).

``ray_jobs/prepare_data.py`` runs :func:`build_shard` for every planned shard as a Ray Data map; everything
here is plain Python so a unit test (or a laptop without Ray) can call it directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch

from dudocrop.ct.geometry import FanBeamGeometry, get_geometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.patients import PHANTOM_STYLES
from dudocrop.ct.trace import metal_trace
from dudocrop.ct.units import hu_to_mu
from dudocrop.data import aapm, clinical
from dudocrop.data.schema import SOURCES, records_to_table
from dudocrop.data.shards import ShardInfo, assign_split, write_shard


@dataclass(frozen=True)
class CaseRef:
    """One slice to build: enough to read or simulate it anywhere in the cluster."""

    case_id: str
    patient_id: str
    slice_index: int
    source: str
    anatomy: str
    locator: str = ""  # source-specific: an AAPM case id, a volume path, a synthetic seed
    split: str = ""  # a split the user fixed (AAPM --test-split); "" = by a hash of the patient id
    root: str = ""  # AAPM: the release folder the case lives in; "" = SourceOptions.root


@dataclass(frozen=True)
class ShardSpec:
    name: str
    split: str
    refs: tuple[CaseRef, ...]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "split": self.split, "refs": [asdict(r) for r in self.refs]})

    @classmethod
    def from_json(cls, s: str) -> ShardSpec:
        d = json.loads(s)
        return cls(d["name"], d["split"], tuple(CaseRef(**r) for r in d["refs"]))


def shard_fingerprint(spec: ShardSpec, opts: SourceOptions) -> str:
    """sha256 of everything that decides a shard's content: its slices, split, the source options (geometry,
    seed, simulation, ...) and the schema version. A shard on disk is reused only under the same fingerprint, so a
    re-run with other options never keeps arrays that do not match the new manifest."""
    from dudocrop.data.schema import SCHEMA_VERSION

    blob = {"spec": json.loads(spec.to_json()), "options": asdict(opts), "schema_version": SCHEMA_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class SourceOptions:
    """Everything that determines the content of a slice (recorded in the manifest)."""

    source: str
    geometry: str
    root: str | None = None
    layout: dict = field(default_factory=dict)  # AAPMLayout fields
    anatomy: str = "body"  # body | head; AAPM also "mixed": both, each case in its own geometry (paper §IV-A)
    test_split: str | None = None  # AAPM: the test cases, a file of case ids or a folder (aapm.read_test_split)
    n_patients: int = 8
    slices_per_patient: int = 2
    seed: int = 0
    simulation: str = "aapm_like"  # a simulator settings preset
    phantom: str = "ellipse"  # synthetic clean slices: ellipse | patient (dudocrop.ct.patients.PHANTOM_STYLES)
    # clinical: False, the slices with metal (no reference); True, the metal-free slices, each the reference of a
    # simulated metal scan (issue 25: train on real anatomy)
    clinical_references: bool = False
    metal_threshold_hu: float = clinical.METAL_THRESHOLD_HU
    trace_dilation: int = 0
    dicom_rescale: tuple[float, float] | None = None  # (slope, intercept) for DICOM slices without the tags

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source in ("aapm", "clinical") and not self.root:
            raise ValueError(f"source={self.source!r} needs root= (the folder to read)")
        get_geometry(self.geometry)
        if self.anatomy not in ("body", "head", "mixed"):
            raise ValueError(f"anatomy must be 'body', 'head' or 'mixed', got {self.anatomy!r}")
        if self.anatomy == "mixed" and self.source != "aapm":
            raise ValueError(f"anatomy='mixed' reads AAPM body and head cases; source={self.source!r} has one anatomy")
        if self.phantom not in PHANTOM_STYLES:
            raise ValueError(f"phantom must be one of {PHANTOM_STYLES}, got {self.phantom!r}")
        if self.test_split is not None and self.source != "aapm":
            raise ValueError(f"test_split names AAPM cases; source={self.source!r} splits by patient hash")


# ---- listing ---------------------------------------------------------------------------------------
def list_case_refs(opts: SourceOptions, skipped: list[dict] | None = None) -> list[CaseRef]:
    """Every slice the source provides, in a deterministic order.

    Clinical inputs are read and their metal slices checked here, on the driver, so a bad file or slice stops
    the run before any shard is built, naming the file (and slice); with a ``skipped`` list they are appended
    to it as ``{"input", "slice", "error"}`` instead, and the rest goes on (``prepare_data --skip-bad``)."""
    if opts.source == "aapm":
        return _aapm_refs(opts)
    if opts.source == "clinical":
        return _clinical_refs(opts, skipped)
    refs = []
    for p in range(opts.n_patients):
        pid = f"synthetic-{opts.seed}-{p:05d}"
        for s in range(opts.slices_per_patient):
            refs.append(CaseRef(f"{pid}/{s:03d}", pid, s, "synthetic", opts.anatomy, pid))
    return refs


def _aapm_refs(opts: SourceOptions) -> list[CaseRef]:
    """AAPM cases of ``opts.anatomy`` (``mixed``: body and head). Without a patient grouping (AAPMLayout
    .patient_regex) splitting refuses to run unless the test cases are named (``opts.test_split``); then every
    training case is grouped as its own patient, with a warning."""
    layout = aapm.AAPMLayout(**opts.layout)
    if layout.patient_regex is None and opts.test_split is None:
        aapm.patient_of("", layout)  # raises: no grouping and no named test set
    if layout.patient_regex is None:
        print("prepare_data: WARNING: no AAPM patient grouping (patient_regex): train and val cases are split as "
              "if each were its own patient; only the named test set is kept apart", flush=True)
        layout_ok = aapm.AAPMLayout(**{**opts.layout, "patient_regex": r"^(.*)$"})
    else:
        layout_ok = layout

    def refs_of(root: str, cases, split: str = "", own_root: str = "") -> list[CaseRef]:
        out = []
        for case in cases:
            anatomy = aapm.case_anatomy(root, case, layout)
            if opts.anatomy != "mixed" and anatomy != opts.anatomy:
                continue
            out.append(CaseRef(case, aapm.patient_of(case, layout_ok), 0, "aapm", anatomy, case, split, own_root))
        return out

    cases = aapm.list_cases(opts.root, layout)
    if opts.test_split is None:
        return refs_of(opts.root, cases)
    test_root, test_ids = aapm.read_test_split(opts.test_split, layout)
    if test_root is None:  # case ids in the training root
        missing = sorted(set(test_ids) - set(cases))
        if missing:
            raise ValueError(f"test split {opts.test_split}: {len(missing)} case ids are not in {opts.root}: "
                             f"{missing[:5]}")
        named = set(test_ids)
        return refs_of(opts.root, [c for c in cases if c not in named]) + refs_of(opts.root, test_ids, "test")
    return refs_of(opts.root, cases) + refs_of(test_root, test_ids, "test", os.path.abspath(test_root))


def _clinical_refs(opts: SourceOptions, skipped: list[dict] | None = None) -> list[CaseRef]:
    from dudocrop.pipeline.osro import region_problems

    root = opts.root
    vols = []
    if os.path.isfile(root):
        vols = [root]
    else:
        for dirpath, dirnames, filenames in sorted(os.walk(root)):
            dirnames.sort()
            nii = sorted(f for f in filenames if f.endswith((".nii", ".nii.gz")))
            vols += [os.path.join(dirpath, f) for f in nii]
            if not nii and any(f.lower().endswith(".dcm") or "." not in f for f in filenames):
                vols.append(dirpath)
    if not vols:
        raise FileNotFoundError(f"no NIfTI files or DICOM folders under {root}")
    g = get_geometry(opts.geometry)

    from dudocrop.ct.phantoms import body_mask
    from dudocrop.pipeline.osro import MIN_REGION_PIXELS

    def bad(path: str, index: int | None, error: str) -> None:
        if skipped is None:
            raise ValueError(error if index is None else f"{path}: slice {index}: {error}")
        skipped.append({"input": path, "slice": index, "error": error})

    refs = []
    for v in vols:
        try:
            vol, spacing = _read_volume(v, opts.dicom_rescale)
        except (ValueError, OSError) as e:  # the readers name the file; FileNotFoundError is an OSError
            if skipped is None:
                raise
            bad(v, None, str(e))
            continue
        pid = os.path.relpath(v, root if os.path.isdir(root) else os.path.dirname(root))
        if opts.clinical_references:
            with_metal = set(clinical.slices_with_metal(vol, opts.metal_threshold_hu))
            for s in range(vol.shape[0]):
                if s in with_metal:
                    continue
                clean = clinical.resample_to_geometry(vol[s], spacing, g)
                if int(body_mask(clean).sum()) < MIN_REGION_PIXELS:  # no patient in this slice
                    continue
                refs.append(CaseRef(f"{pid}/{s:04d}", pid, s, "clinical", opts.anatomy, v))
            continue
        for s in clinical.slices_with_metal(vol, opts.metal_threshold_hu):
            x_ma, mask = _clinical_slice(vol, spacing, s, g, opts.metal_threshold_hu)
            why = region_problems(torch.from_numpy(x_ma)[None, None], torch.from_numpy(mask)[None, None], g)[0]
            if why:  # what validate_record would refuse inside a shard build, found here
                bad(v, s, why)
                continue
            refs.append(CaseRef(f"{pid}/{s:04d}", pid, s, "clinical", opts.anatomy, v))
    return refs


@lru_cache(maxsize=2)
def _read_volume(path: str, dicom_rescale: tuple[float, float] | None = None
                 ) -> tuple[np.ndarray, tuple[float, float]]:
    if os.path.isdir(path):
        return clinical.read_dicom_series(path, tuple(dicom_rescale) if dicom_rescale else None)
    return clinical.read_nifti(path)


def _clinical_slice(vol: np.ndarray, spacing: tuple[float, float], index: int, g: FanBeamGeometry,
                    threshold_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """X_ma (HU) and the metal mask of one clinical slice on the geometry's grid."""
    x_ma = clinical.resample_to_geometry(vol[index], spacing, g)
    # segment at the native resolution: interpolation would lower the HU of small implants below threshold
    native = clinical.metal_mask_from_hu(vol[index], threshold_hu)
    mask = (clinical.resample_to_geometry(native, spacing, g, fill_hu=0.0) >= 0.5).astype(np.float32)
    return x_ma, mask


# ---- planning --------------------------------------------------------------------------------------
def plan_shards(refs: list[CaseRef], shard_slices: int, val_fraction: float = 0.1,
                test_fraction: float = 0.1) -> list[ShardSpec]:
    """Group slices into shards of at most ``shard_slices`` per split, split by patient id (deterministic).

    Refs with a fixed ``split`` (a test set the user named) keep it; the others are hashed into train / val only,
    and those of a patient who has a fixed test case are left out (a patient is never in train and test)."""
    if shard_slices < 1:
        raise ValueError(f"shard_slices must be >= 1, got {shard_slices}")
    fixed_test = {r.patient_id for r in refs if r.split == "test"}
    by_split: dict[str, list[CaseRef]] = {}
    dropped = 0
    for r in sorted(refs, key=lambda r: (r.patient_id, r.slice_index, r.case_id)):
        if r.split:
            split = r.split
        elif r.patient_id in fixed_test:
            dropped += 1
            continue
        else:
            split = assign_split(r.patient_id, val_fraction, 0.0 if fixed_test else test_fraction)
        by_split.setdefault(split, []).append(r)
    if dropped:
        print(f"plan_shards: {dropped} slices left out of train/val: their patients have cases in the test set",
              flush=True)
    specs = []
    for split in sorted(by_split):
        rs = by_split[split]
        for k in range(0, len(rs), shard_slices):
            specs.append(ShardSpec(f"{split}-{k // shard_slices:05d}.parquet", split, tuple(rs[k:k + shard_slices])))
    return specs


# ---- building --------------------------------------------------------------------------------------
def _seed_for(ref: CaseRef, base: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{base}:{ref.case_id}".encode()).digest()[:4], "little")


def build_record(ref: CaseRef, opts: SourceOptions, op: FanBeamOperator) -> dict:
    """One slice record (schema columns except split/checksum) for a case reference."""
    g = op.geometry
    if ref.source == "aapm":
        layout = aapm.AAPMLayout(**opts.layout)
        root = ref.root or opts.root
        if opts.anatomy == "mixed":  # each case in its own FOV (the caller passes that case's operator)
            g = aapm.geometry_for_anatomy(ref.anatomy)
            if op.geometry != g:
                raise ValueError(f"AAPM case {ref.case_id} is {ref.anatomy} ({g.name}), but the operator given is "
                                 f"{op.geometry.name!r}")
        rec = aapm.read_case(root, ref.locator, layout, geometry=g)
        implied = aapm.geometry_for_anatomy(rec["anatomy"]).name
        if g.name in ("aapm_body", "aapm_head") and g.name != implied:
            raise ValueError(f"AAPM case {ref.case_id} is {rec['anatomy']} ({implied}), but this run writes "
                             f"geometry {g.name!r}: prepare body and head cases separately or with anatomy='mixed'")
    elif ref.source == "clinical" and opts.clinical_references:
        from dudocrop.data.synthetic import simulate_on

        vol, spacing = _read_volume(ref.locator, opts.dicom_rescale)
        clean = clinical.resample_to_geometry(vol[ref.slice_index], spacing, g)
        kind = "head" if opts.anatomy == "head" else "body"
        rec = simulate_on(clean, kind, op, _seed_for(ref, opts.seed), opts.simulation)
    elif ref.source == "clinical":
        vol, spacing = _read_volume(ref.locator, opts.dicom_rescale)
        x_ma, mask = _clinical_slice(vol, spacing, ref.slice_index, g, opts.metal_threshold_hu)
        y_ma = op.fp(torch.from_numpy(hu_to_mu(x_ma).clip(min=0))[None, None])[0, 0].numpy()
        rec = {"X_ma": x_ma, "Y_ma": y_ma, "X_ref": None, "Y_ref": None, "metal_mask": mask,
               **aapm.metal_descriptors(mask, g)}
    else:
        rec = _simulate_record(ref, opts, op)
    rec.update(case_id=ref.case_id, patient_id=ref.patient_id, slice_index=ref.slice_index, source=ref.source,
               anatomy=rec.get("anatomy", ref.anatomy), geometry=g.name, pixel_spacing_mm=g.pixel_size)
    if rec.get("metal_trace") is None:
        m = torch.from_numpy(np.asarray(rec["metal_mask"], np.float32))[None, None]
        rec["metal_trace"] = metal_trace(m, op, opts.trace_dilation)[0, 0].numpy().astype(np.float32)
    return rec


def _simulate_record(ref: CaseRef, opts: SourceOptions, op: FanBeamOperator) -> dict:
    from dudocrop.data.synthetic import simulate_slice

    return simulate_slice(ref.anatomy, op, _seed_for(ref, opts.seed), opts.simulation, opts.phantom)


def build_shard(spec: ShardSpec, opts: SourceOptions, out_dir: str, backend: str = "auto") -> ShardInfo:
    """Build every slice of a shard and write it atomically. With ``anatomy='mixed'`` each AAPM case is read and
    its metal trace projected in its own geometry (body 400 mm, head 220.16 mm FOV; same array shapes), recorded in
    its ``geometry`` column."""
    g: FanBeamGeometry = get_geometry(opts.geometry)
    ops = {g.name: FanBeamOperator(g, backend)}
    recs = []
    for ref in spec.refs:
        own = aapm.geometry_for_anatomy(ref.anatomy) if opts.anatomy == "mixed" else g
        if own.name not in ops:
            ops[own.name] = FanBeamOperator(own, backend)
        rec = build_record(ref, opts, ops[own.name])
        rec["split"] = spec.split
        recs.append(rec)
    return write_shard(records_to_table(recs, g), out_dir, spec.name, spec.split)
