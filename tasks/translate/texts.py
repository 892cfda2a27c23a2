"""Translation stage: region texts (English) → target language, NLLB-200 through CTranslate2.

``translate_texts`` is the pure function the pipeline calls for all region texts of a shard: it
normalises and dedupes the texts, splits them into sentence chunks (NLLB degrades past ~200 tokens and
drops trailing sentences of long inputs), looks chunks up in the shard's ``TranslationMemory``, sends
the rest to a ``Translator`` in one length-bucketed batch, and reassembles every text in order.

Engines (``tasks/translate/engine.py``) are looked up by the profile's ``[translate].engine``;
chunking is ``chunking.py``, the translation memory ``memory.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tasks import languages
from tasks.translate.chunking import DEFAULT_MAX_CHUNK_TOKENS, canonical_text, chunk_block, split_blocks
from tasks.translate.engine import Translator
from tasks.translate.memory import TranslationMemory


@dataclass
class TranslateStats:
    """Counters of one ``translate_texts`` call (accumulates when the same object is passed again)."""

    segments_in: int = 0  # texts given
    empty: int = 0  # empty / whitespace-only texts passed through
    unique: int = 0  # distinct non-empty texts after whitespace normalisation
    chunks: int = 0  # distinct sentence chunks of those texts
    cache_hits: int = 0  # chunks answered by the cache
    chunks_translated: int = 0  # chunks sent to the model
    model_calls: int = 0  # translator.translate_batch calls
    src_tokens: int = 0  # source tokens sent to the model
    tgt_tokens: int = 0  # tokens of the model's output
    seconds: float = 0.0  # wall time in the model
    langs: dict[str, int] = field(default_factory=dict)  # target iso -> texts


def _token_counter(translator: Translator):
    counter = getattr(translator, "count_tokens", None)
    if counter is not None:
        return lambda texts: counter(list(texts))
    return lambda texts: [max(1, round(len(t.split()) * 1.3)) for t in texts]


def translate_texts(
    translator: Translator,
    texts: Sequence[str],
    src_iso: str,
    tgt_iso: str,
    cache: TranslationMemory | None = None,
    stats: TranslateStats | None = None,
    max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
) -> list[str]:
    """Translate all texts of a shard from ``src_iso`` to ``tgt_iso``; output aligned with input.

    Identical texts (after whitespace normalisation) and identical sentence chunks are translated once;
    the shard's translation memory makes that hold across reruns of the shard too. Empty or
    whitespace-only texts are returned unchanged.
    Chunks of one block are joined with a space, or with nothing for scripts written without spaces
    (zh, ja, th: ``line_break != "word"``); block separators (paragraph / list breaks) are kept.
    """
    src = languages.get(src_iso)
    tgt = languages.get(tgt_iso)
    stats = stats if stats is not None else TranslateStats()
    stats.segments_in += len(texts)
    stats.langs[tgt_iso] = stats.langs.get(tgt_iso, 0) + len(texts)
    n_tokens = _token_counter(translator)
    joiner = " " if tgt.line_break == "word" else ""

    norm = [canonical_text(t) if t and t.strip() else "" for t in texts]
    stats.empty += sum(1 for n in norm if not n)
    unique = [n for n in dict.fromkeys(norm) if n]
    stats.unique += len(unique)

    # layout of each unique text: blocks → chunks
    plans: dict[str, tuple[list[list[str]], list[str]]] = {}
    all_chunks: dict[str, None] = {}
    for text in unique:
        blocks, seps = split_blocks(text)
        chunked = [chunk_block(b, n_tokens, max_chunk_tokens) for b in blocks]
        plans[text] = (chunked, seps)
        for chunks in chunked:
            all_chunks.update(dict.fromkeys(chunks))
    chunk_list = list(all_chunks)
    stats.chunks += len(chunk_list)

    done: dict[str, str] = {}
    if cache is not None and chunk_list:
        done = cache.get_many(translator.model_id, src_iso, tgt_iso, chunk_list)
        stats.cache_hits += len(done)
    todo = [c for c in chunk_list if c not in done]
    if todo:
        t0 = time.perf_counter()
        outs = translator.translate_batch(todo, src.flores, tgt.flores)
        stats.seconds += time.perf_counter() - t0
        stats.model_calls += 1
        stats.chunks_translated += len(todo)
        stats.src_tokens += sum(n_tokens(todo))
        stats.tgt_tokens += sum(n_tokens(outs))
        fresh = dict(zip(todo, outs, strict=True))
        done.update(fresh)
        if cache is not None:
            cache.put_many(translator.model_id, src_iso, tgt_iso, fresh.items())

    translated: dict[str, str] = {}
    for text, (chunked, seps) in plans.items():
        parts = [joiner.join(done[c] for c in chunks) for chunks in chunked]
        out = parts[0]
        for sep, part in zip(seps, parts[1:], strict=True):
            out += sep + part
        translated[text] = out
    return [translated[n] if n else orig for n, orig in zip(norm, texts, strict=True)]
