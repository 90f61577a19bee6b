"""CT physics: geometry, projection operators, metal traces and metal artifact simulation."""

from dudocrop.ct.geometry import PRESETS, FanBeamGeometry, get_geometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.units import MU_WATER, hu_to_mu, mu_to_hu

__all__ = ["PRESETS", "FanBeamGeometry", "FanBeamOperator", "MU_WATER", "get_geometry", "hu_to_mu", "mu_to_hu"]
