"""Issue 20 (Medium): bad input is refused early, by name, and costs nothing already done.

Each test builds the broken input the review used (a mask covering the body, a NaN voxel, an MR series, a
truncated DICOM, ...) and checks that it is refused up front with an error naming the argument, file or slice,
or, where the input is a batch or a folder, that the good parts still go through.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.phantoms import body_mask as body_mask_2d
from dudocrop.ct.phantoms import random_phantom
from dudocrop.data.schema import validate_record
from dudocrop.pipeline.model import DuDoCROP, PipelineConfig
from dudocrop.pipeline.osro import MIN_REGION_PIXELS, region_problems
from dudocrop.sde.irsde import IRSDE
from dudocrop.sde.train import SDEModel

GEOM = "tiny"
G = get_geometry(GEOM)


class _NeverCalled(torch.nn.Module):
    """A U-Net that fails the test if sampling starts: refusals must come before any of it."""

    def forward(self, *a, **kw):
        raise AssertionError("sampling started on input that should have been refused")


def _pipeline() -> DuDoCROP:
    slots = [SDEModel(_NeverCalled(), IRSDE(), d, False, None) for d in ("image", "sinogram", "residual")]
    return DuDoCROP(GEOM, *slots, None, PipelineConfig(steps=2))


def _slices():
    """A body phantom and three masks: an implant inside the body, metal in the air beside it, and a mask that
    covers the whole body."""
    x = random_phantom("body", GEOM, 1)
    body = body_mask_2d(x)
    rows, cols = np.nonzero(body)
    r, c = int(rows.mean()), int(cols.mean())
    inside = np.zeros(G.image_shape, np.float32)
    inside[r - 1:r + 2, c - 1:c + 2] = 1
    air = np.zeros(G.image_shape, np.float32)
    fov = np.hypot(*np.meshgrid(G.pixel_centres[0], G.pixel_centres[1], indexing="xy")) < G.fov_radius - 10
    ar, ac = np.argwhere(~body & fov & ~np.roll(body, 3, 0) & ~np.roll(body, -3, 0)
                         & ~np.roll(body, 3, 1) & ~np.roll(body, -3, 1))[0]
    air[ar:ar + 2, ac:ac + 2] = 1
    covering = body.astype(np.float32)
    x_air = np.where(air > 0, 3000.0, x).astype(np.float32)
    x_in = np.where(inside > 0, 3000.0, x).astype(np.float32)
    return x_in, inside, x_air, air, covering


def test_region_problems_refuse_a_mask_covering_the_body_and_keep_metal_in_air():
    """Metal in the air (an ECG lead, a fixator, a clip on the table) is real and robust NMAR handles it, so it is
    kept; a mask that leaves Eq. 11 no body is refused."""
    x_in, inside, x_air, air, covering = _slices()
    x = torch.from_numpy(np.stack([x_in, x_air, x_in]))[:, None]
    m = torch.from_numpy(np.stack([inside, air, covering]))[:, None]
    ok, in_air, covers = region_problems(x, m, G)
    assert ok is None and in_air is None
    assert f"fewer than {MIN_REGION_PIXELS}" in covers and "covers the body" in covers


def test_prepare_refuses_bad_slices_before_sampling_and_names_them():
    x_in, inside, x_air, air, covering = _slices()
    pipe = _pipeline()
    x = torch.from_numpy(np.stack([x_in, x_in]))[:, None]
    m = torch.from_numpy(np.stack([inside, covering]))[:, None]
    with pytest.raises(ValueError, match=r"slice 1: .*covers the body"):
        pipe(x, metal_mask=m)
    with pytest.raises(ValueError, match=r"slice 0: .*covers the body"):
        pipe(torch.from_numpy(x_in)[None, None], metal_mask=torch.from_numpy(covering)[None, None])
    # the good slice alone passes the checks (and reaches the sampler, which this stub refuses)
    with pytest.raises(AssertionError, match="sampling started"):
        pipe(torch.from_numpy(x_in)[None, None], metal_mask=torch.from_numpy(inside)[None, None])


def test_validate_record_refuses_a_covering_mask_and_keeps_metal_in_air():
    x_in, inside, x_air, air, covering = _slices()
    base = {"case_id": "p0/000", "patient_id": "p0", "source": "clinical", "anatomy": "body", "split": "train",
            "Y_ma": np.zeros(G.sino_shape, np.float32), "metal_trace": np.zeros(G.sino_shape, np.float32)}
    validate_record({**base, "X_ma": x_in, "metal_mask": inside}, G)
    validate_record({**base, "X_ma": x_air, "metal_mask": air}, G)
    with pytest.raises(ValueError, match=r"record p0/000: .*covers the body"):
        validate_record({**base, "X_ma": x_in, "metal_mask": covering}, G)


def test_empty_batches_half_precision_and_numpy_masks_are_validated():
    x_in, inside, *_ = _slices()
    pipe = _pipeline()
    with pytest.raises(ValueError, match=r"x_ma_hu must hold at least one slice"):
        pipe(torch.zeros(0, 1, *G.image_shape))
    with pytest.raises(ValueError, match=r"x_ma_hu must have dtype float32 or float64, got float16"):
        pipe(torch.from_numpy(x_in)[None, None].half())
    y = torch.zeros(1, 1, *G.sino_shape, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"y_ma must have dtype float32 or float64, got float16"):
        pipe(torch.from_numpy(x_in)[None, None], y)
    # a numpy mask (bool or float) is taken like a tensor one: the checks pass and sampling is reached
    for m in (inside[None, None], inside[None, None] > 0):
        with pytest.raises(AssertionError, match="sampling started"):
            pipe(torch.from_numpy(x_in)[None, None], metal_mask=m)
    x, _, mask, trace = pipe.prepare(torch.from_numpy(x_in)[None, None], metal_mask=inside[None, None] > 0)
    assert mask.dtype == torch.float32 and torch.equal(mask[0, 0], torch.from_numpy(inside)) and trace.any()
    with pytest.raises(ValueError, match=r"metal_mask must have 4 dimensions"):
        pipe(torch.from_numpy(x_in)[None, None], metal_mask=inside)


# ---- clinical readers ---------------------------------------------------------------------------------------
def _nifti(path, metal_at=(30, 30), nan_at=None, size=64):
    """A tiny clinical volume (RAS, 5 mm voxels): a water disc, metal at ``metal_at`` (x, y) in slice 1."""
    import nibabel as nib

    vol = np.full((size, size, 3), -1000.0, np.float32)
    yy, xx = np.mgrid[:size, :size]
    vol[(xx - size // 2) ** 2 + (yy - size // 2) ** 2 < 25**2] = 30.0
    x, y = metal_at
    vol[x:x + 3, y:y + 3, 1] = 3500.0
    if nan_at is not None:
        vol[nan_at] = np.nan
    nib.save(nib.Nifti1Image(vol, np.diag([5.0, 5.0, 3.0, 1.0])), path)
    return path


def test_nifti_with_a_nan_voxel_names_the_file_and_slice(tmp_path):
    from dudocrop.data import clinical

    p = _nifti(str(tmp_path / "nan.nii.gz"), nan_at=(20, 20, 2))
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: 1 NaN or inf voxels in slice\(s\) 2 \(1 voxels\)"):
        clinical.read_nifti(p)


def test_truncated_nifti_names_the_file(tmp_path):
    from dudocrop.data import clinical

    p = _nifti(str(tmp_path / "cut.nii"))
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.nii: not a readable NIfTI file"):
        clinical.read_nifti(p)


def _series(folder, n=3, positions=None, **tags):
    """A DICOM CT series from pydicom's CT_small.dcm: ``n`` slices 10 mm apart, ``tags`` set on every slice."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    paths = []
    for k, z in enumerate(positions or [10.0 * i for i in range(n)]):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        for key, v in tags.items():
            if v is None:
                delattr(ds, key)
            else:
                setattr(ds, key, v)
        paths.append(folder / f"im{k}.dcm")
        ds.save_as(paths[-1])
    return paths


