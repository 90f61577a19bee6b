"""Clean anatomy in HU for any geometry: analytic ellipse phantoms, random anatomical phantoms, CT_small.

Everything is described in millimetres in the world frame of ``dudocrop.ct.geometry`` (x to the right, y up,
so +y is anterior / the top of the image) and rendered onto a geometry's pixel grid with supersampling, so the
same description renders on every preset and edges carry partial volume.

* :func:`shepp_logan` — the original Shepp & Logan (1974) head phantom; its densities are attenuation relative
  to water, so HU = 1000 (v - 1): skull +1000 HU, brain +20 HU, ventricles 0 HU, details +30 HU.
  :func:`forbild_like` — an ellipse-only head inspired by the FORBILD head phantom (Lauritsch & Bruder 2001):
  skull (+800 HU), brain (+50 HU), ventricles, eyes, sinus air, ear bone bars and low-contrast (+-5 HU) spots.
  Both are :class:`EllipsePhantom` objects with additive ellipses, so :meth:`EllipsePhantom.line_integrals`
  gives the exact fan-beam line integrals (FBP accuracy tests without projector error).
* :func:`random_anatomy` / :func:`random_phantom` — seeded random ``body`` (thorax / abdomen / pelvis) and
  ``head`` slices painted from simple shapes with textbook HU values, plus a smooth correlated texture.
* :func:`load_ct_small` — pydicom's bundled ``CT_small.dcm`` (128^2, 0.66 mm) in HU, optionally resampled.

Also the shared rasteriser (:class:`Shape` and :func:`coverage`) that ``metal`` uses for partial-volume masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import ndimage

from dudocrop.ct.geometry import FanBeamGeometry, get_geometry
from dudocrop.ct.units import HU_AIR, MU_WATER

__all__ = [
    "Ellipse",
    "EllipsePhantom",
    "Shape",
    "Anatomy",
    "body_mask",
    "bone_mask",
    "coverage",
    "forbild_like",
    "load_ct_small",
    "random_anatomy",
    "random_phantom",
    "shepp_logan",
]

AnatomyKind = Literal["body", "head"]
ANATOMY_KINDS = ("body", "head")
BODY_REGIONS = ("thorax", "abdomen", "pelvis")


# ---- shapes and rasterisation -----------------------------------------------------------------------


class Shape:
    """A region of the plane in world mm: ``inside(x, y)`` on arrays and a bounding ``radius`` about ``centre``."""

    centre: tuple[float, float]

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def radius(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def scaled(self, s: float) -> Shape:  # pragma: no cover - interface
        """The shape with every length (and its centre) multiplied by ``s`` about the isocentre."""
        raise NotImplementedError


def _local(x, y, centre, angle):
    """World -> shape frame (u along the shape's first axis, rotated by ``angle`` from +x)."""
    dx, dy = x - centre[0], y - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


@dataclass(frozen=True)
class Ellipse(Shape):
    """Ellipse with semi-axes ``axes_mm`` = (a along u, b along v), rotated by ``angle`` (rad) from +x.

    ``harmonics`` ((k, amplitude, phase), ...) modulate the boundary radius in the ellipse's normalised polar
    angle theta: inside if rho <= exp(sum a_k cos(k theta + phi_k)) (organic outlines, fractal blobs; the
    exponential keeps the radius positive). ``value`` is the HU painted (or added, in an EllipsePhantom).
    """

    centre: tuple[float, float]
    axes_mm: tuple[float, float]
    angle: float = 0.0
    value: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def _rmod(self, theta: np.ndarray) -> np.ndarray:
        if not self.harmonics:
            return np.ones_like(theta)
        acc = np.zeros_like(theta)
        for k, a, p in self.harmonics:
            acc += a * np.cos(k * theta + p)
        return np.exp(acc)

    def inside(self, x, y):
        u, v = _local(x, y, self.centre, self.angle)
        un, vn = u / self.axes_mm[0], v / self.axes_mm[1]
        rho2 = un * un + vn * vn
        if not self.harmonics:
            return rho2 <= 1.0
        return np.sqrt(rho2) <= self._rmod(np.arctan2(vn, un))

    def radius(self):
        if not self.harmonics:
            return max(self.axes_mm)
        # the sampled maximum of r(theta) plus 2 % (harmonics up to k ~ 30 vary little between 4096 samples)
        th = np.linspace(0.0, 2 * math.pi, 4096, endpoint=False)
        return max(self.axes_mm) * float(self._rmod(th).max()) * 1.02

    def area(self) -> float:
        """Exact area: a b * (1/2) int r(theta)^2 dtheta (the map (a, b) scaling is linear)."""
        if not self.harmonics:
            return math.pi * self.axes_mm[0] * self.axes_mm[1]
        th = np.linspace(0.0, 2 * math.pi, 4096, endpoint=False)
        return float(self.axes_mm[0] * self.axes_mm[1] * 0.5 * np.mean(self._rmod(th) ** 2) * 2 * math.pi)

    def scaled(self, s):
        return replace(self, centre=(self.centre[0] * s, self.centre[1] * s),
                       axes_mm=(self.axes_mm[0] * s, self.axes_mm[1] * s))


def _pixel_range(centre_w: float, radius: float, coords: np.ndarray, px: float) -> tuple[int, int]:
    """Index range [i0, i1) of grid coordinates (ascending) within radius (+1 px) of centre_w."""
    n = coords.size
    lo = int(math.floor((centre_w - radius - coords[0]) / px)) - 1
    hi = int(math.ceil((centre_w + radius - coords[0]) / px)) + 2
    return max(lo, 0), min(hi, n)


def coverage(shape: Shape, geometry: FanBeamGeometry | str, supersample: int = 4,
             out: np.ndarray | None = None) -> np.ndarray:
    """Fractional area of every pixel covered by ``shape`` ((H, W) float32 in [0, 1]).

    Each pixel is sampled on a ``supersample`` x ``supersample`` grid of sub-pixel centres (only inside the
    shape's bounding box), so the total coverage approximates the area to O(perimeter / supersample^2) pixels.
    """
    g = get_geometry(geometry)
    if not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample must be an int >= 1, got {supersample!r}")
    n, px = g.image_size, g.pixel_size
    xs, ys = g.pixel_centres
    res = np.zeros((n, n), np.float32) if out is None else out
    r = shape.radius()
    j0, j1 = _pixel_range(shape.centre[0], r, xs, px)
    # rows: y decreases with row index; mirror into ascending order for the range search
    i0, i1 = _pixel_range(-shape.centre[1], r, -ys, px)
    if j0 >= j1 or i0 >= i1:
        return res
    off = ((np.arange(supersample) + 0.5) / supersample - 0.5) * px
    sx = (xs[j0:j1, None] + off[None, :]).ravel()
    sy = (ys[i0:i1, None] - off[None, :]).ravel()
    hit = shape.inside(sx[None, :], sy[:, None])
    cov = hit.reshape(i1 - i0, supersample, j1 - j0, supersample).mean(axis=(1, 3), dtype=np.float64)
    res[i0:i1, j0:j1] = cov.astype(np.float32)
    return res


def paint(image: np.ndarray, shape: Shape, value: float, geometry: FanBeamGeometry, supersample: int = 3) -> None:
    """Composite ``value`` over ``image`` in place with partial volume: x <- x (1 - c) + value c."""
    c = coverage(shape, geometry, supersample)
    nz = c > 0
    image[nz] = image[nz] * (1.0 - c[nz]) + value * c[nz]


# ---- analytic ellipse phantoms --------------------------------------------------------------------


@dataclass(frozen=True)
class EllipsePhantom:
    """Sum of plain ellipses with additive HU values over ``background`` (air, -1000 HU).

    Because HU is affine in mu (``units``), additive HU deltas are additive attenuations
    (delta mu = delta HU * MU_WATER / 1000), so the line integral is sum_k delta mu_k * chord_k exactly.
    """

    name: str
    ellipses: tuple[Ellipse, ...]
    background: float = HU_AIR

    def render(self, geometry: FanBeamGeometry | str, supersample: int = 4) -> np.ndarray:
        """(H, W) float32 HU with partial-volume edges."""
        g = get_geometry(geometry)
        img = np.full(g.image_shape, self.background, dtype=np.float64)
        for e in self.ellipses:
            img += e.value * coverage(e, g, supersample)
        return img.astype(np.float32)

    def line_integrals(self, geometry: FanBeamGeometry | str) -> np.ndarray:
        """Exact (V, C) float32 line integrals of mu (1/mm) along every ray of the geometry.

        Ray r(t) = s + t d; in the ellipse's normalised frame |p + t q|^2 = 1 has roots whose distance is the
        chord length in mm (d is a unit vector). The background is taken as zero attenuation (air).
        """
        g = get_geometry(geometry)
        src, _, _ = g.view_frames
        d = g.ray_directions  # (V, C, 2)
        out = np.zeros(g.sino_shape, dtype=np.float64)
        for e in self.ellipses:
            if e.harmonics:
                raise ValueError(f"phantom {self.name!r}: analytic line integrals need plain ellipses")
            c, s = math.cos(e.angle), math.sin(e.angle)
            a, b = e.axes_mm
            sx, sy = src[:, 0] - e.centre[0], src[:, 1] - e.centre[1]
            pu, pv = (c * sx + s * sy) / a, (-s * sx + c * sy) / b  # (V,)
            qu, qv = (c * d[..., 0] + s * d[..., 1]) / a, (-s * d[..., 0] + c * d[..., 1]) / b  # (V, C)
            A = qu * qu + qv * qv
            B = 2 * (pu[:, None] * qu + pv[:, None] * qv)
            C = (pu * pu + pv * pv - 1.0)[:, None]
            disc = B * B - 4 * A * C
            chord = np.where(disc > 0, np.sqrt(np.clip(disc, 0, None)) / A, 0.0)
            out += e.value * MU_WATER / 1000.0 * chord
        return out.astype(np.float32)

    def scaled(self, s: float) -> EllipsePhantom:
        return replace(self, ellipses=tuple(e.scaled(s) for e in self.ellipses))


def _default_half_height(g: FanBeamGeometry) -> float:
    return 0.85 * min(g.fov_radius, g.scan_radius)


# Shepp & Logan (1974), Table 1: (x0, y0, a, b, phi_deg, value), value = attenuation relative to water.
_SHEPP_LOGAN = (
    (0.0, 0.0, 0.69, 0.92, 0.0, 2.0),
    (0.0, -0.0184, 0.6624, 0.874, 0.0, -0.98),
    (0.22, 0.0, 0.11, 0.31, -18.0, -0.02),
    (-0.22, 0.0, 0.16, 0.41, 18.0, -0.02),
    (0.0, 0.35, 0.21, 0.25, 0.0, 0.01),
    (0.0, 0.1, 0.046, 0.046, 0.0, 0.01),
    (0.0, -0.1, 0.046, 0.046, 0.0, 0.01),
    (-0.08, -0.605, 0.046, 0.023, 0.0, 0.01),
    (0.0, -0.606, 0.023, 0.023, 0.0, 0.01),
    (0.06, -0.605, 0.023, 0.046, 0.0, 0.01),
)


def _from_table(name: str, table, half_height_mm: float, relative: bool) -> EllipsePhantom:
    s = half_height_mm / 0.92 if relative else half_height_mm
    return EllipsePhantom(name, tuple(
        Ellipse((x0 * s, y0 * s), (a * s, b * s), math.radians(phi), 1000.0 * v if relative else v)
        for x0, y0, a, b, phi, v in table
    ))


def shepp_logan(geometry: FanBeamGeometry | str | None = None, half_height_mm: float | None = None) -> EllipsePhantom:
    """Original Shepp-Logan head in HU (skull +1000, brain +20, ventricles 0, details +30 HU), its outer
    ellipse ``half_height_mm`` high (default 85 % of the geometry's reconstructable radius, else 100 mm)."""
    if half_height_mm is None:
        half_height_mm = _default_half_height(get_geometry(geometry)) if geometry is not None else 100.0
    return _from_table("shepp_logan", _SHEPP_LOGAN, half_height_mm, relative=True)


# FORBILD-like head in units where the skull's outer half-height is 1: (x0, y0, a, b, phi_deg, delta HU).
_FORBILD_LIKE = (
    (0.0, 0.0, 0.80, 1.00, 0.0, 1800.0),  # skull (relative density 1.8)
    (0.0, 0.0, 0.75, 0.95, 0.0, -750.0),  # brain 1.05 -> +50 HU
    (-0.05, 0.08, 0.05, 0.18, 15.0, -5.0),  # ventricles 1.045
    (0.05, 0.08, 0.05, 0.18, -15.0, -5.0),
    (-0.39, 0.60, 0.15, 0.15, 0.0, 10.0),  # eyes 1.06
    (0.39, 0.60, 0.15, 0.15, 0.0, 10.0),
    (0.0, 0.82, 0.12, 0.07, 0.0, -1050.0),  # frontal sinus (air)
    (0.0, -0.45, 0.04, 0.04, 0.0, 5.0),  # low-contrast spots +-5 HU
    (0.12, -0.45, 0.03, 0.03, 0.0, -5.0),
    (-0.12, -0.45, 0.03, 0.03, 0.0, 5.0),
    (0.0, -0.25, 0.30, 0.08, 0.0, 10.0),
    # ear bone bars: thin high-contrast ellipses (high-frequency resolution bars)
    *((side * 0.62, -0.10 + 0.045 * k, 0.06, 0.012, 0.0, 1500.0) for side in (-1, 1) for k in range(5)),
)


def forbild_like(geometry: FanBeamGeometry | str | None = None, half_height_mm: float | None = None) -> EllipsePhantom:
    """Ellipse-only head after FORBILD (skull, brain, ventricles, eyes, sinus, bone bars, +-5 HU details)."""
    if half_height_mm is None:
        half_height_mm = _default_half_height(get_geometry(geometry)) if geometry is not None else 100.0
    return _from_table("forbild_like", _FORBILD_LIKE, half_height_mm, relative=False)


# ---- random anatomical phantoms --------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """A random anatomical slice in mm: shapes painted in order (later ones over earlier ones) onto air,
    then a smooth texture (``texture_hu`` standard deviation, correlation lengths ``texture_mm``) added inside
    the body outline (the first layer)."""

    kind: str
    region: str
    layers: tuple[Ellipse, ...]
    texture_hu: float = 0.0
    texture_mm: tuple[float, ...] = (1.5, 6.0)
    texture_seed: int = 0

    def extent_mm(self) -> float:
        return max(math.hypot(*e.centre) + e.radius() for e in self.layers)

    def fit_scale(self, geometry: FanBeamGeometry) -> float:
        """1, or the shrink factor that keeps the anatomy inside the reconstructable disc (truncated
        projections would otherwise dominate the artifacts)."""
        room = 0.97 * min(geometry.fov_radius, geometry.scan_radius)
        body = self.layers[0]
        ext = math.hypot(*body.centre) + body.radius()
        return min(1.0, room / ext)

    def render(self, geometry: FanBeamGeometry | str, supersample: int = 3) -> np.ndarray:
        """(H, W) float32 HU on the geometry's grid (scaled down only if it would not fit)."""
        g = get_geometry(geometry)
        s = self.fit_scale(g)
        img = np.full(g.image_shape, HU_AIR, dtype=np.float64)
        body_cov = None
        for k, e in enumerate(self.layers):
            e = e.scaled(s) if s != 1.0 else e
            c = coverage(e, g, supersample)
            if k == 0:
                body_cov = c
            nz = c > 0
            img[nz] = img[nz] * (1.0 - c[nz]) + e.value * c[nz]
        if self.texture_hu > 0:
            img += self.texture_hu * _texture(g, self.texture_seed, self.texture_mm, s) * body_cov
        return img.astype(np.float32)


def _texture(g: FanBeamGeometry, seed: int, lengths_mm: tuple[float, ...], scale: float) -> np.ndarray:
    """Unit-variance smooth noise, defined on a fixed 0.5 mm world grid (so every geometry sees the same
    texture) as a sum of Gaussian-filtered white-noise fields with the given correlation lengths."""
    step = 0.5
    half = 256.0  # mm: covers the largest FOV (400 mm body, diagonal of the reconstructable disc)
    m = int(2 * half / step)
    rng = np.random.default_rng(seed)
    field_ = np.zeros((m, m), np.float64)
    for length in lengths_mm:
        f = ndimage.gaussian_filter(rng.standard_normal((m, m)), sigma=length / step, mode="wrap")
        field_ += f / f.std()
    field_ /= field_.std()
    xs, ys = g.pixel_centres
    # world (x, y) -> texture grid (row, col); texture scales with the anatomy when it is shrunk to fit
    cols = (xs / scale + half) / step - 0.5
    rows = (half - ys / scale) / step - 0.5
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(field_, [rr, cc], order=1, mode="nearest")


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _harm(rng: np.random.Generator, amp: float, kmax: int = 5, beta: float = 1.5) -> tuple:
    """Random smooth boundary modulation: amplitude ~ amp k^-beta for k = 2..kmax."""
    return tuple((k, float(rng.normal(0, amp * k ** -beta)), float(rng.uniform(0, 2 * math.pi)))
                 for k in range(2, kmax + 1))


def _shrunk(e: Ellipse, t_mm: float, value: float, **kw) -> Ellipse:
    """The ellipse shrunk by t mm on each semi-axis (an inner layer of thickness ~t)."""
    a, b = e.axes_mm
    return replace(e, axes_mm=(max(a - t_mm, 0.5), max(b - t_mm, 0.5)), value=value, **kw)


def _bone(centre, axes, angle, cortex_hu, marrow_hu, rim_mm, harmonics=()) -> list[Ellipse]:
    """A bone cross-section: cortical rim (``rim_mm`` thick) around trabecular marrow."""
    outer = Ellipse(centre, axes, angle, cortex_hu, harmonics)
    return [outer, _shrunk(outer, rim_mm, marrow_hu)]


def _body_layers(rng: np.random.Generator, region: str) -> list[Ellipse]:
    A = _u(rng, 150, 185) if region != "thorax" else _u(rng, 145, 175)
    B = _u(rng, 95, 130)
    dy = _u(rng, -8, 8)
    out = Ellipse((_u(rng, -5, 5), dy), (A, B), _u(rng, -0.05, 0.05), _u(rng, -110, -80), _harm(rng, 0.04))
    fat = _u(rng, 6, 25)
    wall = _shrunk(out, fat, _u(rng, 40, 60))
    cavity = _shrunk(wall, _u(rng, 8, 15), _u(rng, 0, 30))  # mesenteric fat + bowel mix
    L: list[Ellipse] = [out, wall, cavity]
    cx, cy = out.centre
    a, b = cavity.axes_mm
    yv = cy - b + _u(rng, 38, 48)  # vertebral body centre: ~4 cm in front of the inner back wall
    # paraspinal muscles
    for side in (-1, 1):
        L.append(Ellipse((cx + side * 32, yv - 30), (_u(rng, 22, 30), _u(rng, 18, 24)), side * 0.3,
                         _u(rng, 45, 60), _harm(rng, 0.05)))
    if region == "thorax":
        for side in (-1, 1):
            L.append(Ellipse((cx + side * 0.48 * a, cy + _u(rng, -0.05, 0.1) * b), (0.36 * a, 0.72 * b),
                             side * _u(rng, 0.0, 0.15), _u(rng, -860, -780), _harm(rng, 0.06)))
        L.append(Ellipse((cx + _u(rng, 0.05, 0.15) * a, cy + 0.18 * b), (0.28 * a, 0.36 * b), _u(rng, -0.6, -0.2),
                         _u(rng, 35, 50), _harm(rng, 0.05)))  # heart
        L.append(Ellipse((cx + 20, yv + 28), (12, 12), 0.0, _u(rng, 35, 50)))  # descending aorta
        rib_ring = _shrunk(wall, 4.0, 0.0)
        L += _bone((cx, cy + rib_ring.axes_mm[1] - 4), (14, 5), 0.0, _u(rng, 800, 1100), _u(rng, 200, 300), 1.5)
        n = int(rng.integers(10, 15))
        for t in np.linspace(0.15, 2 * math.pi - 0.15, n) + _u(rng, -0.1, 0.1):
            if abs(math.sin(t)) > 0.93:  # no ribs where the sternum (top) and the spine (bottom) are
                continue
            ra, rb = rib_ring.axes_mm
            p = (cx + ra * math.cos(t), cy + rb * math.sin(t))
            L += _bone(p, (_u(rng, 5, 8), _u(rng, 3, 4.5)), t + math.pi / 2, _u(rng, 900, 1300),
                       _u(rng, 200, 350), 1.2)
    elif region == "abdomen":
        L.append(Ellipse((cx - 0.38 * a, cy + 0.12 * b), (0.45 * a, 0.55 * b), _u(rng, -0.3, 0.3),
                         _u(rng, 55, 70), _harm(rng, 0.08)))  # liver (patient's right = image left)
        L.append(Ellipse((cx + 0.6 * a, cy - 0.05 * b), (0.18 * a, 0.3 * b), _u(rng, -0.5, 0.5),
                         _u(rng, 40, 50), _harm(rng, 0.05)))  # spleen
        for side in (-1, 1):
            L.append(Ellipse((cx + side * 0.32 * a, yv + 2), (_u(rng, 24, 30), _u(rng, 14, 18)),
                             side * _u(rng, 0.8, 1.2), _u(rng, 28, 40)))  # kidneys
        L.append(Ellipse((cx + 15, yv + 28), (11, 11), 0.0, _u(rng, 35, 50)))  # aorta
        for _ in range(int(rng.integers(1, 5))):  # bowel gas
            L.append(Ellipse((cx + _u(rng, -0.3, 0.4) * a, cy + _u(rng, 0.0, 0.6) * b),
                             (_u(rng, 4, 15), _u(rng, 3, 10)), _u(rng, 0, math.pi), -950.0, _harm(rng, 0.1)))
    else:  # pelvis
        L.append(Ellipse((cx, cy + 0.35 * b), (_u(rng, 30, 50), _u(rng, 25, 40)), 0.0, _u(rng, 0, 15),
                         _harm(rng, 0.05)))  # bladder
        for side in (-1, 1):  # iliac wings
            L += _bone((cx + side * 0.55 * a, yv + _u(rng, -5, 15)), (_u(rng, 40, 55), _u(rng, 8, 12)),
                       side * _u(rng, 0.5, 0.8), _u(rng, 1000, 1400), _u(rng, 200, 320), 2.0, _harm(rng, 0.05))
        L.append(Ellipse((cx, yv - 2), (14, 10), 0.0, -900.0, _harm(rng, 0.1)))  # rectal gas
    # spine: vertebral body (cortical rim + trabecular bone), canal, pedicles, spinous process
    va, vb = _u(rng, 17, 23), _u(rng, 13, 17)
    if region == "pelvis":
        va, vb = va * 1.8, vb * 0.9  # sacrum
        yv -= 20
    L += _bone((cx, yv), (va, vb), 0.0, _u(rng, 1100, 1500), _u(rng, 180, 300), _u(rng, 1.5, 2.2))
    yc = yv - vb - 9
    for side in (-1, 1):
        L.append(Ellipse((cx + side * 10, yc), (11, 3.5), side * 1.2, _u(rng, 600, 900)))  # pedicles/laminae
    L.append(Ellipse((cx, yc - 17), (12, 3.5), math.pi / 2, _u(rng, 600, 900)))  # spinous process
    L.append(Ellipse((cx, yc), (7, 8), 0.0, _u(rng, 5, 20)))  # spinal canal
    return L


def _head_layers(rng: np.random.Generator) -> list[Ellipse]:
    A, B = _u(rng, 70, 82), _u(rng, 88, 102)
    scalp = Ellipse((_u(rng, -3, 3), _u(rng, -3, 3)), (A, B), _u(rng, -0.06, 0.06), _u(rng, 20, 50),
                    _harm(rng, 0.02))
    skull_hu = _u(rng, 1500, 2000)
    t_skull = _u(rng, 5, 8)
    skull = _shrunk(scalp, _u(rng, 3, 5), skull_hu)
    diploe = _shrunk(skull, 0.35 * t_skull, _u(rng, 700, 1000))
    inner_table = _shrunk(skull, 0.65 * t_skull, skull_hu)
    gray = _shrunk(skull, t_skull, _u(rng, 35, 42))
    white = replace(_shrunk(gray, _u(rng, 8, 14), _u(rng, 24, 30)), harmonics=_harm(rng, 0.1, kmax=8))
    L = [scalp, skull, diploe, inner_table, gray, white]
    cx, cy = scalp.centre
    csf = _u(rng, 0, 10)
    spread, tilt = _u(rng, 5, 9), _u(rng, 0.15, 0.35)
    for side in (-1, 1):  # lateral ventricles (frontal horns)
        L.append(Ellipse((cx + side * spread, cy + _u(rng, 5, 15)), (_u(rng, 4, 7), _u(rng, 16, 26)), -side * tilt,
                         csf, _harm(rng, 0.08)))
    L.append(Ellipse((cx, cy - _u(rng, 8, 14)), (2.5, 7), 0.0, csf))  # third ventricle
    for _ in range(int(rng.integers(0, 3))):  # small lesions
        r = _u(rng, 3, 8)
        ang, rad = _u(rng, 0, 2 * math.pi), _u(rng, 15, 50)
        L.append(Ellipse((cx + rad * math.cos(ang), cy + rad * math.sin(ang)), (r, r * _u(rng, 0.7, 1.0)),
                         _u(rng, 0, math.pi), _u(rng, 15, 60)))
    return L


def random_anatomy(kind: AnatomyKind, rng: np.random.Generator | int, region: str | None = None) -> Anatomy:
    """A random ``body`` (``region`` thorax / abdomen / pelvis, random if None) or ``head`` slice, in mm.

    Values (HU): fat -80..-110, muscle 40-60, liver 55-70, spleen 40-50, kidney 28-40, lung -780..-860, gas
    -900..-950, CSF 0-20, brain grey 35-42 / white 24-30, trabecular bone 180-350, cortical rim 900-1500,
    skull 1500-2000 (textbook CT values; cortical bone below ~1500 HU reflects partial volume of thin rims).
    """
    if kind not in ANATOMY_KINDS:
        raise ValueError(f"kind must be one of {ANATOMY_KINDS}, got {kind!r}")
    rng = _as_rng(rng, "rng")
    if kind == "head":
        if region not in (None, "head"):
            raise ValueError(f"region must be None or 'head' for kind='head', got {region!r}")
        region = "head"
        layers = _head_layers(rng)
        tex = _u(rng, 4, 8)
    else:
        if region is None:
            region = BODY_REGIONS[int(rng.integers(len(BODY_REGIONS)))]
        if region not in BODY_REGIONS:
            raise ValueError(f"region must be one of {BODY_REGIONS} for kind='body', got {region!r}")
        layers = _body_layers(rng, region)
        tex = _u(rng, 8, 15)
    return Anatomy(kind, region, tuple(layers), texture_hu=tex, texture_seed=int(rng.integers(2**31)))


def random_phantom(kind: AnatomyKind, geometry: FanBeamGeometry | str, seed: np.random.Generator | int = 0,
                   region: str | None = None) -> np.ndarray:
    """Render :func:`random_anatomy` on a geometry: (H, W) float32 HU; the same seed gives the same slice."""
    return random_anatomy(kind, seed, region).render(geometry)


def _as_rng(rng, name: str) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise ValueError(f"{name} must be a numpy Generator or a non-negative int seed, got {rng!r}")


# ---- masks from any clean HU slice -----------------------------------------------------------------


def body_mask(hu: np.ndarray, threshold_hu: float = -400.0) -> np.ndarray:
    """The patient: the largest connected region above ``threshold_hu`` with its holes (lungs, gas) filled."""
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"hu must be a 2-D (H, W) image, got shape {hu.shape}")
    m = hu > threshold_hu
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
    m = lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(m)


