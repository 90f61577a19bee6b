"""Search spaces of the OSRO factors k (Eq. 13), α and β (Eq. 15), all in [0, 1] as the paper states them.

``grid``: every combination of ``points`` evenly spaced values per factor (``points``³ trials; 5 -> 125);
``random``: ``tune.uniform`` per factor for ``num_samples`` random trials (a finer search once the grid has found
the region). Both score from cached priors (``dudocrop.eval.fusion.FusionCache``), so trials cost milliseconds.
"""

from __future__ import annotations

import itertools

import numpy as np
from ray import tune

FACTORS = ("k", "alpha", "beta")


def grid_values(points: int) -> list[float]:
    """The ``points`` evenly spaced values in [0, 1] the grid gives each factor."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2 (values per factor), got {points!r}")
    return [round(float(v), 4) for v in np.linspace(0.0, 1.0, points)]


def grid_candidates(points: int) -> list[dict[str, float]]:
    """Every (k, α, β) of the grid as a dict, in the order Ray Tune's grid runs them: what a plain search over
    cached priors (``FusionCache.best``) needs."""
    values = grid_values(points)
    return [dict(zip(FACTORS, v, strict=True)) for v in itertools.product(values, repeat=len(FACTORS))]


def fusion_space(kind: str = "grid", points: int = 5) -> dict:
    if kind == "grid":
        return {f: tune.grid_search(grid_values(points)) for f in FACTORS}
    if kind == "random":
        return {f: tune.uniform(0.0, 1.0) for f in FACTORS}
    raise ValueError(f"kind must be 'grid' or 'random', got {kind!r}")
