"""Inputs for the service tests: a tiny model folder, CT DICOM instances of a study, NIfTI volumes, slices."""

from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np

METAL_HU = 3000.0


def tiny_model_folder(folder: str, steps: int = 1) -> str:
    """Untrained, unguided image / sinogram / residual IR-SDEs small enough for CPU tests on the ``tiny``
    geometry (64², 6.25 mm pixels), with pipeline.json asking for ``steps`` sampler steps."""
    import torch

    from dudocrop.pipeline.model import PipelineConfig, save_pipeline_meta
    from dudocrop.sde.config import get_unet_config
    from dudocrop.sde.train import save_sde_model
    from dudocrop.sde.unet import build_unet

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    cfg = replace(get_unet_config("tiny", use_embeddings=False), nf=8, ch_mult=(1, 2, 2), attn_levels=(0, 1),
                  st_levels=(2,))
    for dom in ("image", "sinogram", "residual"):
        save_sde_model(os.path.join(folder, f"sde_{dom}.pt"), build_unet(cfg), None, {"domain": dom})
    save_pipeline_meta(folder, "tiny", PipelineConfig(steps=steps))
    return folder


def phantom(n: int = 64, pixel_mm: float = 6.25, metal: bool = True, shift_mm: float = 0.0) -> np.ndarray:
    """An elliptical water body (0 HU) with a bone disc (1000 HU) and, optionally, a titanium-like disc
    (METAL_HU) in air (-1000 HU): (n, n) float32 HU on a grid of ``pixel_mm`` pixels."""
    k = (np.arange(n) - (n - 1) / 2) * pixel_mm
    yy, xx = np.meshgrid(k, k, indexing="ij")
    x = np.full((n, n), -1000.0, np.float32)
    x[(xx / 150) ** 2 + (yy / 110) ** 2 < 1] = 0.0
    x[(xx + 50) ** 2 + (yy - 20 - shift_mm) ** 2 < 20 ** 2] = 1000.0
    if metal:
        x[(xx - 40) ** 2 + (yy + 30) ** 2 < 12 ** 2] = METAL_HU
    return x


def ct_dataset(hu: np.ndarray, spacing: float, *, z: float = 0.0, study_uid: str | None = None,
               series_uid: str | None = None, instance: int = 1, modality: str = "CT"):
    """A complete enough CT Image Storage instance (patient, study, series, frame of reference, equipment, image
    plane, image pixel, CT image and SOP common modules) holding ``hu`` with slope 1, intercept -1024."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    sop = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PHANTOM-1", "", "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
    ds.StudyID, ds.AccessionNumber = "1", ""
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 1, instance
    ds.SeriesDescription = "phantom"
    ds.Laterality, ds.PatientPosition = "", "HFS"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[ds.StudyInstanceUID])
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "test"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ContentDate, ds.ContentTime = "20260101", "120000"
    ds.AcquisitionNumber = 1
    ds.PixelSpacing = [spacing, spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rows, cols = hu.shape
    ds.ImagePositionPatient = [-(cols - 1) / 2 * spacing, -(rows - 1) / 2 * spacing, z]
    ds.SliceThickness, ds.SliceLocation = 2.5, z
    ds.KVP = 120
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = np.rint(hu + 1024).astype(np.int16).tobytes()
    return ds


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def study(n: int, metal_at: tuple[int, ...], size: int = 64, spacing: float = 6.25) -> list:
    """``n`` instances of one series, metal in the slices ``metal_at``."""
    from pydicom.uid import generate_uid

    st, se = generate_uid(), generate_uid()
    return [ct_dataset(phantom(size, spacing, metal=i in metal_at, shift_mm=2.0 * i), spacing, z=2.5 * i,
                       study_uid=st, series_uid=se, instance=i + 1) for i in range(n)]


def nifti_volume_bytes(vol_zyx: np.ndarray, spacing: float) -> bytes:
    """A NIfTI (.nii.gz bytes) whose read_nifti view is ``vol_zyx`` (slices, rows, cols) in HU."""
    import tempfile

    import nibabel as nib

    data = np.transpose(np.flip(vol_zyx, axis=(1, 2)), (2, 1, 0)).astype(np.float32)
    img = nib.Nifti1Image(np.ascontiguousarray(data), np.diag([spacing, spacing, 2.5, 1.0]))
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "v.nii.gz")
        nib.save(img, p)
        with open(p, "rb") as f:
            return f.read()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def metal_volume(n: int, metal_at: tuple[int, ...], seed: int = 0, geometry: str = "tiny") -> np.ndarray:
    """A (n, H, W) HU volume of one patient-like body (``dudocrop.ct.patients``) on ``geometry``'s grid: every
    slice a polychromatic scan of the same anatomy (``dudocrop.ct.simulate``, its own noise per slice), and the
    slices ``metal_at`` holding one implant (the body's ``aapm_like`` metal preset, drawn once) with its
    streaks: a stack as a scanner gives it, metal only where the implant runs."""
    from dudocrop.ct.metal import sample_metal
    from dudocrop.ct.operators import FanBeamOperator
    from dudocrop.ct.patients import patient_phantom
    from dudocrop.ct.simulate import simulate
    from dudocrop.data.synthetic import metal_config_for

    op = FanBeamOperator(geometry)
    rng = np.random.default_rng(seed)
    clean = patient_phantom("body", op.geometry, rng)
    objects = sample_metal(metal_config_for("body", op.geometry), clean, op.geometry, rng)
    res = simulate(np.repeat(clean[None, None], n, axis=0), op,
                   metal=[objects if i in metal_at else () for i in range(n)], seed=seed)
    return res.X_ma[:, 0].cpu().numpy().astype(np.float32)


def ct_study(vol: np.ndarray, spacing: float, thickness: float = 2.5) -> list:
    """A CT study of one axial series from a (slices, rows, cols) HU volume: shared Study / Series /
    FrameOfReference UIDs, ImagePositionPatient stepping ``thickness`` mm along z (feet to head), SliceLocation,
    InstanceNumber 1..n (each instance from :func:`ct_dataset`)."""
    from pydicom.uid import generate_uid

    st, se = generate_uid(), generate_uid()
    return [ct_dataset(hu, spacing, z=thickness * i, study_uid=st, series_uid=se, instance=i + 1)
            for i, hu in enumerate(vol)]


def wait_for_job(url: str, job_id: str, timeout: float = 300, poll: float = 0.3) -> dict:
    """Poll ``GET /v1/jobs/{id}`` until the job is done, failed or cancelled; its last status."""
    import time

    import requests

    t0, st = time.time(), None
    while time.time() - t0 < timeout:
        st = requests.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()
        if st["state"] in ("done", "failed", "cancelled"):
            return st
        time.sleep(poll)
    raise AssertionError(f"job {job_id} still {st} after {timeout} s")
