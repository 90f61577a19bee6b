"""DuDoCLIP (paper §III-B-1, Fig. 2, Eq. 2-3): frozen CLIP + one control net per domain, trained contrastively.

``config`` (presets ``tiny``/``paper``), ``weights`` (offline weight resolution), ``model`` (:class:`DuDoCLIP`),
``preprocess`` (CT → CLIP input, defined once), ``loss`` (Eq. 2-3), ``retrieval`` (top-k accuracy), ``train``
(the model file, shard rows → inputs, one Eq. 3 step, the embeddings the diffusion stages read).
"""

from dudocrop.clip.config import (
    DOMAINS,
    DuDoCLIPConfig,
    DuDoCLIPTrainConfig,
    get_model_config,
    get_train_config,
)
from dudocrop.clip.loss import TextTargets, batch_loss, contrastive_loss, dudoclip_loss, encode_captions, text_ids
from dudocrop.clip.model import CTEmbeddings, DuDoCLIP, DuDoCLIPOutput
from dudocrop.clip.preprocess import default_window, preprocess_ct
from dudocrop.clip.retrieval import caption_gallery, chance_accuracy, evaluate_retrieval, retrieval_accuracy
from dudocrop.clip.train import (
    EMBEDDING_COLUMNS,
    TextCache,
    build_dudoclip,
    clip_batch,
    clip_train_step,
    embed_rows,
    load_dudoclip,
    make_optimizer,
    retrieval_report,
    save_dudoclip,
)
from dudocrop.clip.weights import WeightsNotFoundError, WeightsSource, create_clip, resolve_weights

__all__ = [
    "DOMAINS", "EMBEDDING_COLUMNS", "CTEmbeddings", "DuDoCLIP", "DuDoCLIPConfig", "DuDoCLIPOutput",
    "DuDoCLIPTrainConfig", "TextCache", "TextTargets", "WeightsNotFoundError", "WeightsSource", "batch_loss",
    "build_dudoclip", "caption_gallery", "chance_accuracy", "clip_batch", "clip_train_step", "contrastive_loss",
    "create_clip", "default_window", "dudoclip_loss", "embed_rows", "encode_captions", "evaluate_retrieval",
    "get_model_config", "get_train_config", "load_dudoclip", "make_optimizer", "preprocess_ct", "resolve_weights",
    "retrieval_accuracy", "retrieval_report", "save_dudoclip", "text_ids",
]
