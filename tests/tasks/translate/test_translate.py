"""Translation stage on the real engines: a tiny NLLB built once per session, CTranslate2 int8."""

from __future__ import annotations

import json
import threading
import unicodedata
from pathlib import Path

import pytest

from tasks.languages import LANGUAGES, UnknownLanguageError
from tasks.recipes.nllb_tiny import NllbTinyConfig
from tasks.translate.chunking import canonical_text, chunk_block, split_blocks, split_sentences
from tasks.translate.engine import CT2NllbTranslator, build_translator, ensure_ct2_model
from tasks.translate.memory import TranslationMemory
from tasks.translate.texts import TranslateStats, translate_texts

# A fixed step count (not a time budget) keeps the test model identical on a busy shared CPU.

SENTENCES = [
    "The European Union signed a new agreement with India in January.",
    "Results show that the proposed model improves accuracy on three benchmarks.",
    "Figure 2 compares the Japanese yen with the United States dollar.",
    "Russia and China reported lower rainfall in March and April.",
    "The survey covered Brazil, Canada, Mexico and South Africa.",
    "On Monday the committee discussed the budget of the Arab League.",
    "We thank the reviewers for their helpful comments.",
    "Tamil and Hindi speakers were recruited in Chennai and Delhi.",
    "The data were collected between June and September.",
    "Prices are given in euros and British pounds.",
    "Section 4 describes the Latin and Cyrillic scripts.",
    "Germany, France and Italy joined the project on Friday.",
]

SCRIPT_OF = {"hi": "DEVANAGARI", "ar": "ARABIC", "zh": "CJK", "ru": "CYRILLIC"}


@pytest.fixture(scope="session")
def tiny_nllb_root(tiny_models) -> Path:
    """The model cache holding the tiny profile's ``nllb-tiny`` (built once, shared by all tests)."""
    return tiny_models["nllb-tiny"].parent


@pytest.fixture(scope="session")
def translator(tiny_nllb_root: Path) -> CT2NllbTranslator:
    return CT2NllbTranslator(
        tiny_nllb_root / "nllb-tiny" / "ct2", intra_threads=2, no_repeat_ngram_size=3, max_batch_size=8
    )


class Recording:
    """Delegates to a real translator and records what it was asked (chunk inputs / outputs)."""

    def __init__(self, inner: CT2NllbTranslator) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.calls: list[tuple[list[str], list[str]]] = []

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)

    def translate_batch(self, texts, src_flores, tgt_flores):
        outs = self.inner.translate_batch(texts, src_flores, tgt_flores)
        self.calls.append((list(texts), outs))
        return outs


def _script_share(texts: list[str], script: str) -> float:
    letters = [ch for t in texts for ch in t if ch.isalpha()]
    assert letters, f"no letters in {texts!r}"
    return sum(unicodedata.name(ch, "").startswith(script) for ch in letters) / len(letters)


# ---------------------------------------------------------------------------------------------- build


def test_recipe_outputs_are_nllb_layout(tiny_nllb_root: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from tasks.recipes.nllb_tiny import flores_codes

    out = tiny_nllb_root / "nllb-tiny"
    meta = json.loads((out / "recipe.json").read_text())
    assert "NOT a translation-quality model" in meta["warning"]
    assert meta["steps_run"] == NllbTinyConfig().steps and meta["pairs_total"] > 20_000
    assert meta["final_loss"] < meta["first_loss"]
    cfg = AutoConfig.from_pretrained(out / "hf")
    assert (cfg.model_type, cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == ("m2m_100", 128, 2, 2)
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert type(tok).__name__ == "NllbTokenizer"
    ids = tok.convert_tokens_to_ids(flores_codes())
    assert tok.unk_token_id not in ids and len(set(ids)) == 22
    assert (out / "ct2" / "model.bin").is_file() and (out / "ct2" / "tokenizer.json").is_file()
    ct2_vocab = json.loads((out / "ct2" / "shared_vocabulary.json").read_text())
    assert ct2_vocab[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))


# -------------------------------------------------------------------------------------- tokenisation


def test_source_tokens_follow_nllb_convention(translator: CT2NllbTranslator) -> None:
    text = "Results on 3 benchmarks."
    (tokens,) = translator.tokenize_source([text], "eng_Latn")
    assert tokens[0] == "eng_Latn" and tokens[-1] == "</s>"
    assert tokens[1:-1] == translator.tokenizer.tokenize(text)
    assert tokens.count("eng_Latn") == 1 and tokens.count("</s>") == 1
    assert "<unk>" not in tokens  # digits and punctuation are in the BPE


def test_hf_checkpoint_and_ct2_agree_on_tokenisation(tiny_nllb_root: Path, translator) -> None:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny_nllb_root / "nllb-tiny" / "hf")
    for src, text in [("eng_Latn", SENTENCES[0]), ("eng_Latn", "e.g. 3.5% (n=12)"), ("hin_Deva", "विश्व")]:
        hf_tok.src_lang = src
        expected = hf_tok.convert_ids_to_tokens(hf_tok(text)["input_ids"])
        assert translator.tokenize_source([text], src)[0] == expected


