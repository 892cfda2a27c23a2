"""Bidi levels and visual order of mixed RTL lines: python-bidi (Rust unicode-bidi) checked against FriBiDi.

FriBiDi (the system library raqm links, so it is always here when rendering works) is an independent
implementation of the same algorithm (UAX #9): it is the reference for our per-character levels.
``bidi.get_display`` is the reference for the visual order our line layout produces.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import random
import unicodedata
from functools import cache

import pytest
from bidi import get_display
from bidi.mirror import MIRRORED

from tasks import languages
from tasks.render import fonts
from tasks.render.pdf import _mirror
from tasks.render.text_layout import _uba_levels, bidi_levels, split_runs

_FRIBIDI_PAR_LTR, _FRIBIDI_PAR_RTL = 0x110, 0x111  # FRIBIDI_TYPE_LTR / FRIBIDI_TYPE_RTL


@cache
def _fribidi() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("fribidi") or "libfribidi.so.0")
    lib.fribidi_get_par_embedding_levels_ex.restype = ctypes.c_int8  # FriBidiLevel: max level + 1, 0 = error
    return lib


def fribidi_levels(text: str, rtl_base: bool) -> list[int]:
    """FriBiDi's resolved levels for one paragraph with the given base direction (rules X1–I2, and L1)."""
    lib, n = _fribidi(), len(text)
    chars = (ctypes.c_uint32 * n)(*map(ord, text))
    types, brackets, levels = (ctypes.c_uint32 * n)(), (ctypes.c_uint32 * n)(), (ctypes.c_int8 * n)()
    lib.fribidi_get_bidi_types(chars, n, types)
    lib.fribidi_get_bracket_types(chars, n, types, brackets)
    par = ctypes.c_uint32(_FRIBIDI_PAR_RTL if rtl_base else _FRIBIDI_PAR_LTR)
    assert lib.fribidi_get_par_embedding_levels_ex(types, brackets, n, ctypes.byref(par), levels) > 0
    return list(levels)


# Arabic / Hebrew lines with digits (European and Arabic-Indic), separators, terminators, brackets and
# Latin; none ends in whitespace (rule L1 resets trailing whitespace per line; the layout strips lines).
MIXED = [
    "١٢٣-٤٥٦",  # W4 does not join Arabic numbers over ES; W6 makes it ON, so the line reads ٤٥٦-١٢٣
    "ABC 1,234.5 ابجد",  # W4 joins 1,234.5; W7 makes it L after ABC
    "(abc) عربي [1]",  # N0: brackets take the embedding direction
    "عربي: 12% - test.",  # W2: 12 is AN after Arabic letters, so % is not a terminator of it (W5 vs W6)
    "تقرير PDF 2024 جديد",
    "«القاهرة» (مصر) PDF",
    "الهند الصين PDF 2024 (v1.2)",  # N0: the closing bracket stays with the Latin group
    "عربي 123-456 نص",
    "السعر $5 أو 10€ أو ٣٪",
    "عَرَبِيّ (نص) a+b=c",  # harakat (NSM) take the class of their base letter (W1)
    "شلوم ١٫٥ و 1.5 و 1/2",
    "שלום 123-456 עולם",  # Hebrew is R, not AL: 123-456 stays EN and W4 joins it
    "עברית (abc) 12% [x] סוף",
    "ב (c) d",
]


@pytest.mark.parametrize("text", MIXED)
@pytest.mark.parametrize("rtl_base", [True, False])
def test_levels_match_fribidi_on_mixed_lines(text: str, rtl_base: bool) -> None:
    assert bidi_levels(text, rtl_base) == fribidi_levels(text, rtl_base)


