"""Measured-data consistency: does a candidate image agree with the raw data on the rays that miss the metal?

Beyond the paper (issue 25 §2). OSRO keeps raw-data fidelity only for the sinogram prior (Eq. 10); nothing checks
the image prior, and a prior that paints an organ out (a model trained on anatomy unlike the patient's) passes
into X_o through Eq. 15. The rays off the metal trace M_s are measured and uncorrupted, so an image true to the
patient agrees with them; a missing organ changes every ray through it.

The naive test, FP(μ(x)) − Y_ma off M_s, is dominated by things every image shares (measured in
``docs/consistency.md``): the FBP round trip (FP∘FBP is not the identity: 0.014 RMS in line integrals on a noiseless
``small`` slice, twice an erased organ's 0.007), noise, and beam hardening near bone, which no water-corrected
image reproduces. So the residual here is taken against the candidate's own round trip:

1. complete the measurement with the candidate: Y_x = Y_ma off M_s, FP(μ(x)) on M_s (the metal rays carry no
   usable data, so the candidate may fill them as it likes);
2. reconstruct it, x_b = FBP(Y_x): the image the measured rays give when the candidate is trusted only where
   nothing was measured. A faithful x is already such an image (x_b ≈ x); an x with an organ painted out gets it
   back from the measured rays;
3. the difference x − x_b is taken over the body minus the metal, eroded by 2 px (the air/skin edge is where
   resolution differences live), smoothed by a Gaussian of ``image_sigma`` px (a smoother or sharper but faithful
   image — denoising — is not an inconsistency; an organ is several pixels wide), and forward projected;
4. its size: per ray weighted by exp(−Y_ma / 2) (the inverse noise standard deviation of a line integral, which also
   down-weights the long paths through bone where beam hardening accumulates), low-passed along views and channels
   by ``sigma`` samples over the off-trace rays only, RMS over those rays.

The residual is affine in x, so a fused image's residual is the same blend of its parts' (``safeguard`` in
:mod:`dudocrop.pipeline.osro` uses that). The score divides it by a reference's (NMAR's image, or X'_p = FBP(Y_p),
both reconstructions of the measurement): faithful images score about 1 (X_ref: 0.4-1.4 on the ``small`` probe,
``bench/consistency_probe.py``), an image prior with an organ painted out 10-40.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dudocrop.ct.units import hu_to_mu

__all__ = ["CONSISTENCY_IMAGE_SIGMA", "CONSISTENCY_SIGMA", "ConsistencyCheck", "consistency_score", "data_residual"]

#: low-pass width (detector samples, along channels and views) of the projected difference before its size is taken
CONSISTENCY_SIGMA = 2.0
#: Gaussian width (pixels) of the image-domain smoothing of x − x_b: resolution is not consistency
CONSISTENCY_IMAGE_SIGMA = 3.0
#: erosion (pixels) of the body-minus-metal region, so the skin edge's resolution differences stay out
CONSISTENCY_EROSION = 2


def _blur_within(x: torch.Tensor, w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian average of ``x`` over the samples where ``w`` is 1 (normalised convolution), per (N, 1) plane;
    views wrap around (a full rotation), channels are padded with zeros."""
    if sigma <= 0:
        return x * w
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()

    def blur(t):
        t = F.pad(t, (0, 0, r, r), mode="circular")
        t = F.conv2d(t, k.view(1, 1, -1, 1))
        return F.conv2d(t, k.view(1, 1, 1, -1), padding=(0, r))

    return blur(x * w) / blur(w).clamp_min(1e-6) * w


