"""Image-quality metrics for CT metal artifact reduction, in the conventions MAR papers use.

Conventions (one place, used by every table and picture of the project):

* Inputs are (N, 1, H, W) images in HU (torch or numpy), the prediction ``x`` and the metal-free reference
  ``ref``; every function returns a (N,) float64 tensor of per-slice values on ``x``'s device.
* PSNR and SSIM first clip both images to a window ``(lo, hi)`` in HU and map it to [0, 1] with
  ``(x - lo) / (hi - lo)``, as InDuDoNet / ACDNet / DuDoDp normalise before scoring, so the data range (the
  peak) is the window width. PSNR does not depend on the shift; SSIM's luminance term does, hence the statement.
  The default window is the full CT range :data:`CT_RANGE_HU` = [-1024, 3072] HU (data range 4096 HU); pass
  :data:`DISPLAY_WINDOW_HU` ([-175, 275] HU, the paper's display window) to score what a reader sees.
  RMSE is in HU, unclipped unless a window is given.
* ``metal_mask`` pixels are excluded: the reference has no metal there and the reinserted metal is not a result
  of the method (AAPM CT-MAR; InDuDoNet / ACDNet / DuDoDp evaluate outside the metal as well). ``roi``
  restricts the evaluation further, e.g. to :func:`body_mask` of the reference.
* SSIM (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 13(4), 2004): 11 x 11 Gaussian window with sigma = 1.5,
  K1 = 0.01, K2 = 0.03, population (not sample) covariances. The SSIM map is defined where the window lies
  inside the image (the 5-pixel border is dropped, as in Wang's reference code and in
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)`` on the normalised images, which it matches); the score is its mean over the evaluated pixels.
  Before filtering, the metal pixels of ``x`` take the reference's values, so that windows touching the metal
  see only the method's error around it.
* PSNR = 10 log10(range^2 / MSE) over the evaluated pixels; identical images give +inf (not an error).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dudocrop.checks import check_tensor

__all__ = [
    "BODY_THRESHOLD_HU",
    "CT_RANGE_HU",
    "DISPLAY_WINDOW_HU",
    "ERROR_WINDOW_HU",
    "body_mask",
    "image_metrics",
    "psnr",
    "rmse",
    "ssim",
]

#: Full CT range (12-bit, -1024..3071 HU rounded to 3072): the default evaluation window; data range 4096 HU.
CT_RANGE_HU = (-1024.0, 3072.0)
#: The paper's display window (Figs. 8-13): [-175, 275] HU.
DISPLAY_WINDOW_HU = (-175.0, 275.0)
#: The paper's error-map window (Fig. 13): [-400, 400] HU.
ERROR_WINDOW_HU = (-400.0, 400.0)
#: Body segmentation threshold: above fat/lung-boundary air (-1000) and below fat (about -100 HU); lungs and gas
#: inside the patient are recovered by hole filling.
BODY_THRESHOLD_HU = -400.0

# Wang et al. 2004, Sec. III-C
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# ---- validation ----------------------------------------------------------------------------------------


def _check_window(window, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of HU values, got {window!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be a finite (low, high) pair with low < high, got {window!r}")
    return lo, hi


def _check_mask(m, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(m)
    if isinstance(m, torch.Tensor) and m.dtype == torch.bool:
        check_tensor(m, name, ndim=4, shape=shape, floating=False)
        return m.to(device)
    m = check_tensor(m, name, ndim=4, shape=shape)
    if m.numel() and bool(((m < 0) | (m > 1)).any()):
        raise ValueError(f"{name} must be bool or hold values in [0, 1]")
    return (m > 0.5).to(device)


def _prepare(x, ref, metal_mask, roi):
    """Validated float64 (x, ref) on x's device, the bool metal mask (or None) and the evaluated pixels."""
    x = check_tensor(x, "x", ndim=4)
    if x.shape[1] != 1:
        raise ValueError(f"x must have shape (N, 1, H, W), got {tuple(x.shape)}")
    shape = tuple(x.shape)
    ref = check_tensor(ref, "ref", ndim=4, shape=shape, context="x's shape").to(x.device)
    keep = torch.ones(shape, dtype=torch.bool, device=x.device)
    metal = None
    if metal_mask is not None:
        metal = _check_mask(metal_mask, "metal_mask", shape, x.device)
        keep &= ~metal
    if roi is not None:
        keep &= _check_mask(roi, "roi", shape, x.device)
    return x.to(torch.float64), ref.to(torch.float64), metal, keep


def _normalise(x: torch.Tensor, window) -> torch.Tensor:
    """Clip to the window and map it to [0, 1], so the data range (PSNR's peak, SSIM's C1 and C2) is 1."""
    if window is None:
        raise ValueError("window must be a (low, high) pair of HU values: PSNR and SSIM need a data range")
    lo, hi = _check_window(window, "window")
    return (x.clamp(lo, hi) - lo) / (hi - lo)


