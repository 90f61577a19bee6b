"""Stage-1 training pieces of DuDoCLIP without any framework (paper §III-B-1, Eq. 3, Algorithm 1 step 5): the final
model file, shard rows → model inputs, one optimiser step of Eq. 3, and the embeddings the diffusion stages read.

``ray_jobs/train_clip.py`` runs :func:`clip_train_step` inside Ray Train and ``ray_jobs/embed.py`` runs
:func:`embed_rows` over the shards; the tests call both directly.

Which caption trains which embedding (Eq. 3 and the caption sidecar's columns, ``dudocrop.captions.FIELDS``):

==========  =========================  ====================  ======================================
domain      CT column (model input)    content ↔ e^{I1}      control ↔ e^{I2}
==========  =========================  ====================  ======================================
image  (x)  ``X_ma`` (HU)              ``caption_x_content``  ``caption_x_tuple`` (QSPD)
sinogram(y) ``Y_ma`` (line integrals)  ``caption_y_content``  ``caption_y_tuple`` (QSPD)
==========  =========================  ====================  ======================================

Choices, stated:

* no augmentation: the captions state sizes and left/right/anterior/posterior positions, which flips, rotations
  and crops would falsify.
* no EMA: neither the paper nor open_clip's fine-tuning average the weights; the final model is the last step's.
* the frozen towers of a random-weight model (the ``tiny`` preset) are rebuilt from the recorded ``init_seed`` and
  checked against the recorded checksum of the frozen weights, so a file never silently pairs trained controllers
  with different frozen towers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dudocrop.atomic import torch_save
from dudocrop.captions.captioning import FIELDS
from dudocrop.clip.config import DOMAINS, DuDoCLIPConfig
from dudocrop.clip.loss import LossTerms, TextTargets, dudoclip_loss, text_ids
from dudocrop.clip.model import CTEmbeddings, DuDoCLIP
from dudocrop.serialization import check_shapes, load_torch, plain

#: the shard column each domain's model input comes from (Algorithm 1 step 4: {X_ma, Y_ma} → e^{I1,2}).
CT_COLUMN = {"image": "X_ma", "sinogram": "Y_ma"}
#: the caption sidecar column of each domain's (content, control) pair — built from the caption stage's FIELDS
#: (x_* = image domain, y_* = sinogram domain) so a renamed field fails here at import, not silently in training.
_FIELD_OF = {"image": ("x_content", "x_tuple"), "sinogram": ("y_content", "y_tuple")}
assert all(f in FIELDS for pair in _FIELD_OF.values() for f in pair), f"caption FIELDS changed: {FIELDS}"
CAPTION_COLUMNS: dict[str, tuple[str, str]] = {d: tuple(f"caption_{f}" for f in fs) for d, fs in _FIELD_OF.items()}
#: the ``embeddings`` sidecar columns (contract): e^{I1}_x, e^{I2}_x, e^{I1}_y, e^{I2}_y.
EMBEDDING_COLUMNS: dict[str, tuple[str, str]] = {d: (f"e_{d}_content", f"e_{d}_control") for d in DOMAINS}
FILE_FORMAT = "dudoclip-v1"


def row_columns(domains: Sequence[str] = DOMAINS) -> list[str]:
    """The shard columns a stage-1 batch needs (captions come from the ``captions`` sidecar)."""
    return [*(CT_COLUMN[d] for d in domains), "geometry"]


def caption_columns(domains: Sequence[str] = DOMAINS) -> list[str]:
    return [c for d in domains for c in CAPTION_COLUMNS[d]]


# ---- the model file ------------------------------------------------------------------------------------------
def frozen_checksum(model: DuDoCLIP) -> str:
    """sha256 over the frozen tensors (names and bytes, name order): identifies the frozen CLIP a file needs."""
    h = hashlib.sha256()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for k, v in sorted(model.state_dict().items()):
        if k in trainable:
            continue
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().numpy()
                 .tobytes())
    return h.hexdigest()


def build_dudoclip(config: DuDoCLIPConfig | str = "tiny", init_seed: int = 0, **overrides) -> DuDoCLIP:
    """:meth:`DuDoCLIP.from_config` with torch's generator seeded by ``init_seed`` for the build only, so random
    frozen towers (``tiny``) and the controllers' copies are the same on every worker and at every reload."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        return DuDoCLIP.from_config(config, **overrides)