def test_dicom_series_refuses_non_ct_missing_rescale_duplicates_and_mixed_spacing(tmp_path):
    import pydicom

    from dudocrop.data import clinical

    good = _series(tmp_path / "good")
    vol, _ = clinical.read_dicom_series(str(tmp_path / "good"))
    assert vol.shape == (3, 128, 128)
    (tmp_path / "good" / "README.txt").write_text("not DICOM: skipped")
    assert clinical.read_dicom_series(str(tmp_path / "good"))[0].shape == (3, 128, 128)

    _series(tmp_path / "mr", Modality="MR")
    with pytest.raises(ValueError, match=r"mr/im0\.dcm: Modality is 'MR', not 'CT'"):
        clinical.read_dicom_series(str(tmp_path / "mr"))

    _series(tmp_path / "norescale", RescaleSlope=None, RescaleIntercept=None)
    with pytest.raises(ValueError, match=r"norescale/im0\.dcm: RescaleSlope and RescaleIntercept missing"):
        clinical.read_dicom_series(str(tmp_path / "norescale"))
    raw = pydicom.dcmread(good[0]).pixel_array.astype(np.float32)
    vol, _ = clinical.read_dicom_series(str(tmp_path / "norescale"), assume_rescale=(1.0, -1024.0))
    assert np.array_equal(vol[0], raw - 1024.0)  # the explicit override, as stated

    _series(tmp_path / "dup", positions=[0.0, 5.0, 5.0])
    with pytest.raises(ValueError, match=r"dup/im[12]\.dcm: at the same slice position \(5 mm\) as .*dup/im[12]"):
        clinical.read_dicom_series(str(tmp_path / "dup"))

    paths = _series(tmp_path / "spacing")
    ds = pydicom.dcmread(paths[1])
    ds.PixelSpacing = [0.9, 0.9]
    ds.save_as(paths[1])
    with pytest.raises(ValueError, match=r"spacing: slices have mixed pixel spacing .*im1\.dcm"):
        clinical.read_dicom_series(str(tmp_path / "spacing"))


