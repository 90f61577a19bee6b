"""Typed, frozen settings of DuDoCLIP (paper §III-B-1, Fig. 2, Eq. 2-3) and of its stage-1 training.

Every number the paper gives appears once, next to the equation it belongs to:

* backbone ViT-B-32 (§IV-A-1: "The pre-trained text encoder and image encoder in DuDoCLIP employ a backbone of the
  Vision Transformer version of ViT-B-32");
* batch 200, learning rate 2e-5, at most 1000 epochs (§IV-A-2, first stage).

Not in the paper, and where they come from:

* the pretrained tag ``laion2b_s34b_b79k``: the paper says only "pre-trained CLIP"; DA-CLIP, which DuDoCLIP adapts,
  starts from ViT-B/32 trained on LAION-2B (REFERENCE §2). The OpenAI weights work too but need the QuickGELU
  architecture ``ViT-B-32-quickgelu`` (REFERENCE §5); :mod:`dudocrop.clip.weights` refuses the mismatch.
* the optimiser (AdamW, no weight decay, warm-up then cosine): open_clip's fine-tuning defaults; the paper names
  only the learning rate.
* the windows: CLIP sees each slice in the window the captioner was shown
  (:func:`dudocrop.captions.render.window_for`), because the captions describe those pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from dudocrop.captions.render import DISPLAY_WINDOW_HU

#: the two domains of Eq. 3: x (image, HU) and y (sinogram, line integrals).
DOMAINS: tuple[str, str] = ("image", "sinogram")

#: CLIP's input side (REFERENCE §2: "image resized (bicubic) to 224").
CLIP_IMAGE_SIZE = 224
#: CLIP's text context and BPE vocabulary; tiny towers keep them so the bundled tokenizer works unchanged.
CLIP_CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408

#: The tiny architecture, built in code (no JSON file, no weights): a 2-block ViT-B/32-shaped image tower and a
#: 2-block text tower, 64 wide. It keeps CLIP's 224² input, /32 patches, vocabulary and context, so everything
#: but the widths is exercised as for ViT-B-32. Passed to ``open_clip.create_model`` as keyword overrides.
TINY_ARCH = "dudoclip-tiny"
IN_CODE_ARCHS: dict[str, dict[str, Any]] = {
    TINY_ARCH: {
        "embed_dim": 64,
        "quick_gelu": False,
        "vision_cfg": {"image_size": CLIP_IMAGE_SIZE, "patch_size": 32, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": CLIP_CONTEXT_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": 64, "heads": 2,
                     "layers": 2},
    },
}
#: the open_clip built-in whose tokenizer and default preprocessing an in-code architecture borrows.
IN_CODE_BASE = "ViT-B-32"

#: §IV-A-1: ViT-B-32; the tag is DA-CLIP's (LAION-2B), see the module docstring.
PAPER_ARCH = "ViT-B-32"
PAPER_PRETRAINED = "laion2b_s34b_b79k"

#: §IV-A-2, stage 1: "we set the batch size as 200 and the learning rate as 2 × 10^-5 with the maximum epoch 1000".
PAPER_BATCH_SIZE = 200
PAPER_LR = 2e-5
PAPER_MAX_EPOCHS = 1000


@dataclass(frozen=True)
class DuDoCLIPConfig:
    """The DuDoCLIP model of Fig. 2: which CLIP, which weights, and how CT reaches it.

    ``arch``: an open_clip architecture name (``ViT-B-32``, ``ViT-B-32-quickgelu``) or an in-code one
    (:data:`TINY_ARCH`). ``pretrained``: an open_clip tag (``laion2b_s34b_b79k``, ``openai``), a local weights file
    (``.pt``/``.pth``/``.bin``/``.safetensors``), ``local-dir:<dir>``, or ``None`` for random weights (the model
    is then flagged ``is_random``). Tags are looked up in the local caches only unless ``allow_download`` is set
    (and ``HF_HUB_OFFLINE`` is not): absent weights fail at once. ``cache_dir``: where tag weights are cached
    (default: the Hugging Face cache and ``~/.cache/clip``, as open_clip).

    ``share_frozen_towers``: both domains run through ONE frozen image tower (only the controllers differ, so a
    second copy would hold identical frozen weights); ``False`` gives each domain its own frozen copy.

    ``hu_window`` maps image-domain HU to [0, 1]; ``sino_window`` maps sinogram line integrals to [0, 1] — ``None``
    means the captioner's per-geometry window [0, 2 μ_w R] (R = FOV radius). ``init_logit_scale`` (ln 1/τ of
    Eq. 2) ``None`` starts from the CLIP weights' value (ln(1/0.07) for random weights).
    """

    arch: str = PAPER_ARCH
    pretrained: str | None = PAPER_PRETRAINED
    share_frozen_towers: bool = True
    domains: tuple[str, ...] = DOMAINS
    image_size: int = CLIP_IMAGE_SIZE
    hu_window: tuple[float, float] = (DISPLAY_WINDOW_HU.lo, DISPLAY_WINDOW_HU.hi)
    sino_window: tuple[float, float] | None = None
    init_logit_scale: float | None = None
    allow_download: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"DuDoCLIPConfig.arch must be a non-empty architecture name, got {self.arch!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError("DuDoCLIPConfig.pretrained must be None, an open_clip tag, a file path or "
                             f"'local-dir:<dir>', got {self.pretrained!r}")
        if not self.domains or any(d not in DOMAINS for d in self.domains) or len(set(self.domains)) != len(
                self.domains):
            raise ValueError(f"DuDoCLIPConfig.domains must be distinct names from {DOMAINS}, got {self.domains!r}")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"DuDoCLIPConfig.image_size must be an int >= 32, got {self.image_size!r}")
        for name in ("hu_window", "sino_window"):
            w = getattr(self, name)
            if w is None and name == "sino_window":
                continue
            if (not isinstance(w, tuple) or len(w) != 2 or not all(isinstance(v, int | float) for v in w)
                    or not all(math.isfinite(v) for v in w) or not w[1] > w[0]):
                raise ValueError(f"DuDoCLIPConfig.{name} must be a tuple (lo, hi) of finite numbers with hi > lo, "
                                 f"got {w!r}")
        if self.init_logit_scale is not None and not (
                isinstance(self.init_logit_scale, int | float) and 0 <= self.init_logit_scale <= math.log(100)):
            raise ValueError(f"DuDoCLIPConfig.init_logit_scale must lie in [0, ln 100], got {self.init_logit_scale!r}")


@dataclass(frozen=True)
class DuDoCLIPTrainConfig:
    """Stage-1 training (§IV-A-2, Algorithm 1 step 1): the controllers and τ are fitted by Eq. 3.

    ``epochs`` is the paper's maximum; ``warmup_steps`` and the cosine decay are open_clip's fine-tuning habit.
    ``checkpoint_every`` counts optimiser steps; ``eval_every`` is how often held-out retrieval is measured.
    """

    batch_size: int = PAPER_BATCH_SIZE
    lr: float = PAPER_LR
    epochs: int = PAPER_MAX_EPOCHS
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 500
    grad_clip_norm: float | None = 1.0
    checkpoint_every: int = 1000
    eval_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("batch_size", "epochs"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DuDoCLIPTrainConfig.{f} must be an int >= 1, got {v!r}")
        for f in ("warmup_steps", "checkpoint_every", "eval_every", "seed"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"DuDoCLIPTrainConfig.{f} must be an int >= 0, got {v!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise ValueError(f"DuDoCLIPTrainConfig.lr must lie in (0, 1), got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise ValueError(f"DuDoCLIPTrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"DuDoCLIPTrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"DuDoCLIPTrainConfig.grad_clip_norm must be None or > 0, got {self.grad_clip_norm!r}")


MODEL_PRESETS: dict[str, DuDoCLIPConfig] = {
    # Fig. 2 with ViT-B-32 (151 M frozen + 2 x 88 M controller parameters); weights from the local cache.
    "paper": DuDoCLIPConfig(),
    # CPU-sized, random weights, builds offline in ~0.1 s: tests and the embedded default of the training job.
    "tiny": DuDoCLIPConfig(arch=TINY_ARCH, pretrained=None),
}

TRAIN_PRESETS: dict[str, DuDoCLIPTrainConfig] = {
    "paper": DuDoCLIPTrainConfig(),
    # random tiny towers learn from scratch: a larger step, short warm-up, frequent checkpoints, and no gradient
    # clipping (open_clip's default): clipped at 1.0, bench/clip.py's 600 steps left image -> tuple top-5 at chance
    # (0.125 of 40) where the unclipped in-process run of the same data and seed reached 0.30.
    "tiny": DuDoCLIPTrainConfig(batch_size=32, lr=1e-3, epochs=20, warmup_steps=10, grad_clip_norm=None,
                                checkpoint_every=50, eval_every=50),
}


def get_model_config(name: str, **overrides) -> DuDoCLIPConfig:
    """A named DuDoCLIP preset (``tiny``, ``paper``), optionally with fields replaced."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown DuDoCLIP preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
    return replace(MODEL_PRESETS[name], **overrides)


def get_train_config(name: str, **overrides) -> DuDoCLIPTrainConfig:
    """A named stage-1 training preset (``tiny``, ``paper``), optionally with fields replaced."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown DuDoCLIP training preset {name!r}; expected one of {sorted(TRAIN_PRESETS)}")
    return replace(TRAIN_PRESETS[name], **overrides)
