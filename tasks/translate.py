"""Translation stage: region texts (English) → target language, NLLB-200 through CTranslate2.

``translate_texts`` is the pure function the pipeline calls for all region texts of a shard: it
normalises and dedupes the texts, splits them into sentence chunks (NLLB degrades past ~200 tokens and
drops trailing sentences of long inputs), looks chunks up in a persistent ``TranslationCache``, sends
the rest to a ``Translator`` in one length-bucketed batch, and reassembles every text in order.

Engines are looked up in ``ENGINES`` by the profile's ``[translate].engine``; the model comes from a
source string (``recipe:``, ``hf:``, path) resolved by ``tasks.models``. No code branches on profiles.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tasks import languages
from tasks.models import convert_nllb_to_ct2, fingerprint, models_dir, resolve_source

DEFAULT_MAX_CHUNK_TOKENS = 64


@runtime_checkable
class Translator(Protocol):
    """A batch translator over FLORES-200 codes.

    Optional: ``count_tokens(texts) -> list[int]`` (used for chunking; words are counted otherwise).
    """

    model_id: str

    def translate_batch(self, texts: list[str], src_flores: str, tgt_flores: str) -> list[str]: ...


# --------------------------------------------------------------------------------------------------
# CTranslate2 NLLB engine


def _resolve_compute_type(compute_type: str, device: str) -> str:
    if compute_type != "auto":
        return compute_type
    return "int8_float16" if device.startswith("cuda") else "int8"


class CT2NllbTranslator:
    """NLLB-200 (or any M2M100-layout model) converted to CTranslate2, with its HF tokenizer.

    Source tokens follow the NLLB convention ``[src_lang] tokens </s>``; the target language is forced
    with ``target_prefix=[[tgt_lang]]`` and stripped from the output. Inputs are sorted by token length
    and cut into batches of ``max_batch_size`` so that padding stays small; order is restored.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        compute_type: str = "auto",
        beam_size: int = 1,
        max_batch_size: int = 32,
        inter_threads: int = 1,
        intra_threads: int = 0,
        max_decoding_length: int = 256,
        no_repeat_ngram_size: int = 0,
        max_length_ratio: float = 3.0,
    ) -> None:
        import ctranslate2
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "model.bin").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a CTranslate2 model (no model.bin)")
        self.device = device
        self.compute_type = _resolve_compute_type(compute_type, device)
        self.beam_size = beam_size
        self.max_batch_size = max_batch_size
        self.max_decoding_length = max_decoding_length
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.max_length_ratio = max_length_ratio
        self._ct2 = ctranslate2.Translator(
            str(self.model_dir),
            device=device,
            compute_type=self.compute_type,
            inter_threads=inter_threads,
            intra_threads=intra_threads,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self._special = set(self.tokenizer.all_special_tokens)
        self.batches_run = 0
        # Everything that changes the output goes into the id (it keys the translation cache).
        self.model_id = (
            f"ct2-nllb:{self.model_dir.name}:{fingerprint(self.model_dir)}:{self.compute_type}"
            f":beam{beam_size}:nrng{no_repeat_ngram_size}:len{max_decoding_length}x{max_length_ratio:g}"
        )

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CT2NllbTranslator:
        """Build from a profile's ``[translate]`` table (converting a transformers checkpoint once)."""
        device = cfg.get("device", "cpu")
        if device.startswith("cuda"):
            import ctranslate2

            if ctranslate2.get_cuda_device_count() == 0:
                raise RuntimeError("translate.device is cuda but CTranslate2 sees no CUDA device")
        quant = cfg.get("quantization") or ("int8_float16" if device.startswith("cuda") else "int8")
        model_dir = ensure_ct2_model(cfg["model"], quantization=quant)
        keys = (
            "compute_type",
            "beam_size",
            "max_batch_size",
            "inter_threads",
            "intra_threads",
            "max_decoding_length",
            "no_repeat_ngram_size",
            "max_length_ratio",
        )
        return cls(model_dir, device=device, **{k: cfg[k] for k in keys if k in cfg})

    # tokenisation ---------------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Subword tokens per text (without language/eos tokens)."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def tokenize_source(self, texts: Sequence[str], src_flores: str) -> list[list[str]]:
        """Token lists sent to CTranslate2: ``[src_lang] tokens </s>`` (NLLB non-legacy convention)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        eos = self.tokenizer.eos_token
        return [[src_flores, *self.tokenizer.convert_ids_to_tokens(row), eos] for row in ids]

    def detokenize(self, tokens: Sequence[str], tgt_flores: str) -> str:
        """Strip the forced language prefix and special tokens, then join subwords into text."""
        toks = list(tokens)
        if toks and toks[0] == tgt_flores:
            toks = toks[1:]
        toks = [t for t in toks if t not in self._special]
        return self.tokenizer.convert_tokens_to_string(toks).strip()

    # translation ----------------------------------------------------------------------------------

    def translate_tokens(self, batch: list[list[str]], tgt_flores: str) -> list[list[str]]:
        """One CTranslate2 call on pre-tokenised sources; returns hypotheses with the prefix kept."""
        longest = max(len(t) for t in batch)
        max_len = min(self.max_decoding_length, int(self.max_length_ratio * longest) + 8)
        results = self._ct2.translate_batch(
            batch,
            target_prefix=[[tgt_flores]] * len(batch),
            beam_size=self.beam_size,
            max_batch_size=self.max_batch_size,
            max_decoding_length=max_len,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            return_scores=False,
        )
        self.batches_run += 1
        return [r.hypotheses[0] for r in results]

    def translate_batch(self, texts: list[str], src_flores: str, tgt_flores: str) -> list[str]:
        """Translate texts (already sentence-chunked) from one FLORES language to another."""
        if not texts:
            return []
        tokens = self.tokenize_source(texts, src_flores)
        order = sorted(range(len(texts)), key=lambda i: (len(tokens[i]), i))
        out: list[str] = [""] * len(texts)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start : start + self.max_batch_size]
            hyps = self.translate_tokens([tokens[i] for i in idx], tgt_flores)
            for i, hyp in zip(idx, hyps, strict=True):
                out[i] = self.detokenize(hyp, tgt_flores)
        return out


ENGINES: dict[str, type] = {"ctranslate2": CT2NllbTranslator}


def _is_transformers_m2m100(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    import json

    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        return False
    return data.get("model_type") == "m2m_100" or "M2M100ForConditionalGeneration" in data.get(
        "architectures", []
    )


def ensure_ct2_model(source: str, quantization: str = "int8") -> Path:
    """A CTranslate2 directory for a model source.

    A CT2 dir (``model.bin``) or a recipe dir with ``ct2/`` is used as is; a transformers NLLB checkpoint
    (e.g. ``hf:facebook/nllb-200-distilled-600M``) is converted once into the model cache, under a file
    lock so concurrent workers convert it only once.
    """
    path = resolve_source(source)
    for cand in (path, path / "ct2"):
        if (cand / "model.bin").is_file():
            return cand
    hf = next((c for c in (path, path / "hf") if _is_transformers_m2m100(c)), None)
    if hf is None:
        raise ValueError(
            f"{source!r} ({path}) is neither a CTranslate2 model nor a transformers NLLB checkpoint"
        )
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")
    out = models_dir() / "ct2-converted" / f"{safe}-{quantization}"
    done = out / ".complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            convert_nllb_to_ct2(hf, out, quantization=quantization)
            done.write_text("ok\n")
    return out


def build_translator(cfg: dict[str, Any]) -> Translator:
    """The translator named by a profile's ``[translate]`` table (``engine`` → ``ENGINES``)."""
    engine = cfg.get("engine", "ctranslate2")
    if engine not in ENGINES:
        raise ValueError(f"unknown translate engine {engine!r}; known: {', '.join(sorted(ENGINES))}")
    return ENGINES[engine].from_config(cfg)


# --------------------------------------------------------------------------------------------------
# Sentence splitting and chunking

# Words whose trailing period does not end a sentence (lower-cased, without the final period).
_ABBREVIATION_WORDS = (
    "e.g i.e etc al fig figs eq eqs eqn vol vols pp p sec secs ch chap cf approx vs viz dr mr mrs ms prof st "
    "jr sr inc ltd co corp dept tab ref refs resp ca ed eds jan feb mar apr jun jul aug sep sept oct nov dec "
    "u.s u.k ph.d a.m p.m"
)
_ABBREVIATIONS = frozenset(_ABBREVIATION_WORDS.split())
# Only before a number ("No. 5"); "no." at a sentence end is the word.
_NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "nr"})
_BOUNDARY = re.compile(r"([.!?…]+)([\"'”’)\]]*)(\s+)")
_LIST_START = re.compile(r"^\s*(?:[•◦▪●‣*–—-]\s|\(?\d{1,3}[.)]\s|\(?[a-zA-Z][.)]\s)")
_SENTENCE_END = re.compile(r"[.!?…:][\"'”’)\]]*\s*$")


