"""Input validation shared by the whole library: errors name the argument and the expected form,
and nothing is silently broadcast or cast."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def format_shape(shape: Sequence[int | None]) -> str:
    """``(N, 1, 64, 64)`` for ``(None, 1, 64, 64)``."""
    return "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"


def check_tensor(
    x,
    name: str,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
    floating: bool = True,
    context: str = "",
    nonempty: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
) -> torch.Tensor:
    """Validate ``x`` and return it as a torch tensor (numpy arrays are wrapped without copying).

    ``shape`` may hold ``None`` for free dimensions, e.g. ``(None, 1, 64, 64)``; ``context`` (e.g. the
    geometry) is appended to shape errors so the user sees why that shape is expected. ``nonempty``: a batch of
    zero slices is refused (the operators would fail deep inside MKL / the samplers); ``dtypes``: the dtypes
    accepted (half precision, say, has no CPU kernels in the CT operators and is refused here, by name).
    """
    ctx = f" for {context}" if context else ""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {want}, got {str(x.dtype).replace('torch.', '')} "
                         f"(convert it explicitly, e.g. x.float())")
    if ndim is not None and x.ndim != ndim:
        want = f" {format_shape(shape)}" if shape is not None else ""
        raise ValueError(f"{name} must have {ndim} dimensions{want}{ctx}, got shape {tuple(x.shape)}")
    if shape is not None:
        if len(shape) != x.ndim or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            raise ValueError(f"{name} must have shape {format_shape(shape)}{ctx}, got {tuple(x.shape)}")
    if nonempty and (x.ndim == 0 or x.shape[0] == 0):
        raise ValueError(f"{name} must hold at least one slice, got an empty batch of shape {tuple(x.shape)}")
    if finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return x


#: what the pipeline's inputs may be: single or double precision (half precision is refused, not cast).
INPUT_DTYPES = (torch.float32, torch.float64)


def check_mask(x, name: str, *, shape: Sequence[int | None] | None = None, context: str = "") -> torch.Tensor:
    """A binary mask (bool, integer or floating; torch or numpy) validated like :func:`check_tensor` and returned
    as a float32 tensor of 0 / 1 (numpy masks used to fail with AttributeError on ``.float()``)."""
    x = check_tensor(x, name, ndim=None if shape is None else len(shape), shape=shape, floating=False,
                     context=context)
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        raise ValueError(f"{name} must be bool, integer, float32 or float64, got {x.dtype}")
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return (x > 0).float() if x.dtype != torch.bool else x.float()


def parse_assignments(items: Sequence[str]) -> dict:
    """``["steps=100", "betas=(0.9,0.999)", "norm=affine", "x=null"]`` -> ``{"steps": 100, "betas": (0.9, 0.999),
    "norm": "affine", "x": None}``: the command lines' ``--set`` items. Values are Python literals or JSON (so
    ``true`` / ``null`` / ``[1, 2]`` work as well as ``True`` / ``None`` / ``(1, 2)``); anything else stays a string.
    A malformed item raises ValueError naming it."""
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set expects field=value, got {it!r}")
        k, v = (s.strip() for s in it.split("=", 1))
        out[k] = _literal(v)
    return out


def _literal(text: str):
    import ast
    import json

    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(text)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return text
