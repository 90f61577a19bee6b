"""Normalized metal artifact reduction (NMAR; Meyer, Raupach, Lell, Schmidt & Kachelrieß, Med. Phys. 37(10),
5482-5493, 2010), as in REFERENCE §3 and the public NMAR code of the SynDeepLesion line (InDuDoNet / ACDNet).

1. LI image (``classic.li``) with the metal pixels set to water.
2. Thresholds from a 3-class k-means of its values (air / soft tissue / bone, started at 0, mu_w and 2 mu_w);
   the tissue/bone threshold is at least +200 HU (the public code's ``max(t, 1.2 mu_w)``).
3. Prior: the image smoothed by a 5 x 5 Gaussian (sigma = 1 pixel) and segmented with those thresholds: air -> 0,
   soft tissue -> mu_water, bone keeps its (smoothed) value. (The public code smooths before it segments; the
   thresholds come from the unsmoothed LI image.)
4. p_prior = max(FP(prior), 0) + 1e-6; the measured sinogram is divided by it, the quotient is linearly
   interpolated across the metal trace (the same routine as LI, :func:`classic.li.interpolate_trace`), and
   multiplied back. Dividing by the prior flattens the sinogram where the prior explains it (bone edges,
   the body outline), so the interpolation only has to bridge the small residual, not the bone's own structure.
   Safeguard (not in the paper): where the prior explains less than 1 / ``MAX_QUOTIENT`` of a measured ray
   next to the trace (metal at the body's edge, where the LI image segments tissue as air, so FP(prior) ~ 0
   while the measurement is not), the quotient there is meaningless and, interpolated into rays where the prior
   is large, would multiply up to thousands of HU. Such rays get quotient 1, and the interpolated share of them
   across the trace blends the result towards LI, so NMAR falls back to LI exactly where its prior fails.
5. FBP, then the metal pixels are reinserted from X_ma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dudocrop.classic.li import _check_inputs, _operator, interpolate_trace, reinsert_metal
from dudocrop.ct.geometry import FanBeamGeometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.units import MU_WATER, hu_to_mu, mu_to_hu

__all__ = ["BONE_MIN_HU", "MAX_QUOTIENT", "PRIOR_EPS", "kmeans_thresholds", "nmar", "nmar_prior",
           "normalized_interpolation"]

#: REFERENCE §3: the bone class starts at +200 HU at the lowest (1.2 mu_water in the public code).
BONE_MIN_HU = 200.0
#: REFERENCE §3: p_prior = max(FP(prior), 0) + 1e-6 keeps the normalisation finite on air rays.
PRIOR_EPS = 1e-6
#: a trace neighbour whose quotient Y / p_prior exceeds this has a prior that misses the tissue (see step 4)
MAX_QUOTIENT = 2.0
#: Meyer 2010 / public code: 5 x 5 Gaussian, sigma = 1 pixel.
SMOOTH_SIZE, SMOOTH_SIGMA = 5, 1.0
#: k-means starts: air, water, twice water (0, mu_w, 2 mu_w), in HU.
_KMEANS_INIT_HU = (-1000.0, 0.0, 1000.0)


def kmeans_thresholds(x_hu: torch.Tensor, max_iter: int = 100) -> torch.Tensor:
    """Air/tissue and tissue/bone thresholds (N, 2) in HU from a 3-class 1-D k-means (Lloyd) of each slice.

    In one dimension the k-means classes are intervals of the sorted values, so each Lloyd step is two binary
    searches and prefix sums, and the thresholds are the midpoints between the converged centres. The bone
    threshold is raised to :data:`BONE_MIN_HU` when lower (an image with little bone would otherwise split soft
    tissue in two). An empty class keeps its previous centre. Started at (-1000, 0, 1000) HU = (0, mu_w, 2 mu_w).
    """
    v = x_hu.detach().flatten(1).to(torch.float64).sort(-1).values
    n, P = v.shape
    csum = F.pad(v.cumsum(-1), (1, 0))  # csum[:, k] = sum of the k smallest values
    c = torch.tensor(_KMEANS_INIT_HU, dtype=torch.float64, device=v.device).expand(n, 3).clone()
    cuts = None
    for _ in range(max_iter):
        # Lloyd's assignment step on sorted values: the classes are the intervals between the midpoints of the
        # centres (a value on a midpoint joins the lower class, as argmin's first-index tie-break does)
        mids = 0.5 * (c[:, :2] + c[:, 1:])
        new = torch.searchsorted(v, mids.contiguous(), right=True)  # (n, 2) class boundaries in sorted order
        if cuts is not None and torch.equal(new, cuts):
            break
        cuts = new
        lo = torch.cat([torch.zeros_like(cuts[:, :1]), cuts], 1)
        hi = torch.cat([cuts, torch.full_like(cuts[:, :1], P)], 1)
        cnt = (hi - lo).to(v.dtype)
        tot = csum.gather(1, hi) - csum.gather(1, lo)
        c = torch.where(cnt > 0, tot / cnt.clamp(min=1), c)
    c = c.sort(-1).values
    t_air = 0.5 * (c[:, 0] + c[:, 1])
    t_bone = torch.clamp(0.5 * (c[:, 1] + c[:, 2]), min=BONE_MIN_HU)
    return torch.stack([t_air, torch.maximum(t_bone, t_air)], -1)


def _gaussian_kernel(size: int, sigma: float, dtype, device) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return (k / k.sum()).to(dtype)[None, None]


def nmar_prior(x_li_hu: torch.Tensor, metal: torch.Tensor) -> torch.Tensor:
    """NMAR prior image (N, 1, H, W) in 1/mm from an LI image in HU and a bool metal mask (steps 1-3 above)."""
    x = torch.where(metal, torch.zeros((), dtype=x_li_hu.dtype, device=x_li_hu.device), x_li_hu)  # metal -> water
    t = kmeans_thresholds(x)
    k = _gaussian_kernel(SMOOTH_SIZE, SMOOTH_SIGMA, x.dtype, x.device)
    # replicate padding: the public code filters with 'nearest' / 'symmetric' borders, not zeros
    sm = F.conv2d(F.pad(x, (SMOOTH_SIZE // 2,) * 4, mode="replicate"), k)
    t_air, t_bone = t[:, 0].view(-1, 1, 1, 1).to(sm.dtype), t[:, 1].view(-1, 1, 1, 1).to(sm.dtype)
    mu = hu_to_mu(sm)
    prior = torch.where(sm <= t_air, torch.zeros_like(mu), torch.where(sm < t_bone, torch.full_like(mu, MU_WATER), mu))
    return prior


def normalized_interpolation(y: torch.Tensor, trace: torch.Tensor, prior: torch.Tensor, op: FanBeamOperator
                             ) -> torch.Tensor:
    """Step 4: the line integrals ``y`` (N, 1, V, C) completed across the bool ``trace`` by interpolating
    y / FP(prior) and multiplying back, for any ``prior`` image (N, 1, H, W) in 1/mm (NMAR's own is
    :func:`nmar_prior`; ``bench/prior_ceiling.py`` passes the reference to measure what a perfect prior gives)."""
    p_prior = op.fp(prior).clamp(min=0) + PRIOR_EPS
    q = y / p_prior
    reliable = q <= MAX_QUOTIENT
    y_norm = interpolate_trace(torch.where(reliable, q, torch.ones_like(q)), trace) * p_prior
    w = interpolate_trace(reliable.to(y.dtype), trace)  # 1 where both trace ends have a usable prior
    y_nmar = w * y_norm + (1 - w) * interpolate_trace(y, trace)
    # outside the trace the division and multiplication round-trip in floating point; keep the measurement exactly
    return torch.where(trace, y_nmar, y)


def nmar(Y_ma, metal_mask, X_ma, op: FanBeamOperator | FanBeamGeometry | str, *, trace=None, dilate: int = 0,
         return_sinogram: bool = False, filter: str = "ram-lak", cutoff: float = 1.0):
    """NMAR (Meyer et al. 2010; REFERENCE §3), batched over N, curved and flat detectors.

    Arguments and returns as :func:`dudocrop.classic.li.li`: X_NMAR (N, 1, H, W) in HU, or (X_NMAR, Y_NMAR)
    with the corrected (N, 1, V, C) line integrals when ``return_sinogram``.
    """
    op = _operator(op)
    y, metal, x_ma, tr = _check_inputs(Y_ma, metal_mask, X_ma, op, trace, dilate)
    x_li = mu_to_hu(op.fbp(interpolate_trace(y, tr), filter=filter, cutoff=cutoff))
    y_nmar = normalized_interpolation(y, tr, nmar_prior(x_li, metal), op)
    x = reinsert_metal(mu_to_hu(op.fbp(y_nmar, filter=filter, cutoff=cutoff)), metal, x_ma)
    return (x, y_nmar) if return_sinogram else x
