"""The embedding-guided conditional U-Net ε_Θ(F_t, μ, t) of paper Fig. 3(b) (§III-B-2, "Embedding Guided
Conditional Network"), DA-CLIP's variant (REFERENCE §1-2).

* Input ``cat[F_t − μ, μ]``: F_t − μ is the network's first guess of the noise, μ the degraded observation.
* The time t goes through a sinusoidal embedding and an MLP; the control embedding e^{I2} goes through an MLP, a
  softmax over its features, a learnable prompt and a Linear, and is *added* to the time embedding ("the control
  embedding is added with the time embedding"). The sum scales and shifts every ResBlock.
* Up and down branches alternate ResBlocks and Linear Attention (LA); the deepest levels and the bottleneck hold a
  Spatial Transformer (ST): self-attention, cross-attention whose keys/values come from the content embedding
  e^{I1} as one 512-d token (Q ∈ R^{(h·w)×c}, K, V ∈ R^c), and a GEGLU feed-forward, with a zero-initialised
  output projection so a new ST starts as the identity.

The network knows nothing about the SDE (``dudocrop.sde.irsde``); it maps (x_t, μ, t, e^{I1}, e^{I2}) to the
predicted noise and accepts any spatial size (it pads to a multiple of 2**(levels-1) and crops back).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dudocrop.checks import check_tensor
from dudocrop.sde.config import UNetConfig, get_unet_config


def _groups(channels: int) -> int:
    # 32 groups as in DA-CLIP, but at least 2 channels per group: a 1x1 feature map (tiny inputs) cannot be
    # normalised over a single value.
    return math.gcd(32, max(channels // 2, 1))


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sin/cos features of the (integer-valued) timestamp t_i."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel (gain only), as in the IR-SDE LA blocks."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gain


class ResBlock(nn.Module):
    """Two 3x3 convs; the (time + control) embedding scales and shifts the first one's output (Fig. 3b)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.conv1(x) * (1 + scale) + shift)
        h = F.silu(self.conv2(self.drop(h)))
        return h + self.skip(x)


