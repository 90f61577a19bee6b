"""The [0, 1] normalisation of attenuation used by the diffusion stages (paper §IV-A: "the image inputs are
converted from HU to attenuation coefficient (mm^-1) and normalized in the range [0, 1]"), defined once.

Images: mu / mu_max with mu_max the attenuation of +3072 HU (top of the 12-bit CT range; metal saturates).
Sinograms: p / sino_max with sino_max the line integral of a +1000 HU (dense bone) path across the whole field
of view, so every anatomy fits and only metal traces saturate (they are replaced by the prior, paper Eq. 10).
Residuals (paper Eq. 16, the residual-domain IR-SDE): 0.5 + Δμ / (2 mu_max) for a difference Δμ of two images,
see :meth:`Normalization.residual`.
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

    def residual(self, dhu):
        """A difference of two images in HU (X_p − X'_p or X_p − X_ref, paper Eq. 16) -> [0, 1].

        0.5 + Δμ / (2 mu_max) with Δμ = μ_water · ΔHU / 1000 (the HU offset cancels in a difference). Why this
        form: two images inside the image range [0, mu_max] differ by at most ±mu_max, so this maps every such
        residual into [0, 1] without clipping, with 0 (no residual) at the mid-point 0.5 so both signs fit; and one
        unit is 2·mu_max, the same order of attenuation per unit as the image domain, so λ = 50/255 (Eq. 6) means a
        comparable noise level ("the residual-domain IR-SDE is set to the same parameters as the image-domain
        IR-SDE", paper §IV-B)."""
        return _clip01(0.5 + (hu_to_mu(dhu) - hu_to_mu(0.0)) / (2.0 * self.mu_max))

    def residual_to_hu(self, unit):
        """Inverse of :meth:`residual`: [0, 1] -> a difference in HU."""
        return mu_to_hu((unit - 0.5) * 2.0 * self.mu_max + hu_to_mu(0.0))


def _clip01(x):
    if isinstance(x, torch.Tensor):
        return x.clamp(0.0, 1.0)
    return np.clip(x, 0.0, 1.0)


def neutral_level(domain: str) -> float:
    """The [0, 1] value of "nothing there" in a domain, the centre a network's inputs are standardised around:
    water for images (the same for every geometry: mu_max does not depend on it), no difference (0.5) for
    residuals, no attenuation (0) for sinograms."""
    if domain == "image":
        return float(hu_to_mu(0.0) / hu_to_mu(HU_MAX))
    if domain == "residual":
        return 0.5
    if domain == "sinogram":
        return 0.0
    raise ValueError(f"domain must be 'image', 'sinogram' or 'residual', got {domain!r}")
