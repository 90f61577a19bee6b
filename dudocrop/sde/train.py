"""Training the IR-SDE of one domain (paper §III-B-2, Eq. 4-9; residual domain Eq. 16, Algorithm 1), framework-free.

Everything a training loop needs, with no Ray import (the Ray Train loop is ``ray_jobs/train_sde.py``):

* :class:`SDETrainConfig` with the presets ``tiny`` (CPU-sized) and ``paper`` (§IV-B).
* :func:`domain_columns` / :func:`make_batch`: the columns a domain reads and its normalised, augmented batch
  (μ, F_0, mask and the DuDoCLIP embeddings) from :class:`dudocrop.train.SliceRows` rows.
* :func:`train_step` (one exactly replayable step: learning rate, batch, :func:`sde_train_step`, EMA) and
  :func:`fit_in_process` (the same loop in one process, for tests and benchmarks).
* :func:`save_sde_model` / :func:`load_sde_model` -> :class:`SDEModel`: the final artifact inference loads.
* :func:`validate`: PSNR / SSIM on a few full-size held-out slices with a short sampler.

Domains (μ -> F_0, all mapped to [0, 1] by :class:`dudocrop.data.normalize.Normalization`):

* ``image``: X_ma -> X_ref (``Normalization.image``), embeddings ``e_image_content`` / ``e_image_control``.
* ``sinogram``: Y_ma -> Y_ref (``Normalization.sino``), crops along the periodic view axis, ``e_sinogram_*``.
* ``residual`` (Eq. 16): X_r^in = X_p − X'_p -> X_r^ref = X_p − X_ref (``Normalization.residual``), from the
  ``priors`` sidecar; no embeddings: the paper's residual IR-SDE is the "conventional" one (§III-C).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import numpy as np
import torch
from torch import nn

from dudocrop.atomic import torch_save
from dudocrop.checks import parse_assignments
from dudocrop.data.loader import CropSpec, augment
from dudocrop.data.normalize import Normalization, neutral_level
from dudocrop.sde.config import SDEConfig, UNetConfig, get_sde_config, get_unet_config
from dudocrop.sde.irsde import IRSDE
from dudocrop.sde.unet import ConditionalUNet, with_precision
from dudocrop.serialization import check_shapes, load_torch, plain
from dudocrop.train.rows import SliceRows, batch_indices
from dudocrop.train.state import EMA, cosine_lr, step_generator, step_rng, unwrap

Domain = Literal["image", "sinogram", "residual"]
SDE_DOMAINS: tuple[str, ...] = ("image", "sinogram", "residual")

#: §IV-B: "randomly cropped and rotated to a size of 256 x 256 with a batch size 16".
PAPER_PATCH = 256
PAPER_BATCH = 16
#: §IV-B: "An AdamW optimizer with an initial learning rate 2e-4 ... β1 = 0.9, β2 = 0.99 ... total iteration 70,000".
PAPER_LR = 2e-4
PAPER_BETAS = (0.9, 0.99)
PAPER_STEPS = 70_000
#: §IV-B: "We train our model with 400 and 600 epochs on image and sinogram domains ... the residual-domain IR-SDE is
#: set to the same parameters as the image-domain IR-SDE and is trained for about 200 epochs". The 70,000 iterations
#: are the image domain's (70,000 x 16 / 3,003 slices ≈ 373 epochs ≈ 400); the other domains keep that ratio of
#: iterations to epochs (:func:`paper_steps`).
PAPER_EPOCHS = {"image": 400, "sinogram": 600, "residual": 200}


def paper_steps(domain: str) -> int:
    """Iterations of a domain's IR-SDE in the paper: PAPER_STEPS scaled by its epochs over the image domain's."""
    if domain not in PAPER_EPOCHS:
        raise ValueError(f"domain must be one of {sorted(PAPER_EPOCHS)}, got {domain!r}")
    return PAPER_STEPS * PAPER_EPOCHS[domain] // PAPER_EPOCHS["image"]

#: REFERENCE §1: the public code's cosine annealing ends at 1e-6 (the paper says only "Cosine Annealing").
REFERENCE_FINAL_LR = 1e-6
#: REFERENCE §1: EMA of the weights with β ≈ 0.995 (not in the paper).
REFERENCE_EMA = 0.995

#: The sinogram IR-SDE's μ (Eq. 4-6: the state the forward SDE reverts to, which sampling starts from):
#: * ``ma``: Y_ma itself, as the paper writes ε1(Y_ma) (Eq. 10). Inside M_s the network must then replace the
#:   saturated metal line integrals by anatomy, a large jump to learn.
#: * ``li``: Y_ma with M_s filled by per-view linear interpolation (classic.li); identical off the trace, where
#:   Eq. 10 keeps Y_ma anyway. The network only corrects LI's error inside the trace. Measured on the tiny test
#:   shards (16 train / 4 val slices, 600 steps, 10-step sampler): trace RMSE 2.50 with ``ma`` vs 0.37 with
#:   ``li`` (LI itself 0.27, Y_ma 3.11); 1500 steps with ``li``: 0.267, below LI. The paper preset keeps ``ma``.
#: * ``nmar``: M_s filled by NMAR (classic.nmar: LI normalised by the forward projection of a tissue-class prior
#:   image), the best classical completion; it needs X_ma, the metal mask and the CT operator, so training
#:   computes it once per slice (:func:`with_sinogram_mu`). On the small preset's val slices NMAR's trace RMSE is
#:   13 % below LI's (8.2 vs 9.5 per mille of the sinogram range) and its image 1 dB better, a gap the CPU-sized
#:   network did not close from ``li`` (800 steps: -1.4 % trace RMSE, image PSNR unchanged).
SINOGRAM_MU: tuple[str, ...] = ("ma", "li", "nmar")
#: the precomputed μ of the sinogram domain in line integrals (:func:`with_sinogram_mu`)
SINOGRAM_MU_COLUMN = "Y_mu"

#: The image IR-SDE's μ:
#: * ``ma``: X_ma, the paper's ε2(X_ma) (Eq. 12).
#: * ``nmar``: NMAR's image with the metal of X_ma put back (as the NMAR baseline reports it), so the network sees
#:   where the metal is and only corrects NMAR's residual streaks. Trained from X_ma the tiny U-Net stayed 7.5 dB
#:   under NMAR (small's test slices, 35.4 vs 43.0 dB); on the val slices a regression from this μ (1500 steps,
#:   standardised inputs, loss on the body outside the metal, bench/prior_ceiling.py) ended 0.53 dB above NMAR,
#:   and small's image IR-SDE trained so (with ``loss_form='x0'``, 64² sampling windows) 1.08 dB above it on the
#:   12 test slices, 5 sampler steps. Computed once per slice (:func:`with_image_mu`).
#:   (The X_ma comparison was on test slices, not re-decided on val yet: README, "Which split decided what".)
IMAGE_MU: tuple[str, ...] = ("ma", "nmar")
#: the precomputed μ of the image domain in HU (:func:`with_image_mu`)
IMAGE_MU_COLUMN = "X_mu"
#: Where the Eq. 9 loss is averaged: ``all`` pixels (the paper), or ``body``: inside the reference's body outside
#: the metal, the region every image metric scores (metal pixels are replaced by X_ma's in the output anyway).
LOSS_REGIONS: tuple[str, ...] = ("all", "body")

#: Shard columns and sidecar columns of each domain: (μ source, F_0 source, mask) and the embeddings.
_SOURCES = {"image": ("X_ma", "X_ref", "metal_mask"), "sinogram": ("Y_ma", "Y_ref", "metal_trace"),
            "residual": ("X_p", "X_ref", "metal_mask")}


def embedding_columns(domain: str) -> tuple[str, str]:
    """(content e^{I1}, control e^{I2}) column names of a domain's ``embeddings`` sidecar (contract)."""
    _check_domain(domain)
    if domain == "residual":
        raise ValueError("the residual-domain IR-SDE takes no embeddings (the paper's 'conventional' IR-SDE)")
    return f"e_{domain}_content", f"e_{domain}_control"


