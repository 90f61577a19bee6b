"""The dual-domain contrastive loss of DuDoCLIP (paper Eq. 2-3).

Eq. 2, for L2-normalised image-side embeddings a_i and text embeddings b_j of one batch and temperature τ::

    D_con(a, b) = -log( exp(a_iᵀ b_i / τ) / Σ_j exp(a_iᵀ b_j / τ) )

Eq. 3 sums it over both pairs s ∈ {1, 2} (content e^{I1}↔e^{T1}, control e^{I2}↔e^{T2}) and both domains
(x = image, y = sinogram), averaged over the batch::

    L_con = Σ_{d ∈ {x, y}} Σ_{s=1,2} D_con(e_d^{Is}, e_d^{Ts})

Choices, stated:

* symmetric: each D_con is CLIP's (image→text + text→image) / 2; the paper writes only the image→text side.
* one shared learnable τ for all four terms, kept as ``logit_scale`` = ln(1/τ) and clamped at ln 100 as CLIP does.
* duplicate texts are NOT negatives. QSPD tuples and short content captions repeat within a batch (few metal
  descriptions, REFERENCE §2); plain Eq. 2 would push an image away from its own caption's duplicates. Here the
  texts are grouped by identity (equal strings → one id): image→text is a softmax over the batch's DISTINCT texts
  with the image's own text as the target (de-duplication); text→image treats every image carrying that text as
  a positive (multi-positive InfoNCE, -log Σ_{i∈P(t)} p(i | t)). Without duplicates this is exactly CLIP's loss;
  a batch of one repeated caption gives 0 (nothing to contrast) instead of a loss that fights itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dudocrop.checks import check_tensor
from dudocrop.clip.config import DOMAINS
from dudocrop.clip.model import CTEmbeddings, DuDoCLIP

#: CLIP's cap on 1/τ (open_clip clamps logit_scale at ln 100).
MAX_LOGIT_SCALE = math.log(100.0)


class TextTargets(NamedTuple):
    """One domain's text side: e^{T1} (content), e^{T2} (control), ``(N, D)``, and their identity ids ``(N,)``
    (equal ids = the same caption)."""

    content: torch.Tensor
    control: torch.Tensor
    content_ids: torch.Tensor
    control_ids: torch.Tensor


class LossTerms(NamedTuple):
    """Eq. 3's total and its four terms, keyed ``'<domain>/content'`` and ``'<domain>/control'``."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def text_ids(captions: Sequence[str], name: str = "captions") -> torch.Tensor:
    """Identity ids of ``captions``: equal strings get equal ids (numbered by first appearance)."""
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(captions).__name__}")
    if len(captions) == 0:
        raise ValueError(f"{name} must hold at least one caption, got an empty list")
    seen: dict[str, int] = {}
    ids = []
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"{name} must hold only strings; item {i} is {type(c).__name__}")
        ids.append(seen.setdefault(c, len(seen)))
    return torch.tensor(ids, dtype=torch.long)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric Eq. 2 for one pair of ``(N, D)`` L2-normalised embeddings, duplicates not negatives.

    ``logit_scale`` is ln(1/τ) (a scalar tensor; 1/τ is capped at 100). ``text_ids`` ``(N,)``: equal ids mark
    identical texts (module docstring); ``None`` means all texts are distinct (plain CLIP loss).
    """
    image_emb = check_tensor(image_emb, "image_emb", ndim=2)
    text_emb = check_tensor(text_emb, "text_emb", ndim=2)
    n = image_emb.shape[0]
    if n == 0:
        raise ValueError("image_emb must hold at least one embedding, got 0 rows")
    if text_emb.shape != image_emb.shape:
        raise ValueError(f"text_emb must match image_emb's shape {tuple(image_emb.shape)} (one text per image), "
                         f"got {tuple(text_emb.shape)}")
    logit_scale = check_tensor(logit_scale, "logit_scale")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (ln 1/τ), got shape {tuple(logit_scale.shape)}")
    if text_ids is None:
        text_ids = torch.arange(n, device=image_emb.device)
    else:
        text_ids = check_tensor(text_ids, "text_ids", floating=False)
        if text_ids.shape != (n,) or text_ids.is_floating_point() or text_ids.is_complex():
            raise ValueError(f"text_ids must be an integer tensor of shape ({n},), got {text_ids.dtype} "
                             f"{tuple(text_ids.shape)}")
        text_ids = text_ids.to(image_emb.device)
    scale = logit_scale.reshape(()).clamp(max=MAX_LOGIT_SCALE).exp()
    # distinct texts (first occurrence represents its group: identical captions give identical frozen embeddings)
    uniq, inverse = torch.unique(text_ids, return_inverse=True)
    first = torch.full((uniq.numel(),), n, dtype=torch.long, device=image_emb.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=image_emb.device), reduce="amin")
    logits = scale * image_emb @ text_emb[first].T  # (N images, U distinct texts)
    loss_i2t = F.cross_entropy(logits, inverse)
    # text → image: every image carrying text u is a positive
    logits_t = logits.T  # (U, N)
    positive = inverse.unsqueeze(0) == torch.arange(uniq.numel(), device=image_emb.device).unsqueeze(1)
    loss_t2i = (torch.logsumexp(logits_t, dim=1)
                - torch.logsumexp(logits_t.masked_fill(~positive, float("-inf")), dim=1)).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def dudoclip_loss(embeddings: Mapping[str, CTEmbeddings], texts: Mapping[str, TextTargets],
                  logit_scale: torch.Tensor) -> LossTerms:
    """Eq. 3: Σ over the domains present and both pairs of the symmetric Eq. 2 with the shared τ.

    ``embeddings``: ``{domain: CTEmbeddings}`` (L2-normalised, e.g. ``DuDoCLIP.forward(...).embeddings``);
    ``texts``: ``{domain: TextTargets}`` with the same domains and batch sizes.
    """
    if not isinstance(embeddings, Mapping) or not embeddings:
        raise ValueError("embeddings must be a non-empty mapping {domain: CTEmbeddings}")
    if not isinstance(texts, Mapping) or set(texts) != set(embeddings):
        got = sorted(texts) if isinstance(texts, Mapping) else type(texts).__name__
        raise ValueError(f"texts must have the same domains as embeddings {sorted(embeddings)}, got {got}")
    terms: dict[str, torch.Tensor] = {}
    for domain, emb in embeddings.items():
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        txt = texts[domain]
        for pair, img_e, txt_e, ids in (("content", emb.content, txt.content, txt.content_ids),
                                        ("control", emb.control, txt.control, txt.control_ids)):
            if img_e.shape[0] != txt_e.shape[0]:
                raise ValueError(f"texts[{domain!r}].{pair} has {txt_e.shape[0]} rows but the {domain} batch has "
                                 f"{img_e.shape[0]} images (one caption per image)")
            terms[f"{domain}/{pair}"] = contrastive_loss(img_e, txt_e, logit_scale, ids)
    total = torch.stack(list(terms.values())).sum()
    return LossTerms(total, terms)


def encode_captions(model: DuDoCLIP, content: Sequence[str], control: Sequence[str]) -> TextTargets:
    """e^{T1}, e^{T2} and identity ids for one domain's captions; each distinct caption is encoded once."""
    c_ids = text_ids(content, "content captions")
    m_ids = text_ids(control, "control captions")
    if len(content) != len(control):
        raise ValueError(f"content captions ({len(content)}) and control captions ({len(control)}) must be "
                         f"paired one to one")

    def embed(captions: Sequence[str], ids: torch.Tensor) -> torch.Tensor:
        distinct = list(dict.fromkeys(captions))  # first-appearance order = id order
        return model.encode_text(distinct)[ids.to(model.device)]

    dev = model.device
    return TextTargets(embed(content, c_ids), embed(control, m_ids), c_ids.to(dev), m_ids.to(dev))