def test_truncated_and_undecodable_dicom_name_the_file(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    from dudocrop.data import clinical

    for name, cut in (("header", 400), ("pixels", -20000)):
        paths = _series(tmp_path / name)
        raw = paths[1].read_bytes()
        paths[1].write_bytes(raw[:cut])
        what = "without pixel data" if name == "header" else "cannot decode its pixel data"
        with pytest.raises(ValueError, match=rf"{name}/im1\.dcm: .*{what}"):
            clinical.read_dicom_series(str(tmp_path / name))

    paths = _series(tmp_path / "j2k")
    ds = pydicom.dcmread(paths[2])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])  # a JPEG 2000 codestream cut after SIZ
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(paths[2], enforce_file_format=True)
    with pytest.raises(ValueError, match=r"j2k/im2\.dcm: cannot decode its pixel data \(transfer syntax JPEG 2000"):
        clinical.read_dicom_series(str(tmp_path / "j2k"))


def test_prepare_data_skip_bad_builds_the_good_input_and_names_the_five_bad(tmp_path):
    """The corrupt-input run of the issue's closing note: one good NIfTI and five broken inputs (a NaN voxel, a
    truncated file, a series with two slices at one position, an MR series, a series without rescale tags).
    Without --skip-bad the listing stops at the first, naming it, before any shard is built; with it the good
    volume is built and the five are named in the log and in skipped.json."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "in"
    root.mkdir()
    _nifti(str(root / "a_good.nii.gz"))
    _nifti(str(root / "b_nan.nii.gz"), nan_at=(20, 20, 1))
    cut = _nifti(str(root / "c_cut.nii"))
    raw = open(cut, "rb").read()
    open(cut, "wb").write(raw[: len(raw) // 2])
    _series(root / "d_duplicate", positions=[0.0, 5.0, 5.0])
    _series(root / "e_mr", Modality="MR")
    _series(root / "f_norescale", RescaleSlope=None, RescaleIntercept=None)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONPATH=str(repo))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(repo / "ray_jobs" / "prepare_data.py"), "--source", "clinical", "--root", str(root),
           "--geometry", "tiny", "--shard-slices", "4", "--val-fraction", "0", "--test-fraction", "0",
           "--cpus-per-shard", "1"]

    strict = subprocess.run([*cmd, "--out", str(tmp_path / "strict")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert strict.returncode != 0 and "b_nan.nii.gz: 1 NaN or inf voxels in slice(s) 1" in strict.stderr
    # refused while listing: nothing built (the folder holds at most the output lock's files)
    assert not [p for p in (tmp_path / "strict").rglob("*") if not p.name.startswith(".dudocrop.lock")]

    out = tmp_path / "out"
    res = subprocess.run([*cmd, "--out", str(out), "--skip-bad"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    skipped = json.loads((out / "skipped.json").read_text())
    named = {os.path.basename(s["input"]): s for s in skipped}
    assert set(named) == {"b_nan.nii.gz", "c_cut.nii", "d_duplicate", "e_mr", "f_norescale"}
    assert "NaN or inf" in named["b_nan.nii.gz"]["error"]
    assert "not a readable NIfTI" in named["c_cut.nii"]["error"]
    assert "at the same slice position" in named["d_duplicate"]["error"]
    assert "Modality is 'MR'" in named["e_mr"]["error"]
    assert "RescaleSlope and RescaleIntercept missing" in named["f_norescale"]["error"]
    for name in named:
        assert f"skipped {root / name}" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_rows"] == 1
    import pyarrow.parquet as pq

    table = pq.read_table(out / manifest["shards"][0]["name"])
    assert table.column("case_id").to_pylist() == ["a_good.nii.gz/0001"]


# ---- evaluation ---------------------------------------------------------------------------------------------
def test_evaluate_isolates_failing_slices_and_writes_rows_as_they_are_made(tmp_path, monkeypatch):
    """Four test slices in batches of two: slice 1 makes the sampler raise (as a CUDA error or a blown-up prior
    would), slice 3's mask is made to cover the body. Both are recorded as failed, the other two are scored, and
    the first batch's rows are on disk before the second batch starts."""
    import json
    import sys
    from pathlib import Path

    from dudocrop.data.build import CaseRef, ShardSpec, SourceOptions, build_shard
    from dudocrop.data.shards import write_manifest
    from dudocrop.eval.stream import read_rows
    from dudocrop.sde.unet import build_unet

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ray_jobs"))
    import evaluate

    opts = SourceOptions(source="synthetic", geometry=GEOM, seed=5)
    refs = tuple(CaseRef(f"s{i}/000", f"s{i}", 0, "synthetic", "body", f"s{i}") for i in range(4))
    data = tmp_path / "data"
    info = build_shard(ShardSpec("test-00000.parquet", "test", refs), opts, str(data))
    write_manifest(str(data), [info], G.to_dict(), {})

    torch.manual_seed(0)
    slots = [SDEModel(build_unet("tiny", use_embeddings=False), IRSDE(), d, False, None)
             for d in ("image", "sinogram", "residual")]
    model = DuDoCROP(GEOM, *slots, None, PipelineConfig(steps=1))
    monkeypatch.setattr(evaluate.DuDoCROP, "load", classmethod(lambda cls, *a, **kw: model))

    real_load_split, real_restore = evaluate.load_split, evaluate.restore
    bad = {}

    def load_split(*a, **kw):
        rows = real_load_split(*a, **kw)
        bad["x"] = torch.from_numpy(np.array(rows.columns["X_ma"][1]))
        masks = np.array(rows.columns["metal_mask"])
        masks[3] = 1.0  # a mask covering the whole slice
        rows.columns["metal_mask"] = masks
        return rows

    out = tmp_path / "report"
    seen = []

    def restore(model, x_ma, *rest, **kw):
        seen.append([len(read_rows(out / "rows.jsonl")), x_ma.shape[0]])
        if any(torch.equal(x[0].cpu(), bad["x"]) for x in x_ma):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real_restore(model, x_ma, *rest, **kw)

    monkeypatch.setattr(evaluate, "load_split", load_split)
    monkeypatch.setattr(evaluate, "restore", restore)
    res = evaluate.run(evaluate.parse_args(["--data", str(data), "--models", "unused", "--out", str(out),
                                            "--batch-size", "2", "--sweeps", "none"]))
    assert res["slices"] == 4 and res["failed"] == 2
    # batch 1 ([0, 1]) raised, then slice 0 and slice 1 alone; batch 2 held slice 2 only (3 refused up front)
    assert [n for _, n in seen] == [2, 1, 1, 1]
    assert seen[0][0] == 0 and seen[-1][0] > 0  # the first batch's rows were on disk before the second began
    failed = {f["case_id"]: f["error"] for f in read_rows(out / "failed.jsonl")}
    assert set(failed) == {"s1/000", "s3/000"}
    assert failed["s1/000"].startswith("RuntimeError: CUDA error") and "covers the body" in failed["s3/000"]
    rows = json.loads((out / "rows.json").read_text())
    assert {r["case_id"] for r in rows} == {"s0/000", "s2/000"}
    key = [(r["case_id"], r["psnr"], r["ssim"]) for r in rows]
    assert key == [(r["case_id"], r["psnr"], r["ssim"]) for r in read_rows(out / "rows.jsonl")]
    assert "2 of 4 slices failed" in (out / "report.md").read_text()


