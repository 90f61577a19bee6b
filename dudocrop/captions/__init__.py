"""Captions for DuDoCLIP (paper §III-B "Prompt Engineering", Fig. 5-6, Algorithm 1 step 2).

* ``prompts``    — P1-P4 ("Qualifier + Instruction"), the LLaVA-1.5 prompt format.
* ``qspd``       — Quantity, Size, Position from the masks + Description; the 77-token tuple template.
* ``render``     — views as RGB pictures in a stated window (what a VLM is shown).
* ``engine``     — the :class:`CaptionEngine` interface; ``template`` (default, no weights), ``transformers`` and
  ``vllm`` engines (the latter two load lazily: ``create_engine(name, ...)``).
* ``captioning`` — caption columns per slice, sidecar Parquet files per shard, joining them back.
* ``evaluate``   — the positive / negative word scorer of §IV-D.
"""

from dudocrop.captions.captioning import (
    CAPTION_COLUMNS,
    CAPTION_TEXTS,
    FIELDS,
    CaptionSettings,
    build_requests,
    caption_records,
    caption_shard,
    iter_captioned_records,
    join_captions,
    read_captions,
    read_shard_with_captions,
    sidecar_name,
    write_captions_manifest,
)
from dudocrop.captions.engine import (
    CaptionEngine,
    CaptionRequest,
    ModelNotFoundError,
    VLMEngine,
    create_engine,
    engine_settings,
    resolve_model,
)
from dudocrop.captions.evaluate import GroundTruth, PNScore, evaluate_prompts, ground_truth, score_caption
from dudocrop.captions.prompts import (
    IMAGE_TOKEN,
    LLAVA_PROMPT_FORMAT,
    PROMPTS,
    P1ImageContent,
    P2ImageTuple,
    P3SinogramContent,
    P4SinogramTuple,
    Prompt,
    PromptFacts,
    get_prompt,
    llava_prompt,
)
from dudocrop.captions.qspd import (
    ImageQSPD,
    MetalObject,
    SinogramQSPD,
    TraceExtent,
    description_from_reply,
    image_qspd,
    metal_objects,
    render_tuple,
    sinogram_qspd,
    trace_extent,
)
from dudocrop.captions.render import Window, to_rgb, view_image, window_for
from dudocrop.captions.template import TemplateEngine
from dudocrop.captions.tokens import CONTEXT_LENGTH, TokenReport, clip_token_count, fit_clip_context

__all__ = [
    "CAPTION_COLUMNS", "CAPTION_TEXTS", "CONTEXT_LENGTH", "FIELDS", "IMAGE_TOKEN", "LLAVA_PROMPT_FORMAT", "PROMPTS",
    "CaptionEngine", "CaptionRequest", "CaptionSettings", "GroundTruth", "ImageQSPD", "MetalObject",
    "ModelNotFoundError", "P1ImageContent", "P2ImageTuple", "P3SinogramContent", "P4SinogramTuple", "PNScore",
    "Prompt", "PromptFacts", "SinogramQSPD", "TemplateEngine", "TokenReport", "TraceExtent", "VLMEngine", "Window",
    "build_requests", "caption_records", "caption_shard", "clip_token_count", "create_engine",
    "description_from_reply", "engine_settings", "evaluate_prompts", "fit_clip_context", "get_prompt",
    "ground_truth", "image_qspd", "iter_captioned_records", "join_captions", "llava_prompt", "metal_objects",
    "read_captions",
    "read_shard_with_captions", "render_tuple", "resolve_model", "score_caption", "sidecar_name", "sinogram_qspd",
    "to_rgb", "trace_extent", "view_image", "window_for", "write_captions_manifest",
]
