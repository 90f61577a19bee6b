"""The "real anatomy" evaluation set (issue 25 §3): real CT slices with metal simulated by the project's simulator.

The slices are the CT test files of the ``pydicom-data`` package (an abdomen, ``explicit_VR-UN.dcm``, 0.86 mm, and
a head, ``693_UNCR.dcm``, 0.48 mm; both 512²). They are RESERVED for this independent evaluation: no training,
tuning or design choice may use them (the synthetic source never reads them; ``pydicom``'s own ``CT_small.dcm`` is
a different file). Each slice is read in HU, padding below −1024 HU set to air, resampled at its physical pixel
size onto a preset's grid (anti-aliased, centred), and simulated with ``n_draws`` metal draws from the anatomy's
metal preset (``dudocrop.data.synthetic.metal_config_for``) at the AAPM-like settings: independent noise, beam
hardening, scatter, partial volume. Records follow ``dudocrop.data.schema`` (plus ``case_id``).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
from scipy import ndimage

from dudocrop.ct.geometry import FanBeamGeometry, get_geometry
from dudocrop.ct.units import HU_AIR

__all__ = ["REAL_ANATOMY_SLICES", "real_anatomy_cases", "read_real_slice"]

#: name -> (pydicom-data file, anatomy kind for the metal preset)
REAL_ANATOMY_SLICES = {"abdomen": ("explicit_VR-UN.dcm", "body"), "head": ("693_UNCR.dcm", "head")}


def _data_store() -> str:
    spec = importlib.util.find_spec("data_store")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the real-anatomy evaluation needs the 'pydicom-data' package (pip install "
                                "pydicom-data==1.0.0; it is in the dev extra)")
    return os.path.join(os.path.dirname(spec.origin), "data")


def read_real_slice(name: str, geometry: FanBeamGeometry | str) -> np.ndarray:
    """Slice ``name`` (a key of :data:`REAL_ANATOMY_SLICES`) in HU on ``geometry``'s grid, float32."""
    import pydicom

    if name not in REAL_ANATOMY_SLICES:
        raise ValueError(f"real-anatomy slice must be one of {sorted(REAL_ANATOMY_SLICES)}, got {name!r}")
    path = os.path.join(_data_store(), REAL_ANATOMY_SLICES[name][0])
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1.0) or 1.0) + float(
        getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    hu = np.clip(np.where(hu < -1024.0, HU_AIR, hu), HU_AIR, 3071.0)
    iop = [float(v) for v in getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    if iop[4] < 0:  # rows run posterior -> anterior (the abdomen file): flip to the usual anterior-up display
        hu = hu[::-1].copy()
    g = get_geometry(geometry)
    sp = [float(v) for v in ds.PixelSpacing]
    h, w = hu.shape
    ratio = g.pixel_size / min(sp)
    src = ndimage.gaussian_filter(hu, sigma=0.4 * ratio) if ratio > 1.5 else hu
    xs, ys = g.pixel_centres
    rr, cc = np.meshgrid(-ys / sp[0] + (h - 1) / 2, xs / sp[1] + (w - 1) / 2, indexing="ij")
    out = ndimage.map_coordinates(src, [rr, cc], order=1, mode="constant", cval=HU_AIR)
    return out.astype(np.float32)


def real_anatomy_cases(geometry: FanBeamGeometry | str, n_draws: int = 6, simulation: str = "aapm_like",
                       seed: int = 2025) -> list[dict]:
    """Every slice of :data:`REAL_ANATOMY_SLICES` with ``n_draws`` simulated metal configurations each: schema
    records with ``case_id`` ``<slice>/<draw>``, reproducible from ``seed``."""
    from dudocrop.ct.metal import sample_metal
    from dudocrop.ct.operators import FanBeamOperator
    from dudocrop.ct.simulate import get_settings, simulate
    from dudocrop.data.synthetic import MAX_METAL_DRAWS, metal_config_for, resolved

    if not (isinstance(n_draws, int) and n_draws >= 1):
        raise ValueError(f"n_draws must be an int >= 1, got {n_draws!r}")
    op = FanBeamOperator(geometry)
    g = op.geometry
    out = []
    for k, (name, (_, kind)) in enumerate(sorted(REAL_ANATOMY_SLICES.items())):
        clean = read_real_slice(name, g)
        cfg = metal_config_for(kind, g)
        for d in range(n_draws):
            rng = np.random.default_rng(np.random.SeedSequence([seed, k, d]))
            for _ in range(MAX_METAL_DRAWS):
                objects = sample_metal(cfg, clean, g, rng)
                if resolved(objects, g, get_settings(simulation).metal_supersample):
                    break
            rec = simulate(clean, op, metal=objects, settings=simulation, seed=seed + 97 * k + d).record(0)
            rec.update(case_id=f"{name}/{d}", anatomy=kind)
            out.append(rec)
    return out
