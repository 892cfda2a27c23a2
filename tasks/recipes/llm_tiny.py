"""Local recipe ``llm-tiny``: a tiny chat model that the vLLM CPU build can serve, for the query stage.

A real architecture that vLLM supports (``Qwen3ForCausalLM``) with a tiny config and RANDOM weights, a
byte-level BPE tokenizer trained locally on multilingual CLDR names (so every script of the 22
languages tokenises without ``<unk>``) and a ChatML chat template. It exercises the real request /
chat-template / structured-output / response path of ``tasks.queries.VllmQueryGenerator``; its queries
are noise, never a quality result.

Text-only on purpose: most vision models in vLLM need torchvision for their processors, which the vLLM
venv must not have (PyPI's torchvision does not match torch 2.13.0+cpu); the image path of the engine is
tested against a real server with the Idefics3 recipe ``vlm-tiny`` (tasks/recipes/vlm_tiny.py).

Constraints found on this machine (see scripts/setup_vllm.sh): vLLM's CPU attention rejects head_dim 16,
so head_dim is 64; the config is saved by the main venv's transformers (5.23) and read by the vLLM venv's
(< 5.20), so only plain config fields are used.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.recipes.cldr import byte_level_bpe, chat_corpus

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\\n') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class LlmTinyConfig:
    """Everything that determines an ``llm-tiny`` build (recorded in ``recipe.json``)."""

    seed: int = 4321
    vocab_size: int = 4096
    hidden_size: int = 128
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 64  # vLLM CPU attention rejects 16
    intermediate_size: int = 256
    max_position_embeddings: int = 4096


def build_tokenizer(out_dir: Path, cfg: LlmTinyConfig):
    """The byte-level BPE of the query chat models (CLDR names + query text), with a ChatML template."""
    fast = byte_level_bpe(
        chat_corpus(),
        cfg.vocab_size,
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=cfg.max_position_embeddings,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_llm_tiny(out_dir: Path, cfg: LlmTinyConfig | None = None) -> Path:
    """Build ``llm-tiny``: tokenizer + ``Qwen3ForCausalLM`` (random init, seed fixed) in ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    cfg = cfg or LlmTinyConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(out_dir, cfg)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(str(out_dir))
    GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(str(out_dir))
    meta = {
        "recipe": "llm-tiny",
        "what": "Qwen3ForCausalLM, random weights, byte-level BPE trained on CLDR names, ChatML template",
        "warning": "Random weights: its text is noise. It tests the vLLM serving / client path only.",
        "config": asdict(cfg),
        "tokenizer_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "data_source": "Unicode CLDR via babel (Unicode License v3)",
    }
    (out_dir / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir
