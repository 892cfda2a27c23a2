"""Recipe ``nllb-tiny``: an NLLB-architecture translator built and briefly trained offline.

``M2M100ForConditionalGeneration`` + an ``NllbTokenizer`` over a sentencepiece BPE with the FLORES-200
codes of our 22 languages, trained for a fixed number of steps on the CLDR glossary pairs of
:mod:`tasks.recipes.cldr`, then converted to CTranslate2 int8 with CTranslate2's own converter. Its
output lands in the target script; it is NOT a translation-quality model, only a stand-in that
exercises the real load / tokenise / decode path.

Heavy imports (torch, transformers, sentencepiece) happen inside the builder.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.languages import LANGUAGES, SOURCE_LANG
from tasks.recipes.cldr import glossary_pairs
from tasks.translate.engine import convert_nllb_to_ct2

NLLB_TINY_SECONDS_ENV = "M3DR_NLLB_TINY_SECONDS"
NLLB_TINY_STEPS_ENV = "M3DR_NLLB_TINY_STEPS"

# Separators used when several glossary entries are joined into one training example.
_LIST_SEP = {"zh": "、", "ja": "、", "ar": "، "}
# Characters the BPE must know even though CLDR names rarely contain them (digits, ASCII punctuation,
# the separators/full stops above): without them, page text would turn into <unk>.
_REQUIRED_CHARS = "0123456789.,;:!?()[]-–—%/&'\"+=*#@$€£¥、。，،।"
_FULL_STOP = {"zh": "。", "ja": "。", "hi": "।", "mr": "।", "sa": "।", "bn": "।", "pa": "।", "or": "।"}


@dataclass(frozen=True)
class NllbTinyConfig:
    """Everything that determines a ``nllb-tiny`` build (recorded in ``recipe.json``)."""

    seed: int = 1234
    seconds: float = 120.0  # training time budget, used only when ``steps`` is None
    # Exact number of optimiser steps (~110 s on 2 cores): a step count, not a time budget, makes the
    # build bit-reproducible on every machine, however loaded.
    steps: int | None = 600
    threads: int = 2
    vocab_size: int = 4096
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 512
    batch_size: int = 48
    max_pairs_per_example: int = 6
    lr: float = 5e-3
    warmup_steps: int = 30
    label_smoothing: float = 0.1
    dropout: float = 0.1


def flores_codes() -> list[str]:
    """FLORES-200 codes of the 22 languages, registry order (the tokenizer's language tokens)."""
    return [lang.flores for lang in LANGUAGES.values()]


def _train_sentencepiece(pairs: dict[str, list[tuple[str, str]]], out_dir: Path, cfg: NllbTinyConfig) -> Path:
    """Train a deterministic sentencepiece BPE on both sides of the glossary; returns the model file.

    Special ids follow the NLLB sentencepiece model (unk 0, bos 1, eos 2, no pad): the NLLB tokenizer
    conversion shifts them into the fairseq layout ``<s> <pad> </s> <unk>``.
    """
    import sentencepiece as spm

    lines: list[str] = []
    seen: set[str] = set()
    for iso in sorted(pairs):
        for s, t in pairs[iso]:
            for text in (s, t):
                if text not in seen:
                    seen.add(text)
                    lines.append(text)
    corpus = out_dir / "spm_corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = out_dir / "sentencepiece.bpe"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=cfg.vocab_size,
        model_type="bpe",
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        seed_sentencepiece_size=1_000_000,
        required_chars=_REQUIRED_CHARS,
        minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "sentencepiece.bpe.vocab").unlink(missing_ok=True)
    return out_dir / "sentencepiece.bpe.model"


def build_nllb_tokenizer(spm_model: Path, out_dir: Path):
    """Wrap a sentencepiece model as a transformers ``NllbTokenizer`` with our FLORES language tokens.

    transformers 5.x converts ``sentencepiece.bpe.model`` to a fast tokenizer (needs ``protobuf``); the
    language codes must be passed as ``extra_special_tokens`` or it would add all 202 FLORES codes.
    """
    import shutil

    from transformers import NllbTokenizer

    tok_dir = out_dir / "spm"
    tok_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(spm_model, tok_dir / "sentencepiece.bpe.model")
    return NllbTokenizer.from_pretrained(
        str(tok_dir), extra_special_tokens=flores_codes(), src_lang="eng_Latn", model_max_length=1024
    )


