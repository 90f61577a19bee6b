"""Measurements on a slice that captions are made of and checked against (§III-B, §IV-D): the body and its
frame (for radiologist position words), tissue fractions and body region from HU statistics, bone landmarks
(spine, rib, pelvis, skull), streak energy and direction of an artifact image, and metal-trace runs in a
sinogram.

Both the ``template`` caption engine (which sees one view, like a VLM) and the ground truth of the P/N scorer
(which sees the simulator's masks and the reference) use these functions, with different inputs.

Thresholds (HU): body > -500; lung (air inside the body) < -400; fat [-190, -30); soft tissue [-30, 150);
bone >= 250 (NMAR's bone class starts at +200, REFERENCE §3); metal >= 2000 (above cortical bone, below
titanium's ≈ 5000 HU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from dudocrop.ct import phantoms
from dudocrop.ct.geometry import FanBeamGeometry, get_geometry

BODY_HU = -500.0
LUNG_HU = -400.0
FAT_HU = (-190.0, -30.0)
SOFT_HU = (-30.0, 150.0)
BONE_HU = 250.0
METAL_HU = 2000.0
#: a metal object closer than this to a bone is "near" it (about a vertebral body's radius)
NEAR_BONE_MM = 15.0
#: |offset| from the body centre, as a fraction of the half extent, below which a point is midline / central
MIDLINE_FRACTION = 0.10
#: streak severity from the robust spread (HU) of the artifact image inside the body, outside the metal
SEVERITY_BINS_HU = (25.0, 75.0)
SEVERITIES = ("mild", "moderate", "severe")
#: structure-tensor coherence below which streaks have no dominant direction (a star around one implant)
RADIAL_COHERENCE = 0.15
#: line integrals above this count as "inside the body's shadow" in a sinogram
BODY_LINE_INTEGRAL = 0.1
REGIONS = ("head", "thorax", "abdomen", "pelvis")
LANDMARKS = ("spine", "rib", "pelvis", "skull")


@dataclass(frozen=True)
class BodyFrame:
    """The body's centre and half extents (world mm, x right = patient left, y up = anterior)."""

    centre_mm: tuple[float, float]
    half_extent_mm: tuple[float, float]

    def side(self, x_mm: float) -> str:
        """Patient side in the radiological convention: image left (x < centre) is the patient's RIGHT."""
        d = (x_mm - self.centre_mm[0]) / max(self.half_extent_mm[0], 1e-6)
        if abs(d) < MIDLINE_FRACTION:
            return "midline"
        return "left" if d > 0 else "right"

    def ap(self, y_mm: float) -> str:
        """Anterior (y up for a supine patient) / posterior / central."""
        d = (y_mm - self.centre_mm[1]) / max(self.half_extent_mm[1], 1e-6)
        if abs(d) < MIDLINE_FRACTION:
            return "central"
        return "anterior" if d > 0 else "posterior"


@dataclass(frozen=True, eq=False)
class Anatomy:
    """What HU statistics say about one slice (fractions are of the body area)."""

    region: str
    frame: BodyFrame
    body_area_mm2: float
    width_mm: float
    height_mm: float
    lung_fraction: float
    fat_fraction: float
    soft_fraction: float
    bone_fraction: float
    landmarks: tuple[str, ...]  # bone landmarks present, in LANDMARKS order
    body: np.ndarray = field(repr=False)
    bone_labels: np.ndarray = field(repr=False)  # 0 = no bone, k = component k
    bone_kinds: dict = field(repr=False)  # component -> landmark

    @property
    def has_lungs(self) -> bool:
        return self.lung_fraction > 0.05

    def nearest_landmark(self, object_mask: np.ndarray, pixel_mm: float) -> str:
        """The bone landmark within NEAR_BONE_MM of an object, else 'soft tissue'."""
        if not self.bone_kinds or not object_mask.any():
            return "soft tissue"
        bone = self.bone_labels > 0
        dist, idx = ndimage.distance_transform_edt(~bone, sampling=pixel_mm, return_indices=True)
        d = np.where(object_mask, dist, np.inf)
        r, c = np.unravel_index(int(np.argmin(d)), d.shape)
        if d[r, c] > NEAR_BONE_MM:
            return "soft tissue"
        return self.bone_kinds[int(self.bone_labels[idx[0][r, c], idx[1][r, c]])]


