"""Metal-sweep sets for the perceptual indicators PI_q and PI_s (paper §III-D, Fig. 7, Eq. 18-19).

A sweep is one clean slice simulated several times with different metal and nothing else different:

* ``count``: objects placed once (non-overlapping, :func:`dudocrop.ct.metal.sample_count_sweep`), then the
  slice with the first 1, 2, ..., N of them (same positions kept);
* ``size``: one object (shape, material, centre, angle fixed) at growing equivalent diameters
  (:func:`dudocrop.ct.metal.size_sweep`); it is placed at the largest diameter, so every size fits the body.

Every member is simulated by :func:`dudocrop.ct.simulate.simulate` with the same seed as a one-slice batch, so
the reference scan (and its noise) is identical across members: X_ref, Y_ref and Y_ma outside the union of the
members' metal traces do not change, only the metal does (``tests/test_eval.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from dudocrop.ct.metal import (
    MetalConfig,
    MetalObject,
    get_metal_config,
    rasterize_metal,
    sample_count_sweep,
    sample_metal,
    size_sweep,
)
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.phantoms import ANATOMY_KINDS, random_phantom
from dudocrop.ct.simulate import SimulationSettings, get_settings, simulate
from dudocrop.data.synthetic import metal_config_for
from dudocrop.metrics.perceptual import (
    LPIPS_SCALE,
    Distance,
    LocalRegion,
    get_local_region,
    lp_quantity,
    lp_size,
    pi_q,
    pi_s,
)

__all__ = [
    "SWEEP_PRESETS",
    "MetalSweep",
    "SweepConfig",
    "SweepMember",
    "count_sweep_set",
    "get_sweep_config",
    "make_sweeps",
    "size_sweep_set",
    "sweep_lp",
    "sweeps_pi",
]

SweepKind = Literal["count", "size"]


def _check_diameters(ds, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(d) for d in ds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of diameters in mm, got {ds!r}") from None
    if len(out) < 2 or not all(np.isfinite(out)) or out[0] <= 0 or not all(b > a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must hold >= 2 positive, strictly increasing diameters in mm, got {ds!r}")
    return out


@dataclass(frozen=True)
class SweepConfig:
    """What :func:`make_sweeps` generates: ``n_slices`` random ``anatomy`` phantoms (the paper's N_s), each
    with a count sweep of 1..``n_objects`` objects and a size sweep over ``diameters_mm`` (increasing), under
    the simulation preset ``settings``; ``local_region`` is the Eq. 18-19 region preset that fits the grid.
    The paper gives none of these numbers; the presets are ours."""

    name: str = "tiny"
    n_slices: int = 2
    n_objects: int = 3
    diameters_mm: tuple[float, ...] = (10.0, 16.0, 25.0, 40.0)
    anatomy: str = "body"
    settings: str = "aapm_like"
    local_region: str = "tiny"

    def __post_init__(self) -> None:
        for f in ("n_slices", "n_objects"):
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"SweepConfig.{f} must be an int >= 1, got {v!r}")
        if self.n_objects < 2:
            raise ValueError(f"SweepConfig.n_objects must be >= 2 (PI_q differences counts), got {self.n_objects}")
        _check_diameters(self.diameters_mm, "SweepConfig.diameters_mm")
        if self.anatomy not in ANATOMY_KINDS:
            raise ValueError(f"SweepConfig.anatomy must be one of {ANATOMY_KINDS}, got {self.anatomy!r}")
        get_settings(self.settings)
        get_local_region(self.local_region)


SWEEP_PRESETS: dict[str, SweepConfig] = {
    "tiny": SweepConfig(),
    "paper": SweepConfig(name="paper", n_slices=20, n_objects=5, diameters_mm=(6.0, 10.0, 16.0, 25.0, 40.0),
                         local_region="paper"),
}


def get_sweep_config(name_or_config: str | SweepConfig) -> SweepConfig:
    if isinstance(name_or_config, SweepConfig):
        return name_or_config
    try:
        return SWEEP_PRESETS[name_or_config]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sweep config {name_or_config!r}; presets: {', '.join(SWEEP_PRESETS)}") from None


@dataclass(frozen=True, eq=False)
class SweepMember:
    """One member of a sweep: the simulated slice ((1, 1, H, W) images in HU, (1, 1, V, C) sinograms, as
    :class:`dudocrop.ct.simulate.SimulationResult`) and its metal. ``centroids_rc`` are the objects' centroids
    in (row, col) pixels (coverage-weighted), ``areas_px`` their mask pixel counts (coverage > 0.5);
    ``largest`` indexes the largest object (by exact area), whose area is ``area_mm2`` (Eq. 19's A_s)."""

    X_ma: torch.Tensor
    Y_ma: torch.Tensor
    X_ref: torch.Tensor
    Y_ref: torch.Tensor
    metal_mask: torch.Tensor
    metal_trace: torch.Tensor
    objects: tuple[MetalObject, ...]
    centroids_rc: tuple[tuple[float, float], ...]
    areas_px: tuple[int, ...]
    largest: int

    @property
    def count(self) -> int:
        """Eq. 18's N_q: the number of metal objects."""
        return len(self.objects)

    @property
    def area_mm2(self) -> float:
        """Eq. 19's A_s: the exact area of the largest object, mm^2."""
        return self.objects[self.largest].area_mm2

    @property
    def area_px(self) -> int:
        """The largest object's area in mask pixels."""
        return self.areas_px[self.largest]


@dataclass(frozen=True, eq=False)
class MetalSweep:
    """A count or size sweep of one clean slice: ``members`` in increasing count / size."""

    kind: str
    case_id: str
    members: tuple[SweepMember, ...]
    clean_hu: torch.Tensor
    settings: SimulationSettings
    seed: int
    #: the Eq. 18-19 local region (LP's window around each object) that fits the sweep's grid (SweepConfig)
    local_region: str | LocalRegion = "paper"

    def __len__(self) -> int:
        return len(self.members)

    @property
    def steps(self) -> list[float]:
        """Counts (``count``) or largest-object areas in mm^2 (``size``): the denominators of Eq. 18 / 19."""
        return [float(m.count) if self.kind == "count" else m.area_mm2 for m in self.members]

    def stack(self, name: str) -> torch.Tensor:
        """``X_ma`` / ``Y_ma`` / ``X_ref`` / ``Y_ref`` / ``metal_mask`` / ``metal_trace`` of all members, (K, 1, ...),
        the batch a MAR method restores."""
        if name not in ("X_ma", "Y_ma", "X_ref", "Y_ref", "metal_mask", "metal_trace"):
            raise ValueError(f"name must be one of X_ma, Y_ma, X_ref, Y_ref, metal_mask, metal_trace; got {name!r}")
        return torch.cat([getattr(m, name) for m in self.members])


def _operator(op) -> FanBeamOperator:
    return op if isinstance(op, FanBeamOperator) else FanBeamOperator(op)


def _member(clean, op: FanBeamOperator, objects: tuple[MetalObject, ...], settings, seed: int) -> SweepMember:
    res = simulate(clean, op, metal=objects, settings=settings, seed=seed)
    g = op.geometry
    cents, areas = [], []
    for o in objects:
        cov = rasterize_metal([o], g, res.settings.metal_supersample).total
        r, c = ndimage.center_of_mass(cov)
        cents.append((float(r), float(c)))
        areas.append(int((cov > 0.5).sum()))
    largest = int(np.argmax([o.area_mm2 for o in objects]))
    return SweepMember(res.X_ma, res.Y_ma, res.X_ref, res.Y_ref, res.metal_mask, res.metal_trace, tuple(objects),
                       tuple(cents), tuple(areas), largest)


def _clean(clean_hu, op: FanBeamOperator) -> torch.Tensor:
    x = clean_hu
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor) and x.ndim == 2:
        x = x[None, None]
    n = op.geometry.image_size
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and tuple(x.shape) == (1, 1, n, n)):
        raise ValueError(f"clean_hu must be one float HU slice of shape ({n}, {n}) or (1, 1, {n}, {n}) for geometry "
                         f"{op.geometry.name!r}, got {getattr(x, 'shape', type(x).__name__)}")
    return x