def normalize_text(text: str) -> str:
    """Canonical form used for dedupe and caching: spaces collapsed per line, blank-line runs kept as one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return out.strip()


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph (no newlines) into sentences at ``. ? !`` followed by space.

    No split after known abbreviations (e.g., Fig., et al.), single-letter initials, or before a
    lower-case continuation; decimals never split (no space after their point).
    """
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(paragraph):
        end_punct, nxt = m.end(2), m.end(3)
        if nxt >= len(paragraph):
            break
        following = paragraph[nxt]
        if following.islower():
            continue
        if m.group(1) == ".":
            before = paragraph[start : m.start(1)].split()
            word = before[-1].lstrip("([\"'“‘").lower() if before else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
            if word in _NUMBER_ABBREVIATIONS and following.isdigit():
                continue
        sentence = paragraph[start:end_punct].strip()
        if sentence:
            out.append(sentence)
        start = nxt
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def split_blocks(text: str) -> tuple[list[str], list[str]]:
    """Split normalised text into blocks and the separators between them.

    Blank lines are paragraph breaks (``"\\n\\n"``); a line starting a list item keeps its line break
    (``"\\n"``); other single newlines are line wraps of the source layout and become spaces (a line
    ending in a hyphen is joined without one).
    """
    blocks: list[str] = []
    seps: list[str] = []
    for p_idx, para in enumerate(text.split("\n\n")):
        if p_idx:
            seps.append("\n\n")
        current = ""
        for l_idx, line in enumerate(para.split("\n")):
            line = line.strip()
            if l_idx and _LIST_START.match(line) and current:
                blocks.append(current)
                seps.append("\n")
                current = line
            elif not current:
                current = line
            elif current.endswith("-") and line[:1].islower():
                current += line
            else:
                current += " " + line
        blocks.append(current)
    return blocks, seps


