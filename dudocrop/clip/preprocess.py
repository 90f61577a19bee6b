"""CT in, CLIP out: the one definition of how a slice or a sinogram becomes a CLIP input (paper §III-B-1).

``(N, 1, H, W)`` image in HU, or ``(N, 1, V, C)`` sinogram in line integrals
→ clip to the window and map it to [0, 1] → repeat the grey value in 3 channels
→ bicubic resize to ``size x size`` (antialiased, as PIL's bicubic is; values clamped back to [0, 1] since bicubic
overshoots) → subtract CLIP's mean and divide by its std per channel.

Sinograms are not square: they are resized to the square, never centre-cropped — a crop would cut views or
detector channels away (REFERENCE §2). Windows are the ones the captioner was shown
(:func:`dudocrop.captions.render.window_for`), because the captions describe those pictures:

* image: ``[-175, 275]`` HU (the paper's display window); metal and dense bone saturate, streaks stay visible;
* sinogram: ``[0, 2 μ_w R]`` line integral (R = the geometry's FOV radius): a water disc filling the field of view
  is white; metal traces saturate.

Works on batched torch tensors on any device; the output keeps the input's device and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from dudocrop.captions.render import DISPLAY_WINDOW_HU, window_for
from dudocrop.checks import check_tensor
from dudocrop.clip.config import CLIP_IMAGE_SIZE, DOMAINS
from dudocrop.ct.geometry import FanBeamGeometry

CLIP_MEAN: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)


def check_domain(domain, domains: Sequence[str] = DOMAINS) -> str:
    if domain not in domains:
        raise ValueError(f"domain must be one of {tuple(domains)}, got {domain!r}")
    return domain


def default_window(domain: str, geometry: FanBeamGeometry | str | None = None) -> tuple[float, float]:
    """The captioner's window for ``domain``: [-175, 275] HU, or [0, 2 μ_w R] for a sinogram of ``geometry``."""
    check_domain(domain)
    if domain == "image":
        return (DISPLAY_WINDOW_HU.lo, DISPLAY_WINDOW_HU.hi)
    if geometry is None:
        raise ValueError("geometry is needed for the sinogram window [0, 2 mu_w R] (or pass window=(lo, hi) / set "
                         "DuDoCLIPConfig.sino_window); got geometry=None")
    w = window_for("Y_ma", geometry)
    return (w.lo, w.hi)


def preprocess_ct(x: torch.Tensor, window: tuple[float, float], *, size: int = CLIP_IMAGE_SIZE,
                  mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                  name: str = "x") -> torch.Tensor:
    """``(N, 1, H, W)`` CT values → ``(N, 3, size, size)`` CLIP input (module docstring for the steps).

    ``window``: ``(lo, hi)`` in the input's unit (HU for images, line integral for sinograms); values outside are
    clipped. Raises ``ValueError`` naming ``name`` for a wrong rank, channel count, dtype, an empty batch or
    NaN/inf values.
    """
    x = check_tensor(x, name, ndim=4, shape=(None, 1, None, None))
    if x.shape[0] == 0 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"{name} must hold at least one (N >= 1) slice of at least 2 x 2, got {tuple(x.shape)}")
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ValueError(f"window must be (lo, hi) with hi > lo, got {window!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std must hold 3 values (std > 0), got mean={mean!r}, std={std!r}")
    u = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    # resize the one grey channel before repeating it: 3x cheaper, identical result
    if u.shape[-2:] != (size, size):
        u = F.interpolate(u, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    u = u.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
    return (u - m) / s
