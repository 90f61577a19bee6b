"""Patient-like random slices: organ structure, tissue texture and contrast that the smooth ellipse phantoms lack.

Models trained on :func:`dudocrop.ct.phantoms.random_phantom` alone learn that organs are flat, texture-free
blobs and paint real kidneys, liver texture and bowel out of real CT slices (issue 25). A patient slice starts
from the same anatomical layout (:func:`dudocrop.ct.phantoms.random_anatomy`: body outline, fat, muscle, organs,
bones) and adds what real slices show:

* random organ shapes (extra boundary harmonics on every organ) and random contrast phase (unenhanced, arterial,
  portal venous: per-organ enhancement from textbook ranges);
* tissue texture per tissue class (fat, parenchyma / muscle, trabecular and cortical bone, lung), as sums of
  Gaussian-filtered white-noise fields with random amplitudes and correlation lengths;
* structure: vessels in the parenchyma and lungs, bowel loops (wall, fluid or faecal content, gas) in the
  abdomen and pelvis, fat strands, small calcifications, sulci in the brain;
* anatomy-preserving augmentation: a smooth elastic deformation, a small rotation and a scale, which move and
  bend organs without creating or deleting any.

Values are HU; every draw comes from the ``rng`` passed in, so a slice is reproducible from its seed.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from scipy import ndimage

from dudocrop.ct.geometry import FanBeamGeometry, get_geometry
from dudocrop.ct.phantoms import ANATOMY_KINDS, Anatomy, Ellipse, _as_rng, _harm, coverage, random_anatomy
from dudocrop.ct.units import HU_AIR

__all__ = ["PHANTOM_STYLES", "patient_phantom", "phantom"]

#: the synthetic slice generators a data run can choose (``SourceOptions.phantom``, ``RunPreset.phantom``)
PHANTOM_STYLES = ("ellipse", "patient")

#: contrast phases and the enhancement (HU, a range) of the soft-tissue classes, by the layer's unenhanced value:
#: parenchyma (liver / spleen / kidney / heart, 28-70 HU) and vessels (aorta). Arterial: kidneys cortex +100-150,
#: aorta +200-300; portal venous: liver +40-60, kidneys +100-130, aorta +100-150 (textbook CT enhancement).
_PHASES = {
    "unenhanced": {"organ": (0.0, 5.0), "vessel": (0.0, 10.0)},
    "arterial": {"organ": (10.0, 110.0), "vessel": (200.0, 300.0)},
    "portal": {"organ": (40.0, 110.0), "vessel": (100.0, 150.0)},
}


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _fields(shape: tuple[int, int], px: float, rng: np.random.Generator, lengths_mm: tuple[float, ...]) -> list:
    """Unit-variance Gaussian random fields on the pixel grid, one per correlation length (white noise where the
    length is below a pixel: a pixel averages finer texture, so its amplitude is then scaled down)."""
    out = []
    for length in lengths_mm:
        w = rng.standard_normal(shape)
        sigma = length / px
        if sigma >= 0.5:
            f = ndimage.gaussian_filter(w, sigma=sigma, mode="reflect")
            f /= max(float(f.std()), 1e-12)
        else:
            f = w * (2.0 * sigma)  # a pixel of side px averages ~(px / length)^2 independent grains
        out.append(f)
    return out


def _reshape(layers: tuple[Ellipse, ...], first_organ: int, rng: np.random.Generator, amp: float) -> tuple:
    """Organs (layers from ``first_organ`` on) get extra boundary harmonics, a random size and a small shift;
    the body outline and its fat / muscle shells keep their shape so shells never cross."""
    out = list(layers[:first_organ])
    for e in layers[first_organ:]:
        s = _u(rng, 0.85, 1.15)
        extra = _harm(rng, amp, kmax=7, beta=1.2)
        out.append(replace(e, axes_mm=(e.axes_mm[0] * s, e.axes_mm[1] * _u(rng, 0.85, 1.15)),
                           centre=(e.centre[0] + _u(rng, -4, 4), e.centre[1] + _u(rng, -4, 4)),
                           angle=e.angle + _u(rng, -0.2, 0.2), harmonics=tuple(e.harmonics) + extra))
    return tuple(out)


def _enhance(layers: tuple[Ellipse, ...], first_organ: int, rng: np.random.Generator) -> tuple:
    phase = list(_PHASES)[int(rng.integers(len(_PHASES)))]
    rng_organ, rng_vessel = _PHASES[phase]["organ"], _PHASES[phase]["vessel"]
    out = list(layers[:first_organ])
    for e in layers[first_organ:]:
        v = e.value
        if 25.0 <= v <= 75.0:
            small = e.area() < 600.0  # the aorta and other vessels (< ~14 mm radius)
            lo, hi = rng_vessel if small else rng_organ
            v += _u(rng, lo, hi)
        out.append(replace(e, value=v))
    return tuple(out)


def _render_labels(anat: Anatomy, g: FanBeamGeometry, supersample: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The anatomy's image (HU) and the index of the layer that owns each pixel (-1: air)."""
    s = anat.fit_scale(g)
    img = np.full(g.image_shape, HU_AIR, dtype=np.float64)
    lab = np.full(g.image_shape, -1, dtype=np.int32)
    for k, e in enumerate(anat.layers):
        e = e.scaled(s) if s != 1.0 else e
        c = coverage(e, g, supersample)
        nz = c > 0
        img[nz] = img[nz] * (1.0 - c[nz]) + e.value * c[nz]
        lab[c > 0.5] = k
    return img, lab


