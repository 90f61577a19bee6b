"""Fan-beam FBP pre-weighting and ramp filtering (Kak & Slaney, ch. 3.4), shared by every backend.

Curved (equiangular) detector:  q = p * SID * cos(gamma);  Q = dgamma * (q * g) with
    g(0) = 1/(8 dgamma^2), g(odd n) = -1/(2 pi^2 sin^2(n dgamma)), g(even n) = 0.
Flat (equispaced) detector, rescaled to the isocentre (pitch a):  q = p * SID / sqrt(SID^2 + s^2);
    Q = a * (q * g) with g(0) = 1/(8 a^2), g(odd n) = -1/(2 pi^2 n^2 a^2), g(even n) = 0.
Both kernels already carry the 1/2 that a full 360-degree scan needs (every ray is measured twice).
The backprojection then sums dbeta * Q(beta, .) / L^2 (curved) or / U^2 (flat).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from dudocrop.ct.geometry import FanBeamGeometry

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")


@lru_cache(maxsize=32)
def _kernel_spectrum(geometry: FanBeamGeometry, filter_name: str, cutoff: float) -> np.ndarray:
    """rfft of the zero-padded spatial ramp kernel, apodised by the named window."""
    c = geometry.n_channels
    size = 1 << int(math.ceil(math.log2(2 * c)))
    n = np.fft.fftfreq(size, d=1.0 / size).astype(np.int64)  # 0, 1, ..., -1 (circular lags)
    g = np.zeros(size, dtype=np.float64)
    odd = (n % 2) != 0
    if geometry.detector == "curved":
        d = geometry.delta_gamma
        g[n == 0] = 1.0 / (8 * d * d)
        g[odd] = -1.0 / (2 * math.pi**2 * np.sin(n[odd] * d) ** 2)
        g *= d
    else:
        a = geometry.channel_pitch_at_iso
        g[n == 0] = 1.0 / (8 * a * a)
        g[odd] = -1.0 / (2 * math.pi**2 * (n[odd] * a) ** 2)
        g *= a
    spec = np.fft.rfft(g)
    f = np.fft.rfftfreq(size) * 2.0  # 1.0 at Nyquist
    x = np.clip(f / cutoff, 0.0, None)
    if filter_name == "ram-lak":
        w = np.ones_like(f)
    elif filter_name == "shepp-logan":
        w = np.sinc(x / 2)
    elif filter_name == "cosine":
        w = np.cos(np.pi * x / 2)
    elif filter_name == "hann":
        w = 0.5 * (1 + np.cos(np.pi * x))
    else:  # pragma: no cover - validated by the caller
        raise ValueError(f"filter must be one of {FILTERS}, got {filter_name!r}")
    w = np.where(f <= cutoff, w, 0.0)
    return spec * w


@lru_cache(maxsize=32)
def _preweights(geometry: FanBeamGeometry) -> np.ndarray:
    c = geometry.channel_coords
    if geometry.detector == "curved":
        return geometry.sid * np.cos(c)
    s = c * geometry.sid / geometry.sdd
    return geometry.sid / np.sqrt(geometry.sid**2 + s**2)


def filter_sinogram(sino: torch.Tensor, geometry: FanBeamGeometry, filter_name: str = "ram-lak",
                    cutoff: float = 1.0) -> torch.Tensor:
    """Pre-weight and ramp-filter a (N, 1, V, C) sinogram along channels; returns Q, same shape."""
    if filter_name not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter_name!r}")
    if not 0 < cutoff <= 1:
        raise ValueError(f"cutoff must be in (0, 1] (fraction of Nyquist), got {cutoff}")
    spec = _kernel_spectrum(geometry, filter_name, float(cutoff))
    size = 2 * (spec.shape[0] - 1)
    w = torch.as_tensor(_preweights(geometry), dtype=sino.dtype, device=sino.device)
    q = sino * w
    spec_t = torch.as_tensor(spec, dtype=torch.complex64 if sino.dtype != torch.float64 else torch.complex128,
                             device=sino.device)
    out = torch.fft.irfft(torch.fft.rfft(q, n=size, dim=-1) * spec_t, n=size, dim=-1)
    return out[..., : geometry.n_channels].contiguous()
