"""The perceptual indicators PI_q and PI_s of the paper (§III-D, Eq. 18-19, Fig. 7, Table III).

For one clean slice j the simulator gives a *sweep*: the same anatomy with a growing number of metal objects
(quantity) or one object of growing size. A MAR method restores every member; LP compares each restoration
with the metal-free reference:

* Eq. 18, quantity: LP_q = (1 / N_q) sum_i LP_q^(i) + LP_q(global), the mean local LPIPS over the N_q metal
  objects plus the global LPIPS; PI_q = mean over consecutive members of (LP_q[k] - LP_q[k-1]) /
  (N_q[k] - N_q[k-1]).
* Eq. 19, size: LP_s = LP_s(local, around the largest object) + LP_s(global); PI_s = mean over consecutive
  members of (LP_s[k] - LP_s[k-1]) / (A_s[k] - A_s[k-1]), A_s the area of the largest object.

Both are averaged over the N_s slices: PI = (1 / N_s) sum_j PI(j). The paper writes a single sum over j with
the j-1 member inside it; we read it as the mean difference quotient of each sweep (a sweep of K members has
K - 1 of them), then the mean over slices. Lower PI = the method's LPIPS depends less on the metal.

Choices the paper leaves open, stated here once:

* The local region (Fig. 7's boxes) is :class:`LocalRegion`: a square of ``side_px`` pixels centred on the
  object's centroid, shifted to stay inside the image.
* Regions or images smaller than ``min_side_px`` are upsampled bilinearly to it before the distance, because
  AlexNet-LPIPS needs at least 32 px (``metrics.lpips.LPIPS_MIN_SIDE_PX``).
* With ``metal_mask`` the metal pixels of the restoration take the reference's values first (the reference has
  no metal; the conventions of ``metrics.image``).
* LP values are multiplied by :data:`LPIPS_SCALE` (the paper's tables report LPIPS x 100) before differencing;
  the unit of A_s is whatever the caller passes (``eval.sweeps`` uses mm^2). The paper states neither the
  region size nor the area unit, so PI_s values are comparable between methods here, not with Table III.

The LPIPS function is injected (``distance(x, ref) -> (N,)`` on (N, 1, h, w) HU tensors, e.g.
:class:`dudocrop.metrics.lpips.LPIPSMetric`), so the arithmetic can be tested with a stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dudocrop.checks import check_tensor
from dudocrop.metrics.image import _check_mask

__all__ = [
    "LOCAL_REGIONS",
    "LPIPS_SCALE",
    "Distance",
    "LocalRegion",
    "get_local_region",
    "local_lp",
    "lp_quantity",
    "lp_size",
    "metal_objects",
    "pi_q",
    "pi_s",
    "sensitivity",
]

#: Tables II-V report LPIPS x 100; PI_q and PI_s difference LP in the same units.
LPIPS_SCALE = 100.0

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LocalRegion:
    """The local region of a metal object in Eq. 18-19: a ``side_px`` x ``side_px`` square centred on the
    object's centroid (clipped to the image side, shifted inside the image); anything narrower than
    ``min_side_px`` is upsampled bilinearly to that size before the distance (AlexNet needs >= 32 px)."""

    side_px: int = 64
    min_side_px: int = 64

    def __post_init__(self) -> None:
        for f in ("side_px", "min_side_px"):
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"LocalRegion.{f} must be an int >= 1, got {v!r}")

    def window(self, centroid_rc: Sequence[float], image_hw: Sequence[int]) -> tuple[slice, slice]:
        """(row slice, column slice) of the region around ``centroid_rc`` = (row, col) in pixels."""
        try:
            r, c = (float(v) for v in centroid_rc)
        except (TypeError, ValueError):
            raise ValueError(f"centroid must be a (row, col) pair of pixel coordinates, got {centroid_rc!r}") from None
        H, W = (int(v) for v in image_hw)
        if not (math.isfinite(r) and math.isfinite(c) and -0.5 <= r <= H - 0.5 and -0.5 <= c <= W - 0.5):
            raise ValueError(f"centroid (row, col) must lie inside the {H} x {W} image, got {centroid_rc!r}")
        sh, sw = min(self.side_px, H), min(self.side_px, W)
        r0 = min(max(math.floor(r + 0.5) - sh // 2, 0), H - sh)
        c0 = min(max(math.floor(c + 0.5) - sw // 2, 0), W - sw)
        return slice(r0, r0 + sh), slice(c0, c0 + sw)


#: ``paper``: 64 px (about 50 mm) on the 512^2 grids; ``tiny``: 16 px on the 64^2 test grid (same fraction of
#: the field of view). Our choice: the paper does not give the region's size.
LOCAL_REGIONS: dict[str, LocalRegion] = {"paper": LocalRegion(64, 64), "tiny": LocalRegion(16, 64)}


def get_local_region(name_or_region: str | LocalRegion) -> LocalRegion:
    if isinstance(name_or_region, LocalRegion):
        return name_or_region
    try:
        return LOCAL_REGIONS[name_or_region]
    except (KeyError, TypeError):
        raise ValueError(f"unknown local region {name_or_region!r}; presets: {', '.join(LOCAL_REGIONS)}") from None


# ---- inputs ----------------------------------------------------------------------------------------------


def _slice_image(x, name: str) -> torch.Tensor:
    """(H, W) or (1, 1, H, W) -> (1, 1, H, W) float tensor."""
    if isinstance(x, np.ndarray | torch.Tensor) and x.ndim == 2:
        x = x[None, None]
    return check_tensor(x, name, ndim=4, shape=(1, 1, None, None))


def _prepare(x, ref, metal_mask) -> tuple[torch.Tensor, torch.Tensor]:
    x = _slice_image(x, "x")
    ref = _slice_image(ref, "ref")
    if ref.shape != x.shape:
        raise ValueError(f"ref must have x's shape {tuple(x.shape)}, got {tuple(ref.shape)}")
    ref = ref.to(x.device, x.dtype)
    if metal_mask is not None:
        if isinstance(metal_mask, np.ndarray | torch.Tensor) and metal_mask.ndim == 2:
            metal_mask = metal_mask[None, None]
        m = _check_mask(metal_mask, "metal_mask", tuple(x.shape), x.device)
        x = torch.where(m, ref, x)  # the reference has no metal: score the method around it, not the implant
    return x, ref


def _fit(t: torch.Tensor, min_side: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    if min(h, w) >= min_side:
        return t
    s = min_side / min(h, w)
    size = (max(min_side, round(h * s)), max(min_side, round(w * s)))
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _distance(distance: Distance, a: torch.Tensor, b: torch.Tensor, region: LocalRegion) -> torch.Tensor:
    if not callable(distance):
        raise ValueError(f"distance must be a callable (x, ref) -> (N,) tensor, got {type(distance).__name__}")
    a, b = _fit(a, region.min_side_px), _fit(b, region.min_side_px)
    d = torch.as_tensor(distance(a, b)).reshape(-1).to(torch.float64)
    if d.numel() != a.shape[0]:
        raise ValueError(f"distance must return one value per image ({a.shape[0]}), got {d.numel()}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError("distance returned NaN or inf")
    return d


def _centroids(centroids) -> list[tuple[float, float]]:
    if isinstance(centroids, np.ndarray | torch.Tensor):
        centroids = np.asarray(centroids, dtype=np.float64).reshape(-1, 2).tolist()
    if not isinstance(centroids, Sequence) or isinstance(centroids, str) or len(centroids) == 0:
        raise ValueError(f"centroids must be a non-empty sequence of (row, col) pixel pairs, got {centroids!r}")
    return [tuple(c) for c in centroids]


# ---- LP of one restoration (first lines of Eq. 18 and Eq. 19) ------------------------------------------


def local_lp(x, ref, centroids, distance: Distance, region: str | LocalRegion = "paper",
             metal_mask=None) -> torch.Tensor:
    """Local LPIPS LP^(i) of each object i: ``distance`` between the :class:`LocalRegion` of ``x`` and of
    ``ref`` around centroid i ((row, col) px); (n_objects,) float64 (unscaled)."""
    region = get_local_region(region)
    x, ref = _prepare(x, ref, metal_mask)
    hw = tuple(x.shape[-2:])
    boxes = [region.window(c, hw) for c in _centroids(centroids)]
    a = torch.cat([x[..., r, c] for r, c in boxes])
    b = torch.cat([ref[..., r, c] for r, c in boxes])
    return _distance(distance, a, b, region)


def lp_quantity(x, ref, centroids, distance: Distance, region: str | LocalRegion = "paper",
                metal_mask=None) -> float:
    """Eq. 18, first line: LP_q = (1 / N_q) sum_i LP_q^(i) + LP_q(global), N_q = len(centroids), for one
    restoration ``x`` (HU, (H, W) or (1, 1, H, W)) against the metal-free ``ref`` (unscaled LPIPS)."""
    region = get_local_region(region)
    x, ref = _prepare(x, ref, metal_mask)
    local = local_lp(x, ref, centroids, distance, region)
    return float(local.mean() + _distance(distance, x, ref, region)[0])


def lp_size(x, ref, centroid, distance: Distance, region: str | LocalRegion = "paper", metal_mask=None) -> float:
    """Eq. 19, first line: LP_s = LP_s(local, around the largest object's ``centroid``) + LP_s(global)."""
    region = get_local_region(region)
    x, ref = _prepare(x, ref, metal_mask)
    local = local_lp(x, ref, [centroid], distance, region)
    return float(local[0] + _distance(distance, x, ref, region)[0])


# ---- difference quotients (second lines of Eq. 18 and Eq. 19) ------------------------------------------


def sensitivity(lp: Sequence[float], steps: Sequence[float]) -> float:
    """One sweep's mean difference quotient: mean_k (lp[k] - lp[k-1]) / (steps[k] - steps[k-1]), k = 1..K-1;
    ``steps`` (metal counts or areas) strictly increasing, K >= 2."""
    try:
        v = np.asarray(lp, dtype=np.float64).reshape(-1)
        s = np.asarray(steps, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"lp and steps must be sequences of numbers, got {lp!r} and {steps!r}") from None
    if v.size < 2 or v.size != s.size:
        raise ValueError(f"lp and steps must have the same length >= 2 (one per sweep member), got {v.size} and "
                         f"{s.size}")
    if not (np.isfinite(v).all() and np.isfinite(s).all()):
        raise ValueError("lp and steps must be finite")
    ds = np.diff(s)
    if not (ds > 0).all():
        raise ValueError(f"steps must be strictly increasing (metal counts or areas in sweep order), got {s.tolist()}")
    return float(np.mean(np.diff(v) / ds))


def _pi(lp_per_slice, steps_per_slice, scale: float, what: str) -> float:
    if isinstance(lp_per_slice, Mapping) or isinstance(steps_per_slice, Mapping):
        raise ValueError(f"{what}: pass sequences (one entry per slice), not mappings")
    if not (isinstance(lp_per_slice, Sequence) and isinstance(steps_per_slice, Sequence)
            and len(lp_per_slice) == len(steps_per_slice) >= 1):
        raise ValueError(f"{what}: lp_per_slice and steps must be sequences with one entry per slice (N_s >= 1)")
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    per = [sensitivity(np.asarray(lp, dtype=np.float64) * scale, st)
           for lp, st in zip(lp_per_slice, steps_per_slice)]
    return float(np.mean(per))


def pi_q(lp_per_slice: Sequence[Sequence[float]], counts_per_slice: Sequence[Sequence[int]],
         scale: float = LPIPS_SCALE) -> float:
    """Eq. 18, second line: PI_q = (1 / N_s) sum_j mean_k (LP_q[k] - LP_q[k-1]) / (N_q[k] - N_q[k-1]), with
    ``lp_per_slice[j]`` the :func:`lp_quantity` values of slice j's members and ``counts_per_slice[j]`` their
    metal counts; LP scaled by ``scale`` (LPIPS x 100 as in Table III)."""
    return _pi(lp_per_slice, counts_per_slice, scale, "pi_q")


def pi_s(lp_per_slice: Sequence[Sequence[float]], areas_per_slice: Sequence[Sequence[float]],
         scale: float = LPIPS_SCALE) -> float:
    """Eq. 19, second line: PI_s = (1 / N_s) sum_j mean_k (LP_s[k] - LP_s[k-1]) / (A_s[k] - A_s[k-1]), with
    ``lp_per_slice[j]`` the :func:`lp_size` values of slice j's members and ``areas_per_slice[j]`` the areas of
    their largest objects; LP scaled by ``scale``."""
    return _pi(lp_per_slice, areas_per_slice, scale, "pi_s")


# ---- metal objects from a mask (when the objects are not known) ----------------------------------------


def metal_objects(metal_mask) -> list[tuple[tuple[float, float], int]]:
    """Connected metal regions of a binary mask ((H, W) or (1, 1, H, W); 8-connected): [((row, col) centroid,
    area in px)], largest first. For data without the simulator's object list (Fig. 5: the masks give the
    quantity, size and position); touching objects merge into one region."""
    m = metal_mask
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    if not isinstance(m, np.ndarray):
        raise ValueError(f"metal_mask must be a numpy array or torch tensor, got {type(m).__name__}")
    if m.ndim == 4 and m.shape[:2] == (1, 1):
        m = m[0, 0]
    if m.ndim != 2:
        raise ValueError(f"metal_mask must have shape (H, W) or (1, 1, H, W), got {m.shape}")
    m = m > 0.5 if m.dtype != np.bool_ else m
    lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    idx = list(range(1, n + 1))
    areas = ndimage.sum_labels(np.ones_like(lab), lab, idx)
    cents = ndimage.center_of_mass(m, lab, idx)
    out = [((float(c[0]), float(c[1])), int(a)) for c, a in zip(cents, areas)]
    return sorted(out, key=lambda t: -t[1])
