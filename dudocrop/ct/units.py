"""Hounsfield units and linear attenuation: the one place the conversion is defined.

AAPM CT-MAR convention (REFERENCE §3): mu [1/mm] = MU_WATER * (1 + HU / 1000) with MU_WATER = 0.02 /mm.
"""

from __future__ import annotations

MU_WATER = 0.02  # 1/mm
HU_AIR = -1000.0


def hu_to_mu(hu, mu_water: float = MU_WATER):
    """Linear attenuation (1/mm) from HU; works on floats, numpy arrays and torch tensors."""
    return mu_water * (1.0 + hu / 1000.0)


def mu_to_hu(mu, mu_water: float = MU_WATER):
    """HU from linear attenuation (1/mm)."""
    return (mu / mu_water - 1.0) * 1000.0