def save_dudoclip(path: str, model: DuDoCLIP, meta: Mapping[str, Any] | None = None, *,
                  init_seed: int | None = None) -> str:
    """Write the final stage-1 model atomically: ``{"format", "config", "trainable", "meta"}`` (contract).

    ``meta`` is kept as given plus what a loader must know: ``is_random``, ``pretrained_source``, ``init_seed``
    (the build seed, needed to rebuild random frozen towers; taken from ``meta["init_seed"]`` if not passed) and
    ``frozen_sha256``. Returns ``path``."""
    model = getattr(model, "module", model)
    if not isinstance(model, DuDoCLIP):
        raise ValueError(f"model must be a DuDoCLIP (or a DDP wrapper of one), got {type(model).__name__}")
    meta = dict(meta or {})
    seed = init_seed if init_seed is not None else meta.get("init_seed")
    if model.is_random and seed is None:
        raise ValueError("init_seed is required for a model with random frozen towers (the tiny preset): without it "
                         "load_dudoclip cannot rebuild them; build with build_dudoclip(config, init_seed)")
    meta.update(is_random=model.is_random, pretrained_source=model.pretrained_source,
                init_seed=None if seed is None else int(seed), frozen_sha256=frozen_checksum(model),
                embed_dim=model.embed_dim, domains=list(model.domains), saved_at=time.time())
    blob = {"format": FILE_FORMAT, "config": dataclasses.asdict(model.config),
            "trainable": {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()},
            "meta": plain(meta)}
    torch_save(path, blob)
    return path


