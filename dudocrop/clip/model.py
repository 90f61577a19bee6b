"""DuDoCLIP (paper §III-B-1, Fig. 2): a frozen CLIP whose image encoder is steered by one control net per domain.

Fig. 2(b), as built here (DA-CLIP's controller, REFERENCE §2):

* frozen: the open_clip image tower V and text tower T (``requires_grad=False``, always in eval mode);
* trainable, per domain d ∈ {image, sinogram}: a controller C_d deep-copied from V, and one zero-initialised
  ``Linear(width, width)`` Z_{d,l} per transformer block l (the paper's "zero convolution": a 1x1 conv on tokens);
* trainable: the temperature of Eq. 2, kept as ``logit_scale`` = ln(1/τ) (open_clip's parameterisation).

Pairing order: LAYER-ALIGNED. With h_l the output of C_d's block l, V's residual stream after its block l becomes
``V_l(x) + Z_{d,l}(h_l)``, l = 1..L. (DA-CLIP's released weights pair them in reverse order; ours is a choice and
makes the controller's depth match the depth it steers.) Because every Z starts at zero, an untrained DuDoCLIP
computes exactly plain CLIP's image embedding: the control net starts as a no-op.

Outputs for a preprocessed batch of domain d (see :mod:`dudocrop.clip.preprocess`):

* content embedding e^{I1}_d: V's pooled projection computed WITH the controls (matched to the clean-content
  caption e^{T1}_d in Eq. 3);
* control embedding e^{I2}_d: C_d's own pooled projection (matched to the QSPD metal tuple e^{T2}_d);
* :meth:`DuDoCLIP.encode_text` gives e^{T1}/e^{T2} from the frozen text tower.

Frozen towers are SHARED between the domains by default: only the controllers differ, and a second frozen copy
would hold the same weights. ``share_frozen_towers=False`` gives each domain its own frozen copy of V (same
initial weights; the option exists for loading different frozen towers per domain).

Needs open_clip >= 2.32 (``VisionTransformer._embeds`` / ``_pool``); the check is made at construction.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dudocrop.checks import check_tensor
from dudocrop.clip.config import DuDoCLIPConfig, get_model_config
from dudocrop.clip.preprocess import CLIP_MEAN, CLIP_STD, check_domain, default_window, preprocess_ct
from dudocrop.clip.weights import WeightsSource, create_clip
from dudocrop.ct.geometry import FanBeamGeometry

log = logging.getLogger(__name__)


class CTEmbeddings(NamedTuple):
    """One domain's image-side embeddings (``(N, D)`` each): e^{I1} (content) and e^{I2} (control)."""

    content: torch.Tensor
    control: torch.Tensor


class DuDoCLIPOutput(NamedTuple):
    """``forward``'s result: per-domain embeddings and ln(1/τ) (returned so DDP sees it used in forward)."""

    embeddings: dict[str, CTEmbeddings]
    logit_scale: torch.Tensor


def _check_vit(visual: nn.Module) -> None:
    missing = [a for a in ("_embeds", "_pool", "proj", "transformer") if not hasattr(visual, a)]
    if missing or not hasattr(visual.transformer, "resblocks"):
        raise TypeError(f"DuDoCLIP needs an open_clip VisionTransformer image tower (open_clip >= 2.32: _embeds, "
                        f"_pool, transformer.resblocks); {type(visual).__name__} lacks {missing or ['resblocks']}")
    if getattr(visual, "proj", None) is None:
        raise TypeError("DuDoCLIP needs the image tower's projection (visual.proj) to give CLIP embeddings")