def test_levels_where_weak_and_bracket_rules_matter() -> None:
    # UAX #9 by hand: letters R/AL at 1, L and numbers at 2 in an RTL paragraph
    assert bidi_levels("١٢٣-٤٥٦", True) == [2, 2, 2, 1, 2, 2, 2]
    assert bidi_levels("ABC 1,234.5 ابجد", True) == [2] * 11 + [1] * 5
    assert bidi_levels("(abc) عربي [1]", True) == [1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1]
    assert bidi_levels("عربي: 12% - test.", True) == [1] * 6 + [2, 2] + [1] * 4 + [2] * 4 + [1]
    assert bidi_levels("שלום 123-456 עולם", True) == [1] * 5 + [2] * 7 + [1] * 5
    assert bidi_levels("عربي 123-456", True) == [1] * 5 + [2, 2, 2, 1, 2, 2, 2]
    assert bidi_levels("PDF 2024 (v1.2)", True) == [2] * 15  # the bracket pair encloses L, after L
    assert bidi_levels("ب (c) d", True) == [1, 1, 1, 2, 1, 1, 2]  # the pair follows R: embedding direction


def test_levels_match_fribidi_on_random_mixed_strings() -> None:
    rng = random.Random(22)
    pool = list("ابجد שלום ١٢٣ ۴۵ 12 abc .,-+%$#°()[]{}«»/:")
    for _ in range(1500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 16))).rstrip()
        for rtl_base in (True, False):
            assert bidi_levels(text, rtl_base) == fribidi_levels(text, rtl_base), (text, rtl_base)


def test_pure_ltr_fast_path_agrees_with_the_library() -> None:
    for text in ["PDF 2024 (v1.2)", "हिन्दी दस्तावेज़ 12%", "印度 法国 1月", "a-b, c."]:
        assert bidi_levels(text, False) == [0] * len(text) == list(_uba_levels(text, False))
    # explicit controls leave the fast path: RLO makes the following Latin right-to-left
    assert bidi_levels("a\u202eb", False) == list(_uba_levels("a\u202eb", False))
    assert bidi_levels("a\u202eb", False)[2] == 1
    assert bidi_levels("", True) == []


def _visual(text: str) -> str:
    """Our layout's visual order as one string: runs left to right, each RTL run's characters reversed."""
    chain = fonts.font_chain("ar")
    runs = split_runs(text, languages.get("ar"), chain)
    return "".join(t[::-1] if level % 2 else t for t, _face, level in runs)


@pytest.mark.parametrize("text", MIXED)
def test_visual_order_matches_get_display(text: str) -> None:
    # get_display (unicode-bidi's reorder_line) applies no mirroring (L4), and neither does this string
    assert _visual(text) == get_display(text, base_dir="R")


def test_visual_order_of_the_named_lines() -> None:
    assert _visual("١٢٣-٤٥٦") == "٤٥٦-١٢٣"
    assert _visual("ABC 1,234.5 ابجد") == "دجبا ABC 1,234.5"
    assert _visual("(abc) عربي [1]") == "]1[ يبرع )abc("  # drawn mirrored by the shaper: [1] عربي (abc)
    assert _visual("عربي: 12% - test.") == ".test - %12 :يبرع"
    assert _visual("שלום 123-456 עולם") == "םלוע 123-456 םולש"


def test_mirroring_uses_unicode_bidi_mirroring_glyphs() -> None:
    for ch, mate in MIRRORED.items():  # python-bidi's BidiMirroring.txt pairs: mirrored chars, involution
        assert unicodedata.mirrored(ch) and MIRRORED[mate] == ch
    # a word with no RTL letter is shaped LTR by HarfBuzz, so its mirrored characters are swapped here
    assert _mirror("(abc) «x» ‹y› [1] {z} <w>") == ")abc( »x« ›y‹ ]1[ }z{ >w<"
    assert _mirror("x≤y ∈ ⁅a⁆") == "x≥y ∋ ⁆a⁅"  # beyond the ASCII brackets
    assert _mirror("(مصر) [1]") == "(مصر) ]1["  # a word with Arabic letters is shaped RTL: left alone
