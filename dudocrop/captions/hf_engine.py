"""The ``transformers`` caption engine: LLaVA (the paper uses LLaVA-v1.5-13b, §IV-A) from a local directory
through Hugging Face ``LlavaForConditionalGeneration``, on CPU or GPU, batched, greedy decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PIL import Image

from dudocrop.captions.engine import VLMEngine, check_vlm_inputs, chunks, resolve_model

log = logging.getLogger(__name__)


class TransformersEngine(VLMEngine):
    """LLaVA through transformers. ``model``: a local directory (``save_pretrained`` layout: config, weights,
    processor) or a Hub tag already in the local cache; ``device``: where the model runs (explicit, never
    guessed); ``dtype``: e.g. ``torch.float16`` on a GPU (default float32)."""

    name = "transformers"

    def __init__(self, model: str, device: str = "cpu", dtype=None, max_new_tokens: int = 96, batch_size: int = 4,
                 allow_download: bool = False):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model_path = resolve_model(model, allow_download)  # fails at once when the weights are absent
        self.model_ref = model
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
        # decoder-only generation continues the last token: pad on the left so every row ends at its prompt
        self.processor.tokenizer.padding_side = "left"
        self.model = LlavaForConditionalGeneration.from_pretrained(
            self.model_path, dtype=self.dtype, local_files_only=True).to(self.device).eval()
        tok = self.processor.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @classmethod
    def describe(cls, model: str, max_new_tokens: int = 96, dtype=None, **_) -> dict:
        # device and batch size do not change greedy answers: left out so a CPU and a GPU run share keys
        return {"engine": cls.name, "model": model, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                "dtype": str(dtype) if dtype is not None else "torch.float32"}

    def settings(self) -> dict:
        return self.describe(self.model_ref, self.max_new_tokens, self.dtype)

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        import torch

        images = check_vlm_inputs(images, prompts)
        out: list[str] = []
        for sl in chunks(len(prompts), self.batch_size):
            inputs = self.processor(images=images[sl], text=list(prompts[sl]), return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self._pad_id)
            new = ids[:, inputs["input_ids"].shape[1]:]  # left padding: the answers start at the same column
            out.extend(t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True))
        empty = sum(1 for t in out if not t)
        if empty:
            log.warning("transformers engine: %d of %d replies are empty", empty, len(out))
        return out

    def close(self) -> None:
        self.model = None
