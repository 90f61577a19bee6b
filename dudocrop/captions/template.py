"""The ``template`` caption engine: deterministic answers to P1-P4 computed from the view itself — the
embedded default that needs no weights (issue 4; stands in for LLaVA-v1.5-13b of §IV-A).

It sees what a VLM sees — one view and the prompt — but reads the view's numbers, and it uses exactly the
facts the prompt states:

* with the qualifier (§III-B, Fig. 5) it knows the anatomy metadata, the pixel size and channel pitch, and the
  radiological convention (image left = patient right);
* without it (the Fig. 6(a) ablation) it reads the picture as a photograph: sides in the image frame (so the
  patient's left/right come out swapped), 1 mm per pixel / channel, no channel indices, body region from HU
  statistics alone.

So its P/N difference between the two measures what the qualifier's facts are worth, not language-model
behaviour. Shown a residual (X_r, Y_r) it sees metal and streaks but no anatomy (no body, no bone landmarks);
shown X_ma / Y_ma it sees both, and anatomy counts as streaks (the Fig. 6(b) comparison).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from dudocrop.captions import analysis as an
from dudocrop.captions.engine import CaptionEngine, CaptionRequest
from dudocrop.captions.qspd import format_mm

TEMPLATE_VERSION = 1
#: Y_r above this (line integral) is metal trace: above the residual noise of two independent scans
TRACE_THRESHOLD = 0.2
#: channels of Y_ma standing this far above their view's running median (over 1/8 of the detector) are trace
OUTLIER_THRESHOLD = 0.5


class TemplateEngine(CaptionEngine):
    """Deterministic captions from HU statistics and masks estimated on the view (no weights)."""

    name = "template"

    def __init__(self, **kwargs):
        self.describe(**kwargs)  # rejects options: the answers depend on the view and the prompt only

    @classmethod
    def describe(cls, **kwargs) -> dict:
        if kwargs:
            raise ValueError(f"the template engine takes no options, got {sorted(kwargs)}")
        return {"engine": cls.name, "version": TEMPLATE_VERSION}

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        out = []
        for r in requests:
            fn = {"P1": _image_content, "P2": _image_tuple, "P3": _sino_content, "P4": _sino_tuple}[r.prompt.key]
            out.append(fn(r))
        return out


# ---- shared -------------------------------------------------------------------------------------
def _pixel_mm(r: CaptionRequest) -> float:
    return r.geometry.pixel_size if r.qualified else 1.0  # unqualified: a picture has no scale, 1 mm assumed


def _side(frame: an.BodyFrame, x: float, qualified: bool) -> str:
    s = frame.side(x)
    if qualified or s == "midline":
        return s
    return {"right": "left", "left": "right"}[s]  # the image's left read as "left"


def _metal_components(view: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(view >= an.METAL_HU)


# ---- P1: image content ----------------------------------------------------------------------------
def _image_content(r: CaptionRequest) -> str:
    hu = r.array
    g = r.geometry
    metal = hu >= an.METAL_HU
    ring = ndimage.binary_dilation(metal, iterations=max(1, round(5.0 / g.pixel_size))) if metal.any() else metal
    a = an.analyse_anatomy(hu, g, r.facts.anatomy if r.qualified else None, exclude=ring)
    if a.body_area_mm2 == 0:
        return "Empty field of view: air only, no body."
    scale = _pixel_mm(r) / g.pixel_size
    tissues = []
    if a.fat_fraction > 0.05:
        tissues.append("subcutaneous fat")
    if a.soft_fraction > 0.2:
        tissues.append("soft tissue" if a.region != "head" else "brain tissue")
    if a.has_lungs:
        tissues.append("aerated lungs on both sides")
    s1 = (f"Axial CT of the {a.region}: body about {a.width_mm * scale:.0f} x {a.height_mm * scale:.0f} mm with "
          f"{_join(tissues) or 'soft tissue'}.")
    bones = {"spine": "the spine posterior in the midline", "rib": "ribs along the body wall",
             "pelvis": "the pelvic bones laterally", "skull": "the skull around the brain"}
    parts = [bones[lm] for lm in a.landmarks]
    s2 = f"Bone: {_join(parts)}." if parts else "No dense bone."
    s3 = " A metal implant with streak artifacts." if metal.any() else ""
    return f"{s1} {s2}{s3}"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# ---- P2: image tuple ------------------------------------------------------------------------------
def _image_tuple(r: CaptionRequest) -> str:
    v = r.array
    g = r.geometry
    lab, n = _metal_components(v)
    metal = lab > 0
    ring = ndimage.binary_dilation(metal, iterations=max(1, round(5.0 / g.pixel_size))) if n else metal
    X, Y = an.world_grid(g)
    if r.view == "X_r":
        # a residual shows no anatomy: positions relative to the image centre, no bone landmarks
        frame = an.BodyFrame((0.0, 0.0), (g.fov_radius, g.fov_radius))
        anat = None
        region = (np.hypot(X, Y) < g.fov_radius) & ~ring
    else:
        anat = an.analyse_anatomy(v, g, r.facts.anatomy if r.qualified else None, exclude=ring)
        frame = anat.frame
        region = anat.body & ~ring
    px = _pixel_mm(r)
    objs = []
    for k in range(1, n + 1):
        sel = lab == k
        area = float(sel.sum()) * px * px
        cx, cy = float(X[sel].mean()), float(Y[sel].mean())
        where = _side(frame, cx, r.qualified)
        ap = frame.ap(cy)
        where = where if ap == "central" else f"{where} {ap}"
        if anat is not None:
            lm = anat.nearest_landmark(sel, g.pixel_size)
            where += " in soft tissue" if lm == "soft tissue" else f" near the {lm}"
        objs.append((area, 2 * np.sqrt(area / np.pi), where))
    objs.sort(key=lambda o: -o[0])
    st = an.measure_streaks(v, region)
    if not objs:
        return f"quantity: 0; size: none; position: none; description: {st.severity} streaks, no metal seen."
    desc = f"{st.severity} bright and dark streak artifacts, {st.direction}"
    if len(objs) >= 2:
        desc += ", dark band between the implants"
    return (f"quantity: {len(objs)}; size: {', '.join(f'{format_mm(o[1])} mm' for o in objs)}; "
            f"position: {', '.join(o[2] for o in objs)}; description: {desc}.")


# ---- P3: sinogram content -------------------------------------------------------------------------
def _coverage(y: np.ndarray) -> tuple[int, int, float]:
    cols = np.flatnonzero((y > an.BODY_LINE_INTEGRAL).any(axis=0))
    if cols.size == 0:
        return 0, 0, 0.0
    return int(cols.min()), int(cols.max()), (cols.max() - cols.min() + 1) / y.shape[1]


def _sino_content(r: CaptionRequest) -> str:
    y = r.array
    a, b, f = _coverage(y)
    if f == 0:
        return "Empty sinogram: no attenuation."
    where = (f"channels {a}-{b} ({100 * f:.0f}% of the detector) in all {y.shape[0]} views" if r.qualified
             else f"{100 * f:.0f}% of the detector in every view")
    subject = f"the {r.facts.anatomy}" if r.qualified else "a body"
    s1 = f"Sinogram of {subject}: the object covers {where}, peak line integral {float(y.max()):.1f}."
    bright = an.sinogram_outliers(y, max(3, y.shape[1] // 8), OUTLIER_THRESHOLD).mean()
    s2 = (" Bright sinusoidal tracks come from dense bone." if bright > 0.002
          else " Smooth, without bright sinusoidal tracks.")
    return s1 + s2


# ---- P4: sinogram tuple ---------------------------------------------------------------------------
def _sino_tuple(r: CaptionRequest) -> str:
    V, C = r.array.shape
    y = ndimage.median_filter(r.array, size=3, mode="nearest")  # single-channel noise spikes are not traces
    if r.view == "Y_r":
        trace = y > TRACE_THRESHOLD
    else:
        trace = an.sinogram_outliers(y, max(3, C // 8), OUTLIER_THRESHOLD)
    counts, runs = an.runs_per_view(trace)
    covered = counts > 0
    if not covered.any():
        return "quantity: 0; size: none; position: none; description: no metal trace seen."
    q = int(np.ceil(np.percentile(counts[covered], 90)))  # robust to views where traces overlap or noise
    widths = [e - s + 1 for v in np.flatnonzero(counts == q) for s, e in runs[v]]
    pitch = r.geometry.channel_pitch_at_iso if r.qualified else 1.0
    w_mm = float(np.median(widths)) * pitch if widths else 0.0
    cols = np.flatnonzero(trace.any(axis=0))
    frac = (cols.max() - cols.min() + 1) / C
    pos = (f"{int(covered.sum())}/{V} views, channels {cols.min()}-{cols.max()} ({100 * frac:.0f}% of the detector)"
           if r.qualified else f"{100 * covered.mean():.0f}% of the views, {100 * frac:.0f}% of the detector")
    overlap = q >= 2 and bool((counts[covered] < q).any())
    desc = f"{q} bright sinusoidal trace{'s' if q > 1 else ''}" + (", overlapping in some views" if overlap else "")
    return f"quantity: {q}; size: {format_mm(w_mm)} mm wide; position: {pos}; description: {desc}."
