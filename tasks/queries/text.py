"""Text helpers of the query stage: tokens, length units, script share, prompt injection."""

from __future__ import annotations

import unicodedata

import regex

from tasks import languages

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