def _pack(units: Iterable[tuple[str, int]], max_tokens: int) -> list[str]:
    """Greedily join (text, n_tokens) units with spaces into pieces of at most ``max_tokens`` tokens
    (a unit that is alone over the budget still forms its own piece)."""
    out: list[str] = []
    cur, cur_n = "", 0
    for text, n in units:
        if cur and cur_n + n > max_tokens:
            out.append(cur)
            cur, cur_n = "", 0
        cur = f"{cur} {text}" if cur else text
        cur_n += n
    if cur:
        out.append(cur)
    return out


def _split_long(sentence: str, n_tokens, max_tokens: int) -> list[str]:
    """Cut a sentence that exceeds ``max_tokens`` at clause marks, then at word boundaries."""
    for pattern in (r"(?<=[;:])\s+", r"(?<=,)\s+", r"\s+"):
        parts = [p for p in re.split(pattern, sentence) if p]
        if len(parts) > 1:
            break
    else:
        return [sentence]
    pieces = _pack(zip(parts, n_tokens(parts), strict=True), max_tokens)
    result: list[str] = []
    for piece in pieces:
        if len(pieces) > 1 and n_tokens([piece])[0] > max_tokens:
            result.extend(_split_long(piece, n_tokens, max_tokens))
        else:
            result.append(piece)
    return result


def chunk_block(block: str, n_tokens, max_tokens: int = DEFAULT_MAX_CHUNK_TOKENS) -> list[str]:
    """Sentences of one block packed greedily into chunks of at most ``max_tokens`` tokens, in order.

    A single sentence longer than the budget is cut at clause marks / words so nothing is dropped.
    """
    sentences = split_sentences(block)
    if not sentences:
        return []
    counts = n_tokens(sentences)
    units: list[tuple[str, int]] = []
    for s, n in zip(sentences, counts, strict=True):
        if n > max_tokens:
            pieces = _split_long(s, n_tokens, max_tokens)
            units.extend(zip(pieces, n_tokens(pieces), strict=True))
        else:
            units.append((s, n))
    return _pack(units, max_tokens)


# --------------------------------------------------------------------------------------------------
# Cache


class TranslationCache:
    """Persistent (model_id, src, tgt, text) → translation store in SQLite.

    WAL mode plus a busy timeout make it safe to share between threads (one connection per thread)
    and processes (several Prefect workers on one disk).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS translations (model_id TEXT NOT NULL, src TEXT NOT NULL, "
                "tgt TEXT NOT NULL, text TEXT NOT NULL, translation TEXT NOT NULL, "
                "PRIMARY KEY (model_id, src, tgt, text)) WITHOUT ROWID"
            )

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def get_many(self, model_id: str, src: str, tgt: str, texts: Iterable[str]) -> dict[str, str]:
        """Cached translations of those ``texts`` that are present."""
        texts = list(dict.fromkeys(texts))
        found: dict[str, str] = {}
        con = self._conn()
        for i in range(0, len(texts), 500):
            part = texts[i : i + 500]
            marks = ",".join("?" * len(part))
            rows = con.execute(
                f"SELECT text, translation FROM translations WHERE model_id=? AND src=? AND tgt=? "
                f"AND text IN ({marks})",
                (model_id, src, tgt, *part),
            )
            found.update(rows)
        return found

    def put_many(self, model_id: str, src: str, tgt: str, pairs: Iterable[tuple[str, str]]) -> None:
        """Store translations (last writer wins; entries are deterministic per model_id anyway)."""
        rows = [(model_id, src, tgt, t, tr) for t, tr in pairs]
        if not rows:
            return
        con = self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?)", rows)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


# --------------------------------------------------------------------------------------------------
# The pure stage function


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
    cache: TranslationCache | None = None,
    stats: TranslateStats | None = None,
    max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
) -> list[str]:
    """Translate all texts of a shard from ``src_iso`` to ``tgt_iso``; output aligned with input.

    Identical texts (after whitespace normalisation) and identical sentence chunks are translated once;
    the cache makes that hold across runs too. Empty/whitespace-only texts are returned unchanged.
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

    norm = [normalize_text(t) if t and t.strip() else "" for t in texts]
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
