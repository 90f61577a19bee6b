"""The [0, 1] normalisation of attenuation used by the diffusion stages (paper §IV-A: "the image inputs are
converted from HU to attenuation coefficient (mm^-1) and normalized in the range [0, 1]"), defined once.

Images: mu / mu_max with mu_max the attenuation of +3072 HU (top of the 12-bit CT range; metal saturates).
Sinograms: p / sino_max with sino_max the line integral of a +1000 HU (dense bone) path across the whole field
of view, so every anatomy fits and only metal traces saturate (they are replaced by the prior, paper Eq. 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dudocrop.ct.geometry import FanBeamGeometry, get_geometry
from dudocrop.ct.units import hu_to_mu, mu_to_hu

HU_MAX = 3072.0
SINO_REFERENCE_HU = 1000.0


@dataclass(frozen=True)
class Normalization:
    mu_max: float
    sino_max: float

    @classmethod
    def for_geometry(cls, geometry: FanBeamGeometry | str) -> Normalization:
        g = get_geometry(geometry)
        return cls(mu_max=float(hu_to_mu(HU_MAX)), sino_max=float(hu_to_mu(SINO_REFERENCE_HU)) * 2 * g.fov_radius)

    def image(self, hu):
        """HU -> [0, 1]."""
        return _clip01(hu_to_mu(hu) / self.mu_max)

    def image_to_hu(self, unit):
        return mu_to_hu(unit * self.mu_max)

    def sino(self, p):
        """Line integrals -> [0, 1]."""
        return _clip01(p / self.sino_max)

    def sino_to_line_integrals(self, unit):
        return unit * self.sino_max


def _clip01(x):
    if isinstance(x, torch.Tensor):
        return x.clamp(0.0, 1.0)
    return np.clip(x, 0.0, 1.0)
