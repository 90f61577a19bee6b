"""Synthetic slices: a random anatomical phantom with physically simulated metal (the embedded default source).

One record per (anatomy, seed): the phantom (:func:`dudocrop.ct.phantoms.random_phantom`), metal objects drawn
from the anatomy's metal preset (:data:`METAL_FOR_ANATOMY`) and the polychromatic simulation of
:func:`dudocrop.ct.simulate.simulate`. The metal configuration (count, diameters, materials, centroids) is
recorded through :meth:`SimulationResult.record`, so the schema's descriptor columns are the simulator's truth.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dudocrop.ct.geometry import FanBeamGeometry
from dudocrop.ct.metal import MetalConfig, get_metal_config
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.phantoms import ANATOMY_KINDS, random_phantom
from dudocrop.ct.simulate import simulate

#: which metal preset each anatomy gets: implants anywhere in the body; dental fillings in the head.
METAL_FOR_ANATOMY = {"body": "aapm_like", "head": "dental"}

#: objects narrower than this many pixels vanish into partial volume on coarse grids (the 64² ``tiny`` preset
#: has 6.25 mm pixels), so the preset's diameter range is raised to at least this many pixels.
MIN_DIAMETER_PX = 1.5


def metal_config_for(anatomy: str, geometry: FanBeamGeometry) -> MetalConfig:
    """The anatomy's metal preset with diameters no smaller than :data:`MIN_DIAMETER_PX` pixels."""
    if anatomy not in ANATOMY_KINDS:
        raise ValueError(f"anatomy must be one of {ANATOMY_KINDS}, got {anatomy!r}")
    cfg = get_metal_config(METAL_FOR_ANATOMY[anatomy])
    lo, hi = cfg.diameter_mm
    floor = MIN_DIAMETER_PX * geometry.pixel_size
    if lo < floor:
        cfg = replace(cfg, diameter_mm=(floor, max(hi, 2.0 * floor)))
    return cfg


def simulate_slice(anatomy: str, op: FanBeamOperator, seed: int, simulation: str = "aapm_like") -> dict:
    """One synthetic slice record (schema arrays + metal descriptors), reproducible from ``seed``."""
    g = op.geometry
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    clean = random_phantom(anatomy, g, rng)
    res = simulate(clean, op, metal=metal_config_for(anatomy, g), settings=simulation, seed=int(seed))
    rec = res.record(0)
    rec["anatomy"] = anatomy
    return rec
