"""QSPD feature tuples (§III-B "Prompt Engineering", Fig. 5): Quantity, Size, Position from the masks,
Description from the captioner, rendered as one fixed template that fits CLIP's 77-token context.

* Quantity: connected components of the image-domain metal mask (8-connectivity would merge diagonal
  neighbours of distinct implants at coarse resolutions, so 4-connectivity, scipy's default, is used).
* Size: area in mm^2 (pixel count x pixel area, exact for the mask) and the equivalent diameter 2 sqrt(A/pi).
* Position: radiologist words relative to the body centre — the patient's right/left (radiological convention:
  image left = patient right), anterior/posterior (image top = anterior for a supine patient), and the nearest
  bone landmark within 15 mm (spine, rib, pelvis, skull) from the reference image's bone, else 'soft tissue'.
  For the sinogram: the trace's extent (views covered, channel range, fraction of the detector, mean width).
* Description: the captioner's answer to P2 / P4 (the ``description:`` field when it follows the form).

Templates (objects largest first)::

    metal: quantity 2; size 28 mm2 (6.0 mm), 13 mm2 (4.1 mm); position right posterior near the spine,
    left anterior in soft tissue; description: <D>
    metal trace: quantity 2; size 6.0 mm, 4.1 mm wide; position 96/96 views, channels 31-80 (45% of the
    detector); description: <D>

When a rendering exceeds 77 tokens it is compacted in fixed steps (1: diameters only; 2: the two largest
objects and "+k smaller"; 3: the description cut at a clause, then word); the step and the token counts are
returned and logged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from dudocrop.captions.analysis import Anatomy, analyse_anatomy, world_grid
from dudocrop.captions.tokens import CONTEXT_LENGTH, TokenReport, clip_token_count, fit_clip_context
from dudocrop.ct.geometry import FanBeamGeometry, get_geometry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetalObject:
    area_mm2: float
    diameter_mm: float
    centroid_mm: tuple[float, float]  # world (x, y): x right = patient left, y up = anterior
    side: str  # right | left | midline (the patient's)
    ap: str  # anterior | posterior | central
    landmark: str  # spine | rib | pelvis | skull | soft tissue

    @property
    def position(self) -> str:
        """e.g. 'right posterior near the spine', 'midline in soft tissue'."""
        where = self.side if self.ap == "central" else f"{self.side} {self.ap}"
        near = "in soft tissue" if self.landmark == "soft tissue" else f"near the {self.landmark}"
        return f"{where} {near}"


@dataclass(frozen=True)
class TraceExtent:
    """Where a metal trace lies in the sinogram."""

    views_covered: int
    n_views: int
    channel_min: int
    channel_max: int
    n_channels: int
    mean_width_channels: float

    @property
    def detector_fraction(self) -> float:
        """Fraction of the detector between the outermost trace channels."""
        if self.views_covered == 0:
            return 0.0
        return (self.channel_max - self.channel_min + 1) / self.n_channels


@dataclass(frozen=True)
class ImageQSPD:
    quantity: int
    objects: tuple[MetalObject, ...]
    description: str = ""


@dataclass(frozen=True)
class SinogramQSPD:
    quantity: int
    objects: tuple[MetalObject, ...]
    trace: TraceExtent
    description: str = ""


@dataclass(frozen=True)
class RenderedTuple:
    text: str
    report: TokenReport
    compaction: int = 0  # 0 = full template; see the module docstring
    fields: dict = field(default_factory=dict, repr=False)


def metal_objects(mask: np.ndarray, geometry: FanBeamGeometry | str, reference_hu: np.ndarray | None = None,
                  anatomy_hint: str | None = None, anatomy: Anatomy | None = None,
                  reference_has_metal: bool = False) -> tuple[MetalObject, ...]:
    """The connected metal objects of an image-domain mask with size and position, largest first.

    Positions are relative to the body in ``reference_hu`` (X_ref), or pass a precomputed ``anatomy``. With
    X_ma as the reference (clinical data) set ``reference_has_metal``: the metal and 5 mm around it are then
    excluded from the bone search."""
    g = get_geometry(geometry)
    m = np.asarray(mask) > 0.5
    if m.shape != g.image_shape:
        raise ValueError(f"mask must have shape {g.image_shape} for geometry {g.name!r}, got {m.shape}")
    if anatomy is None:
        if reference_hu is None:
            raise ValueError("metal_objects needs reference_hu (X_ref or X_ma) or a precomputed anatomy")
        ring = None
        if reference_has_metal and m.any():
            ring = ndimage.binary_dilation(m, iterations=max(1, round(5.0 / g.pixel_size)))
        anatomy = analyse_anatomy(reference_hu, g, anatomy_hint, exclude=ring)
    lab, n = ndimage.label(m)
    X, Y = world_grid(g)
    objs = []
    for k in range(1, n + 1):
        sel = lab == k
        area = float(sel.sum()) * g.pixel_size**2
        cx, cy = float(X[sel].mean()), float(Y[sel].mean())
        objs.append(MetalObject(area, float(2.0 * np.sqrt(area / np.pi)), (cx, cy), anatomy.frame.side(cx),
                                anatomy.frame.ap(cy), anatomy.nearest_landmark(sel, g.pixel_size)))
    return tuple(sorted(objs, key=lambda o: (-o.area_mm2, o.centroid_mm)))


def trace_extent(trace: np.ndarray) -> TraceExtent:
    """Views covered, channel range and mean width of a (V, C) binary metal trace (paper Eq. 1's M_s)."""
    t = np.asarray(trace) > 0.5
    if t.ndim != 2:
        raise ValueError(f"trace must be a 2-D (V, C) array, got shape {t.shape}")
    views = t.any(axis=1)
    if not views.any():
        return TraceExtent(0, t.shape[0], 0, 0, t.shape[1], 0.0)
    chans = np.flatnonzero(t.any(axis=0))
    return TraceExtent(int(views.sum()), t.shape[0], int(chans.min()), int(chans.max()), t.shape[1],
                       float(t[views].sum(axis=1).mean()))


def image_qspd(mask, geometry, reference_hu=None, anatomy_hint=None, description: str = "",
               anatomy: Anatomy | None = None) -> ImageQSPD:
    """Q, S, P of the image-domain metal (D = ``description`` from the captioner)."""
    objs = metal_objects(mask, geometry, reference_hu, anatomy_hint, anatomy)
    return ImageQSPD(len(objs), objs, description)


def sinogram_qspd(mask, trace, geometry, reference_hu=None, anatomy_hint=None, description: str = "",
                  anatomy: Anatomy | None = None) -> SinogramQSPD:
    """Q and S from the image mask (objects overlap in the trace), P from the trace's extent."""
    objs = metal_objects(mask, geometry, reference_hu, anatomy_hint, anatomy)
    return SinogramQSPD(len(objs), objs, trace_extent(trace), description)


def description_from_reply(reply: str) -> str:
    """The ``description:`` field of a tuple answer (P2/P4 ask for that form), else the whole reply."""
    m = re.search(r"description\s*:\s*(.+)", reply, flags=re.IGNORECASE | re.DOTALL)
    text = (m.group(1) if m else reply).strip()
    return re.sub(r"\s+", " ", text).rstrip(" .;")


def format_mm(x: float) -> str:
    """3 significant-ish digits: 12 mm, 6.1 mm."""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _render_objects(objs, level: int, sinogram: bool) -> tuple[str, str]:
    shown = list(objs) if level < 2 else list(objs[:2])
    rest = len(objs) - len(shown)
    if sinogram:
        size = ", ".join(f"{format_mm(o.diameter_mm)} mm" for o in shown) + " wide"
    elif level >= 1:
        size = ", ".join(f"{format_mm(o.diameter_mm)} mm" for o in shown)
    else:
        size = ", ".join(f"{o.area_mm2:.0f} mm2 ({format_mm(o.diameter_mm)} mm)" for o in shown)
    pos = ", ".join(o.position for o in shown)
    if rest:
        size += f" +{rest} smaller"
        pos += f" +{rest} more"
    return size, pos


def _render(q, level: int) -> str:
    desc = q.description.strip() or "none given"
    if isinstance(q, SinogramQSPD):
        t = q.trace
        if q.quantity == 0:
            return f"metal trace: quantity 0; no trace; description: {desc}"
        size, _ = _render_objects(q.objects, level, sinogram=True)
        pos = (f"{t.views_covered}/{t.n_views} views, channels {t.channel_min}-{t.channel_max} "
               f"({100 * t.detector_fraction:.0f}% of the detector)")
        return f"metal trace: quantity {q.quantity}; size {size}; position {pos}; description: {desc}"
    if q.quantity == 0:
        return f"metal: quantity 0; no implant; description: {desc}"
    size, pos = _render_objects(q.objects, level, sinogram=False)
    return f"metal: quantity {q.quantity}; size {size}; position {pos}; description: {desc}"


def render_tuple(q: ImageQSPD | SinogramQSPD, context_length: int = CONTEXT_LENGTH) -> RenderedTuple:
    """The fixed QSPD template, compacted step by step until it fits ``context_length`` CLIP tokens."""
    first = _render(q, 0)
    n0 = clip_token_count(first)
    for level in (0, 1, 2):
        text = first if level == 0 else _render(q, level)
        n = clip_token_count(text)
        if n <= context_length:
            if level:
                log.info("QSPD tuple compacted (step %d) to fit %d tokens: %d -> %d", level, context_length, n0, n)
            return RenderedTuple(text, TokenReport(n, n0, False, context_length), level)
    # step 3: the description gives way word by word; Q, S, P (from the masks) are kept whole
    head = text[: text.index("description:") + len("description:")]
    words = text[len(head):].split()
    lo, hi = 0, len(words)
    while lo < hi:  # the longest description prefix that fits
        mid = (lo + hi + 1) // 2
        if clip_token_count(" ".join([head, *words[:mid]])) <= context_length:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join([head, *words[:lo]])
    if clip_token_count(text) > context_length:  # Q, S, P alone too long: a plain cut (reported)
        text, _ = fit_clip_context(text, context_length, what="QSPD tuple")
    n = clip_token_count(text)
    log.warning("QSPD tuple truncated to fit CLIP's %d-token context: %d -> %d tokens (description cut to %d of "
                "%d words)", context_length, n0, n, lo, len(words))
    return RenderedTuple(text, TokenReport(n, n0, True, context_length), 3)