def bone_mask(hu: np.ndarray, threshold_hu: float = 200.0) -> np.ndarray:
    """Bone: pixels above ``threshold_hu`` inside the body (NMAR's bone class starts at +200 HU, REFERENCE §3)."""
    return (np.asarray(hu) > threshold_hu) & body_mask(hu)


# ---- a real slice ------------------------------------------------------------------------------------


def load_ct_small(geometry: FanBeamGeometry | str | None = None, fill_hu: float = HU_AIR,
                  keep_spacing: bool = True) -> np.ndarray:
    """pydicom's bundled ``CT_small.dcm`` in HU (stored value * RescaleSlope + RescaleIntercept), float32.

    Without ``geometry`` the native 128 x 128 grid (0.66 mm pixels) is returned; with one, the slice is
    resampled (bilinear, centred on the isocentre) onto the geometry's grid and ``fill_hu`` pads the outside.
    ``keep_spacing`` keeps its physical size (it covers only 85 mm: in a large FOV a small object surrounded by
    air); False stretches it to 80 % of the reconstructable disc (realistic texture for tests, wrong anatomy
    scale). The slice is a crop: its anatomy is cut at the edges, so expect truncation-like edge artifacts.
    """
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:  # pragma: no cover - pydicom always ships it
        raise FileNotFoundError("pydicom's test file CT_small.dcm is not installed")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1.0)) + float(
        getattr(ds, "RescaleIntercept", 0.0))
    if geometry is None:
        return hu.astype(np.float32)
    g = get_geometry(geometry)
    sp = [float(v) for v in getattr(ds, "PixelSpacing", [1.0, 1.0])]  # (row, col) mm
    h, w = hu.shape
    if not keep_spacing:
        side = 0.8 * 2 * min(g.fov_radius, g.scan_radius) / math.sqrt(2)  # the square's corners stay inside
        sp = [side / h, side / w]
    xs, ys = g.pixel_centres
    cols = xs / sp[1] + (w - 1) / 2
    rows = -ys / sp[0] + (h - 1) / 2
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    # a reduced FOV would alias the source; pre-filter when the target pixels are much larger
    ratio = g.pixel_size / min(sp)
    src = ndimage.gaussian_filter(hu, sigma=0.4 * ratio) if ratio > 1.5 else hu
    out = ndimage.map_coordinates(src, [rr, cc], order=1, mode="constant", cval=fill_hu)
    return out.astype(np.float32)
