"""Metal trace in the sinogram: M_s = FP(metal mask) > 0 (paper §III-A, Eq. 1), optionally dilated."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dudocrop.checks import check_tensor
from dudocrop.ct.operators import FanBeamOperator


def metal_trace(mask, op: FanBeamOperator, dilate: int = 0) -> torch.Tensor:
    """Boolean (N, 1, V, C) trace of a (N, 1, H, W) metal mask; ``dilate`` widens it by that many
    channels on each side (covers partial-volume rays the projector's interpolation misses)."""
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0 channels, got {dilate}")
    m = mask.float() if isinstance(mask, torch.Tensor) and not mask.is_floating_point() else mask
    m = check_tensor(m, "mask", ndim=4, shape=(None, 1, *op.geometry.image_shape))
    if m.numel() and bool(((m < 0) | (m > 1)).any()):
        raise ValueError("mask must hold values in [0, 1] (a binary or fractional metal mask)")
    trace = op.fp((m > 0).float()) > 0
    if dilate:
        k = 2 * dilate + 1
        trace = F.max_pool2d(trace.float(), (1, k), stride=1, padding=(0, dilate)) > 0
    return trace
