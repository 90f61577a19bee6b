"""Search spaces of the IR-SDE's λ (paper Eq. 4-6, §IV-A-2: λ = 50 on the 0-255 scale) and, optionally, the
stage's learning rate and T, for ``ray_jobs/tune_sde.py``.

λ is swept in /255 units (``lam_255``; the trial divides by 255, as ``SDEConfig.lam`` holds it):

* ``grid``: the given values in the given order (default :data:`DEFAULT_LAMBDAS_255`, six values around the
  paper's 50, spaced about ×1.5 apart), each one trial; the paper's value is added (last) when missing, so every
  sweep compares against it;
* ``random``: ``tune.loguniform`` over [lo, hi] (``num_samples`` trials), for a finer search once the grid has found
  the region.

``lr`` and ``T`` are swept when given (a grid of the listed values); otherwise the stage preset's are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray import tune

from dudocrop.sde.config import PAPER_LAMBDA_255

#: six λ·255 values spaced ≈×1.5 around the paper's 50 (the bench sweep's grid)
DEFAULT_LAMBDAS_255: tuple[float, ...] = (15.0, 25.0, 35.0, 50.0, 75.0, 110.0)


def _positive(values, name: str, kind=float) -> list:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or (kind is int and int(v) != v):
            raise ValueError(f"{name} must hold positive {kind.__name__}s, got {v!r}")
        out.append(kind(v))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def sde_space(kind: str = "grid", lambdas_255: Sequence[float] = DEFAULT_LAMBDAS_255,
              lr: Sequence[float] | None = None, T: Sequence[int] | None = None) -> dict:
    """The Tune ``param_space``: ``lam_255`` (+ ``lr``, ``T`` when given). ``kind='random'`` takes the smallest
    and largest of ``lambdas_255`` as the log-uniform range."""
    lams = _positive(lambdas_255, "lambdas_255")
    if kind == "grid":
        grid = list(dict.fromkeys(lams + [PAPER_LAMBDA_255]))  # the order given (trials start in it), 50 added
        space: dict = {"lam_255": tune.grid_search(grid)}
    elif kind == "random":
        lo, hi = min(lams), max(lams)
        if not lo < PAPER_LAMBDA_255 < hi:
            raise ValueError(f"lambdas_255 must span the paper's {PAPER_LAMBDA_255} for a random sweep, got "
                             f"[{lo}, {hi}]")
        space = {"lam_255": tune.loguniform(lo, hi)}
    else:
        raise ValueError(f"kind must be 'grid' or 'random', got {kind!r}")
    if lr:
        space["lr"] = tune.grid_search(_positive(lr, "lr"))
    if T:
        space["T"] = tune.grid_search(_positive(T, "T", int))
    return space
