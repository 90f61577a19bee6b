"""The caption-engine interface (paper §III-B: LLaVA turns a view into text; Algorithm 1 step 2), the request
it receives, local model resolution and the factory.

Every engine answers ``caption(requests) -> list[str]``, one answer per request, in order. A request carries
the prompt (P1-P4, with or without its qualifier), the view as numbers and as the RGB picture a VLM sees.
Vision-language engines (``transformers``, ``vllm``) also offer ``generate(images, prompts)`` on plain PIL
images and LLaVA prompt strings; the ``template`` engine reads the numbers instead.

Weights are only ever read from disk: a directory, or a Hub tag already in the local Hugging Face cache. A
missing model raises :class:`ModelNotFoundError` at once, naming the path or tag — no download and no network
retry unless ``allow_download=True`` and ``HF_HUB_OFFLINE`` is unset.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
from PIL import Image

from dudocrop.captions.prompts import IMAGE_TOKEN, Prompt, PromptFacts, get_prompt, instruction_of
from dudocrop.captions.render import view_image, window_for
from dudocrop.ct.geometry import FanBeamGeometry, get_geometry

log = logging.getLogger(__name__)

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


class ModelNotFoundError(FileNotFoundError):
    """Model weights are not on this machine (the message names the path or tag and what to do)."""


@dataclass(frozen=True, eq=False)
class CaptionRequest:
    """One question to a captioner: prompt ``P1``-``P4`` about one view of one slice."""

    prompt: Prompt
    facts: PromptFacts
    qualified: bool
    array: np.ndarray  # the view: HU (X_*) or line integrals (Y_*)
    geometry: FanBeamGeometry
    tag: str = ""  # the caller's id for the request (e.g. '<case_id>|x_tuple'); engines ignore it

    @classmethod
    def create(cls, prompt: str | Prompt, array: np.ndarray, view: str, geometry: FanBeamGeometry | str,
               anatomy: str, qualified: bool = True, tag: str = "") -> CaptionRequest:
        p = get_prompt(prompt) if isinstance(prompt, str) else prompt
        g = get_geometry(geometry)
        a = np.asarray(array, np.float32)
        want = g.image_shape if view.startswith("X") else g.sino_shape
        if a.shape != tuple(want):
            raise ValueError(f"{view} must have shape {want} for geometry {g.name!r}, got {a.shape}")
        facts = PromptFacts(view=view, anatomy=anatomy, window=window_for(view, g).describe(),
                            pixel_mm=g.pixel_size, n_views=g.n_views, n_channels=g.n_channels,
                            channel_mm=g.channel_pitch_at_iso)
        p.text(facts, qualified)  # fails now, not in a worker, if the view does not fit the prompt
        return cls(p, facts, qualified, a, g, tag)

    @property
    def view(self) -> str:
        return self.facts.view

    @property
    def text(self) -> str:
        """The LLaVA-1.5 prompt string."""
        return self.prompt.llava(self.facts, self.qualified)

    @cached_property
    def image(self) -> Image.Image:
        """The RGB picture a VLM is shown (``render.view_image``: the stated window)."""
        return view_image(self.array, self.view, self.geometry)


class CaptionEngine(ABC):
    """One answer per request, in request order (batching is the engine's business)."""

    name: ClassVar[str]

    @abstractmethod
    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]: ...

    @classmethod
    def describe(cls, **kwargs) -> dict:
        """The settings an engine built with ``kwargs`` would report (no model is loaded)."""
        return {"engine": cls.name}

    def settings(self) -> dict:
        """What determines the answers (recorded in the captions manifest and hashed into the row keys)."""
        return self.describe()

    def close(self) -> None:  # noqa: B027 - optional hook: engines without resources need not override it
        """Release models / accelerators."""


class VLMEngine(CaptionEngine):
    """An engine that sees only the picture and the prompt text (LLaVA)."""

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        return self.generate([r.image for r in requests], [r.text for r in requests])

    @abstractmethod
    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        """One reply per (image, LLaVA prompt) pair, in order; an empty model output is ''."""


def check_vlm_inputs(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[Image.Image]:
    """Validate (image, prompt) pairs for a LLaVA-1.5 engine; returns the images as RGB."""
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must pair up: got {len(images)} images and {len(prompts)} prompts")
    out = []
    for i, (im, p) in enumerate(zip(images, prompts)):
        if not isinstance(im, Image.Image):
            raise ValueError(f"images[{i}] must be a PIL.Image, got {type(im).__name__}")
        if p.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"prompts[{i}] must hold exactly one {IMAGE_TOKEN!r} (one image per prompt): {p[:80]!r}")
        instruction_of(p)  # raises unless "USER: <image>\n... ASSISTANT:"
        out.append(im if im.mode == "RGB" else im.convert("RGB"))
    return out


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _has_weights(path: str) -> bool:
    names = os.listdir(path)
    return "config.json" in names and any(n.endswith(WEIGHT_FILES) for n in names)


def resolve_model(model: str, allow_download: bool = False) -> str:
    """A local directory holding ``config.json`` and weights, for a directory or a cached Hub tag.

    Raises :class:`ModelNotFoundError` at once when the weights are not on this machine."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a local directory or a Hugging Face tag, got {model!r}")
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not _has_weights(path):
            raise ModelNotFoundError(f"no model weights in {path!r}: expected config.json and a "
                                     f"{'/'.join(WEIGHT_FILES)} file (a LLaVA directory saved by save_pretrained)")
        return os.path.abspath(path)
    looks_like_tag = model.count("/") == 1 and not model.startswith((".", "/", "~")) and not os.path.exists(path)
    if not looks_like_tag:
        raise ModelNotFoundError(f"model directory {path!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = snapshot_download(repo_id=model, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        if not allow_download or hf_offline():
            why = "HF_HUB_OFFLINE is set" if hf_offline() else "allow_download=False"
            raise ModelNotFoundError(
                f"model {model!r} is neither a directory nor in the local Hugging Face cache, and downloads are off "
                f"({why}): copy the weights to this machine and pass their directory") from e
        local = snapshot_download(repo_id=model)
    if not _has_weights(local):
        raise ModelNotFoundError(f"the cached snapshot of {model!r} at {local!r} has no config.json / weights")
    return local


ENGINES = ("template", "transformers", "vllm")


def engine_class(name: str) -> type[CaptionEngine]:
    """The class of a named engine (its module imports no model library at import time)."""
    if name == "template":
        from dudocrop.captions.template import TemplateEngine

        return TemplateEngine
    if name == "transformers":
        from dudocrop.captions.hf_engine import TransformersEngine

        return TransformersEngine
    if name == "vllm":
        from dudocrop.captions.vllm_engine import VLLMEngine

        return VLLMEngine
    raise ValueError(f"unknown caption engine {name!r}; engines: {', '.join(ENGINES)}")


def create_engine(name: str, **kwargs) -> CaptionEngine:
    """``template`` (default, no weights), ``transformers`` (``model=`` a local LLaVA directory or cached tag)
    or ``vllm`` (same; vllm imported only there)."""
    return engine_class(name)(**kwargs)


def engine_settings(name: str, **kwargs) -> dict:
    """What ``create_engine(name, **kwargs).settings()`` returns, without loading a model (for a driver that
    hashes the settings while actors hold the engines)."""
    return engine_class(name).describe(**kwargs)


def chunks(n: int, size: int):
    """``range`` slices of at most ``size`` covering ``0..n``."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))
