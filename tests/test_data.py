"""Data layer: readers, the slice schema, shards, splits and training batches (no Ray needed)."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from dudocrop.ct.geometry import get_geometry
from dudocrop.data import aapm, clinical
from dudocrop.data.build import CaseRef, SourceOptions, build_shard, list_case_refs, plan_shards
from dudocrop.data.loader import CropSpec, TrainingBatches, augment
from dudocrop.data.normalize import Normalization
from dudocrop.data.schema import ARRAY_FIELDS, records_to_table, slice_schema, validate_record
from dudocrop.data.shards import (
    CorruptShardError,
    assign_split,
    iter_records,
    read_manifest,
    verify_shard,
    write_manifest,
    write_shard,
)

TINY = get_geometry("tiny")


def _write_raw(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.asarray(arr, dtype="<f4").tofile(path)


def make_fake_aapm(root, cases, g=TINY, rng=None):
    """A release in the default layout with the tiny geometry's shapes (the reader takes a declared geometry)."""
    rng = rng or np.random.default_rng(0)
    truth = {}
    for case, anatomy in cases:
        arrays = {
            "target_img": rng.normal(0, 100, g.image_shape), "baseline_img": rng.normal(0, 300, g.image_shape),
            "target_sino": rng.random(g.sino_shape) * 5, "baseline_sino": rng.random(g.sino_shape) * 9,
        }
        mask = np.zeros(g.image_shape, np.float32)
        mask[20:24, 30:33] = 1.0
        mask[40:42, 10:12] = 0.9
        arrays["mask_img"] = mask
        layout = aapm.AAPMLayout()
        for key, arr in arrays.items():
            _write_raw(os.path.join(root, getattr(layout, key).format(case=case)), arr)
        with open(os.path.join(root, layout.metal_info.format(case=case)), "w") as f:
            json.dump({"anatomy": anatomy, "materials": ["titanium"]}, f)
        truth[case] = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    return truth


def test_aapm_reader_round_trips_bit_exact(tmp_path):
    truth = make_fake_aapm(tmp_path, [("body_0001", "body"), ("head_0002", "head")])
    assert aapm.list_cases(str(tmp_path)) == ["body_0001", "head_0002"]
    rec = aapm.read_case(str(tmp_path), "body_0001", geometry=TINY)
    t = truth["body_0001"]
    for ours, theirs in (("X_ma", "baseline_img"), ("X_ref", "target_img"), ("Y_ma", "baseline_sino"),
                         ("Y_ref", "target_sino")):
        assert np.array_equal(rec[ours], t[theirs])
    assert rec["anatomy"] == "body" and rec["metal_count"] == 2
    assert rec["metal_materials"] == ["titanium", "titanium"]
    assert aapm.case_anatomy(str(tmp_path), "head_0002") == "head"
    # the area of a 4x3-pixel object -> equivalent diameter
    assert sorted(rec["metal_diameters_mm"])[-1] == pytest.approx(2 * np.sqrt(12 * TINY.pixel_size**2 / np.pi))


def test_aapm_default_geometry_is_chosen_by_anatomy(tmp_path):
    make_fake_aapm(tmp_path, [("x_head", "head")], g=get_geometry("aapm_head"))
    assert aapm.read_case(str(tmp_path), "x_head")["geometry"] == "aapm_head"


def test_truncated_raw_names_file_and_sizes(tmp_path):
    make_fake_aapm(tmp_path, [("c1", "body")])
    p = tmp_path / "Baseline" / "c1_sino.raw"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"c1_sino.raw: expected {len(data)} bytes .* found {len(data) - 100}"):
        aapm.read_case(str(tmp_path), "c1", geometry=TINY)


def test_missing_mask_is_named(tmp_path):
    make_fake_aapm(tmp_path, [("c1", "body")])
    os.remove(tmp_path / "Mask" / "c1_img.raw")
    with pytest.raises(FileNotFoundError, match="metal mask missing.*c1_img.raw"):
        aapm.read_case(str(tmp_path), "c1", geometry=TINY)