def _masked_mean(v: torch.Tensor, keep: torch.Tensor, what: str) -> torch.Tensor:
    n = keep.flatten(1).sum(1)
    if bool((n == 0).any()):
        bad = torch.nonzero(n == 0).flatten().tolist()
        raise ValueError(f"no pixel left to evaluate {what} in slice(s) {bad}: metal_mask / roi exclude everything")
    return (v * keep).flatten(1).sum(1) / n


# ---- metrics -------------------------------------------------------------------------------------------


def rmse(x, ref, metal_mask=None, roi=None, window: tuple[float, float] | None = None) -> torch.Tensor:
    """Root-mean-square error in HU over the evaluated pixels (outside ``metal_mask``, inside ``roi``), per slice.

    Unclipped by default; with ``window`` both images are clipped to it first (the result is still in HU).
    """
    x, ref, _, keep = _prepare(x, ref, metal_mask, roi)
    if window is not None:
        lo, hi = _check_window(window, "window")
        x, ref = x.clamp(lo, hi), ref.clamp(lo, hi)
    return _masked_mean((x - ref) ** 2, keep, "RMSE").sqrt()


def psnr(x, ref, metal_mask=None, roi=None, window: tuple[float, float] = CT_RANGE_HU) -> torch.Tensor:
    """PSNR in dB per slice: 10 log10((hi - lo)^2 / MSE_HU) = -10 log10(MSE) of the images clipped to ``window`` =
    (lo, hi) HU and mapped to [0, 1], over the pixels outside ``metal_mask`` and inside ``roi``. Identical images
    give +inf."""
    x, ref, _, keep = _prepare(x, ref, metal_mask, roi)
    mse = _masked_mean((_normalise(x, window) - _normalise(ref, window)) ** 2, keep, "PSNR")
    return torch.where(mse > 0, -10.0 * torch.log10(mse), torch.full_like(mse, math.inf))


def _gauss_1d(dtype, device) -> torch.Tensor:
    r = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    return (g / g.sum()).to(dtype)


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over the positions where the whole window fits (no padding)."""
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def ssim(x, ref, metal_mask=None, roi=None, window: tuple[float, float] = CT_RANGE_HU) -> torch.Tensor:
    """Mean SSIM per slice (Wang et al. 2004; conventions in the module docstring): 11 x 11 Gaussian window,
    sigma 1.5, K1 0.01, K2 0.03, data range = window width, averaged over the pixels outside ``metal_mask`` and
    inside ``roi`` (and at least 5 pixels from the image border)."""
    x, ref, metal, keep = _prepare(x, ref, metal_mask, roi)
    H, W = x.shape[-2:]
    if min(H, W) < SSIM_WINDOW:
        raise ValueError(f"x must be at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels for SSIM, got {H} x {W}")
    x, ref = _normalise(x, window), _normalise(ref, window)
    if metal is not None:
        # the reference has no metal: copying it into x's metal pixels leaves only the method's error in the
        # windows that overlap the implant
        x = torch.where(metal, ref, x)
    g = _gauss_1d(x.dtype, x.device)
    mx, my = _filter_valid(x, g), _filter_valid(ref, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(ref * ref, g) - my * my
    sxy = _filter_valid(x * ref, g) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1 after _normalise
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    p = SSIM_WINDOW // 2
    return _masked_mean(smap, keep[..., p:H - p, p:W - p], "SSIM")


def image_metrics(x, ref, metal_mask=None, roi=None, window: tuple[float, float] = CT_RANGE_HU
                  ) -> dict[str, torch.Tensor]:
    """``{"psnr", "ssim", "rmse"}`` per slice with the same pixels (PSNR/SSIM clipped to ``window``, RMSE in
    unclipped HU)."""
    return {"psnr": psnr(x, ref, metal_mask, roi, window), "ssim": ssim(x, ref, metal_mask, roi, window),
            "rmse": rmse(x, ref, metal_mask, roi)}


# ---- body mask -----------------------------------------------------------------------------------------


def body_mask(x_hu, threshold_hu: float = BODY_THRESHOLD_HU) -> torch.Tensor:
    """The patient's body, per slice (N, 1, H, W) bool: pixels above ``threshold_hu``, the largest connected
    component (4-connected; drops the table, cables and noise specks when they do not touch the body), holes
    filled (lungs, bowel gas). Compute it on the reference image; ``roi=body_mask(ref)`` restricts a metric to
    the body, as AAPM CT-MAR-style evaluations do. Runs on the CPU (scipy.ndimage); the result is on the input's
    device."""
    x = check_tensor(x_hu, "x_hu", ndim=4)
    if x.shape[1] != 1:
        raise ValueError(f"x_hu must have shape (N, 1, H, W), got {tuple(x.shape)}")
    if not (isinstance(threshold_hu, int | float) and math.isfinite(threshold_hu)):
        raise ValueError(f"threshold_hu must be a finite number, got {threshold_hu!r}")
    from dudocrop.ct.phantoms import body_mask as body_mask_2d

    hu = x[:, 0].detach().cpu().numpy()
    out = np.stack([body_mask_2d(h, threshold_hu) for h in hu]) if len(hu) else np.zeros(hu.shape, bool)
    return torch.from_numpy(out).unsqueeze(1).to(x.device)
