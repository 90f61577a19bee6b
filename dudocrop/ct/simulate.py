"""Polychromatic metal artifact simulation: clean HU slice + metal objects -> (X_ma, Y_ma, X_ref, Y_ref, masks).

The recipe is the SynDeepLesion one (Zhang & Yu, IEEE TMI 2018; used by InDuDoNet, ACDNet, DuDoDp; REFERENCE
§3) with an energy-integrating detector, a scatter/electronic floor and the AAPM CT-MAR conventions for HU:

1. Material decomposition of the clean slice (HU -> mu via ``units``, mu >= 0). Pixels below
   ``water_threshold_hu`` (100 HU) are water-like, above ``bone_threshold_hu`` (1500 HU) bone, and in between
   the bone fraction rises linearly. Each part becomes a density map: rho_w = mu_w / (mu/rho)_water(E_ref),
   rho_b = mu_b / (mu/rho)_bone(E_ref), with E_ref = 64.0 keV the energy where water attenuates
   ``MU_WATER`` = 0.02 /mm (``materials.reference_energy_kev``), so the monochromatic E_ref projection of the
   clean slice is exactly FP(hu_to_mu(x)). (SynDeepLesion uses 70 keV and mu_water = 0.192 /cm; we follow
   the project's HU convention instead.)
2. Metal: fractional coverage c_m per material (``metal.rasterize_metal``) at full density; metal displaces
   the tissue under it (rho_w, rho_b multiplied by 1 - c).
3. Line integrals by ONE forward projection per material map (not per energy): P_w = FP(rho_w), P_b = FP(rho_b),
   P_m = FP(c_m) (mm of metal).
4. Per ray, the detected signal sums the spectrum (``materials.spectrum``, 120 kVp):
   I = N0 sum_E s(E) w(E) exp(-(mu/rho)_w(E) P_w - (mu/rho)_b(E) P_b - sum_m mu_m(E) P_m),
   w(E) = E for an energy-integrating detector (1 for photon counting).
5. Noise: the energy-integrated signal is compound Poisson; it is drawn as g * Poisson(mean / g) with
   g = var / mean (mean = N0 sum s w t, var = N0 sum s w^2 t; Whiting, Proc. SPIE 4682, 2002), plus
   ``scatter_photons`` of the mean energy (optionally subtracted again: scatter correction) and Gaussian
   electronic noise; the signal is floored at ``min_quanta`` quanta before p = -log(I / I0).
6. Water beam-hardening correction: a polynomial p_mono = sum_{k=1..K} c_k p^k fitted once per settings so that
   water of any thickness L maps to MU_WATER * L (``water_bhc``), continued linearly beyond the fitted range.
7. X = FBP(Y) in HU.

Y_ref uses the same physics without metal. By default the two scans are independent noise realisations, as two
real acquisitions (and the AAPM CT-MAR data, which simulate them separately) are: outside the metal trace
(M_s = P_metal > 0) Y_ma and Y_ref then have the same mean but independent noise, so X_ma - X_ref off the metal
carries the noise of two scans rather than none. ``SimulationSettings.shared_noise`` keeps the older recipe: the
metal scan reuses the reference realisation and differs only on the trace (simulated with its own noise), so
outside the trace Y_ma == Y_ref exactly (paper Eq. 1 taken literally). Noiseless settings give Y_ma == Y_ref off
the trace either way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch

from dudocrop.checks import check_tensor
from dudocrop.ct.filters import FILTERS
from dudocrop.ct.geometry import FanBeamGeometry
from dudocrop.ct.materials import SpectrumSpec, get_material, mass_attenuation, reference_energy_kev, spectrum
from dudocrop.ct.metal import MetalConfig, MetalObject, describe, get_metal_config, rasterize_metal, sample_metal
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.units import HU_AIR, MU_WATER, hu_to_mu, mu_to_hu

__all__ = [
    "SIMULATION_PRESETS",
    "SimulationResult",
    "SimulationSettings",
    "apply_water_bhc",
    "get_settings",
    "simulate",
    "water_bhc",
]


# ---- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationSettings:
    """Physics of one simulation. ``photons_per_ray`` None means noiseless (no Poisson / electronic noise)."""

    name: str = "custom"
    spectrum: SpectrumSpec = SpectrumSpec()
    photons_per_ray: float | None = 2e6  # incident photons per detector channel and view (N0)
    scatter_photons: float = 0.0  # mean scatter quanta per ray, a uniform floor
    scatter_correction: bool = False  # subtract the expected scatter before the log
    electronic_noise: float = 0.0  # std of additive Gaussian electronic noise, in quanta of the mean energy
    min_quanta: float = 1.0  # signal floor before -log, in quanta (noisy) ...
    min_transmission: float = 1e-12  # ... and as a transmission (noiseless)
    energy_integrating: bool = True  # detector weights photons by energy (False: photon counting)
    water_threshold_hu: float = 100.0  # REFERENCE §3 (SynDeepLesion): water below ...
    bone_threshold_hu: float = 1500.0  # ... bone above, linear mixture in between
    bone_material: str = "cortical_bone"
    bhc: bool = True  # apply the water beam-hardening correction (False: raw -log, shows cupping)
    bhc_degree: int = 4  # water BHC polynomial degree (SynDeepLesion: cubic)
    bhc_max_water_mm: float = 450.0  # water thickness range of the BHC fit (longest body chord ~400 mm)
    displace_tissue: bool = True  # metal replaces the tissue under it
    metal_supersample: int = 8  # sub-pixel samples per axis for metal partial volume
    fbp_filter: str = "ram-lak"
    fbp_cutoff: float = 1.0
    # False: Y_ma and Y_ref are independent noise realisations (two scans, the default); True: the metal scan reuses
    # the reference scan's noise and differs only on the metal trace
    shared_noise: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.spectrum, SpectrumSpec):
            raise ValueError(f"SimulationSettings.spectrum must be a SpectrumSpec, got {type(self.spectrum).__name__}")
        if self.photons_per_ray is not None and not (_pos(self.photons_per_ray) and self.photons_per_ray >= 10):
            raise ValueError(f"SimulationSettings.photons_per_ray must be None (noiseless) or >= 10, "
                             f"got {self.photons_per_ray!r}")
        for f in ("scatter_photons", "electronic_noise"):
            v = getattr(self, f)
            if not (_num(v) and v >= 0):
                raise ValueError(f"SimulationSettings.{f} must be a finite number >= 0, got {v!r}")
        if not (_pos(self.min_quanta) and 0 < self.min_transmission < 1):
            raise ValueError("SimulationSettings.min_quanta must be > 0 and min_transmission in (0, 1)")
        if not (_num(self.water_threshold_hu) and _num(self.bone_threshold_hu)
                and self.water_threshold_hu < self.bone_threshold_hu):
            raise ValueError(f"SimulationSettings thresholds must satisfy water < bone, got "
                             f"{self.water_threshold_hu!r} / {self.bone_threshold_hu!r}")
        object.__setattr__(self, "bone_material", get_material(self.bone_material).name)
        if not (isinstance(self.bhc_degree, int) and 1 <= self.bhc_degree <= 8):
            raise ValueError(f"SimulationSettings.bhc_degree must be an int in [1, 8], got {self.bhc_degree!r}")
        if not _pos(self.bhc_max_water_mm):
            raise ValueError(f"SimulationSettings.bhc_max_water_mm must be > 0, got {self.bhc_max_water_mm!r}")
        if not (isinstance(self.metal_supersample, int) and 1 <= self.metal_supersample <= 32):
            raise ValueError(f"SimulationSettings.metal_supersample must be an int in [1, 32], "
                             f"got {self.metal_supersample!r}")
        if not isinstance(self.shared_noise, bool):
            raise ValueError(f"SimulationSettings.shared_noise must be a bool, got {self.shared_noise!r}")
        if self.fbp_filter not in FILTERS:
            raise ValueError(f"SimulationSettings.fbp_filter must be one of {FILTERS}, got {self.fbp_filter!r}")

    @property
    def noisy(self) -> bool:
        return self.photons_per_ray is not None

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["spectrum"] = {k: getattr(self.spectrum, k) for k in self.spectrum.__dataclass_fields__}
        return d


def _num(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and math.isfinite(v)


def _pos(v) -> bool:
    return _num(v) and v > 0


#: AAPM CT-MAR-like (REFERENCE §3: 120 kVp, Poisson + electronic noise, scatter with correction, water BHC).
#: N0 = 2e6 gives ~25 HU noise (ram-lak) in the centre of a 34 x 24 cm water ellipse at 0.78 mm pixels.
AAPM_LIKE = SimulationSettings(name="aapm_like", photons_per_ray=2e6, scatter_photons=200.0, scatter_correction=True,
                               electronic_noise=10.0)
#: SynDeepLesion-like (REFERENCE §3): 20-120 keV, N0 = 2e7, 20 scatter photons, no scatter correction, cubic BHC
#: (~8 HU noise in the same water ellipse).
SYNDEEPLESION_LIKE = SimulationSettings(
    name="syndeeplesion_like", spectrum=SpectrumSpec(min_energy_kev=20.0, energy_step_kev=1.0),
    photons_per_ray=2e7, scatter_photons=20.0, scatter_correction=False, electronic_noise=0.0, bhc_degree=3,
)
#: The same physics with no noise and no scatter: beam hardening and partial volume only.
NOISELESS = replace(AAPM_LIKE, name="noiseless", photons_per_ray=None, scatter_photons=0.0, electronic_noise=0.0)

SIMULATION_PRESETS: dict[str, SimulationSettings] = {s.name: s for s in (AAPM_LIKE, SYNDEEPLESION_LIKE, NOISELESS)}


def get_settings(name_or_settings: str | SimulationSettings) -> SimulationSettings:
    if isinstance(name_or_settings, SimulationSettings):
        return name_or_settings
    try:
        return SIMULATION_PRESETS[name_or_settings]
    except (KeyError, TypeError):
        raise ValueError(f"unknown simulation settings {name_or_settings!r}; presets: "
                         f"{', '.join(SIMULATION_PRESETS)}") from None


# ---- spectral model and water BHC ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Spectral:
    energies: np.ndarray  # keV
    w1: np.ndarray  # N0-normalised detector weights per bin: s(E) w(E) / sum s w  (sums to 1)
    w2: np.ndarray  # s(E) w(E)^2 / sum s w, for the compound-Poisson variance (in keV per unit signal)
    mean_quantum: float  # signal of one incident photon of the mean detected energy (keV or 1)
    water: np.ndarray  # (mu/rho)(E), (1/mm)/(g/cm^3)
    bone: np.ndarray


@lru_cache(maxsize=16)
def _spectral(spec: SpectrumSpec, energy_integrating: bool, bone_material: str) -> _Spectral:
    sp = spectrum(spec)
    e, s = sp.energies_kev, sp.fractions
    w = e if energy_integrating else np.ones_like(e)
    norm = float(np.sum(s * w))
    return _Spectral(e, s * w / norm, s * w * w / norm, norm, mass_attenuation("water", e),
                     mass_attenuation(bone_material, e))


@lru_cache(maxsize=16)
def _water_bhc_cached(spec: SpectrumSpec, energy_integrating: bool, degree: int, max_water_mm: float):
    sd = _spectral(spec, energy_integrating, "cortical_bone")
    L = np.linspace(0.0, max_water_mm, 4001)
    p = -np.log(np.exp(-np.outer(L, sd.water)) @ sd.w1)  # polychromatic water line integrals
    t = MU_WATER * L  # what a monochromatic E_ref scan measures
    X = np.stack([p**k for k in range(1, degree + 1)], axis=1)
    coef, *_ = np.linalg.lstsq(X, t, rcond=None)
    coef.setflags(write=False)
    return coef, float(p[-1])


def water_bhc(settings: SimulationSettings | str) -> tuple[np.ndarray, float]:
    """Water beam-hardening correction for ``settings``: polynomial coefficients (c_1..c_K, no constant term,
    so p = 0 stays 0) and the largest fitted polychromatic line integral. Least squares over water thickness
    0..``bhc_max_water_mm``; cached per (spectrum, detector, degree, range). Degree 4 is within 0.06 % of
    MU_WATER * L over 0-400 mm for the default spectrum (cubic: 0.23 %)."""
    s = get_settings(settings)
    return _water_bhc_cached(s.spectrum, s.energy_integrating, s.bhc_degree, float(s.bhc_max_water_mm))


def apply_water_bhc(p: torch.Tensor, settings: SimulationSettings | str) -> torch.Tensor:
    """p_mono = sum_k c_k p^k for p <= p_fit, continued along the tangent beyond (metal paths saturate far
    past the fitted water range, where a raw polynomial could turn over)."""
    st = get_settings(settings)
    if not st.bhc:
        return p
    coef, pmax = water_bhc(st)
    c = [float(v) for v in coef]

    def poly(x):
        acc = torch.zeros_like(x)
        for k in range(len(c) - 1, -1, -1):  # Horner on sum_{k>=1} c_k x^k = x (c_1 + x (c_2 + ...))
            acc = acc * x + c[k]
        return acc * x

    f_max = sum(ck * pmax ** (k + 1) for k, ck in enumerate(c))
    d_max = sum((k + 1) * ck * pmax**k for k, ck in enumerate(c))
    return torch.where(p <= pmax, poly(torch.clamp(p, max=pmax)), f_max + d_max * (p - pmax))


# ---- result --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Batched outputs (float32, on the input's device): images (N, 1, H, W) in HU, sinograms (N, 1, V, C)
    as BHC-corrected line integrals. ``metal_mask`` is coverage > 0.5 (0/1 float), ``metal_coverage`` the
    fractional coverage, ``metal_trace`` (bool) the rays with a non-zero metal path (Eq. 1's M_s).

    The trace contains ``trace.metal_trace(metal_mask, op)`` plus the few rays that graze only partial-volume
    metal pixels (coverage <= 0.5); Eq. 1 (Y_ma == Y_ref outside it, in the mean; exactly with
    ``shared_noise`` or without noise) holds for this trace, so
    downstream LI / NMAR should use it (or a dilated binary trace) rather than re-deriving one from the mask."""

    X_ma: torch.Tensor
    Y_ma: torch.Tensor
    X_ref: torch.Tensor
    Y_ref: torch.Tensor
    metal_mask: torch.Tensor
    metal_trace: torch.Tensor
    metal_coverage: torch.Tensor
    objects: tuple[tuple[MetalObject, ...], ...]
    settings: SimulationSettings
    geometry: FanBeamGeometry
    seed: int
    timings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.X_ma.shape[0]

    def record(self, i: int = 0) -> dict:
        """Slice ``i`` as numpy arrays plus the metal descriptors of ``dudocrop.data.schema``."""
        out = {k: getattr(self, k)[i, 0].detach().cpu().numpy().astype(np.float32)
               for k in ("X_ma", "X_ref", "Y_ma", "Y_ref", "metal_mask", "metal_trace")}
        out.update(describe(self.objects[i]))
        out["pixel_spacing_mm"] = self.geometry.pixel_size
        out["geometry"] = self.geometry.name
        return out


