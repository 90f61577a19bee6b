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
    in-plane pixel spacing (row, col) in mm."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for bad files
        raise ValueError(f"{path}: not a readable NIfTI file ({e})") from e
    img = nib.as_closest_canonical(img)  # RAS+: axis 0 = x (left->right of patient), 1 = y, 2 = z
    data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    zooms = img.header.get_zooms()[:3]
    # RAS -> (z, row=anterior at top, col=patient right on the image left)
    vol = np.flip(np.transpose(data, (2, 1, 0)), axis=(1, 2)).astype(np.float32)
    return np.ascontiguousarray(vol), (float(zooms[1]), float(zooms[0]))


def read_dicom_series(folder: str) -> tuple[np.ndarray, tuple[float, float]]:
    """A DICOM series (one folder) as (slices, rows, cols) HU float32 sorted by position along the slice
    normal, and the pixel spacing (row, col) in mm. Rescale slope / intercept are applied."""
    import pydicom

    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if os.path.isfile(f))
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # noqa: BLE001 - skip non-DICOM files in the folder
            continue
        if "PixelData" not in ds:
            continue
        slices.append(ds)
    if not slices:
        raise FileNotFoundError(f"no DICOM images with pixel data in {folder}")
    uids = {getattr(s, "SeriesInstanceUID", None) for s in slices}
    if len(uids) > 1:
        raise ValueError(f"{folder}: holds {len(uids)} DICOM series; give one series per folder")
    slices.sort(key=_position_along_normal)
    vols = [dicom_to_hu(s) for s in slices]
    shapes = {v.shape for v in vols}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: slices have different shapes {sorted(shapes)}")
    sp = getattr(slices[0], "PixelSpacing", [1.0, 1.0])
    return np.stack(vols).astype(np.float32), (float(sp[0]), float(sp[1]))


def dicom_to_hu(ds) -> np.ndarray:
    """Pixel data of one DICOM dataset in HU (RescaleSlope / RescaleIntercept applied)."""
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
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
