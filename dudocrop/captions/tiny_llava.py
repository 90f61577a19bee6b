"""A tiny random LLaVA-1.5 checkpoint built locally (no download), for plumbing tests and the CPU benchmark of the
VLM caption engines (``transformers``, ``vllm``): random weights, so its text means nothing — only how requests
reach the model and how replies come back is under test.

Architecture as the paper's LLaVA-v1.5 (§IV-A), scaled down: a CLIP vision tower (32 px, 8 px patches: 16 patch
tokens, the CLS token dropped by the ``default`` feature strategy), a 2-layer Llama decoder (head_dim 64, which
vLLM's CPU attention supports), the llava-hf key layout, a byte-level BPE tokenizer trained in memory that adds
``<s>`` like Llama's, and the llava-1.5-hf chat template on processor and tokenizer. Saved with
``save_pretrained`` like a published checkpoint.
"""

from __future__ import annotations

import os

#: llava-1.5-hf's chat template (images first, then text, role names upper-cased) behind Llama's BOS: renders one
#: user turn with one image as ``<s>USER: <image>\n{text} ASSISTANT:``, the LLaVA-1.5 format of
#: ``prompts.LLAVA_PROMPT_FORMAT`` as LLaVA was trained on it (the tokenizer adds the ``<s>`` to a text prompt)
LLAVA15_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] in ('image', 'image_pil', 'image_url') %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = ("USER: ASSISTANT: describe the CT slice, metal implant, streak artifacts, quantity size position "
           "description, sinogram trace, right left anterior posterior spine pelvis skull lungs")


def build_tiny_llava(path: str, *, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> str:
    """Save a tiny random ``LlavaForConditionalGeneration`` with its processor and tokenizer under ``path``."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([_CORPUS] * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                  chat_template=LLAVA15_CHAT_TEMPLATE)
    image_proc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=LLAVA15_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    proc.save_pretrained(path)
    # llava-hf key layout (as the published checkpoints): vLLM's CLIP tower expects 'vision_tower.vision_model.*';
    # transformers reads either layout
    f = os.path.join(path, "model.safetensors")
    state = {("vision_tower.vision_model." + k[len("vision_tower."):]
              if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
             for k, v in load_file(f).items()}
    save_file(state, f, metadata={"format": "pt"})
    return path