def count_sweep_set(clean_hu, op, n_objects: int, metal: str | MetalConfig | None = None,
                    settings: str | SimulationSettings = "aapm_like", seed: int = 0,
                    case_id: str = "") -> MetalSweep:
    """The same slice with 1..``n_objects`` metal objects (added one at a time, positions kept).

    ``metal``: the MetalConfig (or preset) the objects are drawn from; default: the body preset of
    :func:`dudocrop.data.synthetic.metal_config_for` for ``op``'s grid. ``seed`` fixes placement and noise."""
    op = _operator(op)
    x = _clean(clean_hu, op)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    cfg = metal_config_for("body", op.geometry) if metal is None else get_metal_config(metal)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0]))
    sweep = sample_count_sweep(cfg, x[0, 0].cpu().numpy(), op.geometry, n_objects, rng)
    members = tuple(_member(x, op, objs, settings, seed) for objs in sweep)
    return MetalSweep("count", case_id, members, x, get_settings(settings), seed)


def size_sweep_set(clean_hu, op, diameters_mm: Sequence[float], metal: str | MetalConfig | None = None,
                   settings: str | SimulationSettings = "aapm_like", seed: int = 0, case_id: str = "",
                   obj: MetalObject | None = None) -> MetalSweep:
    """The same slice with one object at each of ``diameters_mm`` (strictly increasing, mm).

    ``obj`` fixes the object (its diameter is replaced); otherwise one is drawn from ``metal`` (see
    :func:`count_sweep_set`) at the largest diameter, so every smaller size fits where it is placed."""
    op = _operator(op)
    x = _clean(clean_hu, op)
    ds = _check_diameters(diameters_mm, "diameters_mm")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    hu = x[0, 0].cpu().numpy()
    if obj is None:
        cfg = metal_config_for("body", op.geometry) if metal is None else get_metal_config(metal)
        # the object grows in place, so it is drawn inside the body (no air / skin objects)
        cfg = replace(cfg, count=1, diameter_mm=(ds[-1], ds[-1]), air_fraction=0.0, skin_fraction=0.0)
        obj = sample_metal(cfg, hu, op.geometry, np.random.default_rng(np.random.SeedSequence([seed, 0x51])))[0]
    sweep = size_sweep(obj, ds, hu, op.geometry)
    members = tuple(_member(x, op, objs, settings, seed) for objs in sweep)
    return MetalSweep("size", case_id, members, x, get_settings(settings), seed)


