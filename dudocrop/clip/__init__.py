"""DuDoCLIP (paper §III-B-1, Fig. 2, Eq. 2-3): frozen CLIP + one control net per domain, trained contrastively.

``config`` (presets ``tiny``/``paper``), ``weights`` (offline weight resolution), ``model`` (:class:`DuDoCLIP`),
``preprocess`` (CT → CLIP input, defined once), ``loss`` (Eq. 2-3), ``retrieval`` (top-k accuracy).
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
from dudocrop.clip.weights import WeightsNotFoundError, WeightsSource, create_clip, resolve_weights

__all__ = [
    "DOMAINS", "CTEmbeddings", "DuDoCLIP", "DuDoCLIPConfig", "DuDoCLIPOutput", "DuDoCLIPTrainConfig", "TextTargets",
    "WeightsNotFoundError", "WeightsSource", "batch_loss", "caption_gallery", "chance_accuracy", "contrastive_loss",
    "create_clip", "default_window", "dudoclip_loss", "encode_captions", "evaluate_retrieval", "get_model_config",
    "get_train_config", "preprocess_ct", "resolve_weights", "retrieval_accuracy", "text_ids",
]