@dataclass(frozen=True, eq=False)
class ConsistencyCheck:
    """What the residual needs of one batch of slices, computed once: the measurement, its off-trace rays and their
    noise weights, and the region (body minus metal, from a reference reconstruction). :meth:`residual` then
    maps any candidate image (HU) to its projected, weighted, low-passed residual (affine in the image)."""

    op: object
    y_ma: torch.Tensor  # (N, 1, V, C)
    off: torch.Tensor  # (N, 1, V, C) float, 1 on rays off the metal trace
    weight: torch.Tensor  # (N, 1, V, C)
    keep: torch.Tensor  # (N, 1, H, W) float, body minus metal
    inner: torch.Tensor  # keep eroded by CONSISTENCY_EROSION px
    sigma: float = CONSISTENCY_SIGMA
    image_sigma: float = CONSISTENCY_IMAGE_SIGMA
    to_hu: Callable[[torch.Tensor], torch.Tensor] | None = None  # candidates in other units (the pipeline's [0, 1])

    @classmethod
    def build(cls, reference_hu: torch.Tensor, y_ma: torch.Tensor, trace: torch.Tensor, op,
              metal_mask: torch.Tensor | None = None, sigma: float = CONSISTENCY_SIGMA,
              image_sigma: float = CONSISTENCY_IMAGE_SIGMA, to_hu=None) -> ConsistencyCheck:
        """``reference_hu``: a reconstruction of the measurement (NMAR, X'_p) whose body outline is used."""
        from dudocrop.metrics.image import body_mask

        if reference_hu.ndim != 4 or y_ma.ndim != 4 or tuple(trace.shape) != tuple(y_ma.shape):
            raise ValueError(f"reference_hu must be (N, 1, H, W) and y_ma, trace (N, 1, V, C) alike; got "
                             f"{tuple(reference_hu.shape)}, {tuple(y_ma.shape)}, {tuple(trace.shape)}")
        dev = reference_hu.device
        keep = body_mask(reference_hu)
        if metal_mask is not None:
            keep = keep & ~(metal_mask.to(dev) > 0)
        keep = keep.to(torch.float32)
        e = CONSISTENCY_EROSION
        inner = -F.max_pool2d(-keep, 2 * e + 1, stride=1, padding=e) if e else keep
        y = y_ma.to(dev, torch.float32)
        return cls(op, y, (trace.to(dev) <= 0).to(torch.float32), torch.exp(-0.5 * y.clamp_min(0.0)), keep, inner,
                   float(sigma), float(image_sigma), to_hu)

    def residual(self, x_hu: torch.Tensor) -> torch.Tensor:
        """(N, 1, V, C): the candidate's projected inconsistency with the measured rays (module docstring)."""
        from dudocrop.pipeline.osro import _smooth_within

        if self.to_hu is not None:
            x_hu = self.to_hu(x_hu)
        mu = hu_to_mu(x_hu.to(self.keep.device, torch.float32)) * self.keep
        px = self.op.fp(mu)
        xb = self.op.fbp(self.y_ma * self.off + px * (1.0 - self.off)) * self.keep
        diff = _smooth_within(mu - xb, self.inner, self.image_sigma) * self.inner
        return _blur_within(self.weight * self.op.fp(diff), self.off, self.sigma)

    def size(self, residual: torch.Tensor) -> torch.Tensor:
        """(N,): RMS of a :meth:`residual` over the off-trace rays."""
        n = self.off.flatten(1).sum(1).clamp_min(1.0)
        return ((residual ** 2).flatten(1).sum(1) / n).sqrt()

    def score(self, x_hu: torch.Tensor, reference_residual: torch.Tensor) -> torch.Tensor:
        """(N,): the size of ``x_hu``'s residual over ``reference_residual`` (the reference's :meth:`size`)."""
        return self.size(self.residual(x_hu)) / reference_residual.to(self.keep.device).clamp_min(1e-9)


def data_residual(x_hu: torch.Tensor, y_ma: torch.Tensor, trace: torch.Tensor, op,
                  metal_mask: torch.Tensor | None = None, reference_hu: torch.Tensor | None = None) -> torch.Tensor:
    """Per slice (N,): the size of ``x_hu``'s inconsistency with the measured rays off the metal trace (module
    docstring), in weighted line-integral units. ``reference_hu`` gives the body outline (default: ``x_hu``)."""
    chk = ConsistencyCheck.build(x_hu if reference_hu is None else reference_hu, y_ma, trace, op, metal_mask)
    return chk.size(chk.residual(x_hu))


def consistency_score(x_hu: torch.Tensor, reference_hu: torch.Tensor, y_ma: torch.Tensor, trace: torch.Tensor, op,
                      metal_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per slice (N,): :func:`data_residual` of ``x_hu`` over that of ``reference_hu``, a reconstruction of the same
    measurement (NMAR's image in the evaluation, X'_p in the pipeline): about 1 for a faithful image, higher for one
    the measured rays contradict. A plain function of a model's outputs on one slice and the slice's data."""
    chk = ConsistencyCheck.build(reference_hu, y_ma, trace, op, metal_mask)
    return chk.score(x_hu, chk.size(chk.residual(reference_hu)))