def test_target_prefix_is_forced_and_stripped(translator: CT2NllbTranslator) -> None:
    tokens = translator.tokenize_source(SENTENCES[:2], "eng_Latn")
    hyps = translator.translate_tokens(tokens, "hin_Deva")
    assert all(h[0] == "hin_Deva" for h in hyps)
    outs = translator.translate_batch(SENTENCES[:2], "eng_Latn", "hin_Deva")
    assert all(o and "hin_Deva" not in o and "</s>" not in o for o in outs)
    assert outs == [translator.detokenize(h, "hin_Deva") for h in hyps]


# -------------------------------------------------------------------------------- splitting/chunks


def test_sentence_splitter_rules() -> None:
    text = (
        "We use e.g. CNNs. See Fig. 3 for details. The value is 3.5 m! Is it? Yes, J. Smith et al. agree. "
        "Item No. 5 is here. it continues"
    )
    assert split_sentences(text) == [
        "We use e.g. CNNs.",
        "See Fig. 3 for details.",
        "The value is 3.5 m!",
        "Is it?",
        "Yes, J. Smith et al. agree.",
        "Item No. 5 is here. it continues",
    ]
    blocks, seps = split_blocks(canonical_text("A wrapped\nline here.\n\n• first\n• second  item\r\nwraps"))
    assert blocks == ["A wrapped line here.", "• first", "• second item wraps"]
    assert seps == ["\n\n", "\n"]


def test_overlong_sentence_is_cut_without_losing_words(translator: CT2NllbTranslator) -> None:
    words = [f"word{i}" for i in range(150)]
    sentence = ", ".join(" ".join(words[i : i + 10]) for i in range(0, 150, 10)) + "."
    chunks = chunk_block(sentence, translator.count_tokens, max_tokens=40)
    assert len(chunks) > 1
    assert all(n <= 40 for n in translator.count_tokens(chunks))
    assert " ".join(chunks) == sentence


@pytest.mark.parametrize("tgt", ["ru", "zh"])
def test_long_paragraph_is_split_and_reassembled_in_order(translator, tgt: str) -> None:
    paragraph = " ".join(SENTENCES)
    rec = Recording(translator)
    stats = TranslateStats()
    (out,) = translate_texts(rec, [paragraph], "en", tgt, stats=stats, max_chunk_tokens=40)
    assert len(rec.calls) == 1
    chunks, outs = rec.calls[0]
    assert chunks == chunk_block(paragraph, translator.count_tokens, 40)
    assert 3 <= len(chunks) <= 12 and " ".join(chunks) == paragraph  # every sentence, in order
    assert all(n <= 40 for n in translator.count_tokens(chunks))
    joiner = "" if tgt == "zh" else " "
    assert out == joiner.join(outs)  # one output chunk per input chunk, in input order
    assert stats.chunks == stats.chunks_translated == len(chunks) and stats.model_calls == 1


def test_blocks_keep_their_separators(translator) -> None:
    text = "First paragraph here.\n\n• item one\n• item two"
    (out,) = translate_texts(translator, [text], "en", "ru")
    assert out.count("\n\n") == 1 and out.count("\n") == 3


# ------------------------------------------------------------------------------------ dedupe/cache