def test_layout_json_rejects_unknown_keys(tmp_path):
    p = tmp_path / "layout.json"
    p.write_text(json.dumps({"target_img": "T/{case}.raw", "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        aapm.AAPMLayout.from_json(str(p))


def test_nifti_reader_orientation_and_metal_slices(tmp_path):
    import nibabel as nib

    vol = np.full((40, 30, 5), -1000.0, np.float32)  # RAS: x, y, z
    vol[5:35, 5:25, :] = 40.0
    vol[30, 20, 3] = 4000.0  # metal near the patient's right (high x) and anterior (high y)
    vol[31, 20, 3] = 4000.0
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.9, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    hu, spacing = clinical.read_nifti(str(tmp_path / "ct.nii.gz"))
    assert hu.shape == (5, 30, 40) and spacing == (pytest.approx(0.9), pytest.approx(0.8))
    assert clinical.slices_with_metal(hu) == [3]
    r, c = np.nonzero(clinical.metal_mask_from_hu(hu[3]))
    # radiological display: anterior at the top, patient right on the image left
    assert r.mean() < 15 and c.mean() < 20


def test_dicom_series_sorted_by_position_with_rescale(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, z in enumerate([30.0, 10.0, 20.0]):  # written out of order
        ds = base.copy()
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.RescaleIntercept = -1000.0 + k
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(tmp_path / f"im{k}.dcm")
    vol, spacing = clinical.read_dicom_series(str(tmp_path))
    raw = base.pixel_array.astype(np.float32) * float(base.RescaleSlope)
    # sorted by z: 10 (k=1), 20 (k=2), 30 (k=0)
    for i, k in enumerate([1, 2, 0]):
        assert np.allclose(vol[i], raw - 1000.0 + k)
    assert spacing == tuple(float(s) for s in base.PixelSpacing)


def test_ct_small_reads_in_hu():
    import pydicom
    from pydicom.data import get_testdata_file

    hu = clinical.dicom_to_hu(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    assert hu.shape == (128, 128)
    assert -1100 < hu.min() < -500 and 0 < np.median(hu) < 300  # air around soft tissue


def test_clinical_shard_has_null_references(tmp_path):
    import nibabel as nib

    vol = np.full((64, 64, 3), -1000.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    vol[(xx - 32) ** 2 + (yy - 32) ** 2 < 25**2] = 30.0
    vol[30:33, 30:33, 1] = 3500.0  # a 15 mm implant: ~2.4 tiny pixels across
    nib.save(nib.Nifti1Image(vol, np.diag([5.0, 5.0, 3.0, 1.0])), tmp_path / "p1.nii.gz")
    opts = SourceOptions(source="clinical", geometry="tiny", root=str(tmp_path))
    refs = list_case_refs(opts)
    assert [r.slice_index for r in refs] == [1]
    spec = plan_shards(refs, 4, 0.0, 0.0)[0]
    info = build_shard(spec, opts, str(tmp_path / "out"))
    rec = next(iter_records(pq.read_table(tmp_path / "out" / info.name)))
    assert rec["X_ref"] is None and rec["Y_ref"] is None
    assert rec["metal_count"] == 1 and rec["metal_trace"].any()
    assert rec["Y_ma"].shape == TINY.sino_shape


def _record(i, g=TINY, split="train"):
    rng = np.random.default_rng(i)
    mask = np.zeros(g.image_shape, np.float32)
    mask[10:12, 10:12] = 1
    return {"case_id": f"p{i}/000", "patient_id": f"p{i}", "source": "synthetic", "anatomy": "body",
            "split": split, "X_ma": rng.normal(size=g.image_shape), "X_ref": rng.normal(size=g.image_shape),
            "Y_ma": rng.random(g.sino_shape), "Y_ref": rng.random(g.sino_shape), "metal_mask": mask,
            "metal_trace": (rng.random(g.sino_shape) > 0.9).astype(np.float32), "metal_diameters_mm": [5.0],
            "metal_materials": ["titanium"], "metal_centroids_mm": [[1.0, 2.0]]}


def test_schema_round_trip_and_metadata(tmp_path):
    recs = [_record(i) for i in range(3)]
    info = write_shard(records_to_table(recs, TINY), str(tmp_path), "train-00000.parquet", "train")
    table = pq.read_table(tmp_path / info.name)
    assert table.schema.equals(slice_schema(TINY)) and table.schema.metadata == slice_schema(TINY).metadata
    back = list(iter_records(table))
    for r, b in zip(recs, back):
        for f in ARRAY_FIELDS:
            assert np.array_equal(np.asarray(r[f], np.float32), b[f])
        assert b["metal_centroids_mm"] == [[1.0, 2.0]]
    assert verify_shard(str(tmp_path), info.name, info.sha256) == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_corrupted_shard_is_detected_and_named(tmp_path):
    info = write_shard(records_to_table([_record(0)], TINY), str(tmp_path), "train-00000.parquet", "train")
    p = tmp_path / info.name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="train-00000.parquet"):
        verify_shard(str(tmp_path), info.name, info.sha256)


@pytest.mark.parametrize(
    "field,value,match",
    [("X_ma", np.zeros((10, 10)), r"'X_ma' must have shape \(64, 64\)"), ("split", "dev", "split"),
     ("Y_ma", np.full(TINY.sino_shape, np.nan), "NaN"), ("metal_mask", None, "required")],
)
def test_bad_records_name_the_field(field, value, match):
    rec = _record(0) | {field: value}
    with pytest.raises(ValueError, match=match):
        validate_record(rec, TINY)


def test_split_is_per_patient_and_deterministic():
    refs = [CaseRef(f"p{p}/{s}", f"p{p}", s, "synthetic", "body") for p in range(200) for s in range(3)]
    specs = plan_shards(refs, 16, 0.2, 0.2)
    where = {}
    for spec in specs:
        for r in spec.refs:
            where.setdefault(r.patient_id, set()).add(spec.split)
    assert all(len(s) == 1 for s in where.values())
    counts = {k: sum(len(s.refs) for s in specs if s.split == k) for k in ("train", "val", "test")}
    assert 0.1 < counts["test"] / 600 < 0.3 and 0.1 < counts["val"] / 600 < 0.3
    assert plan_shards(list(reversed(refs)), 16, 0.2, 0.2) == specs
    assert all(len(s.refs) <= 16 for s in specs)
    assert assign_split("p7", 0.2, 0.2) == assign_split("p7", 0.2, 0.2)


def test_manifest_counts_and_is_stable(tmp_path):
    info = write_shard(records_to_table([_record(0), _record(1)], TINY), str(tmp_path), "train-00000.parquet",
                       "train")
    m1 = write_manifest(str(tmp_path), [info], TINY.to_dict(), {"x": 1})
    b1 = (tmp_path / "manifest.json").read_bytes()
    write_manifest(str(tmp_path), [info], TINY.to_dict(), {"x": 1})
    assert (tmp_path / "manifest.json").read_bytes() == b1
    assert m1["counts"] == {"train": 2} and read_manifest(str(tmp_path))["shards"][0]["sha256"] == info.sha256


def test_normalisation_maps_attenuation_to_unit_range():
    n = Normalization.for_geometry(TINY)
    assert n.image(np.array([-1000.0, 3072.0, 10000.0])).tolist() == [0.0, 1.0, 1.0]
    hu = np.array([-500.0, 0.0, 1000.0])
    assert np.allclose(n.image_to_hu(n.image(hu)), hu, atol=1e-3)
    assert n.sino(np.array([n.sino_max * 0.5])) == pytest.approx(0.5)


def test_augment_crops_consistently_and_wraps_views():
    rng = np.random.default_rng(0)
    img = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    a, b, c = augment(img, img + 1, img + 2, "image", CropSpec(32, 32), rng)
    assert a.shape == (32, 32) and np.array_equal(b, a + 1) and np.array_equal(c, a + 2)
    sino = np.repeat(np.arange(96, dtype=np.float32)[:, None], 112, 1)
    seen_wrap = False
    for _ in range(50):
        s, _, _ = augment(sino, sino, sino, "sinogram", CropSpec(40, 50), rng)
        assert s.shape == (40, 50)
        d = np.diff(s[:, 0])
        assert set(np.unique(d)).issubset({1.0, -95.0})  # consecutive views, wrapping past view 95
        seen_wrap |= bool((d == -95.0).any())
    assert seen_wrap


def test_training_batches_normalise_and_refuse_missing_references():
    recs = [_record(i) for i in range(2)]
    batch = {k: np.stack([r[k] for r in recs]) for k in ("X_ma", "X_ref", "metal_mask")}
    out = next(iter(TrainingBatches([batch], "image", Normalization.for_geometry(TINY), CropSpec(32, 32))))
    assert out["mu"].shape == (2, 1, 32, 32) and 0 <= float(out["mu"].min()) and float(out["mu"].max()) <= 1
    bad = dict(batch, X_ref=np.full_like(batch["X_ref"], np.nan))  # how shards store an absent reference
    with pytest.raises(ValueError, match="no X_ref"):
        next(iter(TrainingBatches([bad], "image", Normalization.for_geometry(TINY))))
    with pytest.raises(ValueError, match="domain"):
        TrainingBatches([batch], "residual", Normalization.for_geometry(TINY))


# ---- AAPM: patients, named test sets, body and head together (issue 19 §3) ----------------------------------------
AAPM_BODY, AAPM_HEAD = get_geometry("aapm_body"), get_geometry("aapm_head")


def _aapm_opts(root, **kw):
    return SourceOptions(source="aapm", geometry="aapm_body", root=str(root), **kw)


def test_aapm_refuses_to_split_without_a_patient_grouping(tmp_path):
    make_fake_aapm(tmp_path, [("p1_a", "body"), ("p1_b", "body")])
    with pytest.raises(ValueError, match="patient_regex"):
        list_case_refs(_aapm_opts(tmp_path))
    with pytest.raises(ValueError, match="does not match patient_regex"):
        list_case_refs(_aapm_opts(tmp_path, layout={"patient_regex": r"^(q\d+)_"}))
    refs = list_case_refs(_aapm_opts(tmp_path, layout={"patient_regex": r"^(p\d+)_"}))
    assert {r.patient_id for r in refs} == {"p1"}


def test_aapm_named_test_cases_form_the_test_split_and_their_patients_leave_train(tmp_path):
    cases = [(f"p{p}_{s}", "body") for p in range(6) for s in range(2)]
    make_fake_aapm(tmp_path / "release", cases)
    split = tmp_path / "test.txt"
    split.write_text("# the cases we report on\np0_0\np3_1\n")
    opts = _aapm_opts(tmp_path / "release", layout={"patient_regex": r"^(p\d+)_"}, test_split=str(split))
    specs = plan_shards(list_case_refs(opts), 4)
    by_split = {k: sorted(r.case_id for s in specs if s.split == k for r in s.refs) for k in ("train", "val", "test")}
    assert by_split["test"] == ["p0_0", "p3_1"]
    # the other slices of patients p0 and p3 are in neither train nor val; every other case is
    kept = by_split["train"] + by_split["val"]
    assert not any(c.startswith(("p0_", "p3_")) for c in kept)
    assert sorted(kept) == sorted(c for c, _ in cases if not c.startswith(("p0_", "p3_")))
    split.write_text("p0_0\nnot_a_case\n")
    with pytest.raises(ValueError, match=r"test\.txt.*not_a_case"):
        list_case_refs(opts)


def test_aapm_mixed_anatomy_reads_each_case_in_its_own_field_of_view(tmp_path):
    """Body and head cases in one run (paper §IV-A): the head slice is stored with the challenge's 220.16 mm FOV
    and its metal trace is projected in it, the body slice with 400 mm (the challenge's documented FOVs); a test
    set given as a folder of the release's layout is read from that folder."""
    import torch

    from dudocrop.ct.operators import FanBeamOperator
    from dudocrop.ct.trace import metal_trace
    make_fake_aapm(tmp_path / "train", [("b1", "body"), ("h1", "head")], g=AAPM_BODY)
    make_fake_aapm(tmp_path / "official_test", [("t_head", "head")], g=AAPM_BODY)
    opts = _aapm_opts(tmp_path / "train", anatomy="mixed", test_split=str(tmp_path / "official_test"))
    refs = list_case_refs(opts)
    assert sorted((r.case_id, r.anatomy, r.split) for r in refs) == [("b1", "body", ""), ("h1", "head", ""),
                                                                    ("t_head", "head", "test")]
    assert sorted(r.case_id for r in list_case_refs(replace_opts(opts, anatomy="body"))) == ["b1"]
    spec = plan_shards(refs, 8)
    recs = {}
    for s in spec:
        info = build_shard(s, opts, str(tmp_path / "shards"))
        for r in iter_records(pq.read_table(tmp_path / "shards" / info.name)):
            recs[r["case_id"]] = r
    assert {k: (r["geometry"], round(float(r["pixel_spacing_mm"]) * 512, 2)) for k, r in recs.items()} == {
        "b1": ("aapm_body", 400.0), "h1": ("aapm_head", 220.16), "t_head": ("aapm_head", 220.16)}
    mask = torch.from_numpy(np.array(recs["h1"]["metal_mask"], np.float32))[None, None]
    own = metal_trace(mask, FanBeamOperator(AAPM_HEAD), 0)[0, 0].numpy()
    body = metal_trace(mask, FanBeamOperator(AAPM_BODY), 0)[0, 0].numpy()
    assert np.array_equal(recs["h1"]["metal_trace"] > 0, own) and not np.array_equal(own, body)
    truth = np.fromfile(tmp_path / "official_test" / "Baseline" / "t_head_img.raw", "<f4").reshape(512, 512)
    assert np.array_equal(recs["t_head"]["X_ma"], truth)


def replace_opts(opts, **kw):
    from dataclasses import replace

    return replace(opts, **kw)


def test_clinical_metal_free_slices_become_references_with_simulated_metal(tmp_path):
    """Issue 25 §1: a user with real scans trains on them: the metal-free slices are references, the simulator
    adds the metal (the slice with real metal, which has no reference, is left out)."""
    import nibabel as nib

    vol = np.full((64, 64, 3), -1000.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    vol[(xx - 32) ** 2 + (yy - 32) ** 2 < 25**2] = 30.0
    vol[(xx - 40) ** 2 + (yy - 28) ** 2 < 6**2] = 600.0  # a bone
    vol[30:33, 30:33, 1] = 3500.0  # real metal in slice 1
    nib.save(nib.Nifti1Image(vol, np.diag([5.0, 5.0, 3.0, 1.0])), tmp_path / "p1.nii.gz")
    opts = SourceOptions(source="clinical", geometry="tiny", root=str(tmp_path), clinical_references=True)
    refs = list_case_refs(opts)
    assert [r.slice_index for r in refs] == [0, 2]
    info = build_shard(plan_shards(refs, 4, 0.0, 0.0)[0], opts, str(tmp_path / "out"))
    recs = list(iter_records(pq.read_table(tmp_path / "out" / info.name)))
    assert len(recs) == 2
    for rec in recs:
        assert rec["source"] == "clinical" and rec["X_ref"] is not None and rec["Y_ref"] is not None
        assert rec["metal_count"] >= 1 and rec["metal_trace"].any()
        body = rec["X_ref"] > -400
        assert abs(np.median(rec["X_ref"][body]) - 30.0) < 40  # the scan's own tissue is the reference
        out = rec["metal_mask"] < 0.5
        assert np.sqrt(np.mean((rec["X_ma"] - rec["X_ref"])[out & body] ** 2)) > 20  # metal streaks
    from ray_jobs import prepare_data

    a = prepare_data.parse_args(["--source", "clinical", "--root", str(tmp_path), "--clinical-references"])
    assert prepare_data.options_from_args(a).clinical_references
