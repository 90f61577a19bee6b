"""Typed, frozen settings of the IR-SDE (paper §III-B-2, Eq. 4-9) and of its conditional U-Net (Fig. 3b).

Every number the paper gives appears once, next to the equation it belongs to:

* ``T = 100`` and ``λ = 50`` (in /255 units): §IV-A-2, "a cosine noise schedule is applied with a maximum
  timestamp of 100, the parameter λ is set to 50".

The cosine offset ``s = 0.008`` and the end-point ``eps = 0.005`` (``exp(-θ̄_T) = eps``) are not in the paper;
they are the public IR-SDE / DA-CLIP code's values (REFERENCE §1). The U-Net widths are DA-CLIP's
(REFERENCE §1-2); the paper names only the blocks (ResBlock, Linear Attention, Spatial Transformer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

#: Eq. 4-9: number of discrete timestamps t_i (paper §IV-A-2: "maximum timestamp of 100").
PAPER_T = 100
#: Eq. 6: stationary standard deviation λ in /255 units (paper §IV-A-2: "λ is set to 50").
PAPER_LAMBDA_255 = 50.0

#: width of the CLIP embeddings e^{I1} (content) and e^{I2} (control), ViT-B-32 (REFERENCE §2).
CLIP_EMBED_DIM = 512


@dataclass(frozen=True)
class SDEConfig:
    """The forward SDE dF = θ_t(μ − F)dt + σ_t dω with σ_t² = 2λ²θ_t (Eq. 4) and its discretisation.

    ``lam`` is λ on the [0, 1] intensity scale (λ = 50/255 for the paper's λ = 50). ``eps`` fixes the time
    unit: dt is chosen so that exp(−θ̄_T) = eps, i.e. the mean has moved to within ``eps`` of μ at t = T.
    """

    T: int = PAPER_T
    lam: float = PAPER_LAMBDA_255 / 255.0
    schedule: Literal["cosine"] = "cosine"
    cosine_s: float = 0.008  # REFERENCE §1 (Nichol & Dhariwal's offset); not in the paper
    eps: float = 0.005  # REFERENCE §1: exp(-θ̄_T) = eps; gives dt ≈ 0.104 for T = 100
    # What the network outputs (not the SDE: Eq. 4-9 and the samplers see ε̂ either way). "noise": ε̂ itself, as in
    # the paper and the public code. "x0": the restoration F̂_0 − μ, turned into ε̂ by Eq. 6 (IRSDE.noise_of). The
    # sampler's last step returns F̂_0 = μ + (F_t − μ − σ̄_t ε̂) e^{θ̄_t}, so a noise error reaches F̂_0 scaled by
    # σ̄_t e^{θ̄_t} (0.086 at t = 20, 0.28 at t = 40): a small network that must place F̂_0 within a few HU of μ
    # (the sinogram inside the trace, the residual) then loses against μ itself, while with "x0" an untrained
    # network (zero output) returns μ and training only has to learn the correction.
    parametrization: Literal["noise", "x0"] = "noise"

    def __post_init__(self) -> None:
        if not isinstance(self.T, int) or self.T < 1:
            raise ValueError(f"SDEConfig.T must be an int >= 1, got {self.T!r}")
        if not (isinstance(self.lam, int | float) and 0 < self.lam < float("inf")):
            raise ValueError(f"SDEConfig.lam must be a positive finite float (λ/255, e.g. 50/255), got {self.lam!r}")
        if self.schedule != "cosine":
            raise ValueError(f"SDEConfig.schedule must be 'cosine', got {self.schedule!r}")
        if not 0 <= self.cosine_s < 1:
            raise ValueError(f"SDEConfig.cosine_s must lie in [0, 1), got {self.cosine_s!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"SDEConfig.eps must lie in (0, 1), got {self.eps!r}")
        if self.parametrization not in ("noise", "x0"):
            raise ValueError(f"SDEConfig.parametrization must be 'noise' or 'x0', got {self.parametrization!r}")


@dataclass(frozen=True)
class UNetConfig:
    """The embedding-guided conditional U-Net of Fig. 3(b) (DA-CLIP's variant, REFERENCE §1-2).

    Level ``i`` works on ``nf * ch_mult[i-1]`` channels (``nf`` at level 0) at resolution H / 2**i and ends in a
    strided conv to ``nf * ch_mult[i]`` channels (the last level keeps its resolution). ``attn_levels`` get
    Linear Attention (LA), ``st_levels`` a Spatial Transformer (ST, self-attention + cross-attention to the
    content embedding e^{I1}); the bottleneck gets an ST too when ``use_embeddings`` is on. With
    ``use_embeddings=False`` every ST becomes LA and the control branch is dropped: the plain IR-SDE baseline of
    the Fig. 12 ablation.
    """

    in_ch: int = 1
    out_ch: int = 1
    nf: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (0, 1, 2)
    st_levels: tuple[int, ...] = (3,)
    context_dim: int = CLIP_EMBED_DIM
    heads: int = 4  # LinearAttention heads (DA-CLIP: 4 x 32)
    head_dim: int = 32  # channels per head; an ST on c channels has c // head_dim heads
    dropout: float = 0.0
    use_embeddings: bool = True
    # Input standardisation: the network sees cat[F_t − μ, (μ − in_offset)·in_scale] and returns its output /
    # in_scale, a correction in μ's units (meant for SDEConfig.parametrization "x0"). Why: [0, 1] spans
    # −1000..+3072 HU, so streaks of tens of HU are ~0.01 on a 0.25 water level, and a small U-Net trained on that
    # for 600 steps (regression from the NMAR image, bench/prior_ceiling.py) cut its loss by 0.8 %; with water at 0
    # and ×20 (1 unit ≈ 200 HU) by 12 %, and by 28 % in 1500 steps. F_t − μ stays as it is: scaled too, the
    # diffusion noise of high t (λ = 0.196) reached the network at 3.9 and its F̂_0 at t = T was 8.8 dB (μ: 42 dB).
    in_offset: float = 0.0
    in_scale: float = 1.0

    def __post_init__(self) -> None:
        for f in ("in_ch", "out_ch", "nf", "num_res_blocks", "context_dim", "heads", "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UNetConfig.{f} must be an int >= 1, got {v!r}")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ValueError(f"UNetConfig.ch_mult must be a non-empty tuple of ints >= 1, got {self.ch_mult!r}")
        n = len(self.ch_mult)
        for f in ("attn_levels", "st_levels"):
            bad = [i for i in getattr(self, f) if not 0 <= i < n]
            if bad:
                raise ValueError(f"UNetConfig.{f} must hold level indices in [0, {n}), got {getattr(self, f)!r}")
        both = set(self.attn_levels) & set(self.st_levels)
        if both:
            raise ValueError(f"UNetConfig: levels {sorted(both)} are in both attn_levels and st_levels")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"UNetConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.in_scale, int | float) and 0 < self.in_scale < float("inf")):
            raise ValueError(f"UNetConfig.in_scale must be a positive finite number, got {self.in_scale!r}")
        if not (isinstance(self.in_offset, int | float) and abs(self.in_offset) < float("inf")):
            raise ValueError(f"UNetConfig.in_offset must be a finite number, got {self.in_offset!r}")
        for c in self.st_channels:
            if c % self.head_dim:
                raise ValueError(f"UNetConfig: a Spatial Transformer on {c} channels needs head_dim ({self.head_dim}) "
                                 f"to divide it")

    @property
    def levels(self) -> int:
        return len(self.ch_mult)

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of this inside the network (one halving per level but the last)."""
        return 2 ** (self.levels - 1)

    @property
    def st_channels(self) -> list[int]:
        """Channel counts the Spatial Transformers see (down and up branch of each ST level, bottleneck)."""
        mult = (1, *self.ch_mult)
        chans = []
        for i in self.st_levels:
            chans += [self.nf * mult[i], self.nf * mult[i + 1]]
        return chans + [self.nf * self.ch_mult[-1]]


UNET_PRESETS: dict[str, UNetConfig] = {
    # DA-CLIP's restoration U-Net (≈49 M parameters): LA at H, H/2, H/4; ST at H/8 and the bottleneck.
    "paper": UNetConfig(),
    # CPU-sized (≈0.51 M parameters): the same blocks and levels at 1/4 width, channels capped at 2·nf, one ResBlock
    # per level and branch; ST at H/8 and the bottleneck as in the paper preset (an ST at H/4 made 512² inputs
    # cost 18x the FLOPs of 128² ones through the quadratic self-attention).
    "tiny": UNetConfig(nf=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, heads=2, head_dim=16),
}

SDE_PRESETS: dict[str, SDEConfig] = {"paper": SDEConfig(), "tiny": SDEConfig()}


def get_unet_config(name: str, **overrides) -> UNetConfig:
    """A named U-Net preset (``tiny``, ``paper``), optionally with fields replaced."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; expected one of {sorted(UNET_PRESETS)}")
    return replace(UNET_PRESETS[name], **overrides)


def get_sde_config(name: str, **overrides) -> SDEConfig:
    """A named SDE preset (``tiny`` and ``paper`` are the same schedule: T = 100, λ = 50/255)."""
    if name not in SDE_PRESETS:
        raise ValueError(f"unknown SDE preset {name!r}; expected one of {sorted(SDE_PRESETS)}")
    return replace(SDE_PRESETS[name], **overrides)
