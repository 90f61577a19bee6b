"""Corrected CT slices as a new *derived* DICOM series of the input's study (pure pydicom, no Ray).

The MAR service (serve/) and a PACS batch job write their output here: every input instance gets one output
instance in a new series of the same study, so a viewer shows the corrected series next to the original and
nobody mistakes it for an acquisition:

* same patient / study modules and StudyInstanceUID; new SeriesInstanceUID (one per call of
  :func:`new_series_uid`) and a new SOPInstanceUID per slice;
* ImageType ``DERIVED\\SECONDARY\\AXIAL``; DerivationDescription naming the model version, sampler steps and the
  OSRO factors k / α / β (paper Eq. 15); SourceImageSequence pointing at the input instance;
  ContributingEquipmentSequence naming this software and its version; SeriesDescription marked
  "NOT FOR DIAGNOSTIC USE";
* pixel data stored with the input's RescaleSlope / RescaleIntercept, bit depth and pixel representation, and
  the input's geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness) unchanged.

Input checks (CT modality, rescale tags, decodable pixels) are :mod:`dudocrop.data.clinical`'s.
"""

from __future__ import annotations

import copy
import datetime as _dt

import numpy as np

import dudocrop

#: the words every derived series carries in its SeriesDescription (and the prefix of DerivationDescription).
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
#: DICOM "Purpose of Reference" for the contributing equipment: (DCM 109103, "Modifying Equipment").
_MODIFYING_EQUIPMENT = ("109103", "DCM", "Modifying Equipment")
#: "Source image for image processing operation" (DCM 121322), the Purpose of Reference of SourceImageSequence.
_SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")
MANUFACTURER = "dudocrop"


def new_series_uid() -> str:
    """A fresh SeriesInstanceUID for one derived series (all slices of one corrected study share it)."""
    from pydicom.uid import generate_uid

    return generate_uid()


def derivation_description(model_version: str, steps: int | None, k: float, alpha: float, beta: float) -> str:
    """The DerivationDescription text (≤ 1024 chars, DICOM ST): what made the pixels and with which settings."""
    return (f"DuDoCROP metal artifact reduction ({NOT_FOR_DIAGNOSTIC_USE}); model {model_version}; "
            f"steps {steps if steps is not None else 'default'}; OSRO k={k:g} alpha={alpha:g} beta={beta:g}")[:1024]


def _code_item(code):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def encode_hu(hu: np.ndarray, source, name: str = "<source>") -> np.ndarray:
    """HU -> stored values with the source's RescaleSlope / RescaleIntercept, in its bit depth and sign,
    clipped to the stored type's range (the reinserted metal comes back exactly; a corrected value cannot
    leave the range the scanner wrote)."""
    slope, intercept = float(source.RescaleSlope), float(source.RescaleIntercept)
    if slope == 0:
        raise ValueError(f"{name}: RescaleSlope is 0")
    bits = int(source.get("BitsStored", source.BitsAllocated))
    signed = int(source.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    stored = np.clip(np.rint((np.asarray(hu, np.float64) - intercept) / slope), lo, hi)
    dtype = {(16, True): np.int16, (16, False): np.uint16, (8, False): np.uint8, (8, True): np.int8,
             (32, True): np.int32, (32, False): np.uint32}.get((int(source.BitsAllocated), signed))
    if dtype is None:
        raise ValueError(f"{name}: BitsAllocated {source.BitsAllocated} is not supported for output")
    return stored.astype(dtype)


def derived_slice(source, hu: np.ndarray, *, series_uid: str, model_version: str, steps: int | None,
                  k: float, alpha: float, beta: float, series_number: int | None = None,
                  metal_free: bool = False):
    """One output instance (a pydicom FileDataset, explicit VR little endian) for the input instance ``source``
    (a pydicom Dataset whose pixel data was read) and its corrected slice ``hu`` (rows, cols) in HU.

    ``metal_free`` marks a slice that held no metal and is returned as it came (no diffusion ran): the
    DerivationDescription then says so."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    name = getattr(source, "filename", None) or "<source>"
    hu = np.asarray(hu)
    if hu.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"{name}: corrected slice has shape {hu.shape}, the source {source.Rows}x{source.Columns}")
    ds = copy.deepcopy(source)
    # pixel data first: drop every encoding attribute of the source (compressed, palette ...) and write raw
    for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "LargestImagePixelValue",
                "SmallestImagePixelValue", "PixelPaddingValue", "PixelPaddingRangeLimit"):
        if tag in ds:
            del ds[tag]
    stored = encode_hu(hu, source, name)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW" if stored.dtype.itemsize > 1 else "OB"

    sop_uid = generate_uid()
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    desc = str(source.get("SeriesDescription", "") or "CT")
    ds.SeriesDescription = f"MAR {NOT_FOR_DIAGNOSTIC_USE} {desc}"[:64]
    if series_number is not None:
        ds.SeriesNumber = series_number
    text = derivation_description(model_version, steps, k, alpha, beta)
    ds.DerivationDescription = (text + "; no metal: input returned")[:1024] if metal_free else text
    now = _dt.datetime.now(_dt.UTC)
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.BurnedInAnnotation = "NO"

    src = Dataset()
    src.ReferencedSOPClassUID = source.SOPClassUID
    src.ReferencedSOPInstanceUID = source.SOPInstanceUID
    src.PurposeOfReferenceCodeSequence = Sequence([_code_item(_SOURCE_FOR_PROCESSING)])
    ds.SourceImageSequence = Sequence([src])
    ds.DerivationCodeSequence = Sequence([_derivation_code()])
    equip = Dataset()
    equip.Manufacturer = MANUFACTURER
    equip.ManufacturerModelName = "DuDoCROP"
    equip.SoftwareVersions = f"dudocrop {dudocrop.__version__}; model {model_version}"[:64]
    equip.ContributionDescription = text[:1024]
    equip.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    equip.PurposeOfReferenceCodeSequence = Sequence([_code_item(_MODIFYING_EQUIPMENT)])
    ds.ContributingEquipmentSequence = Sequence([equip])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = source.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"DUDOCROP_{dudocrop.__version__}"[:16]
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return ds


def _derivation_code():
    # DICOM's CID 7203 (Image Derivation) has no code for metal artifact reduction; the standard allows a private
    # coding scheme ("99" prefix), so the operation is named exactly rather than by a near-miss DCM code.
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "MAR", "99DUDOCROP", "Metal artifact reduction"
    return item


#: ImplementationClassUID of files this library writes (under pydicom's root, fixed so the value is stable).
_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1.20261206.1"


def to_bytes(ds) -> bytes:
    """A dataset from :func:`derived_slice` as DICOM Part 10 file bytes."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
