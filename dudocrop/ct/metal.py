"""Metal implants for the simulator: typed objects, random placement, partial-volume rasterisation, sweeps.

Every object is a :class:`MetalObject` (shape, material, centre, equivalent diameter, angle, aspect, seed) in
world mm. Its *equivalent diameter* d fixes its area exactly: area = pi (d / 2)^2, whatever the shape, so
"size" means the same thing for a disc, a rod or a fractal blob (the AAPM CT-MAR metal-info JSON and the
paper's perceptual indicator both describe metal by count and size).

Shapes (the u axis of each points along ``angle``; ``aspect`` = length / width >= 1):

* ``disc``    a circle (a rod or screw seen end-on); aspect is ignored.
* ``ellipse`` semi-axes r sqrt(aspect), r / sqrt(aspect).
* ``rod``     a stadium (rectangle with semicircular ends), length / width = aspect.
* ``screw``   a threaded shaft (triangular thread, depth 30 % of the core radius, pitch 1.2 core radii), a
  tapered tip and a wider head; length / thread diameter ~ aspect.
* ``blob``    a random star-shaped "fractal" outline: log-radius = sum_k c_k cos(k theta + phi_k), k = 2..24,
  c_k ~ N(0, (0.4 k^-1.3)^2) (a power-law boundary spectrum; AAPM uses fractal metal shapes, REFERENCE §3),
  stretched by ``aspect``; ``seed`` fixes it.

Rasterisation supersamples each pixel (default 8 x 8) into a fractional coverage map per material; the binary
metal mask is total coverage > 0.5 (the AAPM convention, ``mask > 0.5``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from dudocrop.checks import check_tensor
from dudocrop.ct.geometry import FanBeamGeometry, get_geometry
from dudocrop.ct.materials import METALS, get_material
from dudocrop.ct.phantoms import Ellipse, Shape, _as_rng, _local, body_mask, bone_mask, coverage

__all__ = [
    "METALS",
    "METAL_PRESETS",
    "SHAPES",
    "MetalConfig",
    "MetalMaps",
    "MetalObject",
    "check_placement",
    "count_sweep",
    "describe",
    "get_metal_config",
    "metal_mask",
    "rasterize_metal",
    "sample_count_sweep",
    "sample_metal",
    "size_sweep",
]

ShapeName = Literal["disc", "ellipse", "rod", "screw", "blob"]
SHAPES: tuple[str, ...] = ("disc", "ellipse", "rod", "screw", "blob")
Placement = Literal["body", "bone", "soft_tissue", "skin", "air"]
PLACEMENTS = ("body", "bone", "soft_tissue", "skin", "air")


# ---- shapes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stadium(Shape):
    """Points within ``r`` of the segment of half-length ``half`` along the u axis."""

    centre: tuple[float, float]
    half: float
    r: float
    angle: float

    def inside(self, x, y):
        u, v = _local(x, y, self.centre, self.angle)
        du = np.clip(np.abs(u) - self.half, 0.0, None)
        return du * du + v * v <= self.r * self.r

    def radius(self):
        return self.half + self.r

    def scaled(self, s):
        return replace(self, centre=(self.centre[0] * s, self.centre[1] * s), half=self.half * s, r=self.r * s)


# Screw profile in units of the core radius rho (u along the axis, tip at u = -L, head at u > L).
_THREAD_DEPTH, _PITCH, _TIP, _HEAD_W, _HEAD_L = 0.3, 1.2, 1.5, 1.9, 1.0


def _screw_half_width(u: np.ndarray, L: float) -> np.ndarray:
    """Half-width of the unit screw at axial position u (0 outside it)."""
    x = (u + L) / _PITCH
    tri = 1.0 - np.abs(2.0 * (x - np.floor(x)) - 1.0)  # 0..1 triangular thread
    r = 1.0 + _THREAD_DEPTH * tri
    taper = np.clip((u + L) / _TIP, 0.2, 1.0)  # pointed tip
    r = r * taper
    r = np.where(u > L, _HEAD_W, r)
    return np.where((u >= -L) & (u <= L + _HEAD_L), r, 0.0)


@lru_cache(maxsize=64)
def _screw_unit_area(L: float) -> float:
    u = np.linspace(-L, L + _HEAD_L, 400_001)
    w = 2.0 * _screw_half_width(u, L)
    return float(np.trapezoid(w, u))


@dataclass(frozen=True)
class _Screw(Shape):
    centre: tuple[float, float]
    rho: float  # core radius, mm
    L: float  # shaft half-length in units of rho
    angle: float

    def inside(self, x, y):
        u, v = _local(x, y, self.centre, self.angle)
        # centre the screw's extent [-L, L + head] on its centre
        u = u / self.rho + 0.5 * _HEAD_L
        return np.abs(v) / self.rho <= _screw_half_width(u, self.L)

    def radius(self):
        return self.rho * math.hypot(self.L + 0.5 * _HEAD_L, _HEAD_W)

    def scaled(self, s):
        return replace(self, centre=(self.centre[0] * s, self.centre[1] * s), rho=self.rho * s)


@lru_cache(maxsize=1024)
def _blob_harmonics(seed: int) -> tuple[tuple[int, float, float], ...]:
    rng = np.random.default_rng(seed)
    ks = np.arange(2, 25)
    c = rng.normal(0.0, 0.4 * ks ** -1.3)
    ph = rng.uniform(0.0, 2 * math.pi, ks.size)
    return tuple((int(k), float(a), float(p)) for k, a, p in zip(ks, c, ph))


# ---- objects -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetalObject:
    """One metal object. ``centre_mm`` (x, y) world mm (x right, y up/anterior); ``diameter_mm`` the
    equivalent diameter (area = pi (d/2)^2); ``angle`` (rad) of the long axis from +x; ``aspect`` = length /
    width >= 1 (ignored for discs); ``seed`` fixes a blob's outline. ``material`` is stored canonically."""

    shape: str
    material: str
    centre_mm: tuple[float, float]
    diameter_mm: float
    angle: float = 0.0
    aspect: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"MetalObject.shape must be one of {SHAPES}, got {self.shape!r}")
        object.__setattr__(self, "material", get_material(self.material).name)
        c = self.centre_mm
        if not (isinstance(c, Sequence) and len(c) == 2 and all(_finite(v) for v in c)):
            raise ValueError(f"MetalObject.centre_mm must be a finite (x, y) pair in mm, got {c!r}")
        object.__setattr__(self, "centre_mm", (float(c[0]), float(c[1])))
        if not (_finite(self.diameter_mm) and self.diameter_mm > 0):
            raise ValueError(f"MetalObject.diameter_mm must be a positive finite number, got {self.diameter_mm!r}")
        if not _finite(self.angle):
            raise ValueError(f"MetalObject.angle must be a finite angle in radians, got {self.angle!r}")
        if not (_finite(self.aspect) and 1.0 <= self.aspect <= 50.0):
            raise ValueError(f"MetalObject.aspect must be in [1, 50] (length / width), got {self.aspect!r}")
        if not (isinstance(self.seed, int | np.integer) and self.seed >= 0):
            raise ValueError(f"MetalObject.seed must be a non-negative int, got {self.seed!r}")

    @property
    def area_mm2(self) -> float:
        return math.pi * (0.5 * self.diameter_mm) ** 2

    def outline(self) -> Shape:
        """The world-mm :class:`Shape` with exactly :attr:`area_mm2`."""
        r = 0.5 * self.diameter_mm
        c, a = self.centre_mm, self.angle
        if self.shape == "disc":
            return Ellipse(c, (r, r), 0.0)
        if self.shape == "ellipse":
            q = math.sqrt(self.aspect)
            return Ellipse(c, (r * q, r / q), a)
        if self.shape == "rod":
            rho = r * math.sqrt(math.pi / (4.0 * (self.aspect - 1.0) + math.pi))
            return _Stadium(c, (self.aspect - 1.0) * rho, rho, a)
        if self.shape == "screw":
            L = max(self.aspect * (1.0 + _THREAD_DEPTH) - 0.5 * _HEAD_L, _TIP)
            rho = math.sqrt(self.area_mm2 / _screw_unit_area(L))
            return _Screw(c, rho, L, a)
        q = math.sqrt(self.aspect)
        unit = Ellipse((0.0, 0.0), (q, 1.0 / q), 0.0, harmonics=_blob_harmonics(int(self.seed)))
        s = math.sqrt(self.area_mm2 / unit.area())
        return Ellipse(c, (q * s, s / q), a, harmonics=unit.harmonics)

    def centroid_mm(self) -> tuple[float, float]:
        """Area centroid (x, y) in mm; differs from ``centre_mm`` for screws (head) and blobs."""
        return _centroid(self)

    def radius_mm(self) -> float:
        """Radius of a disc about the centre that contains the whole object."""
        return self.outline().radius()

    def to_dict(self) -> dict:
        return {"shape": self.shape, "material": self.material, "centre_mm": list(self.centre_mm),
                "diameter_mm": self.diameter_mm, "angle": self.angle, "aspect": self.aspect, "seed": self.seed}