def test_identical_strings_translated_once_and_remembered(translator, tmp_path: Path) -> None:
    texts = ["Hello world.", "  Hello   world. ", "Hello world.", "", "   ", "Good morning, India."]
    memory = TranslationMemory(tmp_path, "memory/hi/shard.parquet")
    rec = Recording(translator)
    stats = TranslateStats()
    out = translate_texts(rec, texts, "en", "hi", cache=memory, stats=stats)
    assert (stats.segments_in, stats.empty, stats.unique) == (6, 2, 2)
    assert stats.model_calls == 1 and stats.chunks_translated == 2 and stats.cache_hits == 0
    assert sorted(rec.calls[0][0]) == ["Good morning, India.", "Hello world."]
    assert out[0] == out[1] == out[2] != "" and out[3] == "" and out[4] == "   " and out[5]
    assert stats.src_tokens > 0 and stats.tgt_tokens > 0 and len(memory) == 2
    memory.save()
    first_bytes = (tmp_path / "memory/hi/shard.parquet").read_bytes()

    # a rerun of the shard (a new memory object loaded from the same object) translates nothing
    again = TranslateStats()
    rec2 = Recording(translator)
    reloaded = TranslationMemory(tmp_path, "memory/hi/shard.parquet")
    out2 = translate_texts(rec2, texts, "en", "hi", cache=reloaded, stats=again)
    assert out2 == out and rec2.calls == [] and again.model_calls == 0 and again.cache_hits == 2
    reloaded.save()  # nothing new: not rewritten
    assert (tmp_path / "memory/hi/shard.parquet").read_bytes() == first_bytes
    # another target language is a different key
    translate_texts(rec2, texts[:1], "en", "ar", cache=reloaded)
    assert len(rec2.calls) == 1 and len(reloaded) == 3


def test_memory_is_safe_from_threads(tmp_path: Path) -> None:
    memory = TranslationMemory()

    def work(k: int) -> None:
        for i in range(20):
            memory.put_many("m", "en", "hi", [(f"t{k}-{i}", f"x{k}-{i}")])
            assert memory.get_many("m", "en", "hi", [f"t{k}-{i}"]) == {f"t{k}-{i}": f"x{k}-{i}"}

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(memory) == 80


def test_empty_input_and_unknown_language(translator) -> None:
    stats = TranslateStats()
    assert translate_texts(translator, [], "en", "hi", stats=stats) == []
    assert translate_texts(translator, ["", " \n "], "en", "hi", stats=stats) == ["", " \n "]
    assert stats.model_calls == 0
    with pytest.raises(UnknownLanguageError):
        translate_texts(translator, ["x"], "en", "xx")


# --------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("tgt", sorted(SCRIPT_OF))
def test_output_is_mostly_in_target_script(translator, tgt: str) -> None:
    outs = translate_texts(translator, SENTENCES[:6], "en", tgt)
    share = _script_share(outs, SCRIPT_OF[tgt])
    assert share > 0.5, (share, outs)


def test_translation_does_not_depend_on_the_batch(tiny_nllb_root: Path, translator) -> None:
    """The guarantee translate_batch gives: a text's output depends on the text (and the model and
    decoding options), not on which texts share its CTranslate2 batch, their order, max_batch_size or
    the thread count. The tiny model often runs on until its decoding cap; with a cap taken from the
    longest text of a batch, 4 of 168 outputs changed between batches of 3 and 8."""
    ct2_dir = tiny_nllb_root / "nllb-tiny" / "ct2"
    alone = CT2NllbTranslator(ct2_dir, intra_threads=1, no_repeat_ngram_size=3, max_batch_size=1)
    others = [
        CT2NllbTranslator(ct2_dir, intra_threads=threads, no_repeat_ngram_size=3, max_batch_size=size, **kw)
        for threads, size, kw in (
            (1, 3, {"batch_type": "examples"}),
            (2, 8, {"batch_type": "examples", "max_in_flight": 1}),  # one call at a time
            (2, 32, {"batch_type": "tokens", "max_batch_tokens": 48}),  # token budget cuts the calls
            (1, 32, {"inter_threads": 2, "max_in_flight": 8}),  # several calls decoding at once
        )
    ]
    assert {t.model_id for t in others} == {translator.model_id, alone.model_id}
    shuffled = list(reversed(SENTENCES))
    for tgt in ("hi", "zh"):
        flores = LANGUAGES[tgt].flores
        reference = [alone.translate_batch([s], "eng_Latn", flores)[0] for s in SENTENCES]
        assert alone.translate_batch(SENTENCES, "eng_Latn", flores) == reference
        for other in [translator, *others]:
            assert other.translate_batch(SENTENCES, "eng_Latn", flores) == reference, other.max_batch_size
            assert other.translate_batch(shuffled, "eng_Latn", flores) == reference[::-1]
        # and the pure stage function over a shard's texts gives the same, whatever the instance
        assert translate_texts(others[0], SENTENCES, "en", tgt) == translate_texts(
            translator, SENTENCES, "en", tgt
        )


