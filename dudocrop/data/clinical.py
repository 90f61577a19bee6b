"""Clinical CT volumes: NIfTI (e.g. CTPelvic1K, via nibabel) and DICOM series (pydicom), in HU.

Clinical data has metal but no metal-free reference: slices with metal are found by an HU threshold (the
paper segments its masks by thresholding), sinograms are made by forward projection of the metal-affected
slice with a chosen geometry (paper Algorithm 2), and X_ref / Y_ref stay null rather than being faked.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from scipy import ndimage

from dudocrop.ct.geometry import FanBeamGeometry

#: metal segmentation threshold (HU); bone stays below ~2000 HU, implants read far above.
METAL_THRESHOLD_HU = 2500.0


def read_nifti(path: str) -> tuple[np.ndarray, tuple[float, float]]:
    """A NIfTI CT volume as (slices, rows, cols) HU float32 in radiological display orientation, and the
    in-plane pixel spacing (row, col) in mm. A NaN or inf voxel is refused naming the file and the slices."""
    import nibabel as nib

    try:
        img = nib.load(path)
        img = nib.as_closest_canonical(img)  # RAS+: axis 0 = x (left->right of patient), 1 = y, 2 = z
        data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter; reads the voxels
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for bad (e.g. truncated) files
        raise ValueError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    zooms = img.header.get_zooms()[:3]
    # RAS -> (z, row=anterior at top, col=patient right on the image left)
    vol = np.flip(np.transpose(data, (2, 1, 0)), axis=(1, 2)).astype(np.float32)
    check_finite_volume(vol, path)
    return np.ascontiguousarray(vol), (float(zooms[1]), float(zooms[0]))


def check_finite_volume(vol: np.ndarray, path: str) -> None:
    """ValueError naming ``path`` and the slices (indices as in the case ids) that hold NaN or inf voxels."""
    bad = ~np.isfinite(vol)
    if bad.any():
        per_slice = bad.reshape(len(vol), -1).sum(1)
        idx = np.nonzero(per_slice)[0]
        shown = ", ".join(f"{i} ({per_slice[i]} voxels)" for i in idx[:10]) + (" ..." if len(idx) > 10 else "")
        raise ValueError(f"{path}: {int(bad.sum())} NaN or inf voxels in slice(s) {shown}")


#: SOP classes whose files hold no image and may sit in a series folder (a DICOMDIR); every other file without
#: pixel data is taken as cut short in its header.
_NO_PIXELS_SOP = ("1.2.840.10008.1.3.10",)  # Media Storage Directory Storage


def read_dicom_series(folder: str, assume_rescale: tuple[float, float] | None = None
                      ) -> tuple[np.ndarray, tuple[float, float]]:
    """A DICOM CT series (one folder) as (slices, rows, cols) HU float32 sorted by position along the slice
    normal, and the pixel spacing (row, col) in mm.

    Refused, naming the file: a series that is not CT (Modality), a slice without RescaleSlope /
    RescaleIntercept (stored values are not HU; ``assume_rescale=(slope, intercept)`` states them explicitly),
    two slices at one position, mixed pixel spacing or shapes, a DICOM file cut short (in its header or its pixel
    data) and pixel data pydicom cannot decode (e.g. JPEG 2000 without a codec). Files that are not DICOM at all
    (no 'DICM' prefix, no ``.dcm`` name) are skipped."""
    import pydicom

    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if os.path.isfile(f))
    slices = []
    for f in files:
        looks_dicom = f.lower().endswith(".dcm") or _has_dicom_prefix(f)
        try:
            ds = pydicom.dcmread(f)
        except Exception as e:  # noqa: BLE001 - pydicom raises several types for bad files
            if looks_dicom:
                raise ValueError(f"{f}: not a readable DICOM file ({type(e).__name__}: {e})") from e
            continue  # notes, checksums and other non-DICOM files beside the series
        if "PixelData" not in ds:
            sop = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", ""))
            if sop in _NO_PIXELS_SOP:
                continue
            raise ValueError(f"{f}: DICOM file without pixel data ({len(ds)} elements read): cut short in its "
                             "header?")
        slices.append((f, ds))
    if not slices:
        raise FileNotFoundError(f"no DICOM images with pixel data in {folder}")
    uids = {getattr(s, "SeriesInstanceUID", None) for _, s in slices}
    if len(uids) > 1:
        raise ValueError(f"{folder}: holds {len(uids)} DICOM series; give one series per folder")
    for f, ds in slices:
        modality = ds.get("Modality", None)
        if modality != "CT":
            raise ValueError(f"{f}: Modality is {modality!r}, not 'CT': only CT values are HU")
    spacings = {}
    for f, ds in slices:
        sp = ds.get("PixelSpacing", None)
        if sp is None or len(sp) != 2:
            raise ValueError(f"{f}: PixelSpacing is missing or malformed ({sp!r})")
        spacings.setdefault((round(float(sp[0]), 6), round(float(sp[1]), 6)), f)
    if len(spacings) > 1:
        raise ValueError(f"{folder}: slices have mixed pixel spacing " + ", ".join(
            f"{k} mm ({os.path.basename(v)})" for k, v in spacings.items()))
    slices.sort(key=lambda fs: _position_along_normal(fs[1]))
    for (f0, d0), (f1, d1) in zip(slices, slices[1:]):
        if abs(_position_along_normal(d0) - _position_along_normal(d1)) < 1e-3:
            raise ValueError(f"{f1}: at the same slice position ({_position_along_normal(d1):g} mm) as {f0}")
    vols = [dicom_to_hu(s, path=f, assume_rescale=assume_rescale) for f, s in slices]
    shapes = {v.shape for v in vols}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: slices have different shapes {sorted(shapes)}")
    vol = np.stack(vols).astype(np.float32)
    check_finite_volume(vol, folder)
    return vol, next(iter(spacings))


def _has_dicom_prefix(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def dicom_to_hu(ds, path: str | None = None, assume_rescale: tuple[float, float] | None = None) -> np.ndarray:
    """Pixel data of one DICOM dataset in HU (RescaleSlope / RescaleIntercept applied). Without the two tags the
    stored values are not known to be HU: refused unless ``assume_rescale=(slope, intercept)`` is given. Errors
    name ``path`` (default: the dataset's filename), pydicom's own for cut-short or undecodable pixel data too."""
    name = path or getattr(ds, "filename", None) or "<DICOM dataset>"
    has = ("RescaleSlope" in ds, "RescaleIntercept" in ds)
    if all(has):
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    elif assume_rescale is not None:
        slope, intercept = (float(v) for v in assume_rescale)
    else:
        missing = [t for t, h in zip(("RescaleSlope", "RescaleIntercept"), has) if not h]
        raise ValueError(f"{name}: {' and '.join(missing)} missing, so the stored values are not known to be HU "
                         "(state them explicitly: assume_rescale=(slope, intercept), prepare_data --dicom-rescale)")
    try:
        arr = ds.pixel_array.astype(np.float32)
    except Exception as e:  # noqa: BLE001 - truncated data, a missing codec, a corrupt JPEG 2000 stream ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise ValueError(f"{name}: cannot decode its pixel data (transfer syntax "
                         f"{getattr(ts, 'name', ts)}): {type(e).__name__}: {e}") from e
    return arr * slope + intercept


def _position_along_normal(ds) -> float:
    pos = getattr(ds, "ImagePositionPatient", None)
    ori = getattr(ds, "ImageOrientationPatient", None)
    if pos is None or ori is None:
        return float(getattr(ds, "InstanceNumber", 0))
    row, col = np.array(ori[:3], float), np.array(ori[3:], float)
    return float(np.dot(np.cross(row, col), np.array(pos, float)))


def resample_to_geometry(slice_hu: np.ndarray, spacing: tuple[float, float], geometry: FanBeamGeometry,
                         fill_hu: float = -1000.0) -> np.ndarray:
    """Resample a slice about its centre onto the geometry's pixel grid (linear interpolation; air outside)."""
    n = geometry.image_size
    k = (np.arange(n) - (n - 1) / 2) * geometry.pixel_size
    rows = k / spacing[0] + (slice_hu.shape[0] - 1) / 2
    cols = k / spacing[1] + (slice_hu.shape[1] - 1) / 2
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(slice_hu, [rr, cc], order=1, mode="constant", cval=fill_hu).astype(np.float32)


def metal_mask_from_hu(slice_hu: np.ndarray, threshold_hu: float = METAL_THRESHOLD_HU,
                       min_pixels: int = 2) -> np.ndarray:
    """Binary metal mask by thresholding (paper §IV-A), dropping specks smaller than ``min_pixels``."""
    m = slice_hu > threshold_hu
    lab, n = ndimage.label(m)
    if n:
        sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
        m = np.isin(lab, 1 + np.nonzero(sizes >= min_pixels)[0])
    return m.astype(np.float32)


def slices_with_metal(volume_hu: np.ndarray, threshold_hu: float = METAL_THRESHOLD_HU,
                      min_pixels: int = 2) -> list[int]:
    """Indices of the slices of a volume that contain metal."""
    return [i for i, s in enumerate(volume_hu) if metal_mask_from_hu(s, threshold_hu, min_pixels).any()]
