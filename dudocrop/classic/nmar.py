"""Normalized metal artifact reduction (NMAR; Meyer, Raupach, Lell, Schmidt & Kachelrieß, Med. Phys. 37(10),
5482-5493, 2010), as in REFERENCE §3 and the public NMAR code of the SynDeepLesion line (InDuDoNet / ACDNet).

1. LI image (``classic.li``) with the metal pixels set to water; metal the LI image sees as air (an implant
   outside the patient) is set to air instead (not in the paper: a water blob in the air would add its path to
   every ray of the trace).
2. Thresholds from a 3-class k-means of its values (air / soft tissue / bone, started at 0, mu_w and 2 mu_w);
   the tissue/bone threshold is at least +200 HU (the public code's ``max(t, 1.2 mu_w)``).
3. Prior: the image smoothed by a 5 x 5 Gaussian (sigma = 1 pixel) and segmented with those thresholds: air -> 0,
   soft tissue -> mu_water, bone keeps its (smoothed) value. (The public code smooths before it segments; the
   thresholds come from the unsmoothed LI image.)
4. p_prior = max(FP(prior), 0); the measured sinogram is divided by it, the quotient is linearly interpolated
   across the metal trace (the same routine as LI, :func:`classic.li.interpolate_trace`), and multiplied back.
   Dividing by the prior flattens the sinogram where the prior explains it (bone edges, the body outline), so
   the interpolation only has to bridge the small residual, not the bone's own structure.

   Guard (not in the paper; issue 19). The public code divides by p_prior + 1e-6. On a ray that misses the
   patient (metal in the air, on the skin, at the body's edge) both the measurement and p_prior are ~0, the
   quotient is noise over noise (a measured -0.003 over 1e-6 is -3000), and interpolated into rays where the
   prior is large it multiplies up to line integrals of -900 and images of 10^4 HU. So a trace neighbour (knot)
   counts as informative only where

   * the prior carries information about the ray: p_prior >= ``PRIOR_FLOOR_PX`` pixels of water. The prior's
     path along a ray is uncertain by about a pixel at each boundary the ray crosses (the LI image's blur, the
     smoothing, the segmentation), so a ray that enters and leaves the body once has about two pixels of
     uncertain path: below that the prior's projection is mostly its own error;
   * and it explains the measurement: MIN_QUOTIENT <= Y / p_prior <= MAX_QUOTIENT. Above the band the prior
     misses tissue (the LI image segments skin next to the metal as air) and dividing by it amplifies; below
     it the prior claims tissue the ray did not see. The band is looser below because a quotient too small
     cannot explode, it only scales the completion down (``docs/nmar_robustness.md`` has the measurements).

   An uninformative knot gets quotient 1, and its interpolated share across the trace blends the completion
   towards LI's (``w * NMAR + (1 - w) * LI`` per ray, w interpolated between the knots' 1 / 0 flags): a run with
   two uninformative knots is LI exactly, so NMAR falls back to LI ray by ray where its prior fails. Finally the
   completed line integrals are clipped to the physical range [0, max Y_ma] (a metal-free ray cannot attenuate
   less than air, nor more than the most attenuating measured ray, which crosses metal).
5. FBP, then the metal pixels are reinserted from X_ma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dudocrop.classic.li import _check_inputs, _operator, interpolate_trace, reinsert_metal
from dudocrop.ct.geometry import FanBeamGeometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.units import HU_AIR, MU_WATER, hu_to_mu, mu_to_hu

__all__ = ["BONE_MIN_HU", "MAX_QUOTIENT", "MIN_QUOTIENT", "PRIOR_FLOOR_PX", "kmeans_thresholds", "nmar", "nmar_prior",
           "normalized_interpolation", "prior_completion"]

#: REFERENCE §3: the bone class starts at +200 HU at the lowest (1.2 mu_water in the public code).
BONE_MIN_HU = 200.0
#: step 4's guard: a trace neighbour is an informative knot only where the prior projects to at least this many
#: pixels of water and the measured quotient Y / p_prior lies in [MIN_QUOTIENT, MAX_QUOTIENT]
PRIOR_FLOOR_PX = 2.0
MAX_QUOTIENT = 2.0
MIN_QUOTIENT = 1.0 / 3.0
#: Meyer 2010 / public code: 5 x 5 Gaussian, sigma = 1 pixel.
SMOOTH_SIZE, SMOOTH_SIGMA = 5, 1.0
#: prior_completion: the Gaussian that refills a prior's metal pixels from their surroundings (sigma in px)
FILL_SIZE, FILL_SIGMA = 25, 4.0
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
    """NMAR prior image (N, 1, H, W) in 1/mm from an LI image in HU and a bool metal mask (steps 1-3 above).

    ``x_li_hu`` is the LI image before the metal is reinserted: its metal pixels hold LI's interpolation of what
    lies behind the metal, which decides whether the metal becomes water (inside the patient) or air."""
    zero = torch.zeros((), dtype=x_li_hu.dtype, device=x_li_hu.device)
    x = torch.where(metal, zero, x_li_hu)  # metal -> water
    t = kmeans_thresholds(x)
    t_air, t_bone = t[:, 0].view(-1, 1, 1, 1).to(x.dtype), t[:, 1].view(-1, 1, 1, 1).to(x.dtype)
    # metal outside the patient: where LI, interpolated from the rays around the metal, sees air, the metal
    # becomes air rather than water (a water blob in the air would add its path to every trace ray)
    x = torch.where(metal & (x_li_hu <= t_air), torch.full_like(x, HU_AIR), x)
    k = _gaussian_kernel(SMOOTH_SIZE, SMOOTH_SIGMA, x.dtype, x.device)
    # replicate padding: the public code filters with 'nearest' / 'symmetric' borders, not zeros
    sm = F.conv2d(F.pad(x, (SMOOTH_SIZE // 2,) * 4, mode="replicate"), k)
    mu = hu_to_mu(sm)
    prior = torch.where(sm <= t_air, torch.zeros_like(mu), torch.where(sm < t_bone, torch.full_like(mu, MU_WATER), mu))
    return prior


def normalized_interpolation(y: torch.Tensor, trace: torch.Tensor, prior: torch.Tensor, op: FanBeamOperator
                             ) -> torch.Tensor:
    """Step 4: the line integrals ``y`` (N, 1, V, C) completed across the bool ``trace`` by interpolating
    y / FP(prior) and multiplying back, for any ``prior`` image (N, 1, H, W) in 1/mm (NMAR's own is
    :func:`nmar_prior`; ``bench/prior_ceiling.py`` passes the reference to measure what a perfect prior gives).

    With the module docstring's guard: LI where the knots' prior is uninformative, and the completion clipped to
    [0, max y] per slice. Outside the trace ``y`` is returned bit for bit."""
    p_prior = op.fp(prior).clamp(min=0)
    floor = PRIOR_FLOOR_PX * MU_WATER * op.geometry.pixel_size
    q = y / p_prior.clamp(min=floor)
    informative = (p_prior >= floor) & (q >= MIN_QUOTIENT) & (q <= MAX_QUOTIENT)
    y_norm = interpolate_trace(torch.where(informative, q, torch.ones_like(q)), trace) * p_prior
    w = interpolate_trace(informative.to(y.dtype), trace)  # 1 where both trace ends have an informative prior
    y_nmar = w * y_norm + (1 - w) * interpolate_trace(y, trace)
    y_nmar = torch.minimum(y_nmar.clamp(min=0), y.amax(dim=(1, 2, 3), keepdim=True))
    # outside the trace the division and multiplication round-trip in floating point; keep the measurement exactly
    return torch.where(trace, y_nmar, y)


def _fill_metal(x_hu: torch.Tensor, metal: torch.Tensor) -> torch.Tensor:
    """The metal pixels of an image in HU replaced by what surrounds them (a Gaussian average of the non-metal
    pixels, sigma = ``FILL_SIGMA`` px), kept within [air, water] as step 1 does: water inside the body, air for an
    implant in the air; water where no non-metal pixel is near."""
    k = _gaussian_kernel(FILL_SIZE, FILL_SIGMA, x_hu.dtype, x_hu.device)
    keep = (~metal).to(x_hu.dtype)
    pad = (FILL_SIZE // 2,) * 4
    num = F.conv2d(F.pad(x_hu * keep, pad, mode="replicate"), k)
    den = F.conv2d(F.pad(keep, pad, mode="replicate"), k)
    fill = torch.where(den > 1e-3, num / den.clamp_min(1e-3), torch.zeros_like(num)).clamp(HU_AIR, 0.0)
    return torch.where(metal, fill, x_hu)


def prior_completion(prior_hu: torch.Tensor, Y_ma: torch.Tensor, metal: torch.Tensor, trace: torch.Tensor,
                     op: FanBeamOperator, filter: str = "ram-lak", cutoff: float = 1.0, return_sinogram: bool = False):
    """Step 4-5 with any prior image: the measured line integrals ``Y_ma`` completed across the bool ``trace`` by
    :func:`normalized_interpolation` with ``prior_hu`` (N, 1, H, W, HU; its bool ``metal`` pixels refilled from
    their surroundings) as the prior, then FBP: an image in HU without the metal reinserted (and the completed
    line integrals with ``return_sinogram``, as :func:`nmar`).

    Off the trace every measured ray is kept, so the prior only decides the trace; with a learned image as the
    prior this is CNN-MAR's completion step (Zhang & Yu, IEEE TMI 37(6), 2018), the pipeline's
    ``OSROConfig.completion``."""
    prior = hu_to_mu(_fill_metal(prior_hu, metal)).clamp(min=0)
    y = normalized_interpolation(Y_ma, trace, prior, op)
    x = mu_to_hu(op.fbp(y, filter=filter, cutoff=cutoff))
    return (x, y) if return_sinogram else x


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