# ---- credentials and the user's settings ------------------------------------------------------------------
SECRET_URI = "https://alice:s3cret@mlflow.example:5000/base?token=t0k3n&experiment=7"


def test_redact_uri_hides_user_info_and_secret_parameters():
    from ray_jobs import common

    assert common.redact_uri(SECRET_URI) == "https://***@mlflow.example:5000/base?token=***&experiment=7"
    assert common.redact_uri("postgresql://mlflow:pw@db.internal/mlflow") == "postgresql://***@db.internal/mlflow"
    for plain in ("sqlite:////tmp/out/mlflow.db", "http://mlflow.example:5000", "databricks", None, ""):
        assert common.redact_uri(plain) == plain


def test_tracking_uri_restores_credentials_from_the_environment_only(monkeypatch):
    from ray_jobs import common

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stored = common.redact_uri(SECRET_URI)
    with pytest.raises(ValueError, match=r"credentials removed .* set MLFLOW_TRACKING_URI"):
        common.tracking_uri(stored)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:other@mlflow.example:5000/base?token=x&experiment=7")
    assert common.tracking_uri(stored) == "https://bob:other@mlflow.example:5000/base?token=x&experiment=7"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://eve:x@elsewhere.example/")
    with pytest.raises(ValueError, match="credentials removed"):
        common.tracking_uri(stored)
    assert common.tracking_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_train_all_never_prints_or_stores_tracking_credentials(tmp_path, monkeypatch, capsys):
    import json

    import mlflow

    from ray_jobs import common, train_all

    store = f"sqlite:///{tmp_path}/mlflow.db"
    real_client = mlflow.MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI)
    monkeypatch.setattr(common, "init_ray", lambda *a, **kw: None)
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)
    # the tracking server is a local store here; the URI train_all holds is the one with credentials
    monkeypatch.setattr(mlflow, "MlflowClient", lambda uri: real_client(store) if uri == SECRET_URI else None)
    res = train_all.run(train_all.parse_args(["--out", str(tmp_path / "run"), "--stages", ""]))
    printed = capsys.readouterr().out
    stored = (tmp_path / "run" / "mlflow_run.json").read_text()
    assert res["mlflow_run_id"] and json.loads(stored)["tracking_uri"] == common.redact_uri(SECRET_URI)
    for text in (printed, stored):
        assert "s3cret" not in text and "t0k3n" not in text
    assert "https://***@mlflow.example:5000" in printed


def test_train_sde_loop_config_holds_no_credentials(tmp_path, monkeypatch):
    from ray_jobs import common, train_sde

    class Stop(Exception):
        pass

    seen = {}

    def fit(loop, config, **kw):
        seen.update(config)
        raise Stop

    # train_sde sets MLFLOW_TRACKING_URI for its workers: setenv first, so monkeypatch restores its absence after
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr(common, "init_ray", lambda *a, **kw: None)
    monkeypatch.setattr(common, "fit", fit)
    monkeypatch.setattr(train_sde, "normalization_for_data", lambda data: None)
    with pytest.raises(Stop):
        train_sde.run(str(tmp_path), str(tmp_path / "out"), "image", "tiny", mlflow_uri=SECRET_URI)
    assert seen["mlflow_uri"] == common.redact_uri(SECRET_URI) and "s3cret" not in repr(seen)
    # the workers (here: this process) connect with the full URI, from the environment
    assert common.tracking_uri(seen["mlflow_uri"]) == SECRET_URI


def test_bench_data_keeps_the_users_ray_auth_mode(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert bench.subprocess_env()["RAY_AUTH_MODE"] == "token"
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert bench.subprocess_env()["RAY_AUTH_MODE"] == "disabled"
