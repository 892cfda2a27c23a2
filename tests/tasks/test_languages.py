import re

import pytest

from tasks import languages
from tasks.render.fonts import load_manifest

EXPECTED = [
    "en",
    "es",
    "fr",
    "de",
    "it",
    "hi",
    "mr",
    "sa",
    "kn",
    "te",
    "ta",
    "ml",
    "zh",
    "ja",
    "ko",
    "ar",
    "bn",
    "gu",
    "or",
    "pa",
    "ru",
    "th",
]


def test_registry_has_the_22_languages_in_order():
    assert list(languages.ALL_LANGS) == EXPECTED


def test_registry_fields_are_consistent():
    font_keys = set(load_manifest())
    floreses = [lang.flores for lang in languages.LANGUAGES.values()]
    assert len(set(floreses)) == 22
    for lang in languages.LANGUAGES.values():
        assert re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang.flores), lang.flores
        assert lang.direction in ("ltr", "rtl")
        assert lang.fonts and set(lang.fonts) <= font_keys, lang.iso
    assert [iso for iso, lang in languages.LANGUAGES.items() if lang.direction == "rtl"] == ["ar"]


def test_parse_langs_splits_known_and_unknown():
    known, unknown = languages.parse_langs("hi, ar,xx,hi,en,zz")
    assert known == ["hi", "ar"]
    assert unknown == ["xx", "zz"]
    assert languages.parse_langs("all")[0] == EXPECTED[1:]


def test_get_unknown_language_is_a_clear_error():
    with pytest.raises(languages.UnknownLanguageError, match="unknown language code 'xx'"):
        languages.get("xx")