def batch_loss(model: DuDoCLIP, images: Mapping[str, torch.Tensor],
               captions: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> LossTerms:
    """One Eq. 3 evaluation from preprocessed images ``{domain: (N, 3, S, S)}`` and captions
    ``{domain: (content captions, QSPD tuples)}`` — what a training step calls."""
    if not isinstance(captions, Mapping) or not isinstance(images, Mapping) or set(captions) != set(images):
        raise ValueError(f"captions must be a mapping with the same domains as images "
                         f"{sorted(images) if isinstance(images, Mapping) else images!r}, got "
                         f"{sorted(captions) if isinstance(captions, Mapping) else type(captions).__name__}")
    for domain, x in images.items():
        pair = captions[domain]
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"captions[{domain!r}] must be a pair (content captions, control captions), got "
                             f"{type(pair).__name__}")
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim > 0 else None
        for what, caps in zip(("content", "control"), pair):
            if isinstance(caps, str) or not isinstance(caps, Sequence):
                raise ValueError(f"captions[{domain!r}] {what} captions must be a list of strings, got "
                                 f"{type(caps).__name__}")
            if len(caps) == 0:
                raise ValueError(f"captions[{domain!r}] {what} list is empty; one caption per image is needed")
            if n is not None and len(caps) != n:
                raise ValueError(f"captions[{domain!r}] {what} list has {len(caps)} captions for {n} images "
                                 f"(one per image)")
    out = model(images)
    texts = {d: encode_captions(model, *captions[d]) for d in images}
    return dudoclip_loss(out.embeddings, texts, out.logit_scale)