def _example(rng: random.Random, iso: str, pairs: list[tuple[str, str]], k_max: int) -> tuple[str, str]:
    """Join 1..k_max glossary pairs of one language into one (source, target) example."""
    k = rng.randint(1, k_max)
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(k)]
    src = ", ".join(s for s, _ in chosen)
    tgt = _LIST_SEP.get(iso, ", ").join(t for _, t in chosen)
    if rng.random() < 0.08:  # numbers are copied verbatim: teaches the model to carry digits through
        num = str(rng.randint(1, 2100)) if rng.random() < 0.7 else f"{rng.uniform(0, 100):.1f}"
        pos = rng.randint(0, k)
        src_items = [s for s, _ in chosen]
        tgt_items = [t for _, t in chosen]
        src_items.insert(pos, num)
        tgt_items.insert(pos, num)
        src = ", ".join(src_items)
        tgt = _LIST_SEP.get(iso, ", ").join(tgt_items)
    if rng.random() < 0.3:
        src += "."
        tgt += _FULL_STOP.get(iso, ".")
    return src, tgt


def _batch(tokenizer, rng: random.Random, pairs, langs: list[str], cfg: NllbTinyConfig):
    """One teacher-forcing batch in the NLLB convention.

    encoder: ``[src_lang] tokens </s>``; decoder input: ``</s> [tgt_lang] tokens``; labels:
    ``[tgt_lang] tokens </s>`` with the language token masked (generation forces it anyway).
    """
    import torch

    src_ids, dec_ids, lab_ids = [], [], []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    src_code = tokenizer.convert_tokens_to_ids(LANGUAGES[SOURCE_LANG].flores)
    examples = []
    for _ in range(cfg.batch_size):
        iso = langs[rng.randrange(len(langs))]
        examples.append((iso, *_example(rng, iso, pairs[iso], cfg.max_pairs_per_example)))
    enc_s = tokenizer([e[1] for e in examples], add_special_tokens=False)["input_ids"]
    enc_t = tokenizer([e[2] for e in examples], add_special_tokens=False)["input_ids"]
    for (iso, _, _), s, t in zip(examples, enc_s, enc_t, strict=True):
        tgt_code = tokenizer.convert_tokens_to_ids(LANGUAGES[iso].flores)
        src_ids.append([src_code, *s, eos])
        dec_ids.append([eos, tgt_code, *t])
        lab_ids.append([-100, *t, eos])

    def pad_to(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    input_ids = pad_to(src_ids, pad)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad).long(),
        "decoder_input_ids": pad_to(dec_ids, pad),
        "labels": pad_to(lab_ids, -100),
    }


def tiny_m2m100_config(tokenizer, cfg: NllbTinyConfig):
    """A small ``M2M100Config`` in the NLLB layout (pre-norm, scaled embeddings, ``</s>`` decoder start)."""
    from transformers import M2M100Config

    return M2M100Config(
        vocab_size=len(tokenizer),
        d_model=cfg.d_model,
        encoder_layers=cfg.layers,
        decoder_layers=cfg.layers,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_dim,
        decoder_ffn_dim=cfg.ffn_dim,
        max_position_embeddings=1024,
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        scale_embedding=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        tokenizer_class="NllbTokenizer",
        tie_word_embeddings=True,
    )


def nllb_tiny_config_from_env(**overrides) -> NllbTinyConfig:
    """The default config, with ``M3DR_NLLB_TINY_SECONDS`` / ``M3DR_NLLB_TINY_STEPS`` applied."""
    kw: dict = {}
    if os.environ.get(NLLB_TINY_SECONDS_ENV):
        kw["seconds"] = float(os.environ[NLLB_TINY_SECONDS_ENV])
    if os.environ.get(NLLB_TINY_STEPS_ENV):
        kw["steps"] = int(os.environ[NLLB_TINY_STEPS_ENV])
    kw.update(overrides)
    return NllbTinyConfig(**kw)


