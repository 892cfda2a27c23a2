"""Bundled fonts: manifest integrity, per-language chains, and real CLDR text fully covered by each chain."""

from __future__ import annotations

import shutil
from pathlib import Path

import babel
import pytest
from PIL import ImageFont

from tasks import languages
from tasks.languages import ALL_LANGS
from tasks.render import fonts


def cldr_text(iso: str) -> str:
    """Real text in the language: CLDR territory, month and weekday names (Sanskrit has few; some exist)."""
    loc = babel.Locale.parse(languages.get(iso).cldr_locale)
    parts = [loc.territories.get(c) for c in ("IN", "FR", "JP", "BR", "DE", "US", "CN")]
    parts += list(loc.months["format"]["wide"].values())[:2] + list(loc.days["format"]["wide"].values())[:2]
    words = [p for p in parts if p]
    assert len(words) >= 6, f"too little CLDR text for {iso}"
    return " ".join(words)


def test_verify_fonts_passes_on_bundled_fonts() -> None:
    specs = fonts.verify_fonts()
    keys = {s.key for s in specs}
    assert {k for lang in languages.LANGUAGES.values() for k in lang.fonts} <= keys
    for spec in specs:
        assert spec.regular_path.is_file() and spec.bold_path.is_file()
        assert len(spec.regular_sha256) == 64 and spec.license == "OFL-1.1"


def test_verify_fonts_reports_a_corrupted_file(tmp_path: Path) -> None:
    src = fonts.load_manifest()["noto-sans-gurmukhi"]
    shutil.copy(src.regular_path, tmp_path / src.regular_path.name)
    (tmp_path / src.bold_path.name).write_bytes(src.bold_path.read_bytes()[:-10] + b"0123456789")
    (tmp_path / "fonts.toml").write_text(
        f"""[[font]]
key = "noto-sans-gurmukhi"
family = "Noto Sans Gurmukhi"
scripts = ["Guru"]
index = 0
regular = {{ file = "{src.regular_path.name}", sha256 = "{src.regular_sha256}" }}
bold = {{ file = "{src.bold_path.name}", sha256 = "{src.bold_sha256}" }}
""",
        encoding="utf-8",
    )
    with pytest.raises(fonts.FontError) as info:
        fonts.verify_fonts(tmp_path / "fonts.toml")
    msg = str(info.value)
    assert "sha256 mismatch for NotoSansGurmukhi-Bold.ttf" in msg
    assert "NotoSansGurmukhi-Regular.ttf" not in msg  # the intact file passes
    (tmp_path / src.regular_path.name).unlink()
    fonts.load_manifest.cache_clear()
    with pytest.raises(fonts.FontError, match="missing file"):
        fonts.verify_fonts(tmp_path / "fonts.toml")


@pytest.mark.parametrize("iso", ALL_LANGS)
def test_font_chain_follows_language_registry(iso: str) -> None:
    lang = languages.get(iso)
    for bold in (False, True):
        chain = fonts.font_chain(iso, bold=bold)
        assert [f.key for f in chain] == list(lang.fonts)
        assert all(f.bold is bold and f.path.is_file() for f in chain)
    assert chain[-1].key == "noto-sans"  # Latin fallback last


def test_cjk_faces_pick_the_right_collection_member() -> None:
    from fontTools.ttLib import TTFont

    for iso, family in (("ja", "Noto Sans CJK JP"), ("ko", "Noto Sans CJK KR"), ("zh", "Noto Sans CJK SC")):
        for bold in (False, True):
            face = fonts.font_chain(iso, bold=bold)[0]
            with TTFont(str(face.path), fontNumber=face.index, lazy=True) as tt:
                assert tt["name"].getDebugName(1) == family


@pytest.mark.parametrize("iso", ALL_LANGS)
def test_cldr_text_is_fully_covered(iso: str) -> None:
    text = cldr_text(iso)
    assert fonts.uncovered_chars(text, iso) == []
    assert fonts.uncovered_chars(text, iso, bold=True) == []
    # the primary font really carries the script (not everything falling back to Latin)
    primary = fonts.font_chain(iso)[0]
    letters = [c for c in text if c.isalpha()]
    assert sum(fonts.covers(primary, c) for c in letters) == len(letters)


def test_uncovered_chars_finds_missing_glyphs_and_ignores_format_chars() -> None:
    assert fonts.uncovered_chars("नमस्ते 😀 दुनिया", "hi") == ["😀"]
    assert fonts.uncovered_chars("Ꮳ abc Ꮳ", "en") == ["Ꮳ"]  # Cherokee, reported once
    # whitespace, ZWJ/ZWNJ, bidi marks and controls need no glyph
    assert fonts.uncovered_chars("क्\u200dष\u200c \t\n\u200f\u2066x\u2069\x07", "hi") == []
    # Indic fonts have no Latin letters; the chain's Noto Sans covers them
    deva = fonts.font_chain("hi")[0]
    assert not fonts.covers(deva, "P") and fonts.uncovered_chars("हिन्दी PDF", "hi") == []


def test_pil_fonts_are_cached_and_use_raqm() -> None:
    face = fonts.font_chain("ar")[0]
    a, b = fonts.pil_font(face, 20), fonts.pil_font(face, 20)
    assert a is b and fonts.pil_font(face, 21) is not a
    assert a.layout_engine == ImageFont.Layout.RAQM
    cjk = fonts.font_chain("ko")[0]
    assert fonts.pil_font(cjk, 16).getname()[0] == "Noto Sans CJK KR"