def _zero_linear(width: int) -> nn.Linear:
    lin = nn.Linear(width, width)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _tokens_in(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = visual._embeds(images)  # (N, L, width): patches + class token + positions, ln_pre
    # blocks built with batch_first=False expect (L, N, width); the controls are computed in the same layout
    return x if getattr(visual.transformer, "batch_first", True) else x.transpose(0, 1)


def _embedding_out(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not getattr(visual.transformer, "batch_first", True):
        x = x.transpose(0, 1)
    pooled, _ = visual._pool(x)  # ln_post + class-token pooling, exactly as open_clip's forward
    return pooled @ visual.proj


class ControlNet(nn.Module):
    """C_d of Fig. 2(b): a trainable copy of the image tower plus one zero-initialised Linear per block."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        _check_vit(visual)
        self.visual = copy.deepcopy(visual)
        for p in self.visual.parameters():
            p.requires_grad_(True)
        width = self.visual.transformer.width
        self.zero = nn.ModuleList(_zero_linear(width) for _ in self.visual.transformer.resblocks)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (e^{I2} before normalisation, the L controls Z_l(h_l) in block order)."""
        x = _tokens_in(self.visual, images)
        controls = []
        for block, zero in zip(self.visual.transformer.resblocks, self.zero):
            x = block(x)
            controls.append(zero(x))
        return _embedding_out(self.visual, x), controls


def controlled_image_embedding(visual: nn.Module, images: torch.Tensor, controls: Sequence[torch.Tensor]):
    """e^{I1}: the frozen tower's pooled projection with control l added after block l (layer-aligned)."""
    blocks = visual.transformer.resblocks
    if len(controls) != len(blocks):
        raise ValueError(f"controls must hold one tensor per block ({len(blocks)}), got {len(controls)}")
    x = _tokens_in(visual, images)
    for block, c in zip(blocks, controls):
        x = block(x) + c
    return _embedding_out(visual, x)


class DuDoCLIP(nn.Module):
    """Frozen CLIP + one control net per domain (module docstring); trained by Eq. 3 (:mod:`dudocrop.clip.loss`).

    Build with :meth:`from_config` (``DuDoCLIP.from_config('tiny')``). ``is_random`` / ``pretrained_source`` say
    where the frozen weights came from (``None`` = random: label the run's metrics random-weight).
    """

    def __init__(self, clip: nn.Module, tokenizer, config: DuDoCLIPConfig, source: WeightsSource | None = None):
        super().__init__()
        _check_vit(clip.visual)
        self.config = config
        self.source = source
        self.tokenizer = tokenizer
        self.clip = clip
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.domains: tuple[str, ...] = tuple(config.domains)
        if config.share_frozen_towers:
            self.domain_towers = None
        else:
            self.domain_towers = nn.ModuleDict({d: copy.deepcopy(clip.visual) for d in self.domains})
        self.controllers = nn.ModuleDict({d: ControlNet(clip.visual) for d in self.domains})
        init = clip.logit_scale.detach().reshape(()).clone() if config.init_logit_scale is None else torch.tensor(
            float(config.init_logit_scale))
        # Eq. 2's learnable τ, as ln(1/τ); a copy, so the frozen CLIP's own value stays untouched
        self.logit_scale = nn.Parameter(init.float())
        self.image_size = int(clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple | list)
                              else clip.visual.image_size)
        self.train(False)

    @classmethod
    def from_config(cls, config: DuDoCLIPConfig | str = "tiny", **overrides) -> DuDoCLIP:
        """Build from a config or a preset name (``tiny``, ``paper``); weights resolved offline first."""
        cfg = get_model_config(config, **overrides) if isinstance(config, str) else replace(config, **overrides)
        clip, source, tokenizer = create_clip(cfg.arch, cfg.pretrained, image_size=cfg.image_size,
                                              cache_dir=cfg.cache_dir, allow_download=cfg.allow_download)
        model = cls(clip, tokenizer, cfg, source)
        log.info("DuDoCLIP %s: domains %s, frozen towers %s, %d trainable / %d frozen parameters, weights %s",
                 cfg.arch, model.domains, "shared" if cfg.share_frozen_towers else "per domain",
                 model.num_parameters(trainable=True), model.num_parameters(trainable=False),
                 model.pretrained_source or "RANDOM")
        return model

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def is_random(self) -> bool:
        return bool(getattr(self.clip, "is_random", self.source is None or self.source.is_random))

    @property
    def pretrained_source(self) -> str | None:
        return getattr(self.clip, "pretrained_source", None if self.source is None else self.source.describe())

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.proj.shape[1])

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def num_parameters(self, trainable: bool) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad == trainable)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what Eq. 3 trains (controllers, zero layers, ln 1/τ): a compact checkpoint; the frozen CLIP is
        rebuilt from ``config.pretrained``."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        got = set(state)
        if got != expected:
            raise ValueError(f"state must hold exactly the trainable entries; missing {sorted(expected - got)[:5]}, "
                             f"unexpected {sorted(got - expected)[:5]}")
        self.load_state_dict(dict(state), strict=False)

    def train(self, mode: bool = True) -> DuDoCLIP:
        super().train(mode)
        # the frozen towers never train: no dropout / patch dropout on them, whatever the controllers do
        self.clip.eval()
        if self.domain_towers is not None:
            self.domain_towers.eval()
        return self

    def frozen_tower(self, domain: str) -> nn.Module:
        check_domain(domain, self.domains)
        return self.clip.visual if self.domain_towers is None else self.domain_towers[domain]

    # -- inputs --------------------------------------------------------------------------------------------------
    def preprocess(self, ct: torch.Tensor, domain: str, *, geometry: FanBeamGeometry | str | None = None,
                   window: tuple[float, float] | None = None) -> torch.Tensor:
        """CT values ``(N, 1, H, W)`` (HU) or ``(N, 1, V, C)`` (line integrals) → this model's CLIP input.

        Window: ``window`` if given, else the config's (``hu_window`` / ``sino_window``), else the captioner's
        sinogram window for ``geometry``."""
        check_domain(domain, self.domains)
        if window is None:
            if domain == "image":
                window = self.config.hu_window
            else:
                window = self.config.sino_window or default_window("sinogram", geometry)
        mean, std = (self.source.mean, self.source.std) if self.source is not None else (CLIP_MEAN, CLIP_STD)
        return preprocess_ct(ct, window, size=self.image_size, mean=mean, std=std, name="ct")

    def _check_images(self, images: torch.Tensor, name: str = "images") -> torch.Tensor:
        s = self.image_size
        images = check_tensor(images, name, ndim=4, shape=(None, 3, s, s),
                              context="a preprocessed CLIP batch (DuDoCLIP.preprocess)")
        if images.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one image, got shape {tuple(images.shape)}")
        return images

    # -- encoders ------------------------------------------------------------------------------------------------
    def encode_ct(self, images: torch.Tensor, domain: str, *, normalize: bool = True) -> CTEmbeddings:
        """e^{I1}_d and e^{I2}_d for a preprocessed ``(N, 3, S, S)`` batch of ``domain`` (L2-normalised by
        default, as Eq. 2 compares them by inner product)."""
        check_domain(domain, self.domains)
        images = self._check_images(images)
        control, controls = self.controllers[domain](images)
        content = controlled_image_embedding(self.frozen_tower(domain), images, controls)
        if normalize:
            content, control = F.normalize(content, dim=-1), F.normalize(control, dim=-1)
        return CTEmbeddings(content, control)

    def forward(self, images: Mapping[str, torch.Tensor]) -> DuDoCLIPOutput:
        """Every domain of one Eq. 3 step in one call, ``{domain: (N_d, 3, S, S)}`` → :class:`DuDoCLIPOutput`.
        (One call per step keeps every controller in the graph, as DDP wants.)"""
        if not isinstance(images, Mapping) or not images:
            raise ValueError(f"images must be a non-empty mapping {{domain: tensor}} with domains from "
                             f"{self.domains}, got {type(images).__name__}")
        out = {}
        for domain, x in images.items():
            check_domain(domain, self.domains)
            out[domain] = self.encode_ct(x, domain)
        return DuDoCLIPOutput(out, self.logit_scale)

    @torch.no_grad()
    def encode_image_plain(self, images: torch.Tensor, domain: str = "image", *, normalize: bool = True):
        """Plain CLIP's image embedding (no controls): the baseline the untrained control net must reproduce."""
        images = self._check_images(images)
        out = self.frozen_tower(domain)(images)
        out = out[0] if isinstance(out, tuple) else out
        return F.normalize(out, dim=-1) if normalize else out

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts must hold at least one caption, got an empty list")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must hold only strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """e^{T1} / e^{T2} (frozen text tower) for a list of captions or an ``(N, 77)`` token tensor."""
        if isinstance(texts, torch.Tensor):
            if texts.ndim != 2 or texts.shape[0] == 0 or texts.is_floating_point():
                raise ValueError(f"texts as a tensor must be (N >= 1, context) integer tokens, got "
                                 f"{texts.dtype} {tuple(texts.shape)}")
            tokens = texts.to(self.device)
        else:
            tokens = self.tokenize(texts)
        return self.clip.encode_text(tokens, normalize=normalize)
