"""Prompt evaluation by positive / negative words (paper §IV-D, Fig. 5-6).

"Positive words refer to those that accurately describe the organs and structures in CT images, while negative
words are defined as those that incorrectly or inaccurately describe the images" (§IV-D). Here the truth is the
simulator's (or the shard's): metal count, sizes and positions from the mask, the trace from the sinogram
mask, anatomy from the reference image, streak severity from the true residual and streak direction from the
implants' layout. A caption is read claim by claim; each fact-bearing word (a number with its unit, a side, a
landmark, an organ, a severity, a direction, a metal word) counts +1 if true and -1 if false; words that
state nothing checkable count neither way.

Claims and their truth:

* count ("quantity: 2", "two implants", "no metal") — connected components of the mask;
* size ("6.0 mm", "28 mm2", "12 mm wide") — the nearest object's equivalent diameter / area, within
  max(25 %, one pixel); body size "W x H mm" within 10 %;
* position ("right", "left", "midline", "anterior", "posterior") — some object is there (patient side,
  radiological convention); "near the spine/rib/pelvis/skull" — some object is near that bone;
* sinogram extent ("channels a-b", "n/V views", "x% of the detector", "x% of the views") — the trace (tuple
  views) or the body's shadow (content views), within max(3 channels, 2 % of the detector) / 5 points;
* anatomy words (lungs, heart, liver, kidney, bladder, brain, skull, spine, ribs, pelvis, fat, bone, region
  names) — the region and tissue fractions of the reference image;
* metal / artifact words — the view shows metal (a clean X_ref / Y_ref does not);
* severity (mild / moderate / severe) — the true residual's robust spread; direction (horizontal / vertical /
  diagonal / radial) — the line through the two largest implants (one implant: radial);
* modality (CT, sinogram; MRI, ultrasound, radiograph are wrong).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from dudocrop.captions import analysis as an
from dudocrop.captions.captioning import record_views
from dudocrop.captions.engine import CaptionEngine, CaptionRequest
from dudocrop.captions.qspd import TraceExtent, metal_objects, trace_extent
from dudocrop.ct.geometry import get_geometry

NUMBER_WORDS = {"no": 0, "zero": 0, "one": 1, "single": 1, "a single": 1, "two": 2, "three": 3, "four": 4,
                "five": 5, "six": 6}
#: organ / region words -> regions where a slice may show them
ORGAN_REGIONS = {
    "brain": {"head"}, "head": {"head"}, "cranial": {"head"}, "ventricle": {"head"}, "ventricles": {"head"},
    "thorax": {"thorax"}, "chest": {"thorax"}, "thoracic": {"thorax"}, "heart": {"thorax"}, "cardiac": {"thorax"},
    "mediastinum": {"thorax"}, "mediastinal": {"thorax"}, "aorta": {"thorax", "abdomen"},
    "abdomen": {"abdomen"}, "abdominal": {"abdomen"}, "liver": {"abdomen", "thorax"}, "spleen": {"abdomen"},
    "kidney": {"abdomen"}, "kidneys": {"abdomen"}, "stomach": {"abdomen", "thorax"}, "pancreas": {"abdomen"},
    "bowel": {"abdomen", "pelvis"}, "intestine": {"abdomen", "pelvis"}, "intestines": {"abdomen", "pelvis"},
    "bladder": {"pelvis"}, "rectum": {"pelvis"}, "uterus": {"pelvis"}, "prostate": {"pelvis"},
}
LANDMARK_WORDS = {"spine": "spine", "spinal": "spine", "vertebra": "spine", "vertebral": "spine",
                  "vertebrae": "spine", "rib": "rib", "ribs": "rib", "pelvis": "pelvis", "pelvic": "pelvis",
                  "hip": "pelvis", "hips": "pelvis", "iliac": "pelvis", "sacrum": "pelvis", "femoral": "pelvis",
                  "skull": "skull", "cranium": "skull"}
METAL_WORDS = {"metal", "metallic", "implant", "implants", "prosthesis", "prostheses", "screw", "screws", "streak",
               "streaks", "artifact", "artifacts", "artefact", "artefacts", "trace", "traces"}
SEVERITY_WORDS = {"mild": "mild", "slight": "mild", "minor": "mild", "faint": "mild", "moderate": "moderate",
                  "severe": "severe", "strong": "severe", "heavy": "severe", "extensive": "severe"}
DIRECTION_WORDS = {"horizontal": "horizontal", "vertical": "vertical", "diagonal": "diagonal",
                   "oblique": "diagonal", "radial": "radial", "star": "radial", "starburst": "radial"}
WRONG_MODALITY = ("mri", "magnetic resonance", "ultrasound", "radiograph", "photograph", "x-ray image")


@dataclass(frozen=True)
class GroundTruth:
    """What is true about one view of one slice."""

    view: str
    domain: str  # image | sinogram
    kind: str  # content | tuple
    metal_visible: bool
    count: int
    diameters_mm: tuple[float, ...]
    areas_mm2: tuple[float, ...]
    sides: frozenset
    aps: frozenset
    metal_landmarks: frozenset
    region: str
    landmarks: frozenset
    has_lungs: bool
    fat: bool
    bone: bool
    body_mm: tuple[float, float]
    severity: str | None
    direction: str
    trace: TraceExtent
    trace_overlap: bool
    body_channels: tuple[int, int, float]  # first, last channel of the body's shadow, detector fraction
    pixel_mm: float
    n_channels: int


def ground_truth(record: dict, view: str) -> GroundTruth:
    """The truth for a caption of ``view`` of ``record`` (needs the reference: synthetic / AAPM data)."""
    if record.get("X_ref") is None:
        raise ValueError(f"record {record.get('case_id')}: P/N scoring needs X_ref / Y_ref (simulated data)")
    g = get_geometry(record["geometry"])
    mask = np.asarray(record["metal_mask"]) > 0.5
    anat = an.analyse_anatomy(record["X_ref"], g, record["anatomy"])
    objs = metal_objects(mask, g, anatomy=anat)
    ring = ndimage.binary_dilation(mask, iterations=max(1, round(5.0 / g.pixel_size))) if mask.any() else mask
    residual = np.asarray(record["X_ma"], np.float64) - np.asarray(record["X_ref"], np.float64)
    streaks = an.measure_streaks(residual, anat.body & ~ring)
    if len(objs) >= 2:
        direction = an.line_direction(objs[0].centroid_mm, objs[1].centroid_mm)
    else:
        direction = "radial"
    tr = np.asarray(record["metal_trace"]) > 0.5
    counts, _ = an.runs_per_view(tr)
    cols = np.flatnonzero((np.asarray(record["Y_ref"]) > an.BODY_LINE_INTEGRAL).any(axis=0))
    body_ch = (int(cols.min()), int(cols.max()), (cols.max() - cols.min() + 1) / g.n_channels) if cols.size \
        else (0, 0, 0.0)
    domain = "image" if view.startswith("X") else "sinogram"
    kind = "content" if view in ("X_ref", "Y_ref") else "tuple"
    return GroundTruth(
        view=view, domain=domain, kind=kind, metal_visible=bool(objs) and view not in ("X_ref", "Y_ref"),
        count=len(objs), diameters_mm=tuple(o.diameter_mm for o in objs), areas_mm2=tuple(o.area_mm2 for o in objs),
        sides=frozenset(o.side for o in objs), aps=frozenset(o.ap for o in objs),
        metal_landmarks=frozenset(o.landmark for o in objs), region=anat.region, landmarks=frozenset(anat.landmarks),
        has_lungs=anat.has_lungs, fat=anat.fat_fraction > 0.02, bone=anat.bone_fraction > 0.005,
        body_mm=(anat.width_mm, anat.height_mm), severity=streaks.severity if objs else None, direction=direction,
        trace=trace_extent(tr), trace_overlap=len(objs) >= 2 and bool((counts[counts > 0] < len(objs)).any()),
        body_channels=body_ch, pixel_mm=g.pixel_size, n_channels=g.n_channels)


@dataclass
class PNScore:
    positive: int = 0
    negative: int = 0
    words: list = field(default_factory=list)  # (word, +1 | -1, why)

    def add(self, word: str, ok: bool, why: str) -> None:
        if ok:
            self.positive += 1
        else:
            self.negative += 1
        self.words.append((word, 1 if ok else -1, why))

    def __iadd__(self, other: PNScore) -> PNScore:
        self.positive += other.positive
        self.negative += other.negative
        self.words += other.words
        return self

    @property
    def ratio(self) -> float | None:
        """P/N (None when no negative word)."""
        return self.positive / self.negative if self.negative else None

    @property
    def precision(self) -> float | None:
        """P / (P + N): the share of checkable words that are true."""
        n = self.positive + self.negative
        return self.positive / n if n else None


def _close(x: float, truth: Sequence[float], rel: float, abs_tol: float) -> bool:
    return any(abs(x - t) <= max(rel * t, abs_tol) for t in truth)


def _negated(text: str, start: int) -> bool:
    """'no', 'without', 'not' or 'absent' within the two words before ``start``."""
    return re.search(r"\b(no|without|not|absent)\s+(?:[a-z-]+\s+)?$", text[max(0, start - 30): start]) is not None


def _near(text: str, start: int) -> bool:
    return re.search(r"\b(near|next to|adjacent to|beside|close to)\s+(?:the\s+)?$", text[max(0, start - 20): start]) \
        is not None


def score_caption(text: str, truth: GroundTruth) -> PNScore:
    """Positive / negative words of one caption against the truth (claims listed in the module docstring)."""
    s = PNScore()
    t = " " + re.sub(r"\s+", " ", text.lower()) + " "
    used = np.zeros(len(t), bool)  # characters already read as part of a claim

    def take(m):
        used[m.start():m.end()] = True

    # body size "W x H mm" (before single sizes, so its numbers are not read as implant sizes)
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s*x\s*(\d+(?:\.\d+)?)\s*mm", t):
        take(m)
        for val, ref in zip((float(m.group(1)), float(m.group(2))), truth.body_mm):
            s.add(f"{val:g} mm", abs(val - ref) <= 0.1 * ref, "body size")
    # sinogram extent
    for m in re.finditer(r"channels (\d+)\s*-\s*(\d+)", t):
        take(m)
        lo, hi = ((truth.trace.channel_min, truth.trace.channel_max) if truth.kind == "tuple"
                  else truth.body_channels[:2])
        tol = max(3, 0.02 * truth.n_channels)
        s.add(f"channel {m.group(1)}", abs(int(m.group(1)) - lo) <= tol, "first channel")
        s.add(f"channel {m.group(2)}", abs(int(m.group(2)) - hi) <= tol, "last channel")
    for m in re.finditer(r"(\d+(?:\.\d+)?)% of the detector", t):
        take(m)
        ref = truth.trace.detector_fraction if truth.kind == "tuple" else truth.body_channels[2]
        s.add(m.group(0), abs(float(m.group(1)) / 100 - ref) <= 0.05, "detector fraction")
    for m in re.finditer(r"(\d+(?:\.\d+)?)% of the views", t):
        take(m)
        s.add(m.group(0), abs(float(m.group(1)) / 100 - truth.trace.views_covered / truth.trace.n_views) <= 0.05,
              "views covered")
    for m in re.finditer(r"(\d+)\s*/\s*(\d+) views|all (\d+) views", t):
        take(m)
        n = int(m.group(1) or m.group(3))
        ref = truth.trace.views_covered if truth.kind == "tuple" else truth.trace.n_views
        s.add(m.group(0).strip(), abs(n - ref) <= max(2, 0.02 * truth.trace.n_views), "views covered")
    # counts
    num = r"(\d+|zero|one|two|three|four|five|six|a single|single|no)"
    for m in re.finditer(r"quantity\s*:?\s*(\d+|zero|one|two|three|four|five|six)", t):
        take(m)
        v = int(m.group(1)) if m.group(1).isdigit() else NUMBER_WORDS[m.group(1)]
        s.add(m.group(0), v == truth.count, "count")
    for m in re.finditer(num + r"\s+(?:\w+\s+){0,3}?(implants?|objects?|pieces?|inserts?|screws?|traces?)\b", t):
        if used[m.start(1)]:
            continue
        used[m.start(1):m.end(1)] = True  # the number only: "metal implants" still count as metal words
        w = m.group(1)
        v = int(w) if w.isdigit() else NUMBER_WORDS[w]
        s.add(m.group(0).strip(), v == truth.count, "count")
    # sizes
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s*mm2", t):
        if used[m.start()]:
            continue
        take(m)
        tol = truth.pixel_mm**2 * 2
        s.add(m.group(0), truth.count > 0 and _close(float(m.group(1)), truth.areas_mm2, 0.25, tol), "area")
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s*mm\b", t):
        if used[m.start()]:
            continue
        take(m)
        s.add(m.group(0), truth.count > 0 and _close(float(m.group(1)), truth.diameters_mm, 0.25, truth.pixel_mm),
              "diameter")
    # words
    for m in re.finditer(r"[a-z][a-z-]*", t):
        if used[m.start()]:
            continue
        w = m.group(0)
        neg = _negated(t, m.start())
        if w in ("right", "left", "midline") and truth.metal_visible and truth.domain == "image":
            if t[m.end():m.end() + 6] == " sides" or t[max(0, m.start() - 5):m.start()] == "both ":
                continue
            s.add(w, w in truth.sides, "implant side (patient)")
        elif w in ("anterior", "posterior") and truth.metal_visible and truth.domain == "image":
            s.add(w, w in truth.aps, "implant anterior/posterior")
        elif w in LANDMARK_WORDS:
            lm = LANDMARK_WORDS[w]
            near = _near(t, m.start())
            if near and truth.metal_visible:
                s.add(w, lm in truth.metal_landmarks, "implant near bone")
            elif lm == "pelvis" and not near:
                s.add(w, truth.region == "pelvis" or "pelvis" in truth.landmarks, "region / bone")
            else:
                s.add(w, (lm in truth.landmarks) != neg, "bone landmark")
        elif w in ("lung", "lungs", "aerated"):
            s.add(w, truth.has_lungs != neg, "lungs")
        elif w in ORGAN_REGIONS:
            s.add(w, (truth.region in ORGAN_REGIONS[w]) != neg, "organ / region")
        elif w in ("fat", "fatty"):
            s.add(w, truth.fat != neg, "fat")
        elif w in ("bone", "bones", "bony", "osseous"):
            s.add(w, truth.bone != neg, "bone")
        elif w in METAL_WORDS:
            s.add(w, truth.metal_visible != neg, "metal shown")
        elif w in SEVERITY_WORDS and truth.severity is not None and truth.metal_visible:
            s.add(w, SEVERITY_WORDS[w] == truth.severity, "streak severity")
        elif w in DIRECTION_WORDS and truth.metal_visible and truth.domain == "image":
            s.add(w, DIRECTION_WORDS[w] == truth.direction, "streak direction")
        elif w in ("overlap", "overlapping", "crossing", "cross") and truth.domain == "sinogram":
            s.add(w, truth.trace_overlap != neg, "traces overlap")
        elif w == "sinogram":
            s.add(w, truth.domain == "sinogram", "modality")
        elif w == "ct":
            s.add(w, True, "modality")
    for bad in WRONG_MODALITY:
        for _ in re.finditer(r"\b" + re.escape(bad) + r"\b", t):
            s.add(bad, False, "modality")
    return s


# ---- the Fig. 6 table ----------------------------------------------------------------------------------
#: (row name, prompt, qualified, tuple source) — Fig. 6(a): each prompt w/ and w/o qualifier on its usual view;
#: Fig. 6(b): tuple prompts on the residual vs the metal-affected view
CONDITIONS = [
    ("P1 qualified", "P1", True, "residual"), ("P1 no qualifier", "P1", False, "residual"),
    ("P2 qualified", "P2", True, "residual"), ("P2 no qualifier", "P2", False, "residual"),
    ("P3 qualified", "P3", True, "residual"), ("P3 no qualifier", "P3", False, "residual"),
    ("P4 qualified", "P4", True, "residual"), ("P4 no qualifier", "P4", False, "residual"),
    ("P2 on X_r", "P2", True, "residual"), ("P2 on X_ma", "P2", True, "ma"),
    ("P4 on Y_r", "P4", True, "residual"), ("P4 on Y_ma", "P4", True, "ma"),
]
_FIELD_OF = {"P1": "x_content", "P2": "x_tuple", "P3": "y_content", "P4": "y_tuple"}


def evaluate_prompts(records: Sequence[dict], engine: CaptionEngine, conditions=CONDITIONS) -> list[dict]:
    """P/N per condition over ``records`` with ``engine`` (§IV-D, Fig. 6): one engine call per condition."""
    rows = []
    for name, key, qualified, source in conditions:
        reqs, truths = [], []
        for r in records:
            view, arr = record_views(r, source)[_FIELD_OF[key]]
            reqs.append(CaptionRequest.create(key, arr, view, r["geometry"], r["anatomy"], qualified))
            truths.append(ground_truth(r, view))
        total = PNScore()
        for reply, truth in zip(engine.caption(reqs), truths):
            total += score_caption(reply, truth)
        rows.append({"condition": name, "prompt": key, "qualified": qualified,
                     "view": reqs[0].view if reqs else None, "captions": len(reqs),
                     "positive": total.positive, "negative": total.negative,
                     "pn_ratio": None if total.ratio is None else round(total.ratio, 3),
                     "precision": None if total.precision is None else round(total.precision, 3)})
    return rows