@lru_cache(maxsize=4096)
def _centroid(obj: MetalObject) -> tuple[float, float]:
    if obj.shape in ("disc", "ellipse", "rod"):  # centrally symmetric
        return obj.centre_mm
    shp = obj.outline()
    r = shp.radius()
    t = np.linspace(-r, r, 401)
    x, y = obj.centre_mm[0] + t[None, :], obj.centre_mm[1] + t[:, None]
    inside = shp.inside(x, y)
    w = inside.sum()
    return (float((x * inside).sum() / w), float((np.broadcast_to(y, inside.shape) * inside).sum() / w))


def _finite(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and math.isfinite(v)


def _check_objects(objects, name: str = "objects") -> tuple[MetalObject, ...]:
    if isinstance(objects, MetalObject):
        return (objects,)
    if not isinstance(objects, Sequence) or isinstance(objects, str):
        raise ValueError(f"{name} must be a sequence of MetalObject, got {type(objects).__name__}")
    for i, o in enumerate(objects):
        if not isinstance(o, MetalObject):
            raise ValueError(f"{name}[{i}] must be a MetalObject, got {type(o).__name__}")
    return tuple(objects)


def describe(objects: Sequence[MetalObject]) -> dict:
    """The metal descriptor columns of ``dudocrop.data.schema`` for a list of objects."""
    objs = _check_objects(objects)
    return {
        "metal_count": len(objs),
        "metal_diameters_mm": [o.diameter_mm for o in objs],
        "metal_materials": [o.material for o in objs],
        "metal_centroids_mm": [list(o.centroid_mm()) for o in objs],
    }


# ---- rasterisation -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MetalMaps:
    """Fractional coverage per material ((H, W) float32 in [0, 1], overlaps clipped so the total <= 1)."""

    coverage: dict[str, np.ndarray]
    total: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """Binary metal mask: total coverage > 0.5."""
        return self.total > 0.5


def rasterize_metal(objects: Sequence[MetalObject], geometry: FanBeamGeometry | str,
                    supersample: int = 8) -> MetalMaps:
    """Partial-volume coverage maps of ``objects`` on the geometry's grid, one per material present."""
    g = get_geometry(geometry)
    objs = _check_objects(objects)
    per: dict[str, np.ndarray] = {}
    for o in objs:
        c = coverage(o.outline(), g, supersample)
        per[o.material] = per[o.material] + c if o.material in per else c
    total = np.zeros(g.image_shape, np.float32)
    for c in per.values():
        total += c
    over = total > 1.0
    if over.any():  # overlapping objects: the pixel holds at most one pixel of metal, shared pro rata
        f = np.ones_like(total)
        f[over] = 1.0 / total[over]
        for k in per:
            per[k] = per[k] * f
        total = np.minimum(total, 1.0)
    return MetalMaps(per, total)


def metal_mask(objects: Sequence[MetalObject], geometry: FanBeamGeometry | str, supersample: int = 8) -> np.ndarray:
    """Binary (H, W) mask, coverage > 0.5."""
    return rasterize_metal(objects, geometry, supersample).mask


# ---- random placement ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetalConfig:
    """How :func:`sample_metal` draws objects.

    ``count``: an exact number or an inclusive (min, max) range. ``diameter_mm``: equivalent diameters are drawn
    log-uniformly in this range (small and large implants equally often per octave). ``aspect`` range applies
    to ellipse, rod, screw and blob. ``placement``: ``body`` (anywhere inside the patient), ``bone`` (centre in
    bone, HU > 200), ``soft_tissue`` (the whole object at least ``margin_mm`` away from bone), ``skin`` (centre
    on the body outline, so the object straddles the skin: an ECG electrode, a clip) or ``air`` (the whole
    object outside the patient, at least ``margin_mm`` from the skin: a lead, an external fixator, a clip on the
    table). Inside-body placements keep ``margin_mm`` from the skin; every object keeps ``min_gap_mm`` from the
    others and stays inside the reconstructable disc. ``centres_mm`` pins the centres (then the count is their
    number and only shape, size and material are drawn).

    ``air_fraction`` / ``skin_fraction``: the probability that each object is placed in ``air`` / on the
    ``skin`` instead of by ``placement`` (so training and evaluation also see metal the NMAR prior cannot
    explain; issue 19). Both 0 (the default): every object follows ``placement`` and no extra random number is
    drawn, so such configs give the same objects as before these fields existed.
    """

    count: int | tuple[int, int] = (1, 4)
    diameter_mm: tuple[float, float] = (2.0, 20.0)
    shapes: tuple[str, ...] = SHAPES
    materials: tuple[str, ...] = ("titanium", "stainless_steel", "cocr", "copper")
    placement: str = "body"
    aspect: tuple[float, float] = (1.0, 4.0)
    margin_mm: float = 3.0
    min_gap_mm: float = 2.0
    centres_mm: tuple[tuple[float, float], ...] | None = None
    max_tries: int = 500
    air_fraction: float = 0.0
    skin_fraction: float = 0.0

    def __post_init__(self) -> None:
        c = self.count
        if isinstance(c, int | np.integer) and not isinstance(c, bool):
            lo = hi = int(c)
        elif isinstance(c, Sequence) and len(c) == 2 and all(isinstance(v, int | np.integer) for v in c):
            lo, hi = int(c[0]), int(c[1])
        else:
            raise ValueError(f"MetalConfig.count must be an int or an (min, max) pair of ints, got {c!r}")
        if lo < 1 or hi < lo:
            raise ValueError(f"MetalConfig.count must be >= 1 (and min <= max), got {c!r}")
        d = self.diameter_mm
        if not (isinstance(d, Sequence) and len(d) == 2 and all(_finite(v) for v in d) and 0 < d[0] <= d[1]):
            raise ValueError(f"MetalConfig.diameter_mm must be a (min, max) pair with 0 < min <= max, got {d!r}")
        a = self.aspect
        if not (isinstance(a, Sequence) and len(a) == 2 and all(_finite(v) for v in a) and 1 <= a[0] <= a[1]):
            raise ValueError(f"MetalConfig.aspect must be a (min, max) pair with 1 <= min <= max, got {a!r}")
        if not self.shapes or any(s not in SHAPES for s in self.shapes):
            raise ValueError(f"MetalConfig.shapes must be a non-empty subset of {SHAPES}, got {self.shapes!r}")
        if not self.materials:
            raise ValueError("MetalConfig.materials must name at least one material")
        object.__setattr__(self, "materials", tuple(get_material(m).name for m in self.materials))
        if self.placement not in PLACEMENTS:
            raise ValueError(f"MetalConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for f in ("margin_mm", "min_gap_mm"):
            v = getattr(self, f)
            if not (_finite(v) and v >= 0):
                raise ValueError(f"MetalConfig.{f} must be a finite number >= 0, got {v!r}")
        for f in ("air_fraction", "skin_fraction"):
            v = getattr(self, f)
            if not (_finite(v) and 0 <= v <= 1):
                raise ValueError(f"MetalConfig.{f} must be a probability in [0, 1], got {v!r}")
        if self.air_fraction + self.skin_fraction > 1:
            raise ValueError(f"MetalConfig.air_fraction + skin_fraction must be <= 1, got "
                             f"{self.air_fraction} + {self.skin_fraction}")
        if self.centres_mm is not None:
            cs = self.centres_mm
            if not (isinstance(cs, Sequence) and len(cs) >= 1 and all(
                    isinstance(p, Sequence) and len(p) == 2 and all(_finite(v) for v in p) for p in cs)):
                raise ValueError(f"MetalConfig.centres_mm must be a non-empty sequence of (x, y) mm pairs, got {cs!r}")
            object.__setattr__(self, "centres_mm", tuple((float(p[0]), float(p[1])) for p in cs))

    @property
    def count_range(self) -> tuple[int, int]:
        if self.centres_mm is not None:
            return len(self.centres_mm), len(self.centres_mm)
        c = self.count
        return (int(c), int(c)) if isinstance(c, int | np.integer) else (int(c[0]), int(c[1]))


METAL_PRESETS: dict[str, MetalConfig] = {
    # AAPM CT-MAR-like: 1-4 objects of Ti / steel / Co-Cr / Cu, 2-20 mm, all shapes, anywhere in the body; one
    # object in twenty lies outside the patient and one in twenty on the skin (leads, electrodes, clips)
    "aapm_like": MetalConfig(air_fraction=0.05, skin_fraction=0.05),
    # SynDeepLesion-like: one to a few titanium objects (their 100 masks are Ti, 4.5 g/cm^3; REFERENCE §3)
    "syndeeplesion_like": MetalConfig(count=(1, 3), diameter_mm=(2.0, 25.0), materials=("titanium",)),
    # spinal fixation: 2-4 titanium screws/rods anchored in bone
    "spine": MetalConfig(count=(2, 4), diameter_mm=(4.0, 10.0), shapes=("screw", "rod"), materials=("titanium",),
                         placement="bone", aspect=(3.0, 6.0)),
    # dental fillings / crowns (head): amalgam and gold, small
    "dental": MetalConfig(count=(1, 6), diameter_mm=(2.0, 8.0), shapes=("blob", "ellipse", "disc"),
                          materials=("amalgam", "gold"), aspect=(1.0, 2.0)),
    # hip prosthesis cross-section: one or two large Co-Cr / steel objects
    "hip": MetalConfig(count=(1, 2), diameter_mm=(20.0, 45.0), shapes=("disc", "ellipse"),
                       materials=("cocr", "stainless_steel"), placement="bone", aspect=(1.0, 1.5), margin_mm=5.0),
}


def get_metal_config(name_or_config: str | MetalConfig) -> MetalConfig:
    if isinstance(name_or_config, MetalConfig):
        return name_or_config
    try:
        return METAL_PRESETS[name_or_config]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metal config {name_or_config!r}; presets: {', '.join(METAL_PRESETS)}") from None


@dataclass
class _Regions:
    g: FanBeamGeometry
    body: np.ndarray
    body_dist: np.ndarray  # mm from each body pixel to the outside of the body (0 outside)
    air_dist: np.ndarray  # mm from each pixel outside the body to the body (0 inside)
    bone: np.ndarray
    bone_dist: np.ndarray  # mm from each pixel to the nearest bone pixel
    fov_dist: np.ndarray  # mm from the edge of the reconstructable disc
    taken: list = field(default_factory=list)  # (centre, radius) of placed objects


def _image2d(x, g: FanBeamGeometry, name: str = "clean_hu") -> np.ndarray:
    """A (H, W) or (1, 1, H, W) float image (numpy or torch) as a 2-D numpy array, validated."""
    if isinstance(x, np.ndarray | torch.Tensor) and x.ndim == 4 and tuple(x.shape[:2]) == (1, 1):
        x = x[0, 0]
    t = check_tensor(x, name, ndim=2, shape=g.image_shape, context=f"geometry {g.name!r}")
    return t.detach().cpu().numpy()


def _regions(clean_hu, g: FanBeamGeometry) -> _Regions:
    hu = _image2d(clean_hu, g)
    body = body_mask(hu)
    bone = bone_mask(hu)
    px = g.pixel_size
    xs, ys = g.pixel_centres
    rad = np.hypot(xs[None, :], ys[:, None])
    return _Regions(
        g,
        body,
        ndimage.distance_transform_edt(body) * px,
        ndimage.distance_transform_edt(~body) * px if body.any() else np.full(body.shape, np.inf),
        bone,
        ndimage.distance_transform_edt(~bone) * px if bone.any() else np.full(bone.shape, np.inf),
        min(g.fov_radius, g.scan_radius) - rad,
    )


def _eligible(reg: _Regions, R: float, cfg: MetalConfig, placement: str) -> np.ndarray:
    px = reg.g.pixel_size
    ok = reg.fov_dist >= R + px
    if placement == "air":
        ok &= reg.air_dist >= R + cfg.margin_mm + px
    elif placement == "skin":  # the outermost ring of body pixels: the centre sits on the skin
        ok &= (reg.body_dist > 0) & (reg.body_dist <= px)
    else:
        ok &= reg.body_dist >= R + cfg.margin_mm + px
    if placement == "bone":
        ok &= reg.bone
    elif placement == "soft_tissue":
        ok &= reg.bone_dist >= R + cfg.margin_mm + px
    if reg.taken:
        xs, ys = reg.g.pixel_centres
        for (cx, cy), r in reg.taken:
            ok &= np.hypot(xs[None, :] - cx, ys[:, None] - cy) >= R + r + cfg.min_gap_mm
    return ok


def _draw_object(cfg: MetalConfig, rng: np.random.Generator, centre=(0.0, 0.0)) -> MetalObject:
    shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
    material = cfg.materials[int(rng.integers(len(cfg.materials)))]
    lo, hi = cfg.diameter_mm
    d = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)
    aspect = 1.0 if shape == "disc" else float(rng.uniform(*cfg.aspect))
    return MetalObject(shape, material, centre, d, float(rng.uniform(0, math.pi)), aspect,
                       int(rng.integers(2**31)))


def sample_metal(config: MetalConfig | str, clean_hu, geometry: FanBeamGeometry | str,
                 rng: np.random.Generator | int = 0, count: int | None = None) -> tuple[MetalObject, ...]:
    """Draw objects per ``config`` and place them in ``clean_hu`` ((H, W) HU on ``geometry``'s grid).

    ``count`` overrides the config's count. Raises ValueError if the anatomy has no room (e.g. ``bone``
    placement in a slice without bone) after ``max_tries`` draws.
    """
    cfg = get_metal_config(config)
    g = get_geometry(geometry)
    rng = _as_rng(rng, "rng")
    if count is not None:
        if not (isinstance(count, int | np.integer) and not isinstance(count, bool) and count >= 1):
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        if cfg.centres_mm is not None and count != len(cfg.centres_mm):
            raise ValueError(f"count={count} disagrees with the {len(cfg.centres_mm)} centres in config.centres_mm")
    lo, hi = cfg.count_range
    n = int(count) if count is not None else int(rng.integers(lo, hi + 1))
    if cfg.centres_mm is not None:
        return tuple(_draw_object(cfg, rng, c) for c in cfg.centres_mm)
    reg = _regions(clean_hu, g)
    xs, ys = g.pixel_centres
    px = g.pixel_size
    out: list[MetalObject] = []
    tries = 0
    placement = cfg.placement
    while len(out) < n:
        tries += 1
        if tries > cfg.max_tries:
            raise ValueError(
                f"config: could not place object {len(out) + 1} of {n} ({placement!r} placement, diameters "
                f"{cfg.diameter_mm} mm) in this slice after {cfg.max_tries} tries; the region is too small"
            )
        obj = _draw_object(cfg, rng)
        placement = cfg.placement
        if cfg.air_fraction or cfg.skin_fraction:
            u = rng.uniform()
            placement = "air" if u < cfg.air_fraction else "skin" if u < cfg.air_fraction + cfg.skin_fraction \
                else placement
        R = obj.radius_mm()
        ok = _eligible(reg, R, cfg, placement)
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            continue
        k = int(idx[int(rng.integers(idx.size))])
        i, j = divmod(k, g.image_size)
        # jitter within the pixel: centres are continuous, the eligibility margins include one pixel
        c = (float(xs[j] + rng.uniform(-0.5, 0.5) * px), float(ys[i] + rng.uniform(-0.5, 0.5) * px))
        obj = replace(obj, centre_mm=c)
        if placement == "skin":  # a small object on the outermost body pixels may still miss the air: redraw
            cov = coverage(obj.outline(), g, 2) > 0
            if not (reg.body[cov].any() and (~reg.body[cov]).any()):
                continue
        reg.taken.append((c, R))
        out.append(obj)
    return tuple(out)


def check_placement(objects: Sequence[MetalObject], clean_hu, geometry: FanBeamGeometry | str,
                    placement: str = "body") -> None:
    """Raise ValueError if an object is not where ``placement`` puts it: inside the body (``body``, ``bone``
    with its centre in bone, ``soft_tissue`` touching no bone), across the skin (``skin``: partly inside, partly
    outside) or wholly outside it (``air``)."""
    g = get_geometry(geometry)
    objs = _check_objects(objects)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    hu = _image2d(clean_hu, g)
    body = body_mask(hu)
    bone = bone_mask(hu)
    xs, ys = g.pixel_centres
    for k, o in enumerate(objs):
        cov = coverage(o.outline(), g, 2)
        what = f"objects[{k}] ({o.shape}, {o.diameter_mm:.1f} mm at {o.centre_mm})"
        inside, outside = (cov > 0)[body].any(), (cov > 0)[~body].any()
        if placement == "air":
            if inside:
                raise ValueError(f"{what} touches the body ('air' placement)")
            continue
        if placement == "skin":
            if not (inside and outside):
                raise ValueError(f"{what} does not cross the skin ('skin' placement)")
            continue
        if outside:
            raise ValueError(f"{what} leaves the body")
        if placement == "bone":
            j = int(np.argmin(np.abs(xs - o.centre_mm[0])))
            i = int(np.argmin(np.abs(ys - o.centre_mm[1])))
            if not bone[i, j]:
                raise ValueError(f"objects[{k}] has its centre {o.centre_mm} outside bone")
        if placement == "soft_tissue" and (cov > 0)[bone].any():
            raise ValueError(f"objects[{k}] touches bone")


# ---- sweeps for the perceptual indicator -------------------------------------------------------------


def count_sweep(objects: Sequence[MetalObject]) -> list[tuple[MetalObject, ...]]:
    """Nested object lists [objs[:1], objs[:2], ..., objs[:N]]: the same slice with 1..N objects."""
    objs = _check_objects(objects)
    if not objs:
        raise ValueError("objects must hold at least one MetalObject")
    return [objs[: k + 1] for k in range(len(objs))]


def sample_count_sweep(config: MetalConfig | str, clean_hu, geometry: FanBeamGeometry | str, n_max: int,
                       rng: np.random.Generator | int = 0) -> list[tuple[MetalObject, ...]]:
    """Place ``n_max`` non-overlapping objects once, then return the 1..n_max prefixes (:func:`count_sweep`)."""
    if not (isinstance(n_max, int | np.integer) and not isinstance(n_max, bool) and n_max >= 1):
        raise ValueError(f"n_max must be an int >= 1, got {n_max!r}")
    return count_sweep(sample_metal(config, clean_hu, geometry, rng, count=int(n_max)))


def size_sweep(obj: MetalObject, diameters_mm: Sequence[float], clean_hu=None,
               geometry: FanBeamGeometry | str | None = None) -> list[tuple[MetalObject, ...]]:
    """One object at growing equivalent diameters (same shape, material, centre, angle, aspect, seed), each as
    a one-object list. With ``clean_hu`` and ``geometry`` every size is checked to stay inside the body."""
    if not isinstance(obj, MetalObject):
        raise ValueError(f"obj must be a MetalObject, got {type(obj).__name__}")
    ds = list(diameters_mm) if isinstance(diameters_mm, Sequence | np.ndarray) else None
    if not ds or not all(_finite(float(d)) and float(d) > 0 for d in ds):
        raise ValueError(f"diameters_mm must be a non-empty sequence of positive numbers, got {diameters_mm!r}")
    out = [(replace(obj, diameter_mm=float(d)),) for d in ds]
    if clean_hu is not None:
        if geometry is None:
            raise ValueError("geometry is required to check placement against clean_hu")
        for objs in out:
            check_placement(objs, clean_hu, geometry)
    return out

