"""Small analytic slice records for caption tests and the prompt evaluation of §IV-D (Fig. 6), built in-process
in well under a second each; a stand-in until the project's simulator (``dudocrop.ct.simulate``) exists.

A record holds a region-typed phantom (thorax: lungs, heart, spine, ribs; abdomen: liver, kidneys, spine;
pelvis: hip bones, sacrum, bladder; head: skull, brain) inside a fat layer, metal discs at stated world
positions, and the usual schema fields (HU images, line-integral sinograms, mask, trace, descriptors).

Physics (simple on purpose): Y_ref = FP(mu_ref); the metal's extra line integral m = FP(mu_metal - mu_ref) is
beam-hardened as m / (1 + 0.3 m) (a concave response: dark bands between implants); both scans get Poisson
noise at N0 photons per ray; X = FBP(Y) in HU. Metal is titanium-like, 5500 HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dudocrop.captions.analysis import world_grid
from dudocrop.ct.geometry import get_geometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.trace import metal_trace
from dudocrop.ct.units import hu_to_mu, mu_to_hu
from dudocrop.data.aapm import metal_descriptors

METAL_HU = 5500.0
BEAM_HARDENING = 0.3
N0 = 1e6


@dataclass(frozen=True)
class Disc:
    x_mm: float
    y_mm: float
    diameter_mm: float


#: (region) -> list of (kind, cx, cy, ax, ay, HU) ellipses painted in order (world mm, y up = anterior;
#: x > 0 is the image right = the patient's LEFT)
_ANATOMY = {
    "thorax": [("e", 0, 0, 165, 115, -100), ("e", 0, 0, 153, 103, 40),
               ("e", -72, 8, 55, 72, -820), ("e", 72, 8, 55, 72, -820), ("e", 22, 28, 42, 38, 45),
               ("e", 0, -72, 17, 17, 700), ("e", 0, -92, 7, 9, 700)]
              + [("e", 150 * np.cos(a), 100 * np.sin(a), 6, 6, 650) for a in np.radians([200, 220, 320, 340])],
    "abdomen": [("e", 0, 0, 155, 115, -100), ("e", 0, 0, 143, 103, 40), ("e", -55, 22, 60, 52, 60),
                ("e", -62, -48, 20, 22, 35), ("e", 62, -48, 20, 22, 35), ("e", 30, 45, 9, 9, -900),
                ("e", 0, -70, 18, 18, 700), ("e", 0, -92, 7, 9, 700)],
    "pelvis": [("e", 0, 0, 175, 115, -100), ("e", 0, 0, 163, 103, 40), ("e", 0, 45, 35, 30, 10),
               ("e", -108, -8, 28, 30, 800), ("e", 108, -8, 28, 30, 800), ("e", 0, -72, 24, 18, 650)],
    "head": [("e", 0, 0, 95, 110, 40), ("e", 0, 0, 90, 105, 1200), ("e", 0, 0, 83, 98, 35)],
}


def phantom_hu(region: str, geometry="small") -> np.ndarray:
    """The metal-free HU image of a region phantom."""
    if region not in _ANATOMY:
        raise ValueError(f"region must be one of {sorted(_ANATOMY)}, got {region!r}")
    g = get_geometry(geometry)
    X, Y = world_grid(g)
    hu = np.full(g.image_shape, -1000.0)
    for _, cx, cy, ax, ay, v in _ANATOMY[region]:
        hu[((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2 <= 1.0] = v
    return hu.astype(np.float32)


def disc_mask(discs: list[Disc], geometry="small") -> np.ndarray:
    """Binary mask of metal discs (a pixel is metal when its centre is inside a disc)."""
    g = get_geometry(geometry)
    X, Y = world_grid(g)
    m = np.zeros(g.image_shape, bool)
    for d in discs:
        m |= np.hypot(X - d.x_mm, Y - d.y_mm) <= d.diameter_mm / 2
    return m.astype(np.float32)


def phantom_record(region: str, discs: list[Disc], geometry="small", seed: int = 0, case_id: str | None = None,
                   op: FanBeamOperator | None = None) -> dict:
    """A schema record (see ``dudocrop.data.schema``) of a region phantom with metal ``discs``."""
    g = get_geometry(geometry)
    op = op or FanBeamOperator(g)
    rng = np.random.default_rng(seed)
    ref = phantom_hu(region, g)
    mask = disc_mask(discs, g)
    mu_ref = np.clip(hu_to_mu(ref.astype(np.float64)), 0, None)
    d_mu = np.where(mask > 0, hu_to_mu(METAL_HU) - mu_ref, 0.0)
    fp = lambda a: op.fp(torch.from_numpy(a.astype(np.float32))[None, None])[0, 0].double().numpy()  # noqa: E731
    y_ref, m = fp(mu_ref), fp(d_mu)
    y_ma_clean = y_ref + m / (1.0 + BEAM_HARDENING * m)

    def noisy(y):
        counts = rng.poisson(N0 * np.exp(-y))
        return -np.log(np.maximum(counts, 0.5) / N0)

    y_ref_n, y_ma_n = noisy(y_ref), noisy(y_ma_clean)
    fbp = lambda y: mu_to_hu(op.fbp(torch.from_numpy(y.astype(np.float32))[None, None])[0, 0].double().numpy())  # noqa: E731
    trace = metal_trace(torch.from_numpy(mask)[None, None], op)[0, 0].numpy().astype(np.float32)
    cid = case_id or f"phantom-{region}-{seed}"
    return {
        "case_id": cid, "patient_id": cid.split("/")[0], "slice_index": 0, "source": "synthetic",
        "anatomy": "head" if region == "head" else "body", "geometry": g.name, "pixel_spacing_mm": g.pixel_size,
        "split": "test",
        "X_ma": fbp(y_ma_n).astype(np.float32), "X_ref": fbp(y_ref_n).astype(np.float32),
        "Y_ma": y_ma_n.astype(np.float32), "Y_ref": y_ref_n.astype(np.float32),
        "metal_mask": mask, "metal_trace": trace,
        **metal_descriptors(mask, g),
    }


#: metal layouts per region, as radiologists see them (screws beside the spine, hip prostheses, wires, coils)
LAYOUTS = {
    "thorax": [[Disc(0, 108, 5)], [Disc(-40, -70, 7), Disc(40, -70, 7)], [Disc(60, 40, 10)]],
    "abdomen": [[Disc(-22, -68, 7), Disc(22, -68, 7)], [Disc(50, 20, 12)], [Disc(-80, 50, 6), Disc(10, -20, 9)]],
    "pelvis": [[Disc(-108, -8, 22)], [Disc(-108, -8, 20), Disc(108, -8, 20)], [Disc(0, 45, 8)]],
    "head": [[Disc(-30, 60, 8)], [Disc(40, -20, 6), Disc(-40, -20, 6)], [Disc(0, 30, 12)]],
}


def bench_records(geometry="small", per_region: int = 3, seed: int = 0) -> list[dict]:
    """Records over the four regions and the :data:`LAYOUTS` (deterministic)."""
    g = get_geometry(geometry)
    op = FanBeamOperator(g)
    recs = []
    for region, layouts in LAYOUTS.items():
        for k, discs in enumerate(layouts[:per_region]):
            recs.append(phantom_record(region, discs, g, seed=seed + k, case_id=f"phantom-{region}/{k:03d}", op=op))
    return recs