def test_token_batches_bound_padded_tokens(tiny_nllb_root: Path) -> None:
    """batch_type tokens: a call holds at most max_batch_tokens padded source tokens (its longest source
    times its size) and at most max_batch_size sources; a longer source goes alone; every source once."""
    ct2_dir = tiny_nllb_root / "nllb-tiny" / "ct2"
    tr = CT2NllbTranslator(ct2_dir, max_batch_size=6, batch_type="tokens", max_batch_tokens=64)
    tokens = tr.tokenize_source(SENTENCES * 3 + ["word " * 80], "eng_Latn")
    plan = tr.batch_plan(tokens)
    assert sorted(i for call in plan for i in call) == list(range(len(tokens)))
    for call in plan:
        longest = max(len(tokens[i]) for i in call)
        assert len(call) <= 6 and (len(call) == 1 or longest * len(call) <= 64), call
    assert [len(tokens) - 1] in plan  # 80 words alone
    by_examples = CT2NllbTranslator(ct2_dir, max_batch_size=6, batch_type="examples").batch_plan(tokens)
    assert len(plan) > len(by_examples)  # the token budget, not the count, cut these calls


def test_decoding_cap_is_per_chunk(translator) -> None:
    tokens = translator.tokenize_source(["Hi.", SENTENCES[-1]], "eng_Latn")
    caps = [translator.decoding_cap(len(t)) for t in tokens]
    hyps = translator.translate_tokens(tokens, "hin_Deva")
    assert caps[0] < caps[1] and all(len(h) <= c for h, c in zip(hyps, caps, strict=True))
    greedy_plan = translator.batch_plan(tokens * 5)
    assert [len(b) for b in greedy_plan] == [8, 2]  # greedy: any lengths share a call


def test_build_translator_from_recipe_source(tiny_nllb_root: Path, translator, monkeypatch) -> None:
    from tasks.models import load_profile

    monkeypatch.setenv("M3DR_MODELS", str(tiny_nllb_root))
    cfg = dict(load_profile("tiny")["translate"])
    assert cfg["model"] == "recipe:nllb-tiny"
    built = build_translator(cfg)
    assert isinstance(built, CT2NllbTranslator) and built.compute_type == "int8"
    assert built.model_dir == tiny_nllb_root / "nllb-tiny" / "ct2"
    assert built.translate_batch(SENTENCES[:2], "eng_Latn", "rus_Cyrl") == translator.translate_batch(
        SENTENCES[:2], "eng_Latn", "rus_Cyrl"
    )
    with pytest.raises(ValueError, match="unknown translate engine"):
        build_translator({**cfg, "engine": "nope"})


def test_transformers_checkpoint_is_converted_once(tiny_nllb_root: Path, translator, monkeypatch, tmp_path):
    monkeypatch.setenv("M3DR_MODELS", str(tmp_path / "cache"))
    hf_dir = tiny_nllb_root / "nllb-tiny" / "hf"
    ct2_dir = ensure_ct2_model(str(hf_dir))
    assert ct2_dir.is_relative_to(tmp_path / "cache") and (ct2_dir / "model.bin").is_file()
    mtime = (ct2_dir / "model.bin").stat().st_mtime_ns
    assert ensure_ct2_model(str(hf_dir)) == ct2_dir
    assert (ct2_dir / "model.bin").stat().st_mtime_ns == mtime
    built = build_translator({"engine": "ctranslate2", "model": str(hf_dir), "no_repeat_ngram_size": 3})
    assert built.translate_batch(SENTENCES[:3], "eng_Latn", "hin_Deva") == translator.translate_batch(
        SENTENCES[:3], "eng_Latn", "hin_Deva"
    )
