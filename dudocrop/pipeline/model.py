"""The DuDoCROP model object (paper Fig. 3a, Algorithm 2): DuDoCLIP + three IR-SDEs + the CT operator + OSRO.

    model = DuDoCROP.load("outputs/train_all/models", device="cuda")       # or "runs:/<run_id>/models"
    out = model(x_ma_hu)                        # (N,1,H,W) HU; Y_ma = FP(X_ma) when no sinogram is given
    out = model(x_ma_hu, y_ma, return_priors=True)    # measured sinogram; keep X_p, X'_p, X̂_r for the fusion sweep

The order of the paper's steps lives in :mod:`dudocrop.pipeline.osro`; this module only turns HU / line integrals
into the [0, 1] units the diffusion models were trained in (``dudocrop.data.normalize``), runs the priors and
turns the result back into HU with the metal reinserted.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch

from dudocrop.atomic import write_json
from dudocrop.checks import INPUT_DTYPES, check_mask, check_tensor, parse_assignments
from dudocrop.classic.nmar import nmar, prior_completion
from dudocrop.ct.geometry import CONVENTION_VERSION, FanBeamGeometry, check_convention, get_geometry
from dudocrop.ct.operators import FanBeamOperator
from dudocrop.ct.trace import metal_trace
from dudocrop.ct.units import hu_to_mu
from dudocrop.data.clinical import METAL_THRESHOLD_HU
from dudocrop.data.normalize import Normalization
from dudocrop.pipeline.osro import (  # noqa: F401 - osro_region is imported from here by the jobs and benches
    OSRO_REGIONS,
    OSROConfig,
    OSROResult,
    check_osro_region,
    fuse,
    guarded_fuse,
    osro,
    osro_region,
    sinogram_prior,
    trust_map,
)
from dudocrop.sde.train import image_mu, sinogram_mu
from dudocrop.sde.unet import PRECISIONS

#: file names inside a model folder (what train_all writes and the MLflow run logs under ``models/``).
MODEL_FILES = {"clip": "dudoclip.pt", "image": "sde_image.pt", "sinogram": "sde_sinogram.pt",
               "residual": "sde_residual.pt"}
PIPELINE_FILE = "pipeline.json"


@dataclass(frozen=True)
class PipelineConfig:
    """Inference settings. ``steps``: reverse-diffusion evaluations per prior (None: the models' T = 100, paper
    §IV-B-2; fewer is a measured speed/quality trade, see bench/pipeline.py). ``tile``: sample in overlapping
    tiles of this size (memory-bound cases; None: whole slices). ``domains``: ``dual`` is DuDoCROP; ``image`` and
    ``sinogram`` are the single-domain rows of Table V (X_o is then the image prior X_p, or X'_p = FBP(Y_p)).
    ``metal_region_dilation``: pixels of metal dilation excluded from the Eq. 11 min / max region. ``precision``:
    the U-Nets' arithmetic (``fp32``, or ``bf16`` autocast as in training on CUDA; the samplers stay float32);
    ``channels_last`` takes effect when the model is moved (``DuDoCROP.to``).

    The paper's literal choices, each a switch (the ``paper`` run preset sets all three): ``sampler='sde'``, the
    Euler-Maruyama reverse step of Eq. 5 ((dF_t)_ε of Eq. 9; ``posterior`` is the public IR-SDE code's step);
    ``x0_clip=False``, no clipping of F̂_0 to [0, 1] in the sampler (the paper names none); ``osro_region='image'``,
    Eq. 11's min / max over the whole image (``body``: the body inside the FOV minus the dilated metal,
    :func:`osro_region`)."""

    steps: int | None = None
    sampler: Literal["posterior", "sde"] = "posterior"
    x0_clip: bool = True
    osro_region: Literal["body", "image"] = "body"
    tile: int | None = None
    tile_overlap: int = 32
    domains: Literal["dual", "image", "sinogram"] = "dual"
    osro: OSROConfig = field(default_factory=OSROConfig)
    metal_threshold_hu: float = METAL_THRESHOLD_HU
    trace_dilation: int = 0
    metal_region_dilation: int = 1
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False  # U-Net weights (hence activations) in NHWC, the layout tensor-core convs want
    compile: bool = False  # torch.compile the U-Nets (SDEModel.restore): ≈30 s per U-Net and input size to compile

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"PipelineConfig.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.domains not in ("dual", "image", "sinogram"):
            raise ValueError(f"PipelineConfig.domains must be 'dual', 'image' or 'sinogram', got {self.domains!r}")
        if self.tile is not None and self.tile < 32:
            raise ValueError(f"PipelineConfig.tile must be None or >= 32 pixels, got {self.tile!r}")
        if self.sampler not in ("posterior", "sde"):
            raise ValueError(f"PipelineConfig.sampler must be 'posterior' or 'sde', got {self.sampler!r}")
        if self.osro_region not in OSRO_REGIONS:
            raise ValueError(f"PipelineConfig.osro_region must be one of {OSRO_REGIONS}, got {self.osro_region!r}")
        if not isinstance(self.x0_clip, bool):
            raise ValueError(f"PipelineConfig.x0_clip must be True or False, got {self.x0_clip!r}")


@dataclass
class DuDoCROPOutput:
    """``X_o`` in HU with the metal reinserted; ``priors`` (on request) in normalised units as OSRO saw them."""

    X_o: torch.Tensor
    metal_mask: torch.Tensor
    priors: OSROResult | None = None
    image_prior: torch.Tensor | None = None  # ε2(X_ma) before Eq. 12, normalised
    sinogram_prior: torch.Tensor | None = None  # ε1(Y_ma) before Eq. 10, normalised
    consistency: torch.Tensor | None = None  # (N,) on request: X_o's measured-data consistency score, X'_p's is 1


def residual_from_unit(d: torch.Tensor) -> torch.Tensor:
    """A difference of normalised images (in [-1, 1]) -> the residual IR-SDE's [0, 1] units (0.5 = no residual)."""
    return 0.5 + 0.5 * d


def residual_to_unit(u: torch.Tensor) -> torch.Tensor:
    return 2.0 * (u - 0.5)


class DuDoCROP:
    """Algorithm 2 on batches. Build with :meth:`load` (a model folder or an MLflow artifact URI) or directly."""

    def __init__(self, geometry: FanBeamGeometry | str, image_model, sinogram_model, residual_model=None, clip=None,
                 config: PipelineConfig = PipelineConfig(), device: str | torch.device = "cpu",
                 backend: str = "auto"):
        self.geometry = get_geometry(geometry)
        self.device = torch.device(device)
        self.config = config
        self.norm = Normalization.for_geometry(self.geometry)
        self.op = FanBeamOperator(self.geometry, backend)
        self._ops = {self.geometry.name: self.op}  # operators of other geometries (:meth:`at`), shared by views
        self._backend = backend
        self.models = {"image": image_model, "sinogram": sinogram_model, "residual": residual_model}
        for name, m in self.models.items():
            if m is not None and getattr(m, "domain", name) != name:
                raise ValueError(f"the {name} model slot holds a model trained for domain {m.domain!r}")
        needs_clip = any(m is not None and m.use_embeddings for m in (image_model, sinogram_model))
        if needs_clip and clip is None:
            raise ValueError("the image/sinogram IR-SDEs were trained with DuDoCLIP guidance: pass clip=")
        self.clip = clip
        self.fusion: dict | None = None  # how the OSRO factors were chosen (pipeline.json, ray_jobs/tune_fusion.py)
        self.to(self.device)

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, location: str, device: str | torch.device = "cpu", config: PipelineConfig | None = None,
             **overrides) -> DuDoCROP:
        """Load from a model folder (``dudoclip.pt``, ``sde_{image,sinogram,residual}.pt``, ``pipeline.json``) or
        an MLflow URI (``runs:/<run_id>/models``, ``models:/<name>/<version>``, any artifact URI)."""
        from dudocrop.clip.train import load_dudoclip
        from dudocrop.sde.train import load_sde_model

        folder = resolve_model_location(location)
        check_model_folder(folder)
        meta_path = os.path.join(folder, PIPELINE_FILE)
        with open(meta_path) as f:
            meta = json.load(f)
        check_convention(meta["geometry"], meta.get("geometry_convention"), meta_path)
        loaded = {}
        for key in ("image", "sinogram", "residual"):
            p = os.path.join(folder, MODEL_FILES[key])
            loaded[key] = load_sde_model(p, device=device) if os.path.isfile(p) else None
        clip_path = os.path.join(folder, MODEL_FILES["clip"])
        clip = load_dudoclip(clip_path, device=device) if os.path.isfile(clip_path) else None
        cfg = config or pipeline_config_from_dict(meta.get("pipeline", {}))
        if overrides:
            cfg = replace(cfg, **overrides)
        model = cls(meta["geometry"], loaded["image"], loaded["sinogram"], loaded["residual"], clip, cfg, device)
        model.fusion = meta.get("fusion")
        return model

    def at(self, geometry: FanBeamGeometry | str | None) -> DuDoCROP:
        """This model with the CT geometry of a slice that has its own field of view but the model's array shapes
        (an AAPM head slice, 220.16 mm, in a model trained on body and head, paper §IV-A): FP, FBP, the metal trace,
        NMAR, the FOV of Eq. 11's region and CLIP's sinogram window follow that geometry, while the networks and the
        [0, 1] normalisation they were trained with stay the model's. A view: nothing is copied but the attributes.
        ``None`` or the model's own geometry returns the model itself."""
        if geometry is None:
            return self
        g = get_geometry(geometry)
        if g.name == self.geometry.name:
            return self
        if (g.image_shape, g.sino_shape) != (self.geometry.image_shape, self.geometry.sino_shape):
            raise ValueError(f"geometry {g.name!r} has other array shapes than the model's {self.geometry.name!r} "
                             f"({g.image_shape}, {g.sino_shape} vs {self.geometry.image_shape}, "
                             f"{self.geometry.sino_shape})")
        view = copy.copy(self)
        view.geometry = g
        if g.name not in self._ops:
            self._ops[g.name] = FanBeamOperator(g, self._backend)
        view.op = self._ops[g.name]
        return view

    def to(self, device: str | torch.device) -> DuDoCROP:
        self.device = torch.device(device)
        fmt = torch.channels_last if self.config.channels_last else torch.contiguous_format
        for m in self.models.values():
            if m is not None:
                m.unet.to(self.device, memory_format=fmt)
        if self.clip is not None:
            self.clip.to(self.device)
        return self

    # -- the pieces ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embeddings(self, x_ma_hu: torch.Tensor, y_ma: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """DuDoCLIP's (e^{I1}, e^{I2}) per domain (Fig. 3a): content and control embeddings."""
        if self.clip is None:
            return {}
        out = {}
        for domain, ct in (("image", x_ma_hu), ("sinogram", y_ma)):
            e = self.clip.encode_ct(self.clip.preprocess(ct, domain, geometry=self.geometry), domain)
            out[domain] = (e.content, e.control)
        return out

    def _sample(self, key: str, mu: torch.Tensor, emb: tuple | None, seed_stream: int) -> torch.Tensor:
        c = self.config
        content, control = emb if emb is not None else (None, None)
        g = torch.Generator(device=mu.device)
        g.manual_seed(c.seed * 1000 + seed_stream)
        tile = c.tile if c.tile is not None and max(mu.shape[-2:]) > c.tile else None
        return self.models[key].restore(mu, content, control, steps=c.steps, sampler=c.sampler, generator=g,
                                        tile=tile, overlap=c.tile_overlap, precision=c.precision,
                                        compile=c.compile, x0_clip=c.x0_clip)

    def region(self, x_ma_hu: torch.Tensor, metal_mask: torch.Tensor) -> torch.Tensor:
        """Eq. 11's min / max region as this config says (``osro_region``)."""
        c = self.config
        return osro_region(x_ma_hu, metal_mask, self.geometry, c.metal_region_dilation, c.osro_region)

    def fbp_unit(self, y_unit: torch.Tensor) -> torch.Tensor:
        """FBP from normalised line integrals to normalised attenuation (no clipping: FBP noise may be < 0)."""
        return self.op.fbp(self.norm.sino_to_line_integrals(y_unit)) / self.norm.mu_max

    def refine(self, x_r_in: torch.Tensor) -> torch.Tensor:
        """ε3 (Eq. 13): the residual-domain IR-SDE on X_p − X'_p, in normalised image units."""
        mu = residual_from_unit(x_r_in)
        return residual_to_unit(self._sample("residual", mu, None, 3).to(x_r_in.dtype))

    def prepare(self, x_ma_hu: torch.Tensor, y_ma: torch.Tensor | None = None,
                metal_mask: torch.Tensor | None = None,
                trace: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Checked inputs on the model's device: (X_ma HU, Y_ma line integrals, metal mask, metal trace M_s).

        Without ``y_ma`` the sinogram is FP(X_ma) (Algorithm 2); without ``metal_mask`` metal is segmented by the
        HU threshold (paper §IV-A: "masks can be easily segmented by threshold"); without ``trace``,
        M_s = FP(mask) > 0 (Eq. 1). Slices OSRO cannot use (a mask covering the body:
        :func:`~dudocrop.pipeline.osro.region_problems`), empty batches and half precision are refused by name."""
        g = self.geometry
        x = check_tensor(x_ma_hu, "x_ma_hu", ndim=4, shape=(None, 1, *g.image_shape), nonempty=True,
                         dtypes=INPUT_DTYPES).to(self.device, torch.float32)
        if y_ma is not None:
            y_ma = check_tensor(y_ma, "y_ma", ndim=4, shape=(x.shape[0], 1, *g.sino_shape),
                                dtypes=INPUT_DTYPES).to(self.device, torch.float32)
        if metal_mask is None:
            mask = (x >= self.config.metal_threshold_hu).float()
        else:
            mask = check_mask(metal_mask, "metal_mask", shape=tuple(x.shape)).to(self.device)
        # refused here, before any projection or sampling, rather than by Eq. 11 after all of it
        check_osro_region(x, mask, g, self.config.metal_region_dilation)
        y = self.op.fp(hu_to_mu(x).clamp(min=0)) if y_ma is None else y_ma
        if trace is None:
            trace = metal_trace(mask, self.op, self.config.trace_dilation)
        else:
            trace = check_mask(trace, "trace", shape=tuple(y.shape)).to(self.device) > 0
        return x, y, mask, trace

    def priors(self, x_ma_hu: torch.Tensor, y_ma: torch.Tensor, metal_mask: torch.Tensor,
               trace: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The DAPG stage: ε2(X_ma) and ε1(Y_ma) in normalised units (None for a domain this config skips)."""
        emb = self.embeddings(x_ma_hu, y_ma)
        dom = self.config.domains
        image, sino = self.models["image"], self.models["sinogram"]
        both_nmar = dom == "dual" and image.image_mu == "nmar" and sino.sinogram_mu == "nmar"
        # one NMAR gives both μ (its image with the metal put back and its completed sinogram) instead of two
        shared = nmar(y_ma, metal_mask > 0.5, x_ma_hu, self.op, trace=trace > 0.5, return_sinogram=True) \
            if both_nmar else None
        x_prior = None
        if dom != "sinogram":  # μ as the image model was trained: X_ma or the NMAR image (IMAGE_MU)
            x_mu = shared[0] if shared else image_mu(x_ma_hu, y_ma, metal_mask, trace, image.image_mu, self.op)
            x_prior = self._sample("image", self.norm.image(x_mu), emb.get("image"), 1)
        y_prior = None
        if dom != "image":  # μ as the sinogram model was trained: Y_ma or its LI / NMAR completion (SINOGRAM_MU)
            y_mu = shared[1] if shared else sinogram_mu(y_ma, trace, sino.sinogram_mu, x_ma=x_ma_hu,
                                                        metal_mask=metal_mask, op=self.op)
            y_prior = self._sample("sinogram", self.norm.sino(y_mu), emb.get("sinogram"), 2)
        return x_prior, y_prior

    # -- Algorithm 2 -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x_ma_hu: torch.Tensor, y_ma: torch.Tensor | None = None, *,
                 metal_mask: torch.Tensor | None = None, trace: torch.Tensor | None = None,
                 return_priors: bool = False, osro_config: OSROConfig | None = None,
                 consistency: bool = False) -> DuDoCROPOutput:
        """``consistency``: also score X_o against the measured rays off the metal trace, relative to X'_p
        (``dudocrop.metrics.consistency``; dual-domain only): a number near 1 says the raw data agree with X_o."""
        x, y, mask, trace = self.prepare(x_ma_hu, y_ma, metal_mask, trace)
        x_prior, y_prior = self.priors(x, y, mask, trace)
        x_o, res = self.combine(x, y, mask, trace, x_prior, y_prior, osro_config or self.config.osro,
                                self.config.domains)
        score = None
        if consistency and res is not None:
            score = res.consistency
            if score is None or (osro_config or self.config.osro).completion:  # score the final X_o as it would
                chk = self.guard(x, y, mask, trace)
                score = chk.score(res.X_o, chk.size(chk.residual(res.X_p_prime)))
        return DuDoCROPOutput(x_o, mask, res if return_priors else None,
                              x_prior if return_priors else None, y_prior if return_priors else None, score)

    @torch.no_grad()
    def combine(self, x_ma_hu: torch.Tensor, y_ma: torch.Tensor, metal_mask: torch.Tensor, trace: torch.Tensor,
                x_prior: torch.Tensor | None, y_prior: torch.Tensor | None, cfg: OSROConfig,
                domains: str = "dual") -> tuple[torch.Tensor, OSROResult | None]:
        """From the DAPG priors to X_o in HU (metal reinserted): OSRO for ``dual``, or a single-domain prior."""
        res = None
        if domains == "image":
            x_o = x_prior
        elif domains == "sinogram":
            y_unit = self.norm.sino(y_ma)
            x_o = self.fbp_unit(sinogram_prior(y_prior, y_unit, trace, cfg.fidelity))
        else:
            region = self.region(x_ma_hu, metal_mask)
            refine = self.refine if self.models["residual"] is not None else None
            guard = self.guard(x_ma_hu, y_ma, metal_mask, trace) if cfg.safeguard is not None else None
            trust = trust_map(trace, self.op) if cfg.trust is not None else None
            completion = self.completion(y_ma, metal_mask, trace) if cfg.completion else None
            res = osro(x_prior, y_prior, self.norm.sino(y_ma), trace, self.fbp_unit, refine, region, cfg, guard,
                       trust, completion)
            x_o = res.X_o
        return self.to_hu(x_o, x_ma_hu, metal_mask), res

    def guard(self, x_ma_hu: torch.Tensor, y_ma: torch.Tensor, metal_mask: torch.Tensor, trace: torch.Tensor):
        """The measured-data consistency check (``dudocrop.metrics.consistency``) of these slices, on the pipeline's
        normalised image units: what ``OSROConfig.safeguard`` needs. The body is X_ma's with the metal read as
        water."""
        from dudocrop.metrics.consistency import ConsistencyCheck

        ref = torch.where(metal_mask > 0, torch.zeros_like(x_ma_hu), x_ma_hu)
        return ConsistencyCheck.build(ref, y_ma, trace.to(torch.float32), self.op, metal_mask,
                                      to_hu=self.norm.image_to_hu)

    def completion(self, y_ma: torch.Tensor, metal_mask: torch.Tensor, trace: torch.Tensor):
        """``OSROConfig.completion`` for these slices: normalised image -> the FBP of ``y_ma`` (line integrals)
        completed across the trace with that image as NMAR's prior (``classic.nmar.prior_completion``)."""
        return completion_fn(y_ma, metal_mask, trace, self.op, self.norm)

    def to_hu(self, x_unit: torch.Tensor, x_ma_hu: torch.Tensor, metal_mask: torch.Tensor) -> torch.Tensor:
        """Normalised attenuation -> HU, with the metal of X_ma reinserted."""
        return torch.where(metal_mask > 0, x_ma_hu, self.norm.image_to_hu(x_unit))

    @torch.no_grad()
    def refuse(self, priors: OSROResult, x_ma_hu: torch.Tensor, metal_mask: torch.Tensor,
               cfg: OSROConfig, y_ma: torch.Tensor | None = None, trace: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 13-15 again from cached priors with other (k, α, β): X_o in HU (the Ray Tune fusion sweep). With
        ``cfg.safeguard`` the measurement (``y_ma``, line integrals, and the ``trace``) is needed too."""
        region = self.region(x_ma_hu, metal_mask)
        guard = None
        if cfg.safeguard is not None and cfg.fusion:
            if y_ma is None or trace is None:
                raise ValueError("refuse with OSROConfig.safeguard needs y_ma and trace (the measured-data check)")
            guard = self.guard(x_ma_hu, y_ma, metal_mask, trace)
        trust = None
        if cfg.trust is not None:
            if trace is None:
                raise ValueError("refuse with OSROConfig.trust needs the trace")
            trust = trust_map(trace, self.op)
        completion = None
        if cfg.completion:
            if y_ma is None or trace is None:
                raise ValueError("refuse with OSROConfig.completion needs y_ma and trace (the measured sinogram)")
            completion = self.completion(y_ma, metal_mask, trace)
        _, x_o, _, _ = guarded_fuse(priors.X_p, priors.X_p_prime, priors.X_r_hat, region, cfg, guard, trust,
                                    completion)
        return self.to_hu(x_o, x_ma_hu, metal_mask)


def completion_fn(y_ma: torch.Tensor, metal_mask: torch.Tensor, trace: torch.Tensor, op, norm):
    """``OSROConfig.completion`` on normalised image units (``norm``): x -> the FBP of ``y_ma`` (line integrals)
    completed across ``trace`` with x as NMAR's prior (``classic.nmar.prior_completion``)."""
    metal, tr = metal_mask > 0.5, trace > 0.5

    def complete(x_unit: torch.Tensor) -> torch.Tensor:
        hu = prior_completion(norm.image_to_hu(x_unit), y_ma.to(x_unit.dtype), metal, tr, op)
        return (hu_to_mu(hu) / norm.mu_max).to(x_unit.dtype)  # unclipped, as fbp_unit

    return complete


def geometry_batches(geometries: Sequence[str] | None, n: int, batch_size: int) -> list[tuple[str | None, list[int]]]:
    """Row indices 0..n-1 in batches of at most ``batch_size`` that share one geometry (``geometries[i]`` is row
    i's, e.g. a shard's ``geometry`` column; None: all rows the model's), in row order within each geometry, so a
    caller can run ``model.at(g)`` on each batch and put the results back by index."""
    if geometries is not None and len(geometries) != n:
        raise ValueError(f"geometries has {len(geometries)} entries for {n} rows")
    groups: dict[str | None, list[int]] = {}
    for i in range(n):
        groups.setdefault(None if geometries is None else str(geometries[i]), []).append(i)
    return [(g, idx[k:k + batch_size]) for g, idx in groups.items() for k in range(0, len(idx), batch_size)]


def pipeline_config_with(items, base: PipelineConfig = PipelineConfig()) -> PipelineConfig:
    """``base`` with ``["steps=5", "osro.norm=affine"]`` applied: PipelineConfig fields, or OSROConfig fields as
    ``osro.FIELD`` (``checks.parse_assignments``: Python literals or JSON; bare words stay strings). Raises
    ValueError naming a malformed item or field."""
    from dataclasses import fields

    top, sub = {}, {}
    names = {f.name for f in fields(PipelineConfig)} - {"osro"}
    osro_names = {f.name for f in fields(OSROConfig)}
    for k, v in parse_assignments(items).items():
        if k.startswith("osro."):
            if k[5:] not in osro_names:
                raise ValueError(f"unknown OSROConfig field {k[5:]!r}; expected one of {sorted(osro_names)}")
            sub[k[5:]] = v
        elif k in names:
            top[k] = v
        else:
            raise ValueError(f"unknown PipelineConfig field {k!r}; expected one of {sorted(names)} or osro.FIELD")
    return replace(base, **top, osro=replace(base.osro, **sub))


def pipeline_config_from_dict(d: dict) -> PipelineConfig:
    d = dict(d)
    if isinstance(d.get("osro"), dict):
        d["osro"] = OSROConfig(**d["osro"])
    return PipelineConfig(**d)


def save_pipeline_meta(folder: str, geometry: FanBeamGeometry | str,
                       config: PipelineConfig = PipelineConfig(), fusion: dict | None = None) -> str:
    """Write ``pipeline.json`` (geometry, its convention version and inference settings) next to the model files,
    atomically; ``fusion`` records how the OSRO factors were chosen (ray_jobs/tune_fusion.py)."""
    path = os.path.join(folder, PIPELINE_FILE)
    meta = {"geometry": get_geometry(geometry).name, "geometry_convention": CONVENTION_VERSION,
            "pipeline": asdict(config)}
    if fusion is not None:
        meta["fusion"] = fusion
    write_json(path, meta)
    return path


def check_model_folder(folder: str, meta: bool = True) -> None:
    """FileNotFoundError naming what a model folder lacks: the image and sinogram IR-SDEs (the residual IR-SDE
    and DuDoCLIP are optional: without them Eq. 13 is skipped / the models must be unguided) and pipeline.json."""
    need = [MODEL_FILES["image"], MODEL_FILES["sinogram"]] + ([PIPELINE_FILE] if meta else [])
    missing = [f for f in need if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"model folder {folder} lacks {missing}: train the stage-2 models with "
                                f"ray_jobs/train_sde.py (or run ray_jobs/train_all.py)")


def model_version(uri: str) -> str:
    """A short label for a model (Serve replicas, ``mar_study`` summaries, derived DICOM): the MLflow URI as given,
    or the folder's name and the modification time of its pipeline.json (so two trainings into one folder differ)."""
    if uri.startswith(("runs:/", "models:/")) or "://" in uri:
        return uri
    p = os.path.join(uri, PIPELINE_FILE)
    stamp = int(os.path.getmtime(p)) if os.path.exists(p) else 0
    return f"{os.path.basename(os.path.abspath(uri))}@{stamp}"


def resolve_model_location(location: str) -> str:
    """A local model folder for ``location``: the folder itself, or MLflow's download of an artifact URI."""
    if os.path.isdir(location):
        return location
    if "://" in location or location.startswith(("runs:/", "models:/")):
        import mlflow

        return mlflow.artifacts.download_artifacts(artifact_uri=location)
    raise FileNotFoundError(f"model location {location!r} is neither a folder nor an MLflow artifact URI "
                            f"(runs:/<run_id>/models, models:/<name>/<version>)")
