"""Image → text retrieval accuracy: how often an image's own caption is among its k nearest texts.

The gallery is the set of DISTINCT captions of the evaluated images (duplicates collapse into one candidate, as in
the loss), so chance level is ``min(k, C) / C`` for C distinct captions when captions are balanced. Used to check
that Eq. 3 training moved e^{I1} towards the content captions and e^{I2} towards the QSPD tuples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dudocrop.checks import check_tensor
from dudocrop.clip.loss import text_ids
from dudocrop.clip.model import DuDoCLIP


def caption_gallery(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """(distinct captions in first-appearance order, ``(N,)`` index of each image's caption among them)."""
    ids = text_ids(captions)
    return list(dict.fromkeys(captions)), ids


def chance_accuracy(n_candidates: int, k: int) -> float:
    """Top-k accuracy of a random ranking over ``n_candidates`` texts."""
    if n_candidates < 1 or k < 1:
        raise ValueError(f"n_candidates and k must be >= 1, got {n_candidates}, {k}")
    return min(k, n_candidates) / n_candidates


def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor, targets: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k image→text accuracy: ``image_emb`` ``(N, D)``, candidate ``text_emb`` ``(C, D)``, ``targets`` ``(N,)``
    the index of each image's correct candidate. Returns ``{'top1': ..., 'top5': ...}`` (k capped at C)."""
    image_emb = check_tensor(image_emb, "image_emb", ndim=2)
    text_emb = check_tensor(text_emb, "text_emb", ndim=2)
    targets = check_tensor(targets, "targets", ndim=1, floating=False)
    n, c = image_emb.shape[0], text_emb.shape[0]
    if n == 0 or c == 0:
        raise ValueError(f"image_emb and text_emb must be non-empty, got {n} images and {c} texts")
    if text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"text_emb must have image_emb's width {image_emb.shape[1]}, got {text_emb.shape[1]}")
    if targets.shape[0] != n:
        raise ValueError(f"targets must hold one index per image ({n}), got {targets.shape[0]}")
    if targets.is_floating_point() or int(targets.min()) < 0 or int(targets.max()) >= c:
        raise ValueError(f"targets must be integer indices in [0, {c}), got {targets.dtype} in "
                         f"[{targets.min().item()}, {targets.max().item()}]")
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    sim = image_emb.float() @ text_emb.float().T
    # rank of the correct text; ties count against it, so a collapsed model (all texts alike) scores 0, not 1
    correct = sim.gather(1, targets.to(sim.device).long().unsqueeze(1))
    rank = (sim >= correct).sum(dim=1) - 1
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def evaluate_retrieval(model: DuDoCLIP, images: torch.Tensor, domain: str, content_captions: Sequence[str],
                       control_captions: Sequence[str], *, batch_size: int = 64,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Held-out retrieval for one domain: e^{I1} against the distinct content captions and e^{I2} against the
    distinct control captions. ``images`` are preprocessed ``(N, 3, S, S)``. Keys ``content/top1``,
    ``control/top5``, … plus ``content/chance_top1`` etc. and ``content/candidates``."""
    n = images.shape[0] if isinstance(images, torch.Tensor) else None
    for name, caps in (("content_captions", content_captions), ("control_captions", control_captions)):
        if n is not None and len(caps) != n:
            raise ValueError(f"{name} must hold one caption per image ({n}), got {len(caps)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        parts = [model.encode_ct(images[i:i + batch_size], domain) for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    emb = {"content": torch.cat([p.content for p in parts]), "control": torch.cat([p.control for p in parts])}
    out: dict[str, float] = {}
    for pair, caps in (("content", content_captions), ("control", control_captions)):
        gallery, targets = caption_gallery(caps)
        acc = retrieval_accuracy(emb[pair], model.encode_text(gallery), targets, ks)
        out.update({f"{pair}/{k}": v for k, v in acc.items()})
        out.update({f"{pair}/chance_top{k}": chance_accuracy(len(gallery), k) for k in ks})
        out[f"{pair}/candidates"] = float(len(gallery))
    return out