def cache_config() -> dict | None:
    """The build's config for its recipe-cache key (env overrides applied); None for a time-budgeted
    build (``steps`` unset), whose weights depend on the machine's speed and so are never cached."""
    cfg = nllb_tiny_config_from_env()
    return asdict(cfg) if cfg.steps is not None else None


def build_nllb_tiny(out_dir: Path, cfg: NllbTinyConfig | None = None) -> Path:
    """Build the tiny NLLB: glossary → BPE → NllbTokenizer → M2M100 trained → ``hf/`` + ``ct2/`` (int8).

    Deterministic given the seed and the number of steps (fixed threads, deterministic algorithms,
    inverse-sqrt schedule that does not depend on the total); with a time budget the step count is
    recorded in ``recipe.json`` so ``M3DR_NLLB_TINY_STEPS`` reproduces the same weights.
    """
    import torch
    from transformers import M2M100ForConditionalGeneration

    cfg = cfg or nllb_tiny_config_from_env()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        pairs = glossary_pairs()
        work = out_dir / "work"
        work.mkdir(exist_ok=True)
        spm_model = _train_sentencepiece(pairs, work, cfg)
        tokenizer = build_nllb_tokenizer(spm_model, work)

        torch.manual_seed(cfg.seed)
        model = M2M100ForConditionalGeneration(tiny_m2m100_config(tokenizer, cfg))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)

        def inv_sqrt(step: int) -> float:
            step += 1
            return min(step / cfg.warmup_steps, (cfg.warmup_steps / step) ** 0.5)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, inv_sqrt)
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=cfg.label_smoothing)
        rng = random.Random(cfg.seed)
        langs = sorted(pairs)
        t_train = time.perf_counter()
        step, losses = 0, []
        while True:
            if cfg.steps is not None and step >= cfg.steps:
                break
            if cfg.steps is None and time.perf_counter() - t_train >= cfg.seconds:
                break
            batch = _batch(tokenizer, rng, pairs, langs, cfg)
            labels = batch.pop("labels")
            # project only the positions that carry a label: the vocabulary projection dominates the cost
            hidden = model.model(**batch).last_hidden_state
            keep = labels != -100
            logits = model.lm_head(hidden[keep])
            loss = loss_fn(logits, labels[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
        train_seconds = time.perf_counter() - t_train
        model.eval()

        hf_dir = out_dir / "hf"
        model.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))
        convert_nllb_to_ct2(hf_dir, out_dir / "ct2", quantization="int8")
        n_pairs = {iso: len(p) for iso, p in sorted(pairs.items())}
        tail = losses[-50:] or [float("nan")]
        meta = {
            "recipe": "nllb-tiny",
            "what": "NLLB-architecture translator (M2M100ForConditionalGeneration + NllbTokenizer) trained "
            "briefly on CLDR glossary pairs from babel; CTranslate2 int8 copy in ct2/",
            "warning": "NOT a translation-quality model: it only puts word-like text in the target script "
            "so the real translate/render path can be exercised offline.",
            "config": asdict(cfg),
            "steps_run": step,
            "train_seconds": round(train_seconds, 2),
            "build_seconds": round(time.perf_counter() - t_start, 2),
            "final_loss": round(sum(tail) / len(tail), 4),
            "first_loss": round(losses[0], 4) if losses else None,
            "pairs_per_language": n_pairs,
            "pairs_total": sum(n_pairs.values()),
            "tokenizer_size": len(tokenizer),
            "languages": flores_codes(),
            "reproduce": f"{NLLB_TINY_STEPS_ENV}={step} (same seed) rebuilds the same weights",
            "layout": {"hf": "transformers checkpoint + tokenizer", "ct2": "CTranslate2 int8 + tokenizer"},
            "data_source": "Unicode CLDR via babel (Unicode License v3)",
        }
        (out_dir / "recipe.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        return out_dir
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
