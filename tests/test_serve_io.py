"""The service's library parts without Ray: derived DICOM (checked by pydicom and dciodvfy), grid mapping,
bounded decoding of hostile inputs, the job store and its slice queue (a lost model call is re-queued)."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import zipfile

import numpy as np
import pydicom
import pytest

from dudocrop.ct.geometry import get_geometry
from dudocrop.data.dicom_derived import NOT_FOR_DIAGNOSTIC_USE, derived_slice, new_series_uid, to_bytes
from dudocrop.service.grid import back_to_input_grid, prepare_slice
from dudocrop.service.inputs import InputError, Limits, decode_slice, decode_study, unzip
from dudocrop.service.jobs import JobStore, UnknownJob, run_job
from tests.serve_fixtures import METAL_HU, ct_dataset, dicom_bytes, npy_bytes, phantom, study

TINY = get_geometry("tiny")


def _derived(source_hu, out_hu, spacing=3.0):
    src = pydicom.dcmread(io.BytesIO(dicom_bytes(ct_dataset(source_hu, spacing))))
    ds = derived_slice(src, out_hu, series_uid=new_series_uid(), model_version="tiny@1", steps=7, k=0.5,
                       alpha=0.25, beta=0.75)
    return src, pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def test_derived_dicom_is_a_new_series_of_the_same_study_with_the_input_encoding():
    hu = phantom(64, 3.0)
    out_hu = hu.copy()
    out_hu[hu < METAL_HU] += 7.0  # a "correction"
    src, out = _derived(hu, out_hu)
    assert out.StudyInstanceUID == src.StudyInstanceUID and out.PatientID == src.PatientID
    assert out.SeriesInstanceUID != src.SeriesInstanceUID and out.SOPInstanceUID != src.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert list(out.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert "tiny@1" in out.DerivationDescription and "steps 7" in out.DerivationDescription
    assert "k=0.5 alpha=0.25 beta=0.75" in out.DerivationDescription
    assert NOT_FOR_DIAGNOSTIC_USE in out.SeriesDescription
    ref = out.SourceImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
    eq = out.ContributingEquipmentSequence[0]
    assert eq.Manufacturer == "dudocrop" and "dudocrop" in eq.SoftwareVersions
    for tag in ("RescaleSlope", "RescaleIntercept", "PixelSpacing", "ImagePositionPatient",
                "ImageOrientationPatient", "SliceThickness", "Rows", "Columns", "PixelRepresentation"):
        assert out[tag].value == src[tag].value, tag
    got = out.pixel_array * float(out.RescaleSlope) + float(out.RescaleIntercept)
    np.testing.assert_array_equal(got, np.rint(out_hu))


def test_derived_dicom_passes_dciodvfy(tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    hu = phantom(64, 3.0)
    src, out = _derived(hu, hu)
    for name, ds in (("in.dcm", src), ("out.dcm", out)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
    res = {n: subprocess.run(["dciodvfy", str(tmp_path / n)], capture_output=True, text=True)
           for n in ("in.dcm", "out.dcm")}
    errors = {n: [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")] for n, r in res.items()}
    assert errors["in.dcm"] == [], errors["in.dcm"]  # the fixture itself is valid, so what follows is ours
    assert errors["out.dcm"] == [], errors["out.dcm"]


def test_grid_round_trip_keeps_metal_and_body_at_input_resolution():
    hu = phantom(128, 3.125)  # half the tiny model's 6.25 mm pixels, same FOV
    p = prepare_slice(hu, (3.125, 3.125), TINY, 2500.0)
    assert p.resampled and p.model_hu.shape == TINY.image_shape and p.metal_pixels == int((hu >= METAL_HU).sum())
    back = back_to_input_grid(p.model_hu, p, TINY)  # an identity "correction"
    np.testing.assert_array_equal(back[p.metal_mask], hu[p.metal_mask])  # metal exactly, at input resolution
    inner = (np.abs(hu) < 1) & (np.abs(np.gradient(hu)[0]) < 1) & (np.abs(np.gradient(hu)[1]) < 1)
    assert np.abs(back - hu)[inner].mean() < 50  # water comes back as water, only edges blur
    same = prepare_slice(phantom(), (6.25, 6.25), TINY, 2500.0)
    assert not same.resampled and same.model_hu is not None
    free = prepare_slice(phantom(metal=False), (6.25, 6.25), TINY, 2500.0)
    assert not free.has_metal and free.metal_pixels == 0
    with pytest.raises(ValueError, match="field of view"):
        prepare_slice(phantom(128, 6.25), (6.25, 6.25), TINY, 2500.0)


def test_hostile_inputs_are_refused_by_name():
    lim = Limits(max_decoded_bytes=1 << 20)
    good = dicom_bytes(ct_dataset(phantom(metal=False), 6.25))
    cases = {
        "not a DICOM": (b"hello world" * 20, 415),
        "truncated": (good[:600], 400),
        "cannot decode": (good[:-1000], 400),
        "not 'CT'": (dicom_bytes(ct_dataset(phantom(), 6.25, modality="MR")), 422),
        "NaN or inf": (npy_bytes(np.full((64, 64), np.nan, np.float32)), 422),
        "smaller than": (npy_bytes(np.zeros((1, 1), np.float32)), 422),
        "over the limit": (npy_bytes(np.zeros((2100, 2100), np.int8)), 413),
    }
    for what, (data, status) in cases.items():
        with pytest.raises(InputError, match=what) as e:
            decode_slice(data, None, None, lim)
        assert e.value.status == status, what
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * (4 << 20))
    with pytest.raises(InputError, match="zip bomb") as e:
        unzip(bomb.getvalue(), lim)
    assert e.value.status == 413
    trav = io.BytesIO()
    with zipfile.ZipFile(trav, "w") as zf:
        zf.writestr("../../etc/passwd.dcm", good)
    with pytest.raises(InputError, match="path traversal"):
        unzip(trav.getvalue(), lim)
    a, b = study(2, ()), study(2, ())
    with pytest.raises(InputError, match="mixes 2 DICOM series"):
        decode_study([(f"{i}.dcm", dicom_bytes(d)) for i, d in enumerate(a + b)], lim)


def test_job_store_resumes_and_requeues_a_lost_call(tmp_path):
    """A job of 6 slices, 2 with metal: metal-free slices never reach the model; the first model call fails
    (a lost replica) and is re-queued; a second run_job (a restarted ingress) finds the job done."""
    dss = study(6, (1, 4))
    files = [(f"{i}.dcm", dicom_bytes(d)) for i, d in enumerate(dss)]
    st = decode_study(files)
    store = JobStore("file://" + str(tmp_path / "jobs"))  # a pyarrow file-system URI; a plain folder below
    job = store.create(st, {"with_metal": 2, "model_version": "m", "params": {"k": .5, "alpha": .5,
                                                                                      "beta": .5}})
    calls = []

    async def correct(x):
        calls.append(x.shape)
        if len(calls) == 1:
            raise RuntimeError("replica died")
        return x + 1.0

    state = asyncio.run(run_job(store, job, correct, TINY, 2500.0, retry_delay_s=0.0, log=lambda m: None))
    assert state == "done" and len(calls) == 3 and all(c == TINY.image_shape for c in calls)
    s = store.status(job)
    assert (s["total"], s["done"], s["with_metal"], s["state"]) == (6, 6, 2, "done")
    out = zipfile.ZipFile(io.BytesIO(store.result(job)))
    outs = [pydicom.dcmread(io.BytesIO(out.read(n))) for n in sorted(out.namelist())]
    assert len({o.SeriesInstanceUID for o in outs}) == 1
    for i, (o, src) in enumerate(zip(outs, st.slices)):
        hu = o.pixel_array.astype(np.float32) - 1024
        if i in (1, 4):
            body = src.hu < 2500
            np.testing.assert_allclose(hu[body], src.hu[body] + 1.0)
        else:
            np.testing.assert_array_equal(hu, src.hu)
            assert "no metal" in o.DerivationDescription
    assert asyncio.run(run_job(store, job, correct, TINY, 2500.0)) == "done" and len(calls) == 3
    assert JobStore(str(tmp_path / "jobs")).status(job)["state"] == "done"  # a new process sees the same
    with pytest.raises(UnknownJob):
        store.status("0" * 32)
    with pytest.raises(UnknownJob):
        store.status("../../etc")


@pytest.mark.slow
def test_train_all_registers_its_models_and_the_service_loads_models_uri(tmp_path, monkeypatch):
    """`pytest -m slow tests/test_serve_io.py -k registers` (an MLflow SQLite store costs ~30-120 s to create).
    train_all's Tracking logs the model folder to the parent run and registers it; ``models:/<name>/<v>``
    then loads with DuDoCROP.load, the path serve/ takes for a registry URI."""
    import mlflow

    from dudocrop.config import get_run_preset
    from dudocrop.pipeline.model import DuDoCROP
    from ray_jobs import train_all
    from tests.serve_fixtures import tiny_model_folder

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    models = tiny_model_folder(str(out / "models"))
    before = mlflow.get_tracking_uri()
    try:
        tracking = train_all.Tracking(str(out), get_run_preset("tiny"))
        tracking.log_models(models)
        assert tracking.register_models("dudocrop-tiny") == "1"
        assert tracking.register_models("dudocrop-tiny") == "2"  # each finished training: a new version
        m = DuDoCROP.load("models:/dudocrop-tiny/2")
        assert m.geometry.name == "tiny" and m.config.steps == 1
    finally:
        mlflow.set_tracking_uri(before)


def test_decoding_logs_no_patient_data(caplog, recwarn):
    """pydicom's validation warnings quote values; decoding an upload must not put names or UIDs in logs."""
    import logging

    ds = ct_dataset(phantom(metal=False), 6.25)
    ds.PatientName = "Secret^Person" + "X" * 70  # over PN's 64 chars: pydicom would warn quoting it
    ds.StudyInstanceUID = "1.2.3.0999.SECRET"  # not a valid UID: pydicom would warn quoting it
    data = dicom_bytes(ds)
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    recwarn.clear()  # what writing the fixture warned is not the service's
    s = decode_slice(data)
    assert s.fmt == "dicom"
    text = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "Secret" not in text and "SECRET" not in text


def test_serve_settings_defaults_env_then_args():
    from serve.settings import settings_from

    env = {"DUDOCROP_MODEL_URI": "models:/dudocrop-tiny/3", "DUDOCROP_STEPS": "20", "DUDOCROP_DEVICE": "cpu"}
    s = settings_from({"steps": 5, "max_batch_size": "8"}, environ=env)
    assert (s.model_uri, s.steps, s.device, s.max_batch_size) == ("models:/dudocrop-tiny/3", 5, "cpu", 8)
    assert settings_from({}, environ={}).model_uri == "outputs/train_all/models"
    with pytest.raises(ValueError, match="unknown serve setting"):
        settings_from({"modle_uri": "x"}, environ={})
    with pytest.raises(ValueError, match="cannot read 'many' as int"):
        settings_from({"steps": "many"}, environ={})
    with pytest.raises(ValueError, match="device must be"):
        settings_from({}, environ={"DUDOCROP_DEVICE": "tpu"})
