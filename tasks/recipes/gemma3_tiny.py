"""Local recipe ``gemma3-tiny``: the production retriever backbone class at toy size, built offline.

The retriever of the ``full`` profile is ``Gemma3ForConditionalGeneration`` (Gemma-3-4B-IT). This recipe
builds the *same classes* — ``Gemma3Config`` with a SigLIP vision tower, ``GemmaTokenizer`` (trained
here with the ``tokenizers`` BPE trainer on CLDR names in our 22 languages, with byte fallback so any
text tokenises), ``Gemma3ImageProcessor`` and ``Gemma3Processor`` — and saves them with
``save_pretrained`` so the trainer loads it exactly like a hub checkpoint. Weights are random (seeded).

One fix-up matters: Gemma3 initialises the multimodal projector to **zero**, so every image maps to the
same embeddings and the vision tower gets zero gradients. A pretrained checkpoint has real projector
weights; the random build re-initialises it (normal, std = ``initializer_range``).

Listed in the recipe table of :mod:`tasks.recipes`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.recipes.cldr import corpus_locales, locale_names

# Gemma-3 special tokens the processor and the model config refer to.
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
START_TURN, END_TURN = "<start_of_turn>", "<end_of_turn>"
_BASE_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")

# Gemma's chat format (written here from its documented layout, not copied): ``<bos>`` once, then per
# message ``<start_of_turn>{user|model}\n{content}<end_of_turn>\n``; an image item is ``<start_of_image>``
# (the processor expands it to the image tokens); a system message is folded into the first user turn.
# colpali-engine's BiGemmaProcessor3 / ColGemmaProcessor3 and vLLM's chat endpoint both need it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] | trim ~ '\\n\\n' -%}"
    "{%- else -%}{%- set ns.system = message['content'][0]['text'] | trim ~ '\\n\\n' -%}{%- endif -%}"
    "{%- else -%}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}{{ '\\n' }}"
    "{%- if loop.index0 <= 1 and message['role'] == 'user' %}{{ ns.system }}"
    "{% set ns.system = '' %}{% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<start_of_image>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<end_of_turn>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model{{ '\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Gemma3TinyConfig:
    """Everything that determines a ``gemma3-tiny`` build (recorded in ``recipe.json``)."""

    seed: int = 0
    vocab_size: int = 4096  # BPE merges target (specials + 256 byte-fallback tokens included)
    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 64
    patch_size: int = 8  # 8x8 = 64 patches, pooled to mm_tokens_per_image
    mm_tokens_per_image: int = 16
    max_positions: int = 2048
    sliding_window: int = 512


def _tokenizer_corpus() -> list[str]:
    """Training text for the tiny BPE: every CLDR name of English and the 22 languages' locales."""
    return [name for code in corpus_locales() for name in locale_names(code)]


def build_gemma_tokenizer(cfg: Gemma3TinyConfig, out_dir: Path):
    """Train a Gemma-style BPE (``▁`` for spaces, byte fallback) and wrap it as ``GemmaTokenizer``.

    The vocabulary starts with Gemma's layout (pad 0, eos 1, bos 2, unk 3, mask 4), then the three image
    tokens and the two turn markers, then the 256 ``<0xNN>`` byte-fallback pieces, then the learned merges.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = [*_BASE_SPECIALS, BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, START_TURN, END_TURN]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=specials + byte_tokens,
        limit_alphabet=1000,
        show_progress=False,
    )
    lines = [" " + line for line in _tokenizer_corpus()]  # "▁word" pieces, as in text after a space
    tok.train_from_iterator(lines, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={
            "boi_token": BOI_TOKEN,
            "eoi_token": EOI_TOKEN,
            "image_token": IMAGE_TOKEN,
            "sot_token": START_TURN,
            "eot_token": END_TURN,
        },
        model_max_length=cfg.max_positions,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_gemma3_tiny(out_dir: Path, cfg: Gemma3TinyConfig | None = None) -> Path:
    """Build ``gemma3-tiny`` into ``out_dir``: model (safetensors) + tokenizer + processor + recipe.json."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    cfg = cfg or Gemma3TinyConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_gemma_tokenizer(cfg, out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN)}
    text_cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.head_dim,
        max_position_embeddings=cfg.max_positions,
        sliding_window=cfg.sliding_window,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision_cfg = SiglipVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_cfg,
        vision_config=vision_cfg,
        mm_tokens_per_image=cfg.mm_tokens_per_image,
        boi_token_index=ids[BOI_TOKEN],
        eoi_token_index=ids[EOI_TOKEN],
        image_token_index=ids[IMAGE_TOKEN],
    )
    torch.manual_seed(cfg.seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # zero-initialised projector → identical image embeddings, zero gradients
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, config.initializer_range)
    model.save_pretrained(str(out_dir))
    image_processor = Gemma3ImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size},
        do_pan_and_scan=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=cfg.mm_tokens_per_image,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out_dir))
    meta = {
        "recipe": "gemma3-tiny",
        "what": "Gemma3ForConditionalGeneration (SigLIP vision tower) at toy size, random weights, with a "
        "locally trained GemmaTokenizer (BPE + byte fallback) and Gemma3Processor",
        "warning": "random weights: a stand-in that exercises the real retriever training path offline",
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_size": len(tokenizer),
        "special_token_ids": ids,
        "data_source": "Unicode CLDR via babel (Unicode License v3) for the tokenizer",
    }
    (out_dir / "recipe.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out_dir
