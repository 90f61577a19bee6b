"""Linear-interpolation metal artifact reduction (LI; Kalender, Hebel & Ebersberger, Radiology 164, 1987).

The rays that cross metal (the metal trace, paper Eq. 1's M_s) carry no usable information about the tissue
behind the metal. LI discards them: in every view, each run of consecutive trace channels is replaced by the
straight line between the two measured values just outside the run (its knots), the completed sinogram is
reconstructed by FBP, and the metal is put back by giving the metal pixels their values from the metal-affected
image X_ma (REFERENCE §3: "LI = per-view linear interpolation across the trace, then FBP").

:func:`interpolate_trace` is the one interpolation routine of the project; NMAR (``classic.nmar``) applies it to
the prior-normalised sinogram.
"""

from __future__ import annotations

import torch

from dudocrop.checks import check_tensor
from dudocrop.ct.geometry import FanBeamGeometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.trace import metal_trace
from dudocrop.ct.units import mu_to_hu

__all__ = ["interpolate_trace", "li", "reinsert_metal"]


def interpolate_trace(sino, trace) -> torch.Tensor:
    """Replace the trace channels of every view by linear interpolation in the channel direction.

    Args:
        sino: (N, 1, V, C) float sinogram (any quantity: line integrals, or NMAR's normalised sinogram).
        trace: (N, 1, V, C) bool, True where a ray is to be replaced.

    Returns:
        A new (N, 1, V, C) tensor, equal to ``sino`` outside the trace (bit for bit). Inside a run of trace
        channels ``a..b`` of a view, the value at channel ``i`` is ``(1 - w) sino[a-1] + w sino[b+1]`` with
        ``w = (i - (a-1)) / ((b+1) - (a-1))``: linear in the channel index, which is linear in the fan angle
        (curved detector) or the detector coordinate (flat detector), since both are uniformly sampled. A run that
        touches the detector edge takes the one knot it has (constant extrapolation); a view whose channels are
        all in the trace has no knot and is set to 0.

    Vectorised over N, V and C (no Python loop), on the input's device and dtype.
    """
    y = check_tensor(sino, "sino", ndim=4)
    if y.shape[1] != 1:
        raise ValueError(f"sino must have shape (N, 1, V, C), got {tuple(y.shape)}")
    t = check_tensor(trace, "trace", ndim=4, shape=tuple(y.shape), floating=False)
    if t.dtype != torch.bool:
        raise ValueError(f"trace must be a bool tensor, got dtype {t.dtype}")
    t = t.to(y.device)
    C = y.shape[-1]
    idx = torch.arange(C, device=y.device).expand_as(y)
    # the nearest measured channel on each side: a running max of "own index if measured, else -1" from the
    # left, and a running min of "own index if measured, else C" from the right
    left = torch.where(t, torch.full_like(idx, -1), idx).cummax(dim=-1).values
    right = torch.where(t, torch.full_like(idx, C), idx).flip(-1).cummin(dim=-1).values.flip(-1)
    has_l, has_r = left >= 0, right < C
    yl = torch.gather(y, -1, left.clamp(min=0))
    yr = torch.gather(y, -1, right.clamp(max=C - 1))
    span = (right - left).clamp(min=1).to(y.dtype)
    w = (idx - left).to(y.dtype) / span
    both = yl + w * (yr - yl)
    fill = torch.where(has_l & has_r, both, torch.where(has_l, yl, torch.where(has_r, yr, torch.zeros_like(y))))
    return torch.where(t, fill, y)


def _operator(op) -> FanBeamOperator:
    if isinstance(op, FanBeamOperator):
        return op
    if isinstance(op, FanBeamGeometry | str):
        return FanBeamOperator(op)
    raise ValueError(f"op must be a FanBeamOperator, a FanBeamGeometry or a preset name, got {type(op).__name__}")


def _check_inputs(Y_ma, metal_mask, X_ma, op: FanBeamOperator, trace, dilate: int):
    """Validate the shared LI / NMAR inputs; return (Y_ma, binary metal mask, X_ma or None, trace)."""
    g = op.geometry
    ctx = f"geometry {g.name!r}"
    y = check_tensor(Y_ma, "Y_ma", ndim=4, shape=(None, 1, *g.sino_shape), context=ctx)
    n = y.shape[0]
    m = metal_mask
    if isinstance(m, torch.Tensor) and m.dtype == torch.bool:
        m = m.to(y.dtype)
    m = check_tensor(m, "metal_mask", ndim=4, shape=(n, 1, *g.image_shape), context=f"{ctx} and Y_ma's batch {n}")
    if m.numel() and bool(((m < 0) | (m > 1)).any()):
        raise ValueError("metal_mask must hold values in [0, 1] (a binary metal mask)")
    # metal pixels are those more than half covered: the simulator's convention (coverage > 0.5)
    metal = (m > 0.5).to(y.device)
    x = None
    if X_ma is not None:
        x = check_tensor(X_ma, "X_ma", ndim=4, shape=(n, 1, *g.image_shape),
                         context=f"{ctx} and Y_ma's batch {n}").to(y.device)
    if trace is None:
        if dilate < 0:
            raise ValueError(f"dilate must be >= 0 channels, got {dilate}")
        tr = metal_trace(metal.to(y.dtype), op, dilate=dilate).to(y.device)
    else:
        if dilate:
            raise ValueError("dilate applies only when the trace is derived from metal_mask (trace=None)")
        tr = check_tensor(trace, "trace", ndim=4, shape=(n, 1, *g.sino_shape), floating=False,
                          context=f"{ctx} and Y_ma's batch {n}")
        if tr.dtype != torch.bool:
            raise ValueError(f"trace must be a bool tensor, got dtype {tr.dtype}")
        tr = tr.to(y.device)
    return y, metal, x, tr


def reinsert_metal(x_hu: torch.Tensor, metal: torch.Tensor, X_ma: torch.Tensor | None) -> torch.Tensor:
    """Metal pixels take their values from the metal-affected image (the AAPM CT-MAR convention: the corrected
    image still shows the implant); without ``X_ma`` the image is returned unchanged."""
    if X_ma is None:
        return x_hu
    return torch.where(metal, X_ma.to(x_hu.dtype), x_hu)


def li(Y_ma, metal_mask, X_ma, op: FanBeamOperator | FanBeamGeometry | str, *, trace=None, dilate: int = 0,
       return_sinogram: bool = False, filter: str = "ram-lak", cutoff: float = 1.0):
    """Linear-interpolation MAR (Kalender et al. 1987; REFERENCE §3), batched over N.

    Args:
        Y_ma: (N, 1, V, C) metal-affected line integrals on ``op``'s geometry.
        metal_mask: (N, 1, H, W) metal mask (bool, or float in [0, 1]; a pixel is metal where it is > 0.5).
        X_ma: (N, 1, H, W) metal-affected image in HU whose metal pixels are reinserted, or None to skip the
            reinsertion (metal pixels then keep the interpolated reconstruction).
        op: the operator (or its geometry / preset name); curved and flat detectors alike.
        trace: optional (N, 1, V, C) bool metal trace. By default it is ``metal_trace(metal_mask, op, dilate)``;
            pass the simulator's trace (``SimulationResult.metal_trace``) to also catch rays that graze only
            partial-volume metal.
        dilate: widen the derived trace by this many channels per side.
        return_sinogram: also return the interpolated sinogram.
        filter, cutoff: the FBP filter (``FanBeamOperator.fbp``).

    Returns:
        X_LI (N, 1, H, W) in HU, or (X_LI, Y_LI) with Y_LI the (N, 1, V, C) corrected line integrals when
        ``return_sinogram``.
    """
    op = _operator(op)
    y, metal, x_ma, tr = _check_inputs(Y_ma, metal_mask, X_ma, op, trace, dilate)
    y_li = interpolate_trace(y, tr)
    x = reinsert_metal(mu_to_hu(op.fbp(y_li, filter=filter, cutoff=cutoff)), metal, x_ma)
    return (x, y_li) if return_sinogram else x

