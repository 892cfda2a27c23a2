"""Query filters: script and language id, length, duplicates, copying, prompt injection."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import regex

from tasks import languages
from tasks.queries.base import STAGE, GeneratedQuery
from tasks.queries.text import (
    _uses_words,
    injected_payloads,
    instruction_phrases,
    length_units,
    normalize,
    script_share,
    tokens,
)
from tasks.schema import Reject, RejectReason


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
    # engines (generator "<engine>:<model>") whose queries are spans of the page by design, whatever the
    # kind: the extractive engine's composed queries are a caption span beside a crop
    copy_exempt_engines: tuple[str, ...] = ("extractive",)
    # one query text per language across the batch (same text, two pages: ambiguous); a composed query
    # is keyed on its text and its crop (same question about two different crops: two queries)
    dedup: bool = True
    language_id: str = "langid"  # "script": the script check only; "langid": also langid.py (same-script)
    langid_min_confidence: float = 0.95  # drop when another same-script language has this probability
    langid_min_units: float = 4.0  # shorter queries (keywords: ambiguous) are judged by script only
    # scripts whose languages langid tells apart reliably: Latin (en es fr de it). Not Devanagari: it
    # scored a plain Hindi sentence as Marathi at 0.99, and it has no Sanskrit.
    langid_scripts: tuple[str, ...] = ("Latn",)
    # Devanagari (hi / mr / sa) is told apart by closed-class marker words instead (devanagari_markers):
    # a query is dropped when it holds at least this many markers of one other language and none of its own.
    deva_min_markers: int = 2

    def __post_init__(self) -> None:
        if self.language_id not in ("script", "langid"):
            raise ValueError(f"language_id must be 'script' or 'langid', got {self.language_id!r}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None) -> FilterConfig:
        cfg = dict(cfg or {})
        for key in ("copy_exempt_kinds", "copy_exempt_engines", "langid_scripts"):
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


# Closed-class words (copulas, postpositions, conjunctions, pronouns) that occur in one of the three
# Devanagari languages and not (or hardly) in the other two; words shared by two (ने, की, ही, होते, न)
# are left out. Sanskrit also marks itself by words ending in a virama or a visarga (विशालम्, सः).
_DEVA_MARKER_WORDS = {
    "hi": "है हैं था थे थी का के में और से को नहीं यह वह ये वे भी लिए पर होता होती गया गई क्या कितना "
    "कितने कितनी कौन कहाँ कब किस",
    "mr": "आहे आहेत आणि नाही मध्ये साठी केले करणे आपण असे असते म्हणून पण किती कोण कुठे केव्हा कोणत्या झाले",
    "sa": "अस्ति सन्ति इति एव अपि च तु हि वा सः तत् एतत् इदम् अहम् त्वम् वयम् भवति भवन्ति कथम् किम् "
    "यतः तथा यथा तस्य अस्य तेषाम् अत्र तत्र कुत्र कदा कति",
}
_DEVA_MARKERS: dict[str, frozenset[str]] = {
    iso: frozenset(w.split()) for iso, w in _DEVA_MARKER_WORDS.items()
}
_DEVA_MR_GENITIVE = regex.compile(r"(?:च्या|[^्]च[ाीे])$")  # कंपनीच्या, भारताची (not Hindi बच्चे, कच्चा)


def devanagari_markers(text: str) -> dict[str, int]:
    """Marker counts per Devanagari language (hi, mr, sa) in ``text``: a transparent, offline language id.

    langid.py has no Sanskrit and confuses Hindi with Marathi on short text; closed-class words do not.
    Marathi also counts genitive forms and words with ळ, Sanskrit words ending in a virama or visarga.
    """
    counts = dict.fromkeys(_DEVA_MARKERS, 0)
    for word in regex.findall(r"[\p{Devanagari}]+", text):
        for iso, words in _DEVA_MARKERS.items():
            counts[iso] += word in words
        if len(word) > 3 and (_DEVA_MR_GENITIVE.search(word) or "ळ" in word):  # ळ: Marathi's retroflex ḷa
            counts["mr"] += 1
        if len(word) > 2 and word[-1] in "्ः" and word not in _DEVA_MARKERS["sa"]:
            counts["sa"] += 1
    return counts


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
    # 3c. Devanagari: hi / mr / sa by marker words (langid has no Sanskrit, see devanagari_markers)
    if cfg.language_id == "langid" and lang.script == "Deva" and units >= cfg.langid_min_units:
        counts = devanagari_markers(text)
        other = max((c, iso) for iso, c in counts.items() if iso != lang.iso)
        if counts.get(lang.iso, 0) == 0 and other[0] >= cfg.deva_min_markers:
            return (
                RejectReason.QUERY_WRONG_LANGUAGE,
                f"{other[0]} {other[1]} marker words, none of {lang.iso}",
            )
    # 4. verbatim copy (generative kinds of generative engines only)
    if q.kind not in cfg.copy_exempt_kinds and q.generator.split(":", 1)[0] not in cfg.copy_exempt_engines:
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
    seen: set[tuple[str, str, str]] = set()
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
            crop = hashlib.sha256(q.image_png).hexdigest() if q.image_png else ""
            dkey = (q.query_lang, normalize(q.query), crop)
            if dkey in seen:
                what = "query text and crop" if crop else "query text"
                verdict = (RejectReason.QUERY_DUPLICATE, f"same {what} already kept for this language")
            seen.add(dkey)
        if verdict is None:
            kept.append(q)
        else:
            reason, msg = verdict
            rejects.append(
                Reject(STAGE, q.page_id, reason, f"{q.kind} {q.query[:80]!r}: {msg}", lang=q.query_lang)
            )
    return kept, rejects