@dataclass(frozen=True)
class SDETrainConfig:
    """Settings of one domain's IR-SDE training run (stage 2 for image / sinogram, stage 3 for the residual)."""

    unet: str = "paper"  # a U-Net preset (dudocrop.sde.config.UNET_PRESETS)
    sde: str = "paper"  # an SDE preset (T = 100, λ = 50/255, Eq. 4-6)
    parametrization: Literal["noise", "x0"] = "noise"  # what the U-Net outputs (SDEConfig.parametrization)
    domain: Domain = "image"
    use_embeddings: bool = True  # False: the plain IR-SDE (Fig. 12 ablation; always for the residual domain)
    context_dim: int | None = None  # width of e^{I1}, e^{I2}; None: taken from the embedding columns
    patch: int = PAPER_PATCH
    batch_size: int = PAPER_BATCH  # global batch (all workers together)
    steps: int = PAPER_STEPS
    lr: float = PAPER_LR
    final_lr: float = REFERENCE_FINAL_LR
    warmup: int = 0
    betas: tuple[float, float] = PAPER_BETAS
    weight_decay: float = 0.0  # the public IR-SDE option files use 0; not stated in the paper
    ema_decay: float = REFERENCE_EMA
    loss_form: Literal["sde", "posterior", "x0"] = "sde"  # "sde" is Eq. 9 as written (see IRSDE.loss)
    # The sinogram domain's degraded state μ: the measured Y_ma (paper Eq. 10, ε1(Y_ma)) or its LI or NMAR
    # completion across the metal trace M_s ("li", "nmar", see SINOGRAM_MU). Other domains ignore it.
    sinogram_mu: Literal["ma", "li", "nmar"] = "ma"
    image_mu: Literal["ma", "nmar"] = "ma"  # the image domain's μ (IMAGE_MU)
    loss_region: Literal["all", "body"] = "all"  # LOSS_REGIONS; body needs the image or residual domain
    # UNetConfig.in_scale (with in_offset at the domain's zero: water for images, 0.5 for residuals, 0 for
    # sinograms); 1: the [0, 1] values as they are
    input_scale: float = 1.0
    # sample in windows of this size (IRSDE.sample_tiled) by default: a U-Net trained on crops sees whole slices
    # differently (GroupNorm statistics and the linear attention span the whole input); measured with the
    # regression probe of IMAGE_MU: +0.23 dB over NMAR on whole 128² slices, +0.53 dB in 64² windows
    sample_tile: int | None = None
    grad_clip: float | None = None
    checkpoint_every: int = 1000
    validate_every: int = 5000  # 0: never
    val_slices: int = 2  # few full-size held-out slices, so validation never dominates
    val_steps: int = 10  # sampler network evaluations in validation (any 1..T; fewer = faster)
    log_every: int = 50
    seed: int = 0
    # λ (on the [0, 1] scale, Eq. 4-6) and T replacing the SDE preset's: what ray_jobs/tune_sde.py sweeps; None: the
    # preset's (the paper's λ = 50/255, T = 100)
    lam: float | None = None
    T: int | None = None

    def __post_init__(self) -> None:
        if self.domain not in SDE_DOMAINS:
            raise ValueError(f"SDETrainConfig.domain must be one of {SDE_DOMAINS}, got {self.domain!r}")
        if self.domain == "residual" and self.use_embeddings:
            raise ValueError("SDETrainConfig.use_embeddings must be False for domain='residual' (the paper's "
                             "residual IR-SDE is the conventional one, §III-C)")
        get_unet_config(self.unet)
        get_sde_config(self.sde)
        for f in ("patch", "batch_size", "steps", "checkpoint_every", "val_slices", "val_steps", "log_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SDETrainConfig.{f} must be an int >= 1, got {v!r}")
        for f in ("warmup", "validate_every", "seed"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SDETrainConfig.{f} must be an int >= 0, got {v!r}")
        if self.context_dim is not None and (not isinstance(self.context_dim, int) or self.context_dim < 1):
            raise ValueError(f"SDETrainConfig.context_dim must be None or an int >= 1, got {self.context_dim!r}")
        if not (self.lr > 0 and 0 <= self.final_lr <= self.lr):
            raise ValueError(f"SDETrainConfig needs lr > 0 and 0 <= final_lr <= lr, got {self.lr}, {self.final_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"SDETrainConfig.betas must be two floats in [0, 1), got {self.betas!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"SDETrainConfig.ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        if self.sinogram_mu not in SINOGRAM_MU:
            raise ValueError(f"SDETrainConfig.sinogram_mu must be one of {SINOGRAM_MU}, got {self.sinogram_mu!r}")
        if self.image_mu not in IMAGE_MU:
            raise ValueError(f"SDETrainConfig.image_mu must be one of {IMAGE_MU}, got {self.image_mu!r}")
        if self.loss_region not in LOSS_REGIONS:
            raise ValueError(f"SDETrainConfig.loss_region must be one of {LOSS_REGIONS}, got {self.loss_region!r}")
        if self.loss_region == "body" and self.domain == "sinogram":
            raise ValueError("SDETrainConfig.loss_region='body' is an image region; the sinogram domain takes 'all'")
        if not (isinstance(self.input_scale, int | float) and 0 < self.input_scale < float("inf")):
            raise ValueError(f"SDETrainConfig.input_scale must be a positive finite number, got {self.input_scale!r}")
        if self.input_scale != 1 and self.parametrization != "x0":
            raise ValueError("SDETrainConfig.input_scale != 1 divides the U-Net's output by it: a correction, so it "
                             "needs parametrization='x0'")
        if self.sample_tile is not None and (isinstance(self.sample_tile, bool) or not isinstance(
                self.sample_tile, int) or self.sample_tile <= 32):
            raise ValueError(f"SDETrainConfig.sample_tile must be None or an int > 32 (windows overlap by 32), got "
                             f"{self.sample_tile!r}")
        if self.loss_form not in ("sde", "posterior", "x0"):
            raise ValueError(f"SDETrainConfig.loss_form must be 'sde', 'posterior' or 'x0', got {self.loss_form!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"SDETrainConfig.grad_clip must be None or > 0, got {self.grad_clip!r}")
        if self.lam is not None and (isinstance(self.lam, bool) or not isinstance(self.lam, int | float)
                                     or not 0 < self.lam < float("inf")):
            raise ValueError(f"SDETrainConfig.lam must be None or a positive float (λ/255, e.g. 50/255), got "
                             f"{self.lam!r}")
        if self.T is not None and (isinstance(self.T, bool) or not isinstance(self.T, int) or self.T < 1):
            raise ValueError(f"SDETrainConfig.T must be None or an int >= 1, got {self.T!r}")

    def unet_config(self, context_dim: int | None = None) -> UNetConfig:
        over = {"use_embeddings": self.use_embeddings}
        if self.input_scale != 1:
            over.update(in_scale=float(self.input_scale), in_offset=neutral_level(self.domain))
        dim = self.context_dim or context_dim
        if dim is not None:
            over["context_dim"] = dim
        return get_unet_config(self.unet, **over)

    def sde_config(self) -> SDEConfig:
        over = {k: getattr(self, k) for k in ("lam", "T") if getattr(self, k) is not None}
        return get_sde_config(self.sde, parametrization=self.parametrization, **over)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> SDETrainConfig:
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown SDETrainConfig fields {bad}; expected some of {sorted(names)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**d)


TRAIN_PRESETS: dict[str, SDETrainConfig] = {
    "paper": SDETrainConfig(),
    # CPU-sized: the tiny U-Net on full 64² slices of the tiny geometry (64 x 64 crops of the 96 x 112 sinograms:
    # 32² crops cut the streaks' context), a larger step with a 50-step warm-up because a few hundred steps must
    # show learning, and a short EMA (0.9: ≈10 steps) because at 0.995 the EMA of a 400-step run still holds 13 % of
    # the random initial weights (measured: 6.5 dB held-out PSNR vs 13 dB for the raw weights after 100 steps).
    # Loss: Eq. 9 as written ("sde"); the "posterior" form learned no faster (held-out PSNR 16.1 / 20.5 dB vs
    # 14.7 / 20.8 dB at 100 / 200 steps). 800 steps: the image model passes its uncorrected input (measured on the
    # test shards, 600-step run: 22.21 / 22.44 / 22.52 dB at 400 / 500 / 600 steps vs the input's 22.26 dB).
    "tiny": SDETrainConfig(unet="tiny", sde="tiny", patch=64, batch_size=8, steps=800, lr=2e-3, final_lr=1e-5,
                           warmup=50, ema_decay=0.9, checkpoint_every=50, validate_every=200, val_slices=4,
                           val_steps=10, log_every=10, sinogram_mu="li"),
}


def get_train_config(preset: str, **overrides) -> SDETrainConfig:
    """A named preset (``tiny``, ``paper``) with fields replaced; ``domain='residual'`` switches embeddings off
    unless ``use_embeddings`` is given."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown SDE training preset {preset!r}; expected one of {sorted(TRAIN_PRESETS)}")
    if overrides.get("domain") == "residual":
        overrides.setdefault("use_embeddings", False)
    names = {f.name for f in fields(SDETrainConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown SDETrainConfig fields {bad}; expected some of {sorted(names)}")
    return replace(TRAIN_PRESETS[preset], **overrides)


def parse_overrides(items: Sequence[str]) -> dict:
    """``["steps=100", "lr=1e-3", "betas=(0.9,0.999)"]`` -> typed overrides (``checks.parse_assignments``:
    Python literals or JSON; bare words stay strings). Raises ValueError naming a malformed item or an unknown field."""
    names = {f.name for f in fields(SDETrainConfig)}
    out = parse_assignments(items)
    for k in out:
        if k not in names:
            raise ValueError(f"--set: unknown SDETrainConfig field {k!r}; expected one of {sorted(names)}")
    return out


# ---- data --------------------------------------------------------------------------------------------------------
def _check_domain(domain: str) -> None:
    if domain not in SDE_DOMAINS:
        raise ValueError(f"domain must be one of {SDE_DOMAINS}, got {domain!r}")


def domain_columns(domain: str, use_embeddings: bool, sino_mu: str = "ma", image_mu: str = "ma"
                   ) -> tuple[list[str], dict[str, list[str]]]:
    """(shard columns, {sidecar kind: columns}) that ``load_split`` must read for a domain.

    The image and residual domains also read the sinogram-free columns they score with (X_ma for the input PSNR,
    metal_mask to exclude the metal), and the image domain Y_ma / metal_trace when its μ is ``nmar``; the
    sinogram domain reads Y_ma / Y_ref / metal_trace (the LI comparison), and X_ma / metal_mask when its μ is
    ``nmar``."""
    _check_domain(domain)
    # an NMAR μ is computed in each slice's own geometry (AAPM body and head slices in one run): + "geometry"
    if domain == "image":
        cols = ["X_ma", "X_ref", "metal_mask"] + (["Y_ma", "metal_trace", "geometry"] if image_mu == "nmar" else [])
        side = {}
    elif domain == "sinogram":
        cols = ["Y_ma", "Y_ref", "metal_trace"] + (["X_ma", "metal_mask", "geometry"] if sino_mu == "nmar" else [])
        side = {}
    else:
        cols, side = ["X_ref", "metal_mask"], {"priors": ["X_p", "X_p_prime"]}
    if use_embeddings:
        side["embeddings"] = list(embedding_columns(domain))
    return cols, side


def _column(rows: Mapping, name: str) -> np.ndarray:
    if name not in rows:
        raise ValueError(f"rows have no column {name!r} (columns: {sorted(rows)}); load them with "
                         f"domain_columns()")
    return np.asarray(rows[name], dtype=np.float32)


def sinogram_mu(y_ma, trace, source: str, *, x_ma=None, metal_mask=None, op=None):
    """The sinogram IR-SDE's μ in line integrals (:data:`SINOGRAM_MU`): ``y_ma`` (N, V, C) or (N, 1, V, C),
    numpy or torch, with the boolean-like ``trace`` M_s of the same shape; returns the same type and shape.
    ``nmar`` also needs ``x_ma`` (HU) and ``metal_mask`` shaped like the images and ``op`` (a FanBeamOperator,
    geometry or its name)."""
    if source not in SINOGRAM_MU:
        raise ValueError(f"sinogram_mu must be one of {SINOGRAM_MU}, got {source!r}")
    if source == "ma":
        return y_ma
    from dudocrop.classic.li import interpolate_trace

    as_numpy = not isinstance(y_ma, torch.Tensor)
    y = torch.as_tensor(np.array(y_ma, dtype=np.float32) if as_numpy else y_ma)
    t = torch.as_tensor(trace, device=y.device) > 0.5
    if t.shape != y.shape:
        raise ValueError(f"trace must have y_ma's shape {tuple(y.shape)}, got {tuple(t.shape)}")
    squeeze = y.ndim == 3
    y4, t4 = (y[:, None], t[:, None]) if squeeze else (y, t)
    if source == "li":
        out = interpolate_trace(y4, t4)
    else:
        from dudocrop.classic.nmar import nmar

        if x_ma is None or metal_mask is None or op is None:
            raise ValueError("sinogram_mu='nmar' needs x_ma, metal_mask and op (the CT operator or geometry)")
        x = torch.as_tensor(np.array(x_ma, dtype=np.float32) if as_numpy else x_ma, device=y.device)
        m = torch.as_tensor(np.asarray(metal_mask) if as_numpy else metal_mask, device=y.device) > 0.5
        x4, m4 = (x[:, None], m[:, None]) if x.ndim == 3 else (x, m)
        out = nmar(y4, m4, x4.float(), _operator(op), trace=t4, return_sinogram=True)[1].to(y.dtype)
    out = out[:, 0] if squeeze else out
    return out.numpy() if as_numpy else out


def with_sinogram_mu(rows: SliceRows, source: str, op, batch: int = 16) -> SliceRows:
    """``rows`` with the column :data:`SINOGRAM_MU_COLUMN`: the sinogram μ of every row, computed once (``nmar``
    costs a FBP and a forward projection per slice, too much for every training step); ``ma`` / ``li`` rows are
    returned unchanged (μ is cheap to compute per batch). ``op``: the CT operator or geometry of the data."""
    if source in ("ma", "li"):
        return rows
    return _with_column(rows, SINOGRAM_MU_COLUMN, batch, lambda c, sl, op: sinogram_mu(
        _column(c, "Y_ma")[sl], _column(c, "metal_trace")[sl], source, x_ma=_column(c, "X_ma")[sl],
        metal_mask=_column(c, "metal_mask")[sl], op=op), _operator(op))


def image_mu(x_ma, y_ma, metal_mask, trace, source: str, op):
    """The image IR-SDE's μ in HU (:data:`IMAGE_MU`), torch (N, 1, H, W) or numpy (N, H, W) like ``x_ma``:
    ``x_ma`` itself, or NMAR's image of ``y_ma`` (sinograms shaped like ``trace``) with the metal put back."""
    if source not in IMAGE_MU:
        raise ValueError(f"image_mu must be one of {IMAGE_MU}, got {source!r}")
    if source == "ma":
        return x_ma
    from dudocrop.classic.nmar import nmar

    as_numpy = not isinstance(x_ma, torch.Tensor)
    t = (lambda a: torch.as_tensor(np.array(a, dtype=np.float32))[:, None]) if as_numpy else (lambda a: a.float())
    out = nmar(t(y_ma), t(metal_mask) > 0.5, t(x_ma), _operator(op), trace=t(trace) > 0.5)
    return out[:, 0].numpy() if as_numpy else out.to(x_ma.dtype)


def with_image_mu(rows: SliceRows, source: str, op, batch: int = 16) -> SliceRows:
    """``rows`` with the column :data:`IMAGE_MU_COLUMN` (HU) when the image μ is ``nmar``, computed once per
    slice; ``ma`` rows are returned unchanged."""
    if source == "ma":
        return rows
    return _with_column(rows, IMAGE_MU_COLUMN, batch, lambda c, sl, op: image_mu(
        _column(c, "X_ma")[sl], _column(c, "Y_ma")[sl], _column(c, "metal_mask")[sl], _column(c, "metal_trace")[sl],
        source, op), _operator(op))


def _operator(op):
    from dudocrop.ct.operators import FanBeamOperator

    return op if isinstance(op, FanBeamOperator) else FanBeamOperator(op)


def _with_column(rows: SliceRows, name: str, batch: int, compute, op) -> SliceRows:
    """``rows`` plus column ``name``: ``compute(columns, rows, operator)`` over batches of rows. Rows whose
    ``geometry`` column names another geometry than ``op``'s (AAPM head slices among body slices) get that
    geometry's operator: each slice is projected and reconstructed in its own field of view."""
    cols = rows.columns
    n = len(next(iter(cols.values())))
    geoms = cols.get("geometry")
    ops = {op.geometry.name: op}
    out = None
    for i in range(0, n, batch):
        idx = np.arange(i, min(n, i + batch))
        names = [op.geometry.name] * len(idx) if geoms is None else [str(geoms[j]) for j in idx]
        for g in dict.fromkeys(names):
            sel = idx[[k for k, v in enumerate(names) if v == g]]
            if g not in ops:
                ops[g] = _operator(g)
            part = np.asarray(compute(cols, sel, ops[g]))
            if out is None:
                out = np.empty((n, *part.shape[1:]), part.dtype)
            out[sel] = part
    return SliceRows({**cols, name: out}, rows.shard_of_row)


def to_unit_pair(rows: Mapping, domain: str, norm: Normalization, sino_mu: str = "ma", image_mu: str = "ma"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-size (μ, F_0, mask) in [0, 1] (N, H, W) of a domain, before cropping; ``sino_mu`` / ``image_mu`` are
    the sinogram / image domain's μ (:data:`SINOGRAM_MU`, :data:`IMAGE_MU`; ``nmar`` reads the precomputed
    column)."""
    _check_domain(domain)
    if domain == "image":
        if image_mu == "nmar" and IMAGE_MU_COLUMN not in rows:
            raise ValueError(f"image_mu='nmar' needs the rows' precomputed {IMAGE_MU_COLUMN!r} column "
                             "(with_image_mu)")
        mu = norm.image(_column(rows, IMAGE_MU_COLUMN if image_mu == "nmar" else "X_ma"))
        x0 = norm.image(_column(rows, "X_ref"))
        mask = _column(rows, "metal_mask")
    elif domain == "sinogram":
        mask = _column(rows, "metal_trace")
        if SINOGRAM_MU_COLUMN in rows:
            mu = norm.sino(_column(rows, SINOGRAM_MU_COLUMN))
        elif sino_mu == "nmar":
            raise ValueError(f"sinogram_mu='nmar' needs the rows' precomputed {SINOGRAM_MU_COLUMN!r} column "
                             "(with_sinogram_mu)")
        else:
            mu = norm.sino(sinogram_mu(_column(rows, "Y_ma"), mask, sino_mu))
        x0 = norm.sino(_column(rows, "Y_ref"))
    else:
        xp, xpp, ref = _column(rows, "X_p"), _column(rows, "X_p_prime"), _column(rows, "X_ref")
        mu, x0 = norm.residual(xp - xpp), norm.residual(xp - ref)  # Eq. 16: X_r^in, X_r^ref
        mask = _column(rows, "metal_mask")
    if mu.shape != x0.shape:
        raise ValueError(f"{domain} input and target shapes differ: {mu.shape} vs {x0.shape}")
    return mu, x0, mask


def _embeddings(rows: Mapping, domain: str, n: int, context_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for name in embedding_columns(domain):
        e = _column(rows, name)
        if e.ndim != 2 or e.shape[0] != n or (context_dim is not None and e.shape[1] != context_dim):
            raise ValueError(f"column {name} must hold ({n}, {context_dim or 'D'}) embeddings (the U-Net's "
                             f"context_dim), got shape {e.shape}")
        out.append(torch.from_numpy(np.ascontiguousarray(e)))
    return out[0], out[1]


def make_batch(rows: Mapping, domain: str, norm: Normalization, crop: CropSpec | None, rng: np.random.Generator,
               use_embeddings: bool, context_dim: int | None = None, sino_mu: str = "ma", image_mu: str = "ma",
               loss_region: str = "all") -> dict[str, torch.Tensor]:
    """One training batch ``{"mu", "x0", "mask"[, "weight"][, "content", "control"]}``: float32 (N, 1, h, w) in
    [0, 1], embeddings (N, D). ``crop`` (None: full size) is applied identically to μ, F_0, the mask and the
    weight with ``rng``: random crops + rotations / flips for image and residual, crops along the periodic views
    for sinograms (paper §IV-B, ``dudocrop.data.loader.augment``). ``loss_region='body'`` adds the Eq. 9 loss
    weight (:data:`LOSS_REGIONS`), found on the whole slice before cropping."""
    if loss_region not in LOSS_REGIONS:
        raise ValueError(f"loss_region must be one of {LOSS_REGIONS}, got {loss_region!r}")
    mu, x0, mask = to_unit_pair(rows, domain, norm, sino_mu, image_mu)
    extra = mask
    if loss_region == "body":
        if domain == "sinogram":
            raise ValueError("loss_region='body' is an image region; the sinogram domain takes 'all'")
        from dudocrop.ct.phantoms import body_mask
        from dudocrop.metrics.image import BODY_THRESHOLD_HU

        weight = np.stack([body_mask(r, BODY_THRESHOLD_HU) & (m <= 0.5)
                           for r, m in zip(_column(rows, "X_ref"), mask)]).astype(np.float32)
        extra = np.stack([mask, weight], axis=-1)
    if crop is not None:
        kind = "sinogram" if domain == "sinogram" else "image"
        mus, x0s, es = zip(*(augment(m, x, k, kind, crop, rng) for m, x, k in zip(mu, x0, extra)))
        mu, x0, extra = np.stack(mus), np.stack(x0s), np.stack(es)
    out = {"mu": torch.from_numpy(mu[:, None].copy()), "x0": torch.from_numpy(x0[:, None].copy())}
    if loss_region == "body":
        out["mask"] = torch.from_numpy(extra[:, None, ..., 0].copy())
        out["weight"] = torch.from_numpy(extra[:, None, ..., 1].copy())
    else:
        out["mask"] = torch.from_numpy(extra[:, None].copy())
    if use_embeddings:
        out["content"], out["control"] = _embeddings(rows, domain, len(mu), context_dim)
    return out


def embedding_width(rows: SliceRows | Mapping, domain: str) -> int:
    """Width D of a domain's embedding columns (checked equal for content and control)."""
    cols = rows.columns if isinstance(rows, SliceRows) else rows
    widths = {n: _column(cols, n).shape[-1] for n in embedding_columns(domain)}
    if len(set(widths.values())) != 1:
        raise ValueError(f"embedding columns differ in width: {widths}")
    return next(iter(widths.values()))


# ---- one step ----------------------------------------------------------------------------------------------------
def sde_train_step(model: nn.Module, sde: IRSDE, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
                   *, generator: torch.Generator | None = None, loss_form: str = "sde",
                   grad_clip: float | None = None) -> float:
    """One optimiser step on the Eq. 9 loss (Eq. 16 for the residual domain): t ~ U{1..T}, F_t from Eq. 6,
    ε̂ = model(F_t, μ, t, e^{I1}, e^{I2}), L1 between the one-step reverse mean and F*_{t−1} (Eq. 8), η = 1 (§III-C).

    ``batch`` holds ``mu`` and ``x0`` (N, 1, h, w), optionally the loss ``weight`` (LOSS_REGIONS) and, when the
    U-Net uses them, ``content`` / ``control`` (N, D); tensors are moved to the model's device. On CUDA the
    forward runs under bf16 autocast (the schedule's coefficients stay float32/64); on CPU everything is float32.
    Returns the loss as a float."""
    for k in ("mu", "x0"):
        if k not in batch:
            raise ValueError(f"batch must hold {k!r} (got keys {sorted(batch)})")
    device = next(unwrap(model).parameters()).device
    x0, mu = batch["x0"].to(device, non_blocking=True), batch["mu"].to(device, non_blocking=True)
    content, control = (batch[k].to(device) if batch.get(k) is not None else None for k in ("content", "control"))
    weight = batch["weight"].to(device) if batch.get("weight") is not None else None
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = sde.training_loss(model, x0, mu, content, control, generator=generator, form=loss_form,
                                 weight=weight)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"IR-SDE loss is {loss.item()}: lower the learning rate or check the inputs")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def build_training(cfg: SDETrainConfig, device: torch.device | str = "cpu", context_dim: int | None = None
                   ) -> tuple[ConditionalUNet, EMA, torch.optim.Optimizer, IRSDE]:
    """(U-Net, EMA, AdamW, IRSDE) initialised from ``cfg.seed`` (every rank builds the same weights)."""
    torch.manual_seed(cfg.seed)
    unet = ConditionalUNet(cfg.unet_config(context_dim)).to(device)
    if cfg.parametrization == "x0":  # a zero output is F̂_0 = μ: training starts from the degraded input itself
        nn.init.zeros_(unet.final_conv.weight)
        if unet.final_conv.bias is not None:
            nn.init.zeros_(unet.final_conv.bias)
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return unet, ema, opt, IRSDE(cfg.sde_config())


def train_step(model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, sde: IRSDE, rows: SliceRows,
               cfg: SDETrainConfig, norm: Normalization, step: int, rank: int = 0, world: int = 1) -> dict:
    """Training step ``step`` (0-based) of rank ``rank`` of ``world``: cosine LR, this rank's part of the global
    batch, augmentation and diffusion noise from ``(seed, step, rank)`` only, the optimiser step, the EMA update.
    Nothing random is carried between steps, so a run resumed after step ``s`` replays step ``s+1`` exactly."""
    lr = cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup, final=cfg.final_lr)
    for g in optimizer.param_groups:
        g["lr"] = lr
    idx = batch_indices(len(rows), cfg.batch_size, step, cfg.seed, rank, world)
    ctx = unwrap(model).config.context_dim if cfg.use_embeddings else None
    batch = make_batch(rows.take(idx), cfg.domain, norm, CropSpec(cfg.patch, cfg.patch),
                       step_rng(cfg.seed, step, rank), cfg.use_embeddings, ctx, cfg.sinogram_mu, cfg.image_mu,
                       cfg.loss_region)
    device = next(unwrap(model).parameters()).device
    loss = sde_train_step(model, sde, optimizer, batch, generator=step_generator(cfg.seed, step, rank, device),
                          loss_form=cfg.loss_form, grad_clip=cfg.grad_clip)
    ema.update(model)
    return {"loss": loss, "lr": lr}


def fit_in_process(cfg: SDETrainConfig, rows: SliceRows, norm: Normalization, *, device: torch.device | str = "cpu",
                   callback: Callable[[int, dict], None] | None = None) -> tuple[ConditionalUNet, EMA, list[float]]:
    """The whole loop of ``cfg.steps`` steps in this process (world 1): (U-Net, EMA, losses). Tests and benches."""
    ctx = embedding_width(rows, cfg.domain) if cfg.use_embeddings else None
    unet, ema, opt, sde = build_training(cfg, device, ctx)
    losses = []
    for step in range(cfg.steps):
        m = train_step(unet, ema, opt, sde, rows, cfg, norm, step)
        losses.append(m["loss"])
        if callback is not None:
            callback(step + 1, m)
    return unet, ema, losses


# ---- the final artifact ------------------------------------------------------------------------------------------
@dataclass
class SDEModel:
    """A trained IR-SDE as inference uses it: ``unet`` (EMA weights, eval mode), ``sde``, the ``domain``, whether
    the U-Net takes embeddings and the ``normalization`` that maps the domain's values to [0, 1]."""

    unet: ConditionalUNet
    sde: IRSDE
    domain: str
    use_embeddings: bool
    normalization: Normalization | None
    meta: dict = field(default_factory=dict)
    sinogram_mu: str = "ma"  # the sinogram domain's μ (SINOGRAM_MU), as trained
    image_mu: str = "ma"  # the image domain's μ (IMAGE_MU), as trained
    tile: int | None = None  # restore's default window (SDETrainConfig.sample_tile); None: whole inputs
    _compiled: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _norm(self) -> Normalization:
        if self.normalization is None:
            raise ValueError("this SDE model was saved without a normalization: pass one when saving")
        return self.normalization

    def to_unit(self, x):
        """Domain values -> [0, 1]: HU (image), line integrals (sinogram), a HU difference (residual)."""
        n = self._norm()
        return {"image": n.image, "sinogram": n.sino, "residual": n.residual}[self.domain](x)

    def from_unit(self, u):
        n = self._norm()
        return {"image": n.image_to_hu, "sinogram": n.sino_to_line_integrals,
                "residual": n.residual_to_hu}[self.domain](u)

    def restore(self, mu_unit: torch.Tensor, content=None, control=None, *, steps: int | None = None,
                generator: torch.Generator | None = None, tile: int | None = None, overlap: int = 32,
                precision: str = "fp32", compile: bool = False, x0_clip: bool = True, **kw) -> torch.Tensor:
        """F̂_0 in [0, 1] from μ in [0, 1] (N, 1, H, W): ``IRSDE.sample`` (or ``sample_tiled`` with ``tile``, by
        default the model's own when μ is larger), each F̂_0 clipped to [0, 1], the range every domain is
        normalised to, unless ``x0_clip`` is False (the paper's sampler, which clips nothing).
        ``precision``: the U-Net's (``unet.PRECISIONS``; ``bf16`` autocasts it, as training on CUDA
        does, while the sampler stays float32). ``compile``: the U-Net through ``torch.compile`` (mode
        reduce-overhead: fused kernels, replayed as CUDA graphs on a GPU), compiled once per precision and input
        size; on an H200 the paper U-Net at 512² went from 26.7 to 6.8 ms per evaluation in bf16 (29 s to
        compile, bench/unet_gpu.py)."""
        if not self.use_embeddings:
            content = control = None
        if tile is None and self.tile is not None and max(mu_unit.shape[-2:]) > self.tile:
            tile = self.tile
        net = with_precision(self.unet, precision)
        if compile:
            if precision not in self._compiled:
                self._compiled[precision] = torch.compile(net, mode="reduce-overhead", dynamic=False)
            net = self._compiled[precision]
        x0_range = (0.0, 1.0) if x0_clip else None
        if tile is None:
            return self.sde.sample(net, mu_unit, content, control, steps=steps, generator=generator,
                                   x0_range=x0_range, **kw)
        return self.sde.sample_tiled(net, mu_unit, content, control, tile=tile, overlap=overlap, steps=steps,
                                     generator=generator, x0_range=x0_range, **kw)


def _ema_weights(unet: nn.Module, ema) -> dict[str, torch.Tensor]:
    if ema is None:
        return {k: v.detach().cpu().clone() for k, v in unwrap(unet).state_dict().items()}
    shadow = ema.shadow if isinstance(ema, EMA) else ema.get("shadow", ema) if isinstance(ema, Mapping) else None
    if shadow is None:
        raise ValueError(f"ema must be an EMA, its state_dict() or None, got {type(ema).__name__}")
    return {k: v.detach().cpu().clone() for k, v in shadow.items()}


def save_sde_model(path: str, unet: nn.Module, ema, meta: Mapping | None = None, *, domain: str | None = None,
                   sde_config: SDEConfig | None = None, normalization: Normalization | None = None) -> str:
    """Write the final model atomically: {"domain", "unet_config", "sde_config", "weights" (the EMA weights, or
    the U-Net's own when ``ema`` is None), "normalization", "meta"}. ``domain`` / ``sde_config`` /
    ``normalization`` default to ``meta``'s entries of those names (so ``save_sde_model(path, unet, ema, meta)``
    works when meta carries them); the domain is required."""
    meta = dict(meta or {})
    domain = domain or meta.get("domain")
    _check_domain(domain)
    net = unwrap(unet)
    if not isinstance(net, ConditionalUNet):
        raise ValueError(f"unet must be a ConditionalUNet (or a DDP wrapper of one), got {type(net).__name__}")
    sde_config = sde_config or meta.get("sde_config") or SDEConfig()
    if isinstance(sde_config, Mapping):
        sde_config = SDEConfig(**sde_config)
    normalization = normalization or meta.get("normalization")
    if isinstance(normalization, Mapping):
        normalization = Normalization(**normalization)
    meta.pop("sde_config", None)
    meta.pop("normalization", None)
    weights = _ema_weights(net, ema)
    if set(weights) != set(net.state_dict()):
        raise ValueError("ema weights do not match the U-Net's parameters (different config?)")
    train = meta.get("train_config") or {}
    blob = {"domain": domain, "unet_config": asdict(net.config), "sde_config": asdict(sde_config), "weights": weights,
            "normalization": None if normalization is None else asdict(normalization),
            "sinogram_mu": train.get("sinogram_mu", "ma"), "image_mu": train.get("image_mu", "ma"),
            "tile": train.get("sample_tile"),
            "use_embeddings": net.config.use_embeddings, "meta": plain(meta)}
    torch_save(path, blob)
    return path


def load_sde_model(path: str, device: torch.device | str | None = None) -> SDEModel:
    """The model saved by :func:`save_sde_model`, on ``device`` (default CPU), in eval mode.

    Tensors and plain data only (torch's restricted unpickler); the U-Net is first built on the ``meta`` device and
    its shapes compared with the stored weights, so a config claiming far more parameters than the file holds
    fails before any allocation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SDE model at {path}: train it with ray_jobs/train_sde.py")
    blob = load_torch(path, "SDE model file")
    missing = [k for k in ("domain", "unet_config", "sde_config", "weights") if k not in blob] \
        if isinstance(blob, dict) else ["everything: not a dict"]
    if missing:
        raise ValueError(f"{path} is not an SDE model file (missing {missing})")
    ucfg = {k: tuple(v) if isinstance(v, list) else v for k, v in blob["unet_config"].items()}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ConditionalUNet(UNetConfig(**ucfg)).state_dict().items()}
    check_shapes(path, shapes, blob["weights"])
    unet = ConditionalUNet(UNetConfig(**ucfg))
    unet.load_state_dict(blob["weights"])
    unet.to(device or "cpu").eval()
    norm = blob.get("normalization")
    return SDEModel(unet=unet, sde=IRSDE(SDEConfig(**blob["sde_config"])), domain=blob["domain"],
                    use_embeddings=bool(unet.config.use_embeddings),
                    normalization=None if norm is None else Normalization(**norm), meta=dict(blob.get("meta") or {}),
                    sinogram_mu=str(blob.get("sinogram_mu", "ma")), image_mu=str(blob.get("image_mu", "ma")),
                    tile=blob.get("tile"))


# ---- validation --------------------------------------------------------------------------------------------------
def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


@torch.no_grad()
def validate(model: SDEModel, rows: SliceRows | Mapping, *, n: int = 2, steps: int = 10, seed: int = 0,
             device: torch.device | str | None = None, batch: int = 1, tile: int | None = None) -> dict[str, float]:
    """PSNR / SSIM of ``model`` on the first ``n`` rows (full size, ``steps`` sampler evaluations) next to the
    uncorrected input's, with dudocrop.metrics.image:

    * image: HU vs X_ref, metal excluded, the full CT window; input = X_ma.
    * residual: the corrected image X_p − X̂_r vs X_ref (metal excluded); input = X_p − X_r^in = X'_p.
    * sinogram: line integrals vs Y_ref with window (0, sino_max); plus ``trace_rmse`` inside the metal trace for
      the model, the input and LI (per-view linear interpolation, dudocrop.classic.li), the paper's use of Y_p.

    Keys: ``val_psnr``, ``val_ssim``, ``val_psnr_input``, ``val_ssim_input`` (+ ``val_trace_rmse*``), ``val_seconds``.
    """
    from dudocrop.classic.li import interpolate_trace
    from dudocrop.metrics.image import CT_RANGE_HU, psnr, rmse, ssim

    t0 = time.perf_counter()
    cols = rows.columns if isinstance(rows, SliceRows) else rows
    total = len(next(iter(cols.values())))
    k = min(int(n), total)
    if k < 1:
        raise ValueError(f"validate needs n >= 1 rows, got n={n} of {total}")
    sub = {c: v[:k] for c, v in cols.items()}
    norm = model._norm()
    device = torch.device(device) if device is not None else next(model.unet.parameters()).device
    mu, _, mask = to_unit_pair(sub, model.domain, norm, model.sinogram_mu, model.image_mu)
    emb = _embeddings(sub, model.domain, k, model.unet.config.context_dim) if model.use_embeddings else (None, None)
    outs = []
    for i in range(0, k, batch):
        g = torch.Generator(device=device).manual_seed(seed + i)
        m = torch.from_numpy(mu[i:i + batch, None].copy()).to(device)
        c, e = (None if x is None else x[i:i + batch].to(device) for x in emb)
        outs.append(model.restore(m, c, e, steps=steps, generator=g, tile=tile).float().cpu())
    out = torch.cat(outs).double()
    m4 = torch.from_numpy(mask[:, None] > 0.5)

    def t(name):
        return torch.from_numpy(np.asarray(sub[name], dtype=np.float64)[:, None])

    res: dict[str, float] = {}
    if model.domain == "sinogram":
        pred, ref, raw = norm.sino_to_line_integrals(out), t("Y_ref"), t("Y_ma")
        win = (0.0, float(norm.sino_max))
        li = interpolate_trace(raw, m4)
        res.update(val_trace_rmse=_mean(rmse(pred, ref, roi=m4)), val_trace_rmse_input=_mean(rmse(raw, ref, roi=m4)),
                   val_trace_rmse_li=_mean(rmse(li, ref, roi=m4)))
        metal = None
    else:
        ref = t("X_ref")
        if model.domain == "image":
            pred, raw = norm.image_to_hu(out), t("X_ma")
        else:
            xp = t("X_p")
            pred, raw = xp - norm.residual_to_hu(out), t("X_p_prime")
        win, metal = CT_RANGE_HU, m4
    res.update(val_psnr=_mean(psnr(pred, ref, metal, window=win)), val_ssim=_mean(ssim(pred, ref, metal, window=win)),
               val_psnr_input=_mean(psnr(raw, ref, metal, window=win)),
               val_ssim_input=_mean(ssim(raw, ref, metal, window=win)))
    res = {k2: (v if math.isfinite(v) else float("nan")) if isinstance(v, float) else v for k2, v in res.items()}
    res["val_seconds"] = round(time.perf_counter() - t0, 3)
    return res


def sde_model_from_training(unet: nn.Module, ema: EMA | None, cfg: SDETrainConfig, norm: Normalization | None
                            ) -> SDEModel:
    """An :class:`SDEModel` holding the EMA weights of a run in progress (for validation)."""
    net = ema.averaged(unet) if ema is not None else unwrap(unet)
    return SDEModel(unet=net.eval(), sde=IRSDE(cfg.sde_config()), domain=cfg.domain,
                    use_embeddings=cfg.use_embeddings, normalization=norm, sinogram_mu=cfg.sinogram_mu,
                    image_mu=cfg.image_mu, tile=cfg.sample_tile)


def geometry_for_data(data_dir: str):
    """The FanBeamGeometry of a prepared data folder (its manifest)."""
    from dudocrop.ct.geometry import FanBeamGeometry
    from dudocrop.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {data_dir}: run ray_jobs/prepare_data.py first")
    g = manifest.get("geometry")
    if not isinstance(g, Mapping):
        raise ValueError(f"{data_dir}/manifest.json has no geometry dict")
    return FanBeamGeometry(**g)


def normalization_for_data(data_dir: str) -> Normalization:
    """The [0, 1] normalisation of a prepared data folder's geometry (its manifest), as the pipeline uses."""
    return Normalization.for_geometry(geometry_for_data(data_dir))
