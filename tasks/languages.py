"""The 22 languages m3dr synthesizes: the only place language facts live.

Each entry carries the ISO 639-1 code used everywhere in m3dr (shard names, query languages, qrels),
the FLORES-200 code NLLB-200 expects as source/target token, the ISO 15924 script, the writing
direction, how lines may be broken, and the font chain (keys of ``fonts/fonts.toml``) the renderer
walks per character, primary font first. Everything else imports from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["ltr", "rtl"]
# "word": break at spaces; "char": any character boundary (CJK); "cluster": grapheme clusters
# (Thai has no spaces between words).
LineBreak = Literal["word", "char", "cluster"]


@dataclass(frozen=True)
class Language:
    """One target language of the corpus."""

    iso: str
    name: str
    flores: str
    script: str
    direction: Direction
    line_break: LineBreak
    fonts: tuple[str, ...]
    cldr_locale: str
    tesseract: str = ""  # tesseract traineddata name (Debian package tesseract-ocr-<name, _ as ->)


_LATIN = ("noto-sans",)


# ISO 639-1 → tesseract language (ISO 639-2/T, Chinese by script), used by the render QA round trip.
_TESSERACT = {"zh": "chi_sim", "ja": "jpn", "ko": "kor", "ar": "ara", "or": "ori", "pa": "pan"}


def _lang(iso, name, flores, script, fonts, *, direction="ltr", line_break="word", cldr=None) -> Language:
    tess = _TESSERACT.get(iso, flores[:3])
    return Language(iso, name, flores, script, direction, line_break, tuple(fonts), cldr or iso, tess)


LANGUAGES: dict[str, Language] = {
    lang.iso: lang
    for lang in [
        _lang("en", "English", "eng_Latn", "Latn", _LATIN),
        _lang("es", "Spanish", "spa_Latn", "Latn", _LATIN),
        _lang("fr", "French", "fra_Latn", "Latn", _LATIN),
        _lang("de", "German", "deu_Latn", "Latn", _LATIN),
        _lang("it", "Italian", "ita_Latn", "Latn", _LATIN),
        _lang("hi", "Hindi", "hin_Deva", "Deva", ("noto-sans-devanagari", *_LATIN)),
        _lang("mr", "Marathi", "mar_Deva", "Deva", ("noto-sans-devanagari", *_LATIN)),
        _lang("sa", "Sanskrit", "san_Deva", "Deva", ("noto-sans-devanagari", *_LATIN)),
        _lang("kn", "Kannada", "kan_Knda", "Knda", ("noto-sans-kannada", *_LATIN)),
        _lang("te", "Telugu", "tel_Telu", "Telu", ("noto-sans-telugu", *_LATIN)),
        _lang("ta", "Tamil", "tam_Taml", "Taml", ("noto-sans-tamil", *_LATIN)),
        _lang("ml", "Malayalam", "mal_Mlym", "Mlym", ("noto-sans-malayalam", *_LATIN)),
        _lang(
            "zh",
            "Chinese (Simplified)",
            "zho_Hans",
            "Hans",
            ("noto-sans-cjk-sc", *_LATIN),
            line_break="char",
            cldr="zh_Hans",
        ),
        _lang("ja", "Japanese", "jpn_Jpan", "Jpan", ("noto-sans-cjk-jp", *_LATIN), line_break="char"),
        _lang("ko", "Korean", "kor_Hang", "Kore", ("noto-sans-cjk-kr", *_LATIN)),
        _lang("ar", "Arabic", "arb_Arab", "Arab", ("noto-sans-arabic", *_LATIN), direction="rtl"),
        _lang("bn", "Bengali", "ben_Beng", "Beng", ("noto-sans-bengali", *_LATIN)),
        _lang("gu", "Gujarati", "guj_Gujr", "Gujr", ("noto-sans-gujarati", *_LATIN)),
        _lang("or", "Odia", "ory_Orya", "Orya", ("noto-sans-oriya", *_LATIN)),
        _lang("pa", "Punjabi", "pan_Guru", "Guru", ("noto-sans-gurmukhi", *_LATIN)),
        _lang("ru", "Russian", "rus_Cyrl", "Cyrl", _LATIN),
        _lang("th", "Thai", "tha_Thai", "Thai", ("noto-sans-thai", *_LATIN), line_break="cluster"),
    ]
}

SOURCE_LANG = "en"
ALL_LANGS: tuple[str, ...] = tuple(LANGUAGES)


class UnknownLanguageError(ValueError):
    """A language code that is not one of the 22 supported ones."""


def get(iso: str) -> Language:
    """Look a language up by ISO code; raises UnknownLanguageError with the valid codes."""
    try:
        return LANGUAGES[iso]
    except KeyError:
        raise UnknownLanguageError(
            f"unknown language code {iso!r}; supported: {', '.join(ALL_LANGS)}"
        ) from None


def parse_langs(spec: str | list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split a user's language list ("hi,ar" or ["hi", "ar"] or "all") into (known, unknown).

    Unknown codes are returned rather than raised so a run can record them as rejects and go on.
    Order is preserved, duplicates and the source language are dropped.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s and s.strip()]
    if items == ["all"]:
        items = list(ALL_LANGS)
    known: list[str] = []
    unknown: list[str] = []
    for code in items:
        target = known if code in LANGUAGES else unknown
        if code not in target and code != SOURCE_LANG:
            target.append(code)
    return known, unknown
