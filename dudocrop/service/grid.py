"""Any CT pixel grid onto the model's geometry and back (issue 21: inputs of any pixel grid).

A slice whose spacing or size differs from the model's is resampled about its centre onto the model grid
(:func:`dudocrop.data.clinical.resample_to_geometry`), corrected there, and the correction is resampled back to
the input grid; the metal is then reinserted from the input itself, at the input's own resolution, so no metal
pixel is ever interpolated. A slice whose field of view is larger than the model's cannot be mapped without
cutting the body off: refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dudocrop.ct.geometry import FanBeamGeometry
from dudocrop.data.clinical import metal_mask_from_hu, resample_to_geometry

#: relative tolerance when comparing spacings / FOVs (DICOM decimal strings carry ~6 significant digits).
_RTOL = 1e-4


@dataclass
class PreparedSlice:
    """One input slice ready for the model: ``model_hu`` on the model grid (None when it holds no metal),
    the input's own metal mask and how to come back."""

    input_hu: np.ndarray
    spacing: tuple[float, float]
    metal_mask: np.ndarray  # at input resolution
    model_hu: np.ndarray | None
    resampled: bool

    @property
    def metal_pixels(self) -> int:
        return int(self.metal_mask.sum())

    @property
    def has_metal(self) -> bool:
        return self.model_hu is not None


def check_mappable(shape: tuple[int, int], spacing: tuple[float, float], geometry: FanBeamGeometry,
                   name: str = "slice") -> None:
    """ValueError naming ``name`` when the slice cannot be put on the model's grid: a spacing that is not
    positive and finite, or a field of view (rows x spacing, cols x spacing) larger than the model's."""
    sr, sc = (float(s) for s in spacing)
    if not (np.isfinite(sr) and np.isfinite(sc) and sr > 0 and sc > 0):
        raise ValueError(f"{name}: pixel spacing {spacing!r} mm is not two positive numbers")
    fov = geometry.image_size * geometry.pixel_size
    size = (shape[0] * sr, shape[1] * sc)
    if max(size) > fov * (1 + _RTOL):
        raise ValueError(f"{name}: field of view {size[0]:.1f} x {size[1]:.1f} mm is larger than the model's "
                         f"{fov:.1f} mm ({geometry.name}): it cannot be corrected without cutting it")


def same_grid(shape: tuple[int, int], spacing: tuple[float, float], geometry: FanBeamGeometry) -> bool:
    return (tuple(shape) == geometry.image_shape
            and all(abs(float(s) - geometry.pixel_size) <= _RTOL * geometry.pixel_size for s in spacing))


def prepare_slice(hu: np.ndarray, spacing: tuple[float, float], geometry: FanBeamGeometry,
                  threshold_hu: float, name: str = "slice") -> PreparedSlice:
    """Metal mask at input resolution (HU threshold, paper §IV-A); for a slice with metal, its image on the
    model grid. A metal-free slice has ``model_hu=None``: it is answered without diffusion."""
    hu = np.asarray(hu, np.float32)
    check_mappable(hu.shape, spacing, geometry, name)
    mask = metal_mask_from_hu(hu, threshold_hu) > 0
    if not mask.any():
        return PreparedSlice(hu, spacing, mask, None, False)
    if same_grid(hu.shape, spacing, geometry):
        return PreparedSlice(hu, spacing, mask, hu, False)
    return PreparedSlice(hu, spacing, mask, resample_to_geometry(hu, spacing, geometry), True)


def back_to_input_grid(corrected_model_hu: np.ndarray, prepared: PreparedSlice,
                       geometry: FanBeamGeometry) -> np.ndarray:
    """The corrected slice on the input's grid with the input's metal reinserted (HU, float32)."""
    x = np.asarray(corrected_model_hu, np.float32)
    if prepared.resampled:
        rows, cols = prepared.input_hu.shape
        n = geometry.image_size
        # input pixel centres in mm about the centre -> model pixel coordinates (the inverse of resample_to_geometry)
        r = ((np.arange(rows) - (rows - 1) / 2) * prepared.spacing[0]) / geometry.pixel_size + (n - 1) / 2
        c = ((np.arange(cols) - (cols - 1) / 2) * prepared.spacing[1]) / geometry.pixel_size + (n - 1) / 2
        rr, cc = np.meshgrid(r, c, indexing="ij")
        x = ndimage.map_coordinates(x, [rr, cc], order=1, mode="nearest").astype(np.float32)
    return np.where(prepared.metal_mask, prepared.input_hu, x).astype(np.float32)