def config_from_dict(d: Mapping[str, Any]) -> DuDoCLIPConfig:
    """A :class:`DuDoCLIPConfig` from ``dataclasses.asdict`` output (tuples come back as lists after JSON)."""
    fields = {f.name for f in dataclasses.fields(DuDoCLIPConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"config holds unknown DuDoCLIPConfig fields {unknown}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return DuDoCLIPConfig(**kw)


def load_dudoclip(path: str, device: torch.device | str | None = None) -> DuDoCLIP:
    """The model :func:`save_dudoclip` wrote, in eval mode on ``device`` (default CPU).

    The file is read with torch's restricted unpickler (tensors and plain data only: a pickled callable is refused
    unrun, :class:`~dudocrop.serialization.UnsafeFileError`), and the model is first built on the ``meta`` device
    and its trainable shapes compared with the stored tensors, so a config that claims a huge model fails before
    anything is allocated. The frozen CLIP is rebuilt from the saved config (weights from disk, or random from
    ``init_seed``) and must match the saved checksum; ValueError names the file otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no DuDoCLIP model file at {path} (written by ray_jobs/train_clip.py as "
                                "<out>/dudoclip.pt)")
    blob = load_torch(path, "DuDoCLIP model file")
    if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT or not {"config", "trainable",
                                                                              "meta"} <= set(blob):
        raise ValueError(f"{path} is not a DuDoCLIP model file (expected format {FILE_FORMAT!r} with config, "
                         f"trainable, meta); a Ray Train checkpoint's state.pt is not one")
    meta = blob["meta"]
    if not isinstance(meta, dict) or not isinstance(blob["config"], dict) or not isinstance(blob["trainable"], dict):
        raise ValueError(f"{path}: config, trainable and meta must be dicts")
    cfg = config_from_dict(blob["config"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_dudoclip(cfg, 0).trainable_state_dict().items()}
    check_shapes(path, shapes, blob["trainable"])
    model = build_dudoclip(cfg, meta.get("init_seed") or 0)
    got = frozen_checksum(model)
    if meta.get("frozen_sha256") and got != meta["frozen_sha256"]:
        raise ValueError(f"{path}: the frozen CLIP rebuilt from its config ({cfg.arch}, pretrained="
                         f"{cfg.pretrained!r}, init_seed={meta.get('init_seed')}) differs from the one it was trained "
                         f"with (frozen_sha256 {got[:12]} != {meta['frozen_sha256'][:12]}): other weights on disk?")
    model.load_trainable_state_dict(blob["trainable"])
    model.meta = dict(meta)
    return model.to(device or "cpu").eval()


# ---- batches ---------------------------------------------------------------------------------------------------
def _captions(rows: Mapping[str, Any], column: str, n: int) -> list[str]:
    caps = rows.get(column)
    if caps is None:
        raise ValueError(f"rows have no caption column {column!r}: join the captions sidecar "
                         f"(load_split(..., sidecars={{'captions': {caption_columns()}}}))")
    caps = list(caps)
    if len(caps) == 0:
        raise ValueError(f"rows[{column!r}] is empty; one caption per slice is needed")
    if len(caps) != n:
        raise ValueError(f"rows[{column!r}] has {len(caps)} captions for {n} slices (one per slice)")
    bad = [i for i, c in enumerate(caps) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"rows[{column!r}] item {bad[0]} is not a non-empty caption ({caps[bad[0]]!r}): re-run "
                         "ray_jobs/caption.py")
    return caps


def _geometries(rows: Mapping[str, Any], n: int) -> list[str | None]:
    g = rows.get("geometry")
    if g is None or isinstance(g, str):
        return [g] * n
    g = list(g)
    if len(g) != n:
        raise ValueError(f"rows['geometry'] has {len(g)} entries for {n} slices")
    return g


def preprocess_rows(model: DuDoCLIP, ct: np.ndarray | torch.Tensor, domain: str,
                    geometry: Sequence[str | None] | str | None, name: str) -> torch.Tensor:
    """``(N, H, W)`` or ``(N, V, C)`` CT values → ``(N, 3, S, S)`` CLIP input on the model's device, each row in
    the window of its own geometry (shards of one run share one, but nothing here assumes it)."""
    # a copy: shard columns are read-only views, and the window / resize never need the caller's buffer
    x = ct if isinstance(ct, torch.Tensor) else torch.from_numpy(np.array(ct, dtype=np.float32))
    if x.ndim != 3:
        raise ValueError(f"{name} must be a stack (N, H, W) of 2-D slices, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one slice, got shape {tuple(x.shape)}")
    x = x.to(model.device, torch.float32).unsqueeze(1)
    geoms = [geometry] * x.shape[0] if geometry is None or isinstance(geometry, str) else list(geometry)
    if len(geoms) != x.shape[0]:
        raise ValueError(f"geometry has {len(geoms)} entries for {x.shape[0]} slices of {name}")
    out = None
    for g in dict.fromkeys(geoms):
        idx = [i for i, gi in enumerate(geoms) if gi == g]
        part = model.preprocess(x[idx], domain, geometry=g)
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[idx] = part
    return out


def clip_batch(model: DuDoCLIP, rows: Mapping[str, Any], domains: Sequence[str] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[list[str], list[str]]]]:
    """SliceRows rows (``X_ma``, ``Y_ma``, ``geometry`` and the four caption columns, e.g. ``rows.take(idx)``) →
    (preprocessed images ``{domain: (N, 3, S, S)}``, captions ``{domain: (content, control)}``)."""
    model = getattr(model, "module", model)
    domains = tuple(domains or model.domains)
    if not isinstance(rows, Mapping):
        raise ValueError(f"rows must be a mapping of columns (SliceRows.take), got {type(rows).__name__}")
    images, captions = {}, {}
    n_ref = None
    for d in domains:
        col = CT_COLUMN[d]
        if col not in rows:
            raise ValueError(f"rows have no {col!r} column (the {d} domain's input)")
        ct = rows[col]
        n = len(ct)
        if n_ref is not None and n != n_ref:
            raise ValueError(f"rows[{col!r}] has {n} slices but the other domain has {n_ref}")
        n_ref = n
        images[d] = preprocess_rows(model, ct, d, _geometries(rows, n), f"rows[{col!r}]")
        c, m = CAPTION_COLUMNS[d]
        captions[d] = (_captions(rows, c, n), _captions(rows, m, n))
    return images, captions


def batch_captions(rows: Mapping[str, Any], domains: Sequence[str] = DOMAINS
                   ) -> dict[str, tuple[list[str], list[str]]]:
    """``{domain: (content captions, control captions)}`` of rows (checked as in :func:`clip_batch`)."""
    n = None
    out = {}
    for d in domains:
        c, m = CAPTION_COLUMNS[d]
        n = n if n is not None else len(rows.get(c) or [])
        out[d] = (_captions(rows, c, n), _captions(rows, m, n))
    return out


# ---- one step ----------------------------------------------------------------------------------------------------
class TextCache:
    """e^{T} of captions seen before. The text tower is frozen and in eval mode, so a caption's embedding never
    changes: encoding each distinct caption once saves the text tower's forward in every later step."""

    def __init__(self, max_items: int = 200_000):
        self.max_items = int(max_items)
        self._emb: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._emb)

    @torch.no_grad()
    def encode(self, model: DuDoCLIP, captions: Sequence[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self._emb]
        if new and len(self._emb) + len(new) > self.max_items:  # bound the memory: start over
            self._emb.clear()
            new = list(dict.fromkeys(captions))
        if new:
            with torch.autocast(model.device.type, enabled=False):
                emb = model.encode_text(new).float()
            self._emb.update(zip(new, emb))
        return torch.stack([self._emb[c] for c in captions]).to(model.device)

    def targets(self, model: DuDoCLIP, content: Sequence[str], control: Sequence[str]) -> TextTargets:
        """As :func:`dudocrop.clip.loss.encode_captions`, from the cache."""
        if len(content) != len(control):
            raise ValueError(f"content captions ({len(content)}) and control captions ({len(control)}) must be "
                             "paired one to one")
        c_ids, m_ids = text_ids(content, "content captions"), text_ids(control, "control captions")
        dev = model.device
        return TextTargets(self.encode(model, content), self.encode(model, control), c_ids.to(dev), m_ids.to(dev))


def clip_loss(model: torch.nn.Module, images: Mapping[str, torch.Tensor],
              captions: Mapping[str, tuple[Sequence[str], Sequence[str]]], *,
              text_cache: TextCache | None = None, amp: bool = False,
              gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LossTerms:
    """Eq. 3 for one batch through ``model`` (a DuDoCLIP or its DDP wrapper: the forward goes through the wrapper
    so DDP reduces the gradients). ``amp``: bf16 autocast for the image side on CUDA; the loss is taken in fp32.

    ``gather`` (data-parallel runs): a differentiable all-gather ``(n, D) -> (world_size * n, D)`` in rank order
    with a ``world_size`` attribute; the image embeddings of every rank are then contrasted with the captions of
    the WHOLE global batch (``captions`` must then be the global batch's, in the same order), so every rank
    computes the same loss as one process would. The gathered gradient is the sum over the ranks' identical losses
    and DDP averages over ranks: the update equals the single-process one, and the number of workers changes
    neither the negatives nor the step."""
    inner = getattr(model, "module", model)
    if set(captions) != set(images):
        raise ValueError(f"captions must have the same domains as images {sorted(images)}, got {sorted(captions)}")
    world = 1
    if gather is not None:
        world = getattr(gather, "world_size", None)
        if not isinstance(world, int) or world < 1:
            raise ValueError("gather must carry its world_size (an int >= 1): the number of ranks it gathers from")
    for d, (c, m) in captions.items():
        n = images[d].shape[0] * world
        if len(c) == 0 or len(m) == 0:
            raise ValueError(f"captions[{d!r}] holds an empty caption list; one caption per image is needed")
        if len(c) != n or len(m) != n:
            raise ValueError(f"captions[{d!r}] has {len(c)} content / {len(m)} control captions for {n} images")
    cache = text_cache if text_cache is not None else TextCache()
    use_amp = bool(amp) and inner.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext():
        out = model(dict(images))
    emb = {d: CTEmbeddings(e.content.float(), e.control.float()) for d, e in out.embeddings.items()}
    if gather is not None:
        emb = {d: CTEmbeddings(gather(e.content), gather(e.control)) for d, e in emb.items()}
    texts = {d: cache.targets(inner, *captions[d]) for d in images}
    return dudoclip_loss(emb, texts, out.logit_scale.float())


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What Eq. 3 trains: the controllers (copies + zero layers) and ln(1/τ); never the frozen CLIP."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW on the controller parameters and the temperature only (config module docstring)."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters (controllers and logit_scale)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def clip_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, *, lr: float | None = None,
                    grad_clip_norm: float | None = None, text_cache: TextCache | None = None,
                    amp: bool = False, global_captions: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
                    gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """One optimiser step of Eq. 3 on ``batch`` = rows (a mapping of columns, see :func:`clip_batch`) or an
    already built ``(images, captions)`` pair. Sets the learning rate first when ``lr`` is given; clips the
    gradient norm of the trainable parameters when ``grad_clip_norm`` is set. Data-parallel: ``gather`` and the
    global batch's ``global_captions`` (:func:`clip_loss`). Returns floats: ``loss``, the four
    ``loss/<domain>/<pair>`` terms, ``grad_norm``, ``logit_scale``, ``lr``, ``batch`` (images on this rank)."""
    inner = getattr(model, "module", model)
    images, captions = batch if isinstance(batch, tuple) else clip_batch(inner, batch)
    if (gather is None) != (global_captions is None):
        raise ValueError("gather and global_captions go together (data-parallel Eq. 3 over the global batch)")
    if global_captions is not None:
        captions = global_captions
    if lr is not None:
        for g in optimizer.param_groups:
            g["lr"] = float(lr)
    model.train()
    loss = clip_loss(model, images, captions, text_cache=text_cache, amp=amp, gather=gather)
    if not torch.isfinite(loss.total):
        raise FloatingPointError(f"Eq. 3 loss is {loss.total.item()} (terms "
                                 f"{ {k: float(v) for k, v in loss.terms.items()} })")
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    params = trainable_parameters(inner)
    if grad_clip_norm is not None:
        gn = torch.nn.utils.clip_grad_norm_(params, float(grad_clip_norm))
    else:
        gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    optimizer.step()
    n = next(iter(images.values())).shape[0]
    return {"loss": float(loss.total.detach()), **{f"loss/{k}": float(v.detach()) for k, v in loss.terms.items()},
            "grad_norm": float(gn), "logit_scale": float(inner.logit_scale.detach()),
            "lr": float(optimizer.param_groups[0]["lr"]), "batch": float(n)}


# ---- evaluation and embeddings -------------------------------------------------------------------------------
@torch.no_grad()
def embed_rows(model: DuDoCLIP, X_ma, Y_ma, geometry: Sequence[str | None] | str | None,
               batch_size: int = 32) -> dict[str, np.ndarray]:
    """e^{I1}, e^{I2} of both domains for ``(N, H, W)`` images and ``(N, V, C)`` sinograms: float32 ``(N, D)``
    arrays, L2-normalised, keyed by the ``embeddings`` sidecar columns (``e_image_content``, ...)."""
    model = getattr(model, "module", model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(X_ma)
    if len(Y_ma) != n:
        raise ValueError(f"X_ma has {n} slices but Y_ma has {len(Y_ma)}: the two domains must be paired")
    geoms = [geometry] * n if geometry is None or isinstance(geometry, str) else list(geometry)
    if len(geoms) != n:
        raise ValueError(f"geometry has {len(geoms)} entries for {n} slices")
    was = model.training
    model.eval()
    out: dict[str, list[np.ndarray]] = {c: [] for cols in EMBEDDING_COLUMNS.values() for c in cols}
    try:
        for i in range(0, max(n, 1), batch_size):
            g = geoms[i:i + batch_size]
            for d, ct in (("image", X_ma), ("sinogram", Y_ma)):
                if d not in model.domains:
                    continue
                x = preprocess_rows(model, ct[i:i + batch_size], d, g, CT_COLUMN[d])
                e = model.encode_ct(x, d)
                out[EMBEDDING_COLUMNS[d][0]].append(e.content.float().cpu().numpy())
                out[EMBEDDING_COLUMNS[d][1]].append(e.control.float().cpu().numpy())
    finally:
        model.train(was)
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items() if v}


@torch.no_grad()
def retrieval_report(model: DuDoCLIP, rows: Mapping[str, Any], *, batch_size: int = 64,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Held-out retrieval of both domains (image → its content caption, image → its metal tuple, the same for the
    sinogram) among the DISTINCT captions of ``rows``, with chance levels: keys ``<domain>/<pair>/top1``, ...,
    ``<domain>/<pair>/chance_top1``, ``<domain>/<pair>/candidates`` (:func:`dudocrop.clip.evaluate_retrieval`)."""
    from dudocrop.clip.retrieval import evaluate_retrieval

    model = getattr(model, "module", model)
    images, captions = clip_batch(model, rows)
    out = {}
    for d, x in images.items():
        r = evaluate_retrieval(model, x, d, *captions[d], batch_size=batch_size, ks=ks)
        out.update({f"{d}/{k}": v for k, v in r.items()})
    return out


def mean_top(report: Mapping[str, float], k: int = 1) -> float:
    """The mean top-k over the four (domain, pair) retrievals of a :func:`retrieval_report`."""
    vals = [v for key, v in report.items() if key.endswith(f"/top{k}")]
    return float(sum(vals) / len(vals)) if vals else float("nan")
