"""Synthetic slices: a random anatomical phantom with physically simulated metal (the embedded default source).

One record per (anatomy, seed): the phantom (:func:`dudocrop.ct.phantoms.random_phantom`), metal objects drawn
from the anatomy's metal preset (:data:`METAL_FOR_ANATOMY`) and the polychromatic simulation of
:func:`dudocrop.ct.simulate.simulate`. The metal configuration (count, diameters, materials, centroids) is
recorded through :meth:`SimulationResult.record`, so the schema's descriptor columns are the simulator's truth.

The truth must also be what the mask shows: a draw is kept only if every object is a connected component of
its own in the simulated metal mask (:func:`resolved`); otherwise (objects touching, or a thin rod broken by
coarse pixels) it is redrawn from the same seed's stream, so records stay reproducible from their seed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dudocrop.ct.geometry import FanBeamGeometry
from dudocrop.ct.metal import MetalConfig, MetalObject, get_metal_config, rasterize_metal, sample_metal
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.patients import PHANTOM_STYLES, phantom
from dudocrop.ct.phantoms import ANATOMY_KINDS
from dudocrop.ct.simulate import get_settings, simulate
from dudocrop.data.aapm import label_metal

#: which metal preset each anatomy gets: implants anywhere in the body; dental fillings in the head.
METAL_FOR_ANATOMY = {"body": "aapm_like", "head": "dental"}

#: objects narrower than this many pixels vanish into partial volume on coarse grids (the 64² ``tiny`` preset
#: has 6.25 mm pixels), so the preset's diameter range is raised to at least this many pixels.
MIN_DIAMETER_PX = 1.5

#: redraws allowed before giving up on a slice whose metal never resolves into separate objects
MAX_METAL_DRAWS = 50


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


def resolved(objects: tuple[MetalObject, ...], geometry: FanBeamGeometry, supersample: int) -> bool:
    """True if the objects' joint metal mask has exactly one connected component per object, each holding
    that object's own mask pixels and no other object's."""
    lab, n = label_metal(rasterize_metal(objects, geometry, supersample).mask)
    if n != len(objects):
        return False
    owners = set()
    for o in objects:
        own = rasterize_metal((o,), geometry, supersample).mask
        comps = set(np.unique(lab[own]).tolist()) - {0}
        if len(comps) != 1:
            return False
        owners |= comps
    return len(owners) == len(objects)


def simulate_slice(anatomy: str, op: FanBeamOperator, seed: int, simulation: str = "aapm_like",
                   style: str = "ellipse") -> dict:
    """One synthetic slice record (schema arrays + metal descriptors), reproducible from ``seed``. ``style``
    picks the clean slice: ``ellipse`` (:func:`dudocrop.ct.phantoms.random_phantom`) or ``patient``
    (:func:`dudocrop.ct.patients.patient_phantom`: organ texture, vessels, bowel, random contrast)."""
    g = op.geometry
    metal_config_for(anatomy, g)  # first: it names a bad ``anatomy``
    if style not in PHANTOM_STYLES:
        raise ValueError(f"style must be one of {PHANTOM_STYLES}, got {style!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    clean = phantom(style, anatomy, g, rng)
    return simulate_on(clean, anatomy, op, seed, simulation, rng)


def simulate_on(clean: np.ndarray, anatomy: str, op: FanBeamOperator, seed: int, simulation: str = "aapm_like",
                rng: np.random.Generator | None = None) -> dict:
    """A record from a given clean HU slice (a phantom, or a metal-free slice of a real scan, which then becomes
    the reference): metal drawn from the anatomy's preset until its objects resolve, then simulated."""
    g = op.geometry
    cfg = metal_config_for(anatomy, g)
    if rng is None:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    supersample = get_settings(simulation).metal_supersample
    for _ in range(MAX_METAL_DRAWS):
        objects = sample_metal(cfg, clean, g, rng)
        if resolved(objects, g, supersample):
            break
    else:
        raise ValueError(f"seed {seed}: no draw of the {METAL_FOR_ANATOMY[anatomy]!r} metal preset in "
                         f"{MAX_METAL_DRAWS} tries gave separately visible objects on geometry {g.name!r}")
    res = simulate(clean, op, metal=objects, settings=simulation, seed=int(seed))
    rec = res.record(0)
    rec["anatomy"] = anatomy
    return rec