def world_grid(geometry: FanBeamGeometry) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = geometry.pixel_centres
    return xs[None, :] * np.ones((len(ys), 1)), ys[:, None] * np.ones((1, len(xs)))


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient at the captioner's threshold (-500 HU): ``dudocrop.ct.phantoms.body_mask``."""
    return phantoms.body_mask(hu, BODY_HU)


def analyse_anatomy(hu: np.ndarray, geometry: FanBeamGeometry | str, anatomy_hint: str | None = None,
                    exclude: np.ndarray | None = None) -> Anatomy:
    """Body region, tissue fractions and bone landmarks of an HU image.

    ``anatomy_hint`` is the schema's ``body``/``head`` (None: decided from a bony ring at the body's edge);
    ``exclude`` marks pixels (metal and its surroundings) that must not count as bone or tissue."""
    g = get_geometry(geometry)
    hu = np.asarray(hu, np.float64)
    if hu.shape != g.image_shape:
        raise ValueError(f"hu must have shape {g.image_shape} for geometry {g.name!r}, got {hu.shape}")
    px = g.pixel_size
    body = body_mask(hu)
    keep = body & (~exclude.astype(bool) if exclude is not None else True)
    X, Y = world_grid(g)
    n_body = max(int(body.sum()), 1)
    if body.any():
        cx, cy = float(X[body].mean()), float(Y[body].mean())
        hx = 0.5 * (X[body].max() - X[body].min() + px)
        hy = 0.5 * (Y[body].max() - Y[body].min() + px)
    else:
        cx = cy = 0.0
        hx = hy = g.fov_radius
    frame = BodyFrame((cx, cy), (float(hx), float(hy)))
    frac = lambda m: float((m & keep).sum()) / n_body  # noqa: E731
    lung = frac(hu < LUNG_HU)
    fat = frac((hu >= FAT_HU[0]) & (hu < FAT_HU[1]))
    soft = frac((hu >= SOFT_HU[0]) & (hu < SOFT_HU[1]))
    bone_px = (hu >= BONE_HU) & (hu < METAL_HU) & keep
    # drop noise specks, keep thin cortex (an opening would erase a 2-pixel skull at coarse resolution)
    lab0, n0 = ndimage.label(bone_px)
    if n0:
        sizes = ndimage.sum_labels(np.ones_like(lab0), lab0, index=np.arange(1, n0 + 1))
        keep_ids = np.flatnonzero(sizes >= max(3.0, 10.0 / (px * px))) + 1
        bone_px = np.isin(lab0, keep_ids)
    bone = float(bone_px.sum()) / n_body

    # a bony ring along the body's edge is a skull
    edge = body & ~ndimage.binary_erosion(body, iterations=max(1, round(8.0 / px)))
    skull_ring = edge.any() and float((bone_px & edge).sum()) / float(edge.sum()) > 0.3
    lateral = np.abs(X - cx) > 0.3 * hx
    if anatomy_hint == "head" or (anatomy_hint is None and skull_ring):
        region = "head"
    elif lung > 0.05:
        region = "thorax"
    elif bone > 0.02 and float((bone_px & lateral).sum()) > 0.4 * float(bone_px.sum()):
        region = "pelvis"
    else:
        region = "abdomen"

    labels, nb = ndimage.label(bone_px)
    kinds = {}
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        sel = labels[sl] == k
        bx, by = float(X[sl][sel].mean()), float(Y[sl][sel].mean())
        if region == "head":
            kinds[k] = "skull"
        elif abs(bx - cx) < 0.2 * hx and by < cy:
            kinds[k] = "spine"
        else:
            kinds[k] = "pelvis" if region == "pelvis" else "rib"
    present = tuple(lm for lm in LANDMARKS if lm in kinds.values())
    return Anatomy(region=region, frame=frame, body_area_mm2=float(body.sum()) * px * px,
                   width_mm=2 * frame.half_extent_mm[0], height_mm=2 * frame.half_extent_mm[1],
                   lung_fraction=lung, fat_fraction=fat, soft_fraction=soft, bone_fraction=bone,
                   landmarks=present, body=body, bone_labels=labels, bone_kinds=kinds)