def make_sweeps(op, config: str | SweepConfig = "tiny", seed: int = 0) -> tuple[list[MetalSweep], list[MetalSweep]]:
    """(count sweeps, size sweeps) for ``config.n_slices`` random phantoms on ``op``'s grid, case ids
    ``sweep-<seed>-<j>``; reproducible from ``seed``."""
    cfg = get_sweep_config(config)
    op = _operator(op)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    counts, sizes = [], []
    for j in range(cfg.n_slices):
        s = int(np.random.SeedSequence([seed, j]).generate_state(1)[0] >> 1)
        clean = random_phantom(cfg.anatomy, op.geometry, np.random.default_rng(s))
        metal = metal_config_for(cfg.anatomy, op.geometry)
        cid = f"sweep-{seed}-{j}"
        region = {"local_region": cfg.local_region}
        counts.append(replace(count_sweep_set(clean, op, cfg.n_objects, metal, cfg.settings, s, cid), **region))
        sizes.append(replace(size_sweep_set(clean, op, cfg.diameters_mm, metal, cfg.settings, s, cid), **region))
    return counts, sizes


def sweep_lp(sweep: MetalSweep, outputs: torch.Tensor, distance: Distance,
             region: str | LocalRegion | None = None) -> list[float]:
    """LP of each member's restoration (Eq. 18 first line for ``count`` sweeps, Eq. 19 first line for ``size``)
    against the sweep's reference, metal pixels excluded, in the local ``region`` (None: the sweep's own,
    ``SweepConfig.local_region``). ``outputs``: (K, 1, H, W) HU, one per member in order.
    Feed the lists of several sweeps with their :attr:`MetalSweep.steps` to ``metrics.perceptual.pi_q`` /
    ``pi_s``."""
    if not isinstance(sweep, MetalSweep):
        raise ValueError(f"sweep must be a MetalSweep, got {type(sweep).__name__}")
    if not (isinstance(outputs, torch.Tensor) and outputs.ndim == 4 and outputs.shape[0] == len(sweep)
            and tuple(outputs.shape[1:]) == tuple(sweep.members[0].X_ref.shape[1:])):
        raise ValueError(f"outputs must be a ({len(sweep)}, 1, H, W) tensor (one restoration per member), got "
                         f"{getattr(outputs, 'shape', type(outputs).__name__)}")
    region = sweep.local_region if region is None else region
    out = []
    for k, m in enumerate(sweep.members):
        x, ref, mask = outputs[k:k + 1], m.X_ref.to(outputs.device), m.metal_mask.to(outputs.device)
        if sweep.kind == "count":
            out.append(lp_quantity(x, ref, m.centroids_rc, distance, region, mask))
        else:
            out.append(lp_size(x, ref, m.centroids_rc[m.largest], distance, region, mask))
    return out


def sweeps_pi(sweeps: Sequence[MetalSweep], outputs: Sequence[torch.Tensor], distance: Distance,
              region: str | LocalRegion | None = None, scale: float = LPIPS_SCALE) -> float:
    """PI_q (Eq. 18) of count sweeps or PI_s (Eq. 19) of size sweeps over the N_s = len(sweeps) slices;
    ``outputs[j]`` is the method's (K_j, 1, H, W) restoration of ``sweeps[j].stack("X_ma")`` (with its Y_ma)."""
    if isinstance(sweeps, MetalSweep) or not isinstance(sweeps, Sequence) or len(sweeps) == 0:
        raise ValueError("sweeps must be a non-empty sequence of MetalSweep")
    if not isinstance(outputs, Sequence) or len(outputs) != len(sweeps):
        raise ValueError(f"outputs must hold one (K, 1, H, W) tensor per sweep ({len(sweeps)}), got "
                         f"{len(outputs) if isinstance(outputs, Sequence) else type(outputs).__name__}")
    kinds = {getattr(sw, "kind", None) for sw in sweeps}
    if len(kinds) != 1 or not kinds <= {"count", "size"}:
        raise ValueError(f"sweeps must all be count sweeps or all size sweeps, got kinds {sorted(map(str, kinds))}")
    lps = [sweep_lp(sw, out, distance, region) for sw, out in zip(sweeps, outputs)]
    steps = [sw.steps for sw in sweeps]
    return pi_q(lps, steps, scale) if kinds == {"count"} else pi_s(lps, steps, scale)
