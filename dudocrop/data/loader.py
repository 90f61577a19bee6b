"""Training batches from slice shards, with the paper's augmentations (§IV-B: random 256x256 crops and
rotations for images; for sinograms, crops along the (periodic) view axis and the channels).

The source is any iterable of numpy batch dicts with the schema's columns, e.g. what Ray Train's
``get_dataset_shard("train").iter_batches(batch_format="numpy")`` yields, so the library stays free of Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from dudocrop.data.normalize import Normalization
from dudocrop.data.schema import absent_to_none

DOMAINS = {
    # domain: (input column, target column, extra mask column)
    "image": ("X_ma", "X_ref", "metal_mask"),
    "sinogram": ("Y_ma", "Y_ref", "metal_trace"),
}


@dataclass(frozen=True)
class CropSpec:
    height: int = 256
    width: int = 256


def augment(mu: np.ndarray, x0: np.ndarray, extra: np.ndarray, domain: str, crop: CropSpec,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random crop (+ rotation/flip for images) applied identically to input, target (H, W) and ``extra``
    (H, W) or (H, W, K): masks or loss weights riding along."""
    h, w = mu.shape
    ch, cw = min(crop.height, h), min(crop.width, w)
    if domain == "image":
        r0 = int(rng.integers(0, h - ch + 1))
        c0 = int(rng.integers(0, w - cw + 1))
        sl = (slice(r0, r0 + ch), slice(c0, c0 + cw))
        out = [a[sl] for a in (mu, x0, extra)]
        k = int(rng.integers(0, 4))
        flip = bool(rng.integers(0, 2))
        out = [np.rot90(a, k) for a in out]
        if flip:
            out = [a[:, ::-1] for a in out]
        if ch != cw and k % 2:  # rotated non-square crops change shape: rotate back to keep (ch, cw)
            out = [np.rot90(a, -1) for a in out]
    else:
        # views are periodic over the full rotation: a window may wrap around view 0
        v0 = int(rng.integers(0, h))
        rows = (np.arange(ch) + v0) % h
        c0 = int(rng.integers(0, w - cw + 1))
        out = [a[rows][:, c0:c0 + cw] for a in (mu, x0, extra)]
    return tuple(np.ascontiguousarray(a) for a in out)


class TrainingBatches:
    """Yields dicts of torch tensors ``{"mu", "x0", "mask", **embeddings}`` in [0, 1] (N, 1, h, w)."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]], domain: str, normalization: Normalization,
                 crop: CropSpec | None = CropSpec(), seed: int = 0, embedding_columns: tuple[str, ...] = ()):
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {tuple(DOMAINS)}, got {domain!r}")
        self.batches, self.domain, self.norm, self.crop = batches, domain, normalization, crop
        self.rng = np.random.default_rng(seed)
        self.embedding_columns = embedding_columns

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        src, tgt, extra = DOMAINS[self.domain]
        scale = self.norm.image if self.domain == "image" else self.norm.sino
        for b in self.batches:
            for col in (src, tgt, extra):
                if col not in b:
                    raise ValueError(f"batch has no column {col!r} (columns: {sorted(b)})")
            mus, x0s, exs = [], [], []
            for i in range(len(b[src])):
                mu, x0, ex = b[src][i], absent_to_none(b[tgt][i]), b[extra][i]
                if x0 is None:
                    raise ValueError(f"row {b.get('case_id', ['?'] * (i + 1))[i]} has no {tgt}: "
                                     "supervised training needs reference data")
                if self.crop is not None:
                    mu, x0, ex = augment(mu, x0, ex, self.domain, self.crop, self.rng)
                mus.append(scale(mu))
                x0s.append(scale(x0))
                exs.append(ex)
            out = {
                "mu": torch.from_numpy(np.stack(mus)[:, None].astype(np.float32)),
                "x0": torch.from_numpy(np.stack(x0s)[:, None].astype(np.float32)),
                "mask": torch.from_numpy(np.stack(exs)[:, None].astype(np.float32)),
            }
            for c in self.embedding_columns:
                out[c] = torch.from_numpy(np.stack(list(b[c])).astype(np.float32))
            yield out