# ---- artifacts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Streaks:
    """Streak energy (robust spread, HU), its severity word, and the dominant streak direction."""

    energy_hu: float
    severity: str
    direction: str  # horizontal | vertical | diagonal | radial
    coherence: float
    angle_deg: float  # streak orientation in the displayed image, 0 = along the rows


def severity_of(energy_hu: float) -> str:
    lo, hi = SEVERITY_BINS_HU
    return SEVERITIES[0] if energy_hu < lo else SEVERITIES[1] if energy_hu < hi else SEVERITIES[2]


def direction_of_angle(angle_deg: float) -> str:
    """Orientation (degrees, mod 180) -> horizontal / vertical / diagonal."""
    a = angle_deg % 180.0
    if a < 22.5 or a >= 157.5:
        return "horizontal"
    if 67.5 <= a < 112.5:
        return "vertical"
    return "diagonal"


def measure_streaks(view: np.ndarray, region: np.ndarray) -> Streaks:
    """Streaks of an artifact image (a residual X_r, or X_ma itself) inside ``region``.

    Energy: 1.4826 x the median absolute deviation (a robust standard deviation) of the values, so a few
    bright metal-edge pixels do not dominate. Direction: the structure tensor J = sum(grad grad^T) over the
    region; streaks run perpendicular to the dominant gradient, and a low coherence
    sqrt((Jxx-Jyy)^2 + 4Jxy^2) / (Jxx+Jyy) means no dominant direction (radial streaks)."""
    v = np.asarray(view, np.float64)
    region = region.astype(bool)
    if region.sum() < 16:
        return Streaks(0.0, SEVERITIES[0], "radial", 0.0, 0.0)
    vals = v[region]
    energy = float(1.4826 * np.median(np.abs(vals - np.median(vals))))
    s = ndimage.gaussian_filter(np.clip(v, -1000, 1000), 1.0)  # metal edges would swamp the tensor
    gy, gx = ndimage.sobel(s, axis=0), ndimage.sobel(s, axis=1)
    jxx, jyy, jxy = (float((a * b)[region].sum()) for a, b in ((gx, gx), (gy, gy), (gx, gy)))
    tr = jxx + jyy
    coh = math.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / tr if tr > 0 else 0.0
    # gradient orientation in (col, -row) coordinates = displayed x right, y up; streaks are perpendicular
    theta_g = 0.5 * math.degrees(math.atan2(-2 * jxy, jxx - jyy))
    angle = (theta_g + 90.0) % 180.0
    direction = "radial" if coh < RADIAL_COHERENCE else direction_of_angle(angle)
    return Streaks(energy, severity_of(energy), direction, coh, angle)


def line_direction(p: tuple[float, float], q: tuple[float, float]) -> str:
    """Direction word of the line through two points (world mm: x right, y up)."""
    return direction_of_angle(math.degrees(math.atan2(q[1] - p[1], q[0] - p[0])))


# ---- sinograms ------------------------------------------------------------------------------------
def runs_per_view(mask: np.ndarray) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """Number of contiguous channel runs of a (V, C) boolean mask in every view, and the runs themselves."""
    m = np.asarray(mask, bool)
    d = np.diff(np.pad(m.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    runs = []
    for v in range(m.shape[0]):
        starts = np.flatnonzero(d[v] == 1)
        ends = np.flatnonzero(d[v] == -1)
        runs.append(list(zip(starts.tolist(), (ends - 1).tolist())))
    return np.array([len(r) for r in runs]), runs


def sinogram_outliers(y: np.ndarray, width: int, threshold: float) -> np.ndarray:
    """Channels standing out of their view's smooth background: y - median over ``width`` channels > threshold.
    On a residual Y_r the background is ~0 and this is the metal trace; on Y_ma bone edges also stand out."""
    y = np.asarray(y, np.float64)
    base = ndimage.median_filter(y, size=(1, max(3, width | 1)), mode="nearest")
    return (y - base) > threshold
