"""X-ray spectra (spekpy) and energy-dependent linear attenuation (xraydb) for the metal artifact simulator.

Sources:

* Spectra: SpekPy v2 (Poludniowski et al., *Med. Phys.* 48, 3630, 2021), a tungsten anode, photons per keV
  per unit fluence at 1 m. We bin its 0.5 keV output into ``energy_step_kev`` bins whose energy is the
  photon-weighted mean of the bin (near the peak the bin centre would bias the mean energy).
* Attenuation: xraydb's Elam/Ravel/Sieber tables, total cross section (photo + coherent + incoherent),
  as used by CT simulators (CatSim/XCIST, the AAPM CT-MAR simulator; REFERENCE §3).
* Compositions: ICRU Report 44 (1989) cortical bone (1.92 g/cm^3); ASTM F138 (316L stainless steel),
  ASTM F75 (Co-Cr-Mo casting alloy); a high-copper dental amalgam (Hg 50 %, Ag 30 %, Sn 12 %, Cu 8 % by mass,
  ~11.6 g/cm^3; Ferracane, *Materials in Dentistry*, 2001).

Units: energies in keV, densities in g/cm^3, attenuation in 1/mm (the unit of ``dudocrop.ct.units``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "MATERIALS",
    "Material",
    "Spectrum",
    "SpectrumSpec",
    "get_material",
    "linear_attenuation",
    "mass_attenuation",
    "material_names",
    "reference_energy_kev",
    "spectrum",
]


# ---- materials -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """A named material: either a chemical ``formula`` (e.g. ``"H2O"``, ``"Ti"``) or a ``composition`` of
    (element symbol, mass fraction) pairs summing to 1, and a ``density`` in g/cm^3."""

    name: str
    density: float
    formula: str | None = None
    composition: tuple[tuple[str, float], ...] | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if (self.formula is None) == (self.composition is None):
            raise ValueError(f"Material {self.name!r}: give exactly one of formula or composition")
        if not (math.isfinite(self.density) and self.density > 0):
            raise ValueError(f"Material {self.name!r}: density must be a positive number, got {self.density!r}")
        if self.composition is not None:
            total = sum(w for _, w in self.composition)
            if abs(total - 1.0) > 1e-3 or any(w < 0 for _, w in self.composition):
                raise ValueError(
                    f"Material {self.name!r}: composition mass fractions must be >= 0 and sum to 1, got {total:.4f}"
                )

    def mass_attenuation(self, energies_kev) -> np.ndarray:
        """Mass attenuation coefficient mu/rho in (1/mm) / (g/cm^3), i.e. cm^2/g divided by 10."""
        return mass_attenuation(self.name, energies_kev)

    def mu(self, energies_kev, density: float | None = None) -> np.ndarray:
        """Linear attenuation (1/mm) at the given energies (keV), at ``density`` (default: the material's)."""
        return self.mass_attenuation(energies_kev) * (self.density if density is None else density)


def _fractions(pairs: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    total = sum(pairs.values())
    return tuple((el, w / total) for el, w in pairs.items())


# ICRU 44 cortical bone, mass fractions (%); normalised so rounding in the table does not leak into mu.
_ICRU44_CORTICAL_BONE = {"H": 3.4, "C": 15.5, "N": 4.2, "O": 43.5, "Na": 0.1, "Mg": 0.2, "P": 10.3, "S": 0.3,
                         "Ca": 22.5}

MATERIALS: dict[str, Material] = {
    m.name: m
    for m in (
        Material("water", 1.0, formula="H2O"),
        Material("cortical_bone", 1.92, composition=_fractions(_ICRU44_CORTICAL_BONE), note="ICRU 44"),
        Material("titanium", 4.5, formula="Ti"),
        Material("iron", 7.874, formula="Fe"),
        Material("stainless_steel", 8.0,
                 composition=_fractions({"Fe": 65.5, "Cr": 17.0, "Ni": 12.0, "Mo": 2.5, "Mn": 2.0, "Si": 1.0}),
                 note="316L (ASTM F138)"),
        Material("cocr", 8.3, composition=_fractions({"Co": 65.0, "Cr": 28.0, "Mo": 6.0, "Ni": 1.0}),
                 note="Co-Cr-Mo (ASTM F75)"),
        Material("copper", 8.96, formula="Cu"),
        Material("gold", 19.3, formula="Au"),
        Material("amalgam", 11.6, composition=_fractions({"Hg": 50.0, "Ag": 30.0, "Sn": 12.0, "Cu": 8.0}),
                 note="high-copper dental amalgam"),
    )
}

#: Other spellings (the AAPM metal-info JSON says Ti, Co, Cu, ...).
ALIASES: dict[str, str] = {
    "h2o": "water", "bone": "cortical_bone", "ti": "titanium", "fe": "iron", "steel": "stainless_steel",
    "ss": "stainless_steel", "co": "cocr", "co-cr": "cocr", "cobalt_chrome": "cocr", "cu": "copper",
    "au": "gold",
}

#: Materials that count as metal (everything except the two body base materials).
METALS: tuple[str, ...] = tuple(n for n in MATERIALS if n not in ("water", "cortical_bone"))


def material_names() -> tuple[str, ...]:
    return tuple(MATERIALS)


def get_material(name: str | Material) -> Material:
    """Look a material up by name or alias (case-insensitive); ValueError lists the known names."""
    if isinstance(name, Material):
        return name
    if not isinstance(name, str):
        raise ValueError(f"material must be a material name (str), got {type(name).__name__}")
    key = name.strip().lower().replace(" ", "_")
    key = ALIASES.get(key, key)
    try:
        return MATERIALS[key]
    except KeyError:
        raise ValueError(
            f"unknown material {name!r}; known materials: {', '.join(MATERIALS)} "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        ) from None


@lru_cache(maxsize=256)
def _mass_attenuation_cached(m: Material, energies_kev: tuple[float, ...]) -> np.ndarray:
    import xraydb

    e_ev = np.asarray(energies_kev, dtype=np.float64) * 1e3
    if m.formula is not None:
        mu_cm = np.asarray(xraydb.material_mu(m.formula, e_ev, density=1.0, kind="total"), dtype=np.float64)
    else:
        mu_cm = sum(w * np.asarray(xraydb.mu_elam(el, e_ev, kind="total"), dtype=np.float64)
                    for el, w in m.composition)
    out = np.atleast_1d(mu_cm) / 10.0  # cm^2/g * g/cm^3 = 1/cm -> 1/mm
    out.setflags(write=False)
    return out


def mass_attenuation(material: str | Material, energies_kev) -> np.ndarray:
    """mu/rho of a material (a registered name or a :class:`Material`) in (1/mm)/(g/cm^3), total cross
    section, at energies in keV."""
    m = get_material(material)
    e = np.atleast_1d(np.asarray(energies_kev, dtype=np.float64))
    if e.ndim != 1 or not np.all(np.isfinite(e)) or np.any(e < 1.0) or np.any(e > 1000.0):
        raise ValueError(f"energies_kev must be finite energies in [1, 1000] keV, got {energies_kev!r}")
    return _mass_attenuation_cached(m, tuple(float(v) for v in e)).copy()


def linear_attenuation(material: str | Material, energies_kev, density: float | None = None) -> np.ndarray:
    """Linear attenuation mu(E) in 1/mm (at ``density`` g/cm^3, default the material's)."""
    return get_material(material).mu(energies_kev, density)


@lru_cache(maxsize=8)
def reference_energy_kev(mu_water: float | None = None) -> float:
    """The monochromatic energy at which water attenuates ``mu_water`` (1/mm): 64.0 keV for 0.02/mm.

    HU in this project are defined by ``units.MU_WATER`` (REFERENCE §3); the simulator splits a clean HU image
    into water and bone at this energy so that its monochromatic projection there is exactly FP(hu_to_mu(x)).
    """
    from scipy.optimize import brentq

    from dudocrop.ct.units import MU_WATER

    target = MU_WATER if mu_water is None else float(mu_water)
    f = lambda k: float(mass_attenuation("water", [k])[0]) - target  # noqa: E731
    return float(brentq(f, 20.0, 500.0, xtol=1e-6))


# ---- spectra ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectrumSpec:
    """Tube spectrum settings. The default (120 kVp, 12 deg anode, 3 mm Al + 0.2 mm Cu) has a first HVL of
    7.9 mm Al and a mean energy of 63.6 keV, typical of clinical CT at 120 kVp (HVL 6.5-9 mm Al)."""

    kvp: float = 120.0
    anode_angle_deg: float = 12.0
    filters: tuple[tuple[str, float], ...] = (("Al", 3.0), ("Cu", 0.2))
    energy_step_kev: float = 2.0
    min_energy_kev: float = 15.0  # below this the filtered beam has < 1e-4 of its photons

    def __post_init__(self) -> None:
        if not (20.0 <= self.kvp <= 300.0):
            raise ValueError(f"SpectrumSpec.kvp must be in [20, 300] kV, got {self.kvp!r}")
        if not (0.5 <= self.energy_step_kev <= 20.0) or not math.isclose(self.energy_step_kev * 2,
                                                                           round(self.energy_step_kev * 2)):
            raise ValueError(f"SpectrumSpec.energy_step_kev must be a multiple of 0.5 in [0.5, 20] keV, "
                             f"got {self.energy_step_kev!r}")
        if not (1.0 <= self.min_energy_kev < self.kvp):
            raise ValueError(f"SpectrumSpec.min_energy_kev must be in [1, kvp), got {self.min_energy_kev!r}")
        for f in self.filters:
            if not (isinstance(f, Sequence) and len(f) == 2 and isinstance(f[0], str) and f[1] >= 0):
                raise ValueError(f"SpectrumSpec.filters must hold (material, thickness_mm >= 0) pairs, got {f!r}")


@dataclass(frozen=True)
class Spectrum:
    """A binned spectrum: bin energies (keV, photon-weighted means) and photon fractions summing to 1."""

    energies_kev: np.ndarray
    fractions: np.ndarray
    spec: SpectrumSpec

    @property
    def mean_energy_kev(self) -> float:
        return float(np.sum(self.energies_kev * self.fractions))

    def __hash__(self) -> int:  # arrays are read-only and determined by spec
        return hash(self.spec)

    def __eq__(self, other) -> bool:
        return isinstance(other, Spectrum) and other.spec == self.spec


@lru_cache(maxsize=16)
def spectrum(spec: SpectrumSpec = SpectrumSpec()) -> Spectrum:
    """The binned photon spectrum for ``spec`` (cached: spekpy takes ~0.5 s)."""
    import spekpy

    fine = 0.5
    s = spekpy.Spek(kvp=spec.kvp, th=spec.anode_angle_deg, dk=fine)
    if spec.filters:
        s.multi_filter(tuple((m, float(t)) for m, t in spec.filters))
    k, phi = s.get_spectrum()
    k = np.asarray(k, dtype=np.float64)
    phi = np.clip(np.asarray(phi, dtype=np.float64), 0.0, None)
    keep = k >= spec.min_energy_kev
    k, phi = k[keep], phi[keep]
    idx = np.floor((k - spec.min_energy_kev) / spec.energy_step_kev).astype(np.int64)
    n = int(idx.max()) + 1
    w = np.bincount(idx, weights=phi, minlength=n)
    ke = np.bincount(idx, weights=phi * k, minlength=n)
    ok = w > 0
    energies = ke[ok] / w[ok]
    fractions = w[ok] / w[ok].sum()
    energies.setflags(write=False)
    fractions.setflags(write=False)
    return Spectrum(energies, fractions, spec)