# ---- the simulator -------------------------------------------------------------------------------------


def _operator(op) -> FanBeamOperator:
    if isinstance(op, FanBeamOperator):
        return op
    try:
        return FanBeamOperator(op)
    except ValueError as e:
        raise ValueError(f"op must be a FanBeamOperator, a FanBeamGeometry or a preset name: {e}") from None


def _clean_batch(clean_hu, g: FanBeamGeometry) -> torch.Tensor:
    x = clean_hu
    if isinstance(x, np.ndarray | torch.Tensor) and x.ndim == 2:
        x = x[None, None]
    n = g.image_size
    return check_tensor(x, "clean_hu", ndim=4, shape=(None, 1, n, n), context=f"geometry {g.name!r}")


def _metal_per_slice(metal, n: int) -> list:
    """Normalise ``metal`` to one entry per slice: a tuple of objects or a MetalConfig."""
    if metal is None:
        return [()] * n
    if isinstance(metal, MetalConfig | str):
        return [get_metal_config(metal)] * n
    if isinstance(metal, MetalObject):
        return [(metal,)] * n
    if isinstance(metal, Sequence):
        if len(metal) == 0 or all(isinstance(m, MetalObject) for m in metal):
            return [tuple(metal)] * n
        if len(metal) == n and all(isinstance(m, Sequence | MetalConfig) and not isinstance(m, str)
                                   for m in metal):
            out = []
            for i, m in enumerate(metal):
                if isinstance(m, MetalConfig):
                    out.append(m)
                elif all(isinstance(o, MetalObject) for o in m):
                    out.append(tuple(m))
                else:
                    raise ValueError(f"metal[{i}] must be a sequence of MetalObject or a MetalConfig")
            return out
    raise ValueError(
        "metal must be None, a MetalObject, a sequence of MetalObject (every slice), one such sequence per "
        f"slice ({n} slices), or a MetalConfig / preset name; got {type(metal).__name__}"
    )


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _poly_signal(P: torch.Tensor, M: torch.Tensor, sd: _Spectral, need_var: bool,
                 chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised mean signal T = sum_E w1 exp(-P M^T) (and the variance weight sum_E w2 exp(...)).

    P: (R, K) line integrals of the K material maps; M: (E, K) attenuation per unit map value. Vectorised over
    rays and energies in chunks of rays (R x E float64 would not fit otherwise).
    """
    dev = P.device
    W = torch.as_tensor(np.stack([sd.w1, sd.w2], 1) if need_var else sd.w1[:, None], dtype=torch.float64,
                        device=dev)
    Mt = M.t().contiguous()
    out = torch.empty((P.shape[0], W.shape[1]), dtype=torch.float64, device=dev)
    for s in range(0, P.shape[0], chunk):
        a = P[s:s + chunk] @ Mt
        out[s:s + chunk] = torch.exp_(a.neg_()) @ W
    return out[:, 0], (out[:, 1] if need_var else None)


#: (water, bone) density-path steps (mm * g/cm^3) and sizes of the reference-scan table: water paths up to
#: 1022 mm and bone paths up to 255 mm (rays beyond fall back to the direct spectral sum).
_TABLE_STEP = (2.0, 1.0)
_TABLE_SIZE = (512, 256)


@lru_cache(maxsize=8)
def _table(spec: SpectrumSpec, energy_integrating: bool, bone_material: str) -> torch.Tensor:
    """(1, 2, n_w, n_b) float32 [log T, log V] of the two-material (water, bone) scan on a (P_w, P_b) grid.

    log-sum-exp of linear functions is smooth (its Hessian is the covariance of (mu_w, mu_b) under the
    attenuated spectrum), so bilinear interpolation at these steps errs by < 1e-4 in p, far below quantum
    noise (>= 7e-4 at N0 = 2e6), while costing one small grid instead of R x E exponentials per scan.
    """
    sd = _spectral(spec, energy_integrating, bone_material)
    pw = np.arange(_TABLE_SIZE[0]) * _TABLE_STEP[0]
    pb = np.arange(_TABLE_SIZE[1]) * _TABLE_STEP[1]
    P = torch.as_tensor(np.stack(np.meshgrid(pw, pb, indexing="ij"), -1).reshape(-1, 2))
    M = torch.as_tensor(np.stack([sd.water, sd.bone], 1))
    T, V = _poly_signal(P, M, sd, True)
    return torch.stack([torch.log(T), torch.log(V)]).reshape(1, 2, *_TABLE_SIZE).to(torch.float32)


def _ref_signal(Pw: torch.Tensor, Pb: torch.Tensor | None, st: SimulationSettings, sd: _Spectral):
    """(T, V) of the metal-free scan on every ray by bilinear interpolation in :func:`_table`."""
    if Pb is None:
        Pb = torch.zeros_like(Pw)
    Pw, Pb = Pw.clamp(min=0.0), Pb.clamp(min=0.0)
    tab = _table(st.spectrum, st.energy_integrating, st.bone_material).to(Pw.device)
    # grid_sample (align_corners=True): x indexes the last axis (bone), y the water axis, both in [-1, 1]
    gx = Pb / (_TABLE_STEP[1] * (_TABLE_SIZE[1] - 1)) * 2 - 1
    gy = Pw / (_TABLE_STEP[0] * (_TABLE_SIZE[0] - 1)) * 2 - 1
    grid = torch.stack([gx, gy], -1).to(torch.float32).reshape(1, 1, -1, 2)
    lt_lv = torch.nn.functional.grid_sample(tab, grid, mode="bilinear", padding_mode="border",
                                            align_corners=True)[0, :, 0].to(torch.float64)
    T, V = torch.exp(lt_lv[0]), torch.exp(lt_lv[1])
    out = (gx > 1) | (gy > 1)
    if bool(out.any()):  # beyond the table: exact sum for those few rays
        M = torch.as_tensor(np.stack([sd.water, sd.bone], 1), device=Pw.device)
        To, Vo = _poly_signal(torch.stack([Pw[out], Pb[out]], -1), M, sd, True)
        T[out], V[out] = To, Vo
    return T, (V if st.noisy else None)


def _measure(T: torch.Tensor, V: torch.Tensor | None, st: SimulationSettings, sd: _Spectral,
             gen: torch.Generator | None) -> torch.Tensor:
    """-log of the (noisy) detected signal, normalised to the unattenuated beam; before BHC."""
    if not st.noisy:
        return -torch.log(torch.clamp(T, min=st.min_transmission))
    n0 = float(st.photons_per_ray)
    q = sd.mean_quantum  # signal per photon (mean detected energy, keV; 1 for photon counting)
    # signal in units of q: mean m, variance v (compound Poisson for energy weighting)
    m = n0 * T + st.scatter_photons
    v = n0 * V / q + st.scatter_photons * (float(np.sum(sd.w2)) / q)  # scatter photons at the beam's spectrum
    g = torch.clamp(v / torch.clamp(m, min=1e-12), min=1e-6)
    lam = torch.clamp(m / g, min=0.0)
    sig = g * torch.poisson(lam, generator=gen)
    if st.electronic_noise > 0:
        sig = sig + st.electronic_noise * torch.randn(sig.shape, dtype=sig.dtype, device=sig.device, generator=gen)
    if st.scatter_correction:
        sig = sig - st.scatter_photons
    return -torch.log(torch.clamp(sig, min=st.min_quanta) / n0)


def _torch_generator(ss: np.random.SeedSequence, device: torch.device) -> torch.Generator:
    tg = torch.Generator(device=device)
    tg.manual_seed(int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return tg


def _generator(seed: int, i: int, device: torch.device
               ) -> tuple[np.random.Generator, torch.Generator, torch.Generator]:
    """Independent streams per slice: SeedSequence(seed) child i -> (metal placement, reference-scan noise,
    metal-scan noise). The third stream is only used for independent realisations (``shared_noise`` False);
    spawning it leaves the first two unchanged."""
    child = np.random.SeedSequence(seed, spawn_key=(i,))
    metal_ss, noise_ss, noise_ma_ss = child.spawn(3)
    return (np.random.default_rng(metal_ss), _torch_generator(noise_ss, device),
            _torch_generator(noise_ma_ss, device))


def simulate(clean_hu, op: FanBeamOperator | FanBeamGeometry | str, metal=None,
             settings: SimulationSettings | str = "aapm_like", seed: int = 0) -> SimulationResult:
    """Simulate metal-affected and reference scans of clean slices (see the module docstring for the physics).

    Args:
        clean_hu: (H, W) or (N, 1, H, W) float HU on ``op``'s image grid (numpy or torch; device is kept).
        op: a FanBeamOperator, geometry or preset name.
        metal: None (no metal), a MetalObject, a sequence of MetalObject (same for every slice), one sequence
            per slice, or a MetalConfig / metal preset name (objects sampled per slice from ``seed``).
        settings: SimulationSettings or a preset name (``aapm_like``, ``syndeeplesion_like``, ``noiseless``).
        seed: slice i uses child i of ``np.random.SeedSequence(seed)`` for metal placement and noise (one stream
            per scan), so a result is reproducible and a slice's noise does not depend on the batch size.
    """
    t0 = time.perf_counter()
    op = _operator(op)
    g = op.geometry
    st = get_settings(settings)
    seed = _seed(seed)
    x = _clean_batch(clean_hu, g)
    n = x.shape[0]
    dev = x.device
    per_slice = _metal_per_slice(metal, n)
    gens = [_generator(seed, i, dev) for i in range(n)]
    hu_np = x[:, 0].detach().cpu().numpy()

    # ---- metal objects and coverage maps
    objects: list[tuple[MetalObject, ...]] = []
    for i, m in enumerate(per_slice):
        objects.append(sample_metal(m, hu_np[i], g, gens[i][0]) if isinstance(m, MetalConfig) else m)
    maps = [rasterize_metal(o, g, st.metal_supersample) for o in objects]
    materials = sorted({k for mp in maps for k in mp.coverage})
    H = W_ = g.image_size
    cov = torch.zeros((n, len(materials), H, W_), dtype=torch.float32)
    for i, mp in enumerate(maps):
        for k, name in enumerate(materials):
            if name in mp.coverage:
                cov[i, k] = torch.from_numpy(mp.coverage[name])
    cov = cov.to(dev)
    total = cov.sum(1, keepdim=True)
    t_metal = time.perf_counter()

    # ---- material decomposition at E_ref (REFERENCE §3 thresholds)
    sd = _spectral(st.spectrum, st.energy_integrating, st.bone_material)
    e_ref = reference_energy_kev()
    mw_ref = float(mass_attenuation("water", [e_ref])[0])
    mb_ref = float(mass_attenuation(st.bone_material, [e_ref])[0])
    hu = torch.clamp(x.to(torch.float32), min=HU_AIR)
    mu = hu_to_mu(hu)
    fb = torch.clamp((hu - st.water_threshold_hu) / (st.bone_threshold_hu - st.water_threshold_hu), 0.0, 1.0)
    rho_w = mu * (1.0 - fb) / mw_ref
    rho_b = mu * fb / mb_ref
    has_bone = bool((rho_b > 0).any())

    # ---- one FP per material map, batched into a single operator call
    disp_w = st.displace_tissue and bool((total > 0).any())
    disp_b = disp_w and has_bone and bool((rho_b * total > 0).any())
    maps_fp = ([rho_w] + ([rho_b] if has_bone else []) + ([rho_w * total] if disp_w else [])
               + ([rho_b * total] if disp_b else []))
    n_metal = len(materials)
    if n_metal:
        maps_fp += [cov[:, k:k + 1] for k in range(n_metal)]
    stack = torch.cat(maps_fp, dim=1).reshape(-1, 1, H, W_)  # (N * K, 1, H, W)
    K = len(maps_fp)
    # all-zero maps (a slice of the batch without metal or bone) project to zero: skip them
    live = torch.nonzero(stack.flatten(1).any(1)).flatten()
    proj = torch.zeros((n * K, 1, *g.sino_shape), dtype=torch.float64, device=dev)
    if live.numel():
        proj[live] = op.fp(stack[live]).to(torch.float64)
    proj = proj.reshape(n, K, *g.sino_shape)
    t_fp = time.perf_counter()

    # material columns: water, [bone], [displaced water], [displaced bone], metals...
    mw = torch.as_tensor(sd.water, dtype=torch.float64, device=dev)
    mb = torch.as_tensor(sd.bone, dtype=torch.float64, device=dev)
    k = 0
    Pw = proj[:, k]
    k += 1
    Pb = None
    if has_bone:
        Pb = proj[:, k]
        k += 1
    Pw_disp = Pb_disp = None
    if disp_w:
        Pw_disp = proj[:, k]
        k += 1
    if disp_b:
        Pb_disp = proj[:, k]
        k += 1
    Pm = proj[:, k:]  # (N, n_metal, V, C)
    mu_metal = torch.as_tensor(
        np.stack([get_material(m).mu(sd.energies) for m in materials], 1) if n_metal
        else np.zeros((sd.energies.size, 0)), dtype=torch.float64, device=dev)

    # ---- reference scan on every ray (table), metal scan on the trace only (direct spectral sum)
    metal_path = Pm.sum(1) if n_metal else torch.zeros_like(Pw)
    trace = metal_path > 0  # (N, V, C)
    Y_ref = torch.empty((n, *g.sino_shape), dtype=torch.float64, device=dev)
    Y_ma = torch.empty_like(Y_ref)
    shared = st.shared_noise or not st.noisy
    for i in range(n):
        tg = gens[i][1]
        T, V = _ref_signal(Pw[i].reshape(-1), Pb[i].reshape(-1) if has_bone else None, st, sd)
        Y_ref[i] = apply_water_bhc(_measure(T, V, st, sd, tg), st).reshape(g.sino_shape)
        if shared:
            Y_ma[i] = Y_ref[i]
        else:  # a second scan with its own noise stream; off the trace it does not depend on the metal
            tg = gens[i][2]
            Y_ma[i] = apply_water_bhc(_measure(T, V, st, sd, tg), st).reshape(g.sino_shape)
        tr = trace[i].reshape(-1)
        if bool(tr.any()):
            cols = [Pw[i].reshape(-1)[tr] - (Pw_disp[i].reshape(-1)[tr] if Pw_disp is not None else 0.0)]
            Ms = [mw]
            if has_bone:
                cols.append(Pb[i].reshape(-1)[tr] - (Pb_disp[i].reshape(-1)[tr] if Pb_disp is not None else 0.0))
                Ms.append(mb)
            cols += [Pm[i, j].reshape(-1)[tr] for j in range(n_metal)]
            P_tr = torch.stack(cols, -1).clamp_(min=0.0)
            M_tr = torch.cat([torch.stack(Ms, 1), mu_metal], 1)
            T_tr, V_tr = _poly_signal(P_tr, M_tr, sd, st.noisy)
            Y_ma[i].view(-1)[tr] = apply_water_bhc(_measure(T_tr, V_tr, st, sd, tg), st)
    Y_ref = Y_ref.to(torch.float32).unsqueeze(1)
    Y_ma = Y_ma.to(torch.float32).unsqueeze(1)
    t_phys = time.perf_counter()

    # ---- reconstruction
    # slices whose scans coincide (no metal, shared or no noise) have Y_ma == Y_ref: one FBP serves both
    if shared:
        with_metal = torch.nonzero(trace.flatten(1).any(1)).flatten()
    else:
        with_metal = torch.arange(n, device=dev)
    m = with_metal.numel()
    rec = op.fbp(torch.cat([Y_ma[with_metal], Y_ref], 0), filter=st.fbp_filter, cutoff=st.fbp_cutoff)
    X_ref = mu_to_hu(rec[m:]).contiguous()
    X_ma = X_ref.clone()
    X_ma[with_metal] = mu_to_hu(rec[:m])
    t_fbp = time.perf_counter()
    return SimulationResult(
        X_ma=X_ma, Y_ma=Y_ma, X_ref=X_ref, Y_ref=Y_ref,
        metal_mask=(total > 0.5).to(torch.float32), metal_trace=trace.unsqueeze(1), metal_coverage=total,
        objects=tuple(objects), settings=st, geometry=g, seed=seed,
        timings={"metal_s": t_metal - t0, "fp_s": t_fp - t_metal, "physics_s": t_phys - t_fp,
                 "fbp_s": t_fbp - t_phys, "total_s": t_fbp - t0, "n_fp": int(live.numel()),
                 "n_fbp": m + n},
    )