class LinearAttention(nn.Module):
    """Pre-normed residual linear attention (cost linear in h·w): softmax(K) over pixels, softmax(Q) over features.

    Unlike the public IR-SDE code, V is not divided by h·w: that made the block's output shrink with the image
    size until the output LayerNorm's eps swamped it, so tiles and whole images would see different networks.
    """

    def __init__(self, channels: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm = ChannelLayerNorm(channels)
        self.to_qkv = nn.Conv2d(channels, 3 * inner, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, channels, 1), ChannelLayerNorm(channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, 3, self.heads, self.head_dim, h * w).unbind(1)
        q = q.softmax(dim=-2) * self.head_dim**-0.5
        k = k.softmax(dim=-1)
        kv = torch.einsum("nhdp,nhep->nhde", k, v)
        out = torch.einsum("nhde,nhdp->nhep", kv, q).reshape(n, self.heads * self.head_dim, h, w)
        return x + self.to_out(out)


class Attention(nn.Module):
    """Multi-head (cross-)attention on token sequences; ``context=None`` makes it self-attention."""

    def __init__(self, dim: int, context_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        n, lq, d = x.shape
        lk = ctx.shape[1]
        q = self.to_q(x).view(n, lq, self.heads, -1).transpose(1, 2)
        k = self.to_k(ctx).view(n, lk, self.heads, -1).transpose(1, 2)
        v = self.to_v(ctx).view(n, lk, self.heads, -1).transpose(1, 2)
        # SDPA picks a memory-efficient kernel: the H/8 self-attention of a 1000x900 sinogram has 14k tokens.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, lq, d))


class NoAttention(nn.Module):
    """A level with neither attention nor a spatial transformer; takes (and ignores) the context like they do."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return x


class GEGLUFeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """ST block of Fig. 3(b): GroupNorm, 1x1 in, [self-attn, cross-attn to e^{I1}, GEGLU FF] (pre-LN, residual),
    1x1 out initialised to zero, plus the block's input.

    With one context token the cross-attention softmax is over a single key and is identically 1, so the block adds
    W_out·W_v·e^{I1} to every token before the feed-forward; W_q and W_k of ``attn2`` get no gradient. This is the
    paper's form (K, V ∈ R^c) and DA-CLIP's; a multi-token context (N, L, context_dim) would use them.
    """

    def __init__(self, channels: int, head_dim: int, context_dim: int, dropout: float) -> None:
        super().__init__()
        heads = channels // head_dim
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))
        self.attn1 = Attention(channels, channels, heads, dropout)
        self.attn2 = Attention(channels, context_dim, heads, dropout)
        self.ff = GEGLUFeedForward(channels, dropout)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        n, c, h, w = x.shape
        tok = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        tok = tok + self.attn1(self.norm1(tok))
        tok = tok + self.attn2(self.norm2(tok), context)
        tok = tok + self.ff(self.norm3(tok))
        return x + self.proj_out(tok.transpose(1, 2).reshape(n, c, h, w))


class ConditionalUNet(nn.Module):
    """ε_Θ(F_t, μ, t; e^{I1}, e^{I2}) of Fig. 3(b): predicts the noise ε_t of F_t = m_t + sqrt(v_t)·ε_t (Eq. 6)."""

    def __init__(self, config: UNetConfig | str = "paper") -> None:
        super().__init__()
        cfg = get_unet_config(config) if isinstance(config, str) else config
        if not isinstance(cfg, UNetConfig):
            raise ValueError(f"config must be a UNetConfig or a preset name, got {type(config).__name__}")
        self.config = cfg
        nf, mult, nrb = cfg.nf, (1, *cfg.ch_mult), cfg.num_res_blocks
        emb_dim = 4 * nf

        # Why 2 * in_ch: the input is cat[F_t − μ, μ].
        self.init_conv = nn.Conv2d(2 * cfg.in_ch, nf, 7, padding=3, bias=False)
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(nf), nn.Linear(nf, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim)
        )
        if cfg.use_embeddings:
            # e^{I2} → MLP → softmax → × learnable prompt → Linear, added to the time embedding (Fig. 3b).
            self.control_mlp = nn.Sequential(
                nn.Linear(cfg.context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
            self.prompt = nn.Parameter(torch.rand(1, emb_dim))
            self.prompt_proj = nn.Linear(emb_dim, emb_dim)

        def attn(level: int | None, ch: int) -> nn.Module:
            st = level is None or level in cfg.st_levels
            if st and cfg.use_embeddings:
                return SpatialTransformer(ch, cfg.head_dim, cfg.context_dim, cfg.dropout)
            if st or level in cfg.attn_levels:
                return LinearAttention(ch, cfg.heads, cfg.head_dim)
            return NoAttention()

        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        last = cfg.levels - 1
        for i in range(cfg.levels):
            cin, cout = nf * mult[i], nf * mult[i + 1]
            self.down.append(nn.ModuleDict({
                "blocks": nn.ModuleList(ResBlock(cin, cin, emb_dim, cfg.dropout) for _ in range(nrb)),
                "attn": attn(i, cin),
                "resample": nn.Conv2d(cin, cout, 4, stride=2, padding=1) if i < last
                else nn.Conv2d(cin, cout, 3, padding=1),
            }))
            self.up.insert(0, nn.ModuleDict({
                "blocks": nn.ModuleList(ResBlock(cout + cin, cout, emb_dim, cfg.dropout) for _ in range(nrb)),
                "attn": attn(i, cout),
                "resample": nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                          nn.Conv2d(cout, cin, 3, padding=1)) if i > 0
                else nn.Conv2d(cout, cin, 3, padding=1),
            }))
        mid = nf * mult[-1]
        self.mid1 = ResBlock(mid, mid, emb_dim, cfg.dropout)
        self.mid_attn = attn(None, mid)
        self.mid2 = ResBlock(mid, mid, emb_dim, cfg.dropout)
        self.final_block = ResBlock(2 * nf, nf, emb_dim, cfg.dropout)
        self.final_conv = nn.Conv2d(nf, cfg.out_ch, 3, padding=1)

    # ---- input checks ----------------------------------------------------------------------------------------
    def _check(self, x_t, mu, t, content, control) -> tuple:
        cfg = self.config
        x_t = check_tensor(x_t, "x_t", ndim=4, shape=(None, cfg.in_ch, None, None), finite=False,
                           context=f"in_ch={cfg.in_ch}")
        mu = check_tensor(mu, "mu", ndim=4, finite=False)
        if mu.shape != x_t.shape:
            raise ValueError(f"mu must have the same shape as x_t {tuple(x_t.shape)}, got {tuple(mu.shape)}")
        if mu.dtype != x_t.dtype or mu.device != x_t.device:
            raise ValueError(f"mu must match x_t's dtype and device ({x_t.dtype}, {x_t.device}), "
                             f"got ({mu.dtype}, {mu.device})")
        n = x_t.shape[0]
        if isinstance(t, int | float):
            t = torch.full((n,), float(t), device=x_t.device)
        elif isinstance(t, torch.Tensor):
            if t.ndim == 0:
                t = t.expand(n)
            elif t.shape != (n,):
                raise ValueError(f"t must be a number, a 0-d tensor or a tensor of shape ({n},), got {tuple(t.shape)}")
            t = t.to(x_t.device)
        else:
            raise ValueError(f"t must be a number or a torch.Tensor, got {type(t).__name__}")
        embs = []
        for name, e in (("content", content), ("control", control)):
            if not cfg.use_embeddings:
                embs.append(None)  # the Fig. 12 baseline ignores embeddings so callers need no special case
                continue
            if e is None:
                raise ValueError(f"{name} (a ({n}, {cfg.context_dim}) CLIP embedding) is required when "
                                 f"use_embeddings=True")
            e = check_tensor(e, name, ndim=2, shape=(n, cfg.context_dim), finite=False,
                             context=f"batch {n}, context_dim={cfg.context_dim}")
            if e.device != x_t.device:
                raise ValueError(f"{name} must be on x_t's device {x_t.device}, got {e.device}")
            embs.append(e.to(x_t.dtype))
        return t, mu, *embs

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, mu: torch.Tensor, t, content: torch.Tensor | None = None,
                control: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise ε̂ (same shape as ``x_t``) for F_t = x_t, observation μ = ``mu`` at timestamp ``t``.

        ``content`` is e^{I1} (N, context_dim), the cross-attention token of the STs; ``control`` is e^{I2}
        (N, context_dim), added to the time embedding. Both are required with ``use_embeddings=True`` and ignored
        without.
        """
        t, mu, content, control = self._check(x_t, mu, t, content, control)
        h_in, w_in = x_t.shape[-2:]
        cfg = self.config
        x = torch.cat([x_t - mu, (mu - cfg.in_offset) * cfg.in_scale], dim=1)
        x = _pad_to_multiple(x, cfg.size_multiple)

        emb = self.time_mlp(t).to(x.dtype)
        if control is not None:
            emb = emb + self.prompt_proj(torch.softmax(self.control_mlp(control), dim=1) * self.prompt)
        context = None if content is None else content[:, None, :]

        x = self.init_conv(x)
        x_init = x
        skips = []
        for level in self.down:
            for j, block in enumerate(level["blocks"]):
                x = block(x, emb)
                if j == len(level["blocks"]) - 1:
                    x = level["attn"](x, context)
                skips.append(x)
            x = level["resample"](x)
        x = self.mid2(self.mid_attn(self.mid1(x, emb), context), emb)
        for level in self.up:
            for j, block in enumerate(level["blocks"]):
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
                if j == len(level["blocks"]) - 1:
                    x = level["attn"](x, context)
            x = level["resample"](x)
        x = self.final_block(torch.cat([x, x_init], dim=1), emb)
        return self.final_conv(x)[..., :h_in, :w_in] / cfg.in_scale


#: inference precisions of the U-Net (``SDEModel.restore``, ``PipelineConfig.precision``): autocast dtype or None.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


class Autocast(nn.Module):
    """A network run under ``torch.autocast`` at ``dtype`` that hands back float32.

    Only the network's convolutions and attention drop to bf16 (as in training on CUDA, ``sde_train_step``); the
    sampler's arithmetic stays float32, where Eq. 6 scales the network's error by up to e^{θ̄_T} = 200.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x_t: torch.Tensor, *args, **kw) -> torch.Tensor:
        with torch.autocast(x_t.device.type, dtype=self.dtype):
            out = self.net(x_t, *args, **kw)
        return out.float()


def with_precision(net: nn.Module, precision: str) -> nn.Module:
    """``net`` itself for ``fp32``, else wrapped in :class:`Autocast` (``PRECISIONS``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return net if dtype is None else Autocast(net, dtype)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    # Reflection keeps edges smooth for the convs; it needs the pad to be smaller than the side.
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def build_unet(config: UNetConfig | str = "paper", **overrides) -> ConditionalUNet:
    """The front door: a preset name (``tiny``, ``paper``) or a ``UNetConfig``, with fields replaced."""
    if isinstance(config, str):
        config = get_unet_config(config, **overrides)
    elif overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    return ConditionalUNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tflop_per_eval(net: ConditionalUNet, shape: tuple[int, int], device: torch.device | str | None = None) -> float:
    """TFLOP of one evaluation of ``net`` on a (1, 1, H, W) input (a multiply-add is 2 FLOPs), counted with
    FlopCounterMode; ``device`` defaults to the net's ("meta" nets cost no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(net.parameters()).device if device is None else device
    x = torch.zeros(1, 1, *shape, device=device)
    emb = torch.zeros(1, net.config.context_dim, device=device) if net.config.use_embeddings else None
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, x, torch.full((1,), 50.0, device=device), content=emb, control=emb)
    return fc.get_total_flops() / 1e12