def _points_in(mask: np.ndarray, g: FanBeamGeometry, rng: np.random.Generator, n: int) -> list[tuple[float, float]]:
    """``n`` random world points (mm) at pixels of ``mask`` (fewer if the mask is empty)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or n <= 0:
        return []
    pick = rng.choice(idx, size=n, replace=True)
    xs, ys = g.pixel_centres
    r, c = np.unravel_index(pick, mask.shape)
    jitter = rng.uniform(-0.5, 0.5, size=(n, 2)) * g.pixel_size
    return [(float(xs[cc] + jx), float(ys[rr] + jy)) for rr, cc, (jx, jy) in zip(r, c, jitter, strict=True)]


def _paint(img: np.ndarray, e: Ellipse, g: FanBeamGeometry, within: np.ndarray | None = None) -> None:
    c = coverage(e, g, 3)
    if within is not None:
        c = c * within
    nz = c > 0
    img[nz] = img[nz] * (1.0 - c[nz]) + e.value * c[nz]


def _structures(img: np.ndarray, base: np.ndarray, lab: np.ndarray, kind: str, region: str, g: FanBeamGeometry,
                rng: np.random.Generator, body: np.ndarray) -> None:
    """Vessels, bowel loops, fat strands, calcifications (body); vessels and sulci (head); painted in place.
    ``lab`` is the owning layer per pixel: bowel goes only inside the body cavity (layer 2 and what lies in it)."""
    inner = ndimage.binary_erosion(body, iterations=max(1, int(round(8.0 / g.pixel_size))))
    soft = inner & (base > 20) & (base < 200)
    fat = inner & (base > -150) & (base < -40)
    lung = inner & (base < -600) & (base > -900)
    if kind == "head":
        brain = inner & (base > 15) & (base < 60)
        for p in _points_in(brain, g, rng, int(rng.integers(6, 20))):  # sulci: thin CSF clefts
            _paint(img, Ellipse(p, (_u(rng, 4, 12), _u(rng, 0.6, 1.4)), _u(rng, 0, math.pi), _u(rng, 0, 15)), g,
                   brain)
        for p in _points_in(brain, g, rng, int(rng.integers(2, 8))):  # vessels / dural sinuses
            r = _u(rng, 1.0, 3.0)
            _paint(img, Ellipse(p, (r, r * _u(rng, 0.6, 1.0)), 0.0, _u(rng, 50, 180)), g, brain)
        return
    for p in _points_in(soft, g, rng, int(rng.integers(8, 30))):  # parenchymal vessels (enhanced or not)
        r = _u(rng, 1.0, 5.0)
        _paint(img, Ellipse(p, (r, r * _u(rng, 0.5, 1.0)), _u(rng, 0, math.pi), float(_base_at(base, p, g))
                            + _u(rng, -20, 180)), g, soft)
    for p in _points_in(lung, g, rng, int(rng.integers(20, 60))):  # pulmonary vessels
        r = _u(rng, 0.8, 3.5)
        _paint(img, Ellipse(p, (r, r * _u(rng, 0.5, 1.0)), _u(rng, 0, math.pi), _u(rng, 0, 60)), g, lung)
    for p in _points_in(fat, g, rng, int(rng.integers(5, 25))):  # fat strands, small vessels and nodes in fat
        _paint(img, Ellipse(p, (_u(rng, 3, 25), _u(rng, 0.6, 2.0)), _u(rng, 0, math.pi), _u(rng, -40, 50)), g, fat)
    if region in ("abdomen", "pelvis"):
        visceral = ndimage.binary_erosion(lab >= 2, iterations=max(1, int(round(6.0 / g.pixel_size))))
        cavity = visceral & (base > -60) & (base < 45)  # the mixed mesenteric layer (0-30 HU), not the organs
        for p in _points_in(cavity, g, rng, int(rng.integers(4, 14))):  # bowel loops
            a = _u(rng, 7, 20)
            b = a * _u(rng, 0.5, 1.0)
            ang = _u(rng, 0, math.pi)
            wall = Ellipse(p, (a, b), ang, _u(rng, 25, 70), _harm(rng, 0.08))
            _paint(img, wall, g, visceral)
            t = _u(rng, 1.5, 3.5)
            content = _u(rng, -20, 40) if rng.random() < 0.6 else _u(rng, -150, 20)  # fluid or faeces
            lumen = replace(wall, axes_mm=(max(a - t, 1.0), max(b - t, 0.8)), value=content)
            _paint(img, lumen, g, visceral)
            if rng.random() < 0.55:  # gas, anti-dependent (anterior, +y) in the lumen
                ga = _u(rng, 0.3, 0.9) * lumen.axes_mm[0]
                gas = Ellipse((p[0], p[1] + 0.3 * lumen.axes_mm[1]), (ga, ga * _u(rng, 0.3, 0.8)), ang, -950.0)
                _paint(img, gas, g, visceral)
    for p in _points_in(soft | fat, g, rng, int(rng.integers(0, 4))):  # calcifications
        r = _u(rng, 0.7, 2.0)
        _paint(img, Ellipse(p, (r, r), 0.0, _u(rng, 200, 700)), g, inner)


def _base_at(base: np.ndarray, p: tuple[float, float], g: FanBeamGeometry) -> float:
    """The value of ``base`` at the pixel nearest to world point ``p`` (mm)."""
    xs, ys = g.pixel_centres
    c = int(np.clip(np.round((p[0] - xs[0]) / g.pixel_size), 0, xs.size - 1))
    r = int(np.clip(np.round((ys[0] - p[1]) / g.pixel_size), 0, ys.size - 1))
    return float(base[r, c])


def _texture(img: np.ndarray, base: np.ndarray, g: FanBeamGeometry, rng: np.random.Generator,
             body: np.ndarray) -> np.ndarray:
    """Tissue texture by class (of the unenhanced-layout values ``base``): amplitude (HU) and correlation
    lengths drawn per slice; fat: 5-15 HU, parenchyma / muscle: 4-14 HU, lung: 15-50 HU, trabecular bone:
    30-90 HU, cortical bone: 20-80 HU."""
    fine, mid, coarse = _fields(img.shape, g.pixel_size, rng, (_u(rng, 0.5, 1.2), _u(rng, 1.5, 3.5), _u(rng, 5, 12)))
    classes = (
        ((base > -200) & (base <= -40), (5, 15)),
        ((base > -40) & (base <= 100), (4, 14)),
        ((base > -900) & (base <= -600), (15, 50)),
        ((base > 100) & (base <= 500), (30, 90)),
        (base > 500, (20, 80)),
    )
    tex = np.zeros_like(img)
    for m, (lo, hi) in classes:
        w = rng.dirichlet((1.0, 1.0, 1.0))
        f = np.sqrt(w[0]) * fine + np.sqrt(w[1]) * mid + np.sqrt(w[2]) * coarse
        tex += m * _u(rng, lo, hi) * f
    return img + tex * body


def _augment(img: np.ndarray, g: FanBeamGeometry, rng: np.random.Generator) -> np.ndarray:
    """Elastic deformation (smooth displacement, 1-5 mm at a 30-60 mm correlation length), rotation (±12°) and
    scale (0.90-1.00) about the isocentre; the image is resampled bilinearly, air fills what moves in."""
    n = img.shape[0]
    px = g.pixel_size
    amp = _u(rng, 1.0, 5.0) / px
    sig = _u(rng, 30.0, 60.0) / px
    d = []
    for _ in range(2):
        f = ndimage.gaussian_filter(rng.standard_normal(img.shape), sigma=sig, mode="reflect")
        d.append(f / max(float(np.abs(f).max()), 1e-12) * amp)
    th = _u(rng, -0.21, 0.21)
    s = _u(rng, 0.9, 1.0)
    c = (n - 1) / 2.0
    rr, cc = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")
    cos, sin = math.cos(th), math.sin(th)
    src_r = (cos * rr - sin * cc) / s + c + d[0]
    src_c = (sin * rr + cos * cc) / s + c + d[1]
    return ndimage.map_coordinates(img, [src_r, src_c], order=1, mode="constant", cval=HU_AIR)


def patient_phantom(kind: str, geometry: FanBeamGeometry | str, seed: np.random.Generator | int = 0,
                    region: str | None = None) -> np.ndarray:
    """A patient-like random slice (module docstring): (H, W) float32 HU on ``geometry``'s grid, reproducible
    from ``seed``; ``kind`` and ``region`` as in :func:`dudocrop.ct.phantoms.random_anatomy`."""
    if kind not in ANATOMY_KINDS:
        raise ValueError(f"kind must be one of {ANATOMY_KINDS}, got {kind!r}")
    g = get_geometry(geometry)
    rng = _as_rng(seed, "seed")
    anat = random_anatomy(kind, rng, region)
    first_organ = 6 if kind == "head" else 3  # scalp/skull/diploe/tables/grey; body outline/wall/cavity
    layers = _reshape(anat.layers, first_organ, rng, _u(rng, 0.03, 0.09))
    layers = _enhance(layers, first_organ, rng) if kind == "body" else layers
    anat = replace(anat, layers=layers)
    base, lab = _render_labels(anat, g)
    img = base.copy()
    body = base > -400
    body = ndimage.binary_fill_holes(body)
    _structures(img, base, lab, kind, anat.region, g, rng, body)
    img = _texture(img, base, g, rng, body)
    img = _augment(img, g, rng)
    return np.clip(img, HU_AIR, 3000.0).astype(np.float32)


def phantom(style: str, kind: str, geometry: FanBeamGeometry | str, seed: np.random.Generator | int = 0,
            region: str | None = None) -> np.ndarray:
    """A random clean slice of the named ``style`` (:data:`PHANTOM_STYLES`)."""
    if style == "ellipse":
        from dudocrop.ct.phantoms import random_phantom

        return random_phantom(kind, geometry, seed, region)
    if style == "patient":
        return patient_phantom(kind, geometry, seed, region)
    raise ValueError(f"phantom style must be one of {PHANTOM_STYLES}, got {style!r}")
