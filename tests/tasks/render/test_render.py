"""The font-aware renderer on real CLDR text in all 22 languages: shaping, fallback, bidi, fit, PDF layer."""

from __future__ import annotations

import unicodedata
from functools import cache
from pathlib import Path

import babel
import numpy as np
import pypdfium2 as pdfium
import pytest
import regex
import uharfbuzz as hb
from PIL import Image, ImageChops, ImageDraw, ImageFont

from tasks import languages
from tasks.languages import ALL_LANGS
from tasks.render import fonts
from tasks.render.config import BoxRender, RenderConfig, assert_raqm
from tasks.render.pdf import page_pdf
from tasks.render.png import contrast_ratio, render_page, render_text_in_box
from tasks.schema import Region, RejectReason

CFG = RenderConfig()
BOX = (20.0, 15.0, 440.0, 125.0)


def cldr_text(iso: str) -> str:
    """Real text in the language: CLDR territory, month and weekday names (Sanskrit has few; some exist)."""
    loc = babel.Locale.parse(languages.get(iso).cldr_locale)
    parts = [loc.territories.get(c) for c in ("IN", "FR", "JP", "BR", "DE", "US", "CN")]
    parts += list(loc.months["format"]["wide"].values())[:2] + list(loc.days["format"]["wide"].values())[:2]
    return " ".join(p for p in parts if p)


@cache
def _hb_font(path: Path, index: int) -> hb.Font:
    return hb.Font(hb.Face(hb.Blob.from_file_path(str(path)), index))


def _glyph_ids(text: str, face: fonts.FontFace, rtl: bool) -> list[int]:
    buf = hb.Buffer()
    buf.add_str(text)
    buf.guess_segment_properties()
    buf.direction = "rtl" if rtl else "ltr"
    hb.shape(_hb_font(face.path, face.index), buf, {})
    return [g.codepoint for g in buf.glyph_infos]


def _assert_no_notdef(r: BoxRender) -> None:
    for line in r.lines:
        for run in line.runs:
            gids = _glyph_ids(run.text, run.face, run.rtl)
            assert gids and 0 not in gids, f".notdef in run {run.text!r} set in {run.face.name}"


def _white(w: int = 460, h: int = 140) -> Image.Image:
    return Image.new("RGB", (w, h), (255, 255, 255))


def _inside(bbox: tuple[int, int, int, int], box: tuple[float, ...]) -> bool:
    return bbox[0] >= int(box[0]) and bbox[1] >= int(box[1]) and bbox[2] <= box[2] and bbox[3] <= box[3]


def test_raqm_is_available() -> None:
    assert_raqm()


def test_config_hash_is_stable_and_round_trips() -> None:
    cfg = RenderConfig(min_font_px=8, bold_labels=["title", "header"])  # type: ignore[arg-type]
    assert cfg.bold_labels == ("title", "header")
    again = RenderConfig(**cfg.to_dict())  # type: ignore[arg-type]
    assert again == cfg and again.hash() == cfg.hash()
    assert RenderConfig().hash() != cfg.hash() and len(cfg.hash()) == 16
    with pytest.raises(ValueError):
        RenderConfig(min_font_px=20, max_font_px=10)


@pytest.mark.parametrize("iso", ALL_LANGS)
def test_renders_real_text_in_every_language(iso: str) -> None:
    text = cldr_text(iso)
    original = _white()
    image = original.copy()
    r = render_text_in_box(image, BOX, text, iso, CFG)
    assert r.ok, r.message
    assert CFG.min_font_px <= r.font_px <= CFG.max_font_px
    # every character of the text is drawn exactly once, in logical order, over the lines
    assert regex.sub(r"\s", "", "".join(line.text for line in r.lines)) == regex.sub(r"\s", "", text)
    faces = {run.face for line in r.lines for run in line.runs}
    assert fonts.font_chain(iso)[0] in faces  # the script's own font, not only the Latin fallback
    for face in faces:
        assert fonts.pil_font(face, r.font_px).layout_engine == ImageFont.Layout.RAQM
    _assert_no_notdef(r)
    changed = ImageChops.difference(original, image).getbbox()
    assert changed is not None, "nothing was drawn"
    assert _inside(changed, BOX), f"ink {changed} outside box {BOX}"
    assert r.ink_bbox is not None and _inside(r.ink_bbox, BOX)
    dark = (np.asarray(image.convert("L"))[15:125, 20:440] < 128).sum()
    assert dark > 300  # the box really got text-sized ink
    # RTL lines are right-aligned, LTR lines left-aligned
    x0, x1 = r.ink_bbox[0] - BOX[0], BOX[2] - r.ink_bbox[2]
    if languages.get(iso).direction == "rtl":
        assert x1 < x0 and x1 <= 6
    else:
        assert x0 <= 6


def _ink_segments(image: Image.Image, box: tuple[float, ...]) -> list[tuple[int, int]]:
    """Horizontal extents of ink separated by the widest blank column gap (the space between words)."""
    a = np.asarray(image.convert("L"))[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] < 160
    cols = np.flatnonzero(a.any(axis=0))
    gaps = np.diff(cols)
    k = int(np.argmax(gaps))
    return [(int(cols[0]), int(cols[k])), (int(cols[k + 1]), int(cols[-1]))]


@pytest.mark.parametrize("first_long", [True, False])
def test_arabic_first_logical_word_is_on_the_right(first_long: bool) -> None:
    long_word, short_word = "مستقبلي", "في"  # all letters join: no gaps inside the words
    text = f"{long_word} {short_word}" if first_long else f"{short_word} {long_word}"
    image = _white()
    r = render_text_in_box(image, BOX, text, "ar", CFG)
    assert r.ok and len(r.lines) == 1
    _assert_no_notdef(r)
    (l0, l1), (r0, r1) = _ink_segments(image, BOX)
    left_w, right_w = l1 - l0, r1 - r0
    if first_long:
        assert right_w > 2 * left_w  # long first word drawn on the right
    else:
        assert left_w > 2 * right_w


def test_arabic_with_latin_and_digits_keeps_ltr_groups_in_order() -> None:
    image = _white()
    r = render_text_in_box(image, BOX, "تقرير PDF 2024 جديد", "ar", CFG)
    assert r.ok and len(r.lines) == 1
    _assert_no_notdef(r)
    runs = r.lines[0].runs  # visual order, left to right
    texts = [run.text.strip() for run in runs if run.text.strip()]
    assert texts == ["جديد", "PDF 2024", "تقرير"]
    latin = next(run for run in runs if "PDF" in run.text)
    assert latin.face.key == "noto-sans" and not latin.rtl
    assert all(run.rtl for run in runs if run is not latin)


def test_latin_inside_indic_falls_back_without_notdef() -> None:
    image = _white()
    r = render_text_in_box(image, BOX, "हिन्दी दस्तावेज़ PDF 2024 (क्षेत्र)", "hi", CFG)
    assert r.ok
    _assert_no_notdef(r)
    by_face = {run.face.key: run.text for line in r.lines for run in line.runs}
    assert "PDF 2024" in by_face["noto-sans"] and "क्षेत्र" in by_face["noto-sans-devanagari"]
    # shaping really happened: the conjunct क्ष becomes fewer glyphs than code points
    deva = fonts.font_chain("hi")[0]
    assert len(_glyph_ids("क्ष", deva, False)) < 3


def test_text_that_does_not_fit_fails_and_leaves_image_untouched() -> None:
    original = _white()
    image = original.copy()
    long = " ".join([cldr_text("de")] * 5)
    r = render_text_in_box(image, (10, 10, 70, 30), long, "de", CFG)
    assert not r.ok and r.reason == RejectReason.TEXT_DOES_NOT_FIT
    assert image.tobytes() == original.tobytes()


@pytest.mark.parametrize("text", ["Hello 😀", "ᏣᎳᎩ syllabary"])
def test_missing_glyph_is_a_coverage_failure(text: str) -> None:
    original = _white()
    image = original.copy()
    r = render_text_in_box(image, BOX, text, "en", CFG)
    assert not r.ok and r.reason == RejectReason.GLYPH_COVERAGE and "U+" in r.message
    assert image.tobytes() == original.tobytes()


def _on_segment(pixels: np.ndarray, a: tuple[int, ...], b: tuple[int, ...], tol: float = 12.0) -> np.ndarray:
    """Whether each pixel is (close to) a blend of colours a and b (anti-aliased text over background)."""
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    d = b_ - a_
    t = np.clip(((pixels - a_) @ d) / (d @ d), 0, 1)
    return np.linalg.norm(pixels - (a_ + t[:, None] * d), axis=1) <= tol


def test_coloured_background_is_filled_and_text_contrasts() -> None:
    blue = (30, 60, 120)
    image = Image.new("RGB", (460, 140), blue)
    ImageDraw.Draw(image).rectangle((60, 40, 200, 60), fill=(60, 90, 150))  # faint old "ink"
    r = render_text_in_box(image, BOX, cldr_text("ru"), "ru", CFG)
    assert r.ok and r.background == blue
    assert r.color == (255, 255, 255)  # the faint ink lacks contrast: white is chosen
    box = np.asarray(image, float)[15:125, 20:440].reshape(-1, 3)
    assert _on_segment(box, blue, (255, 255, 255)).mean() > 0.999  # old ink erased, only bg + new text
    assert (np.abs(box - blue).max(axis=1) > 100).sum() > 300


def test_original_ink_colour_is_kept_when_it_contrasts() -> None:
    beige, red = (245, 235, 210), (150, 20, 20)
    image = Image.new("RGB", (460, 140), beige)
    draw = ImageDraw.Draw(image)
    for y in range(25, 120, 20):  # lines of "old text" in dark red
        draw.rectangle((30, y, 420, y + 8), fill=red)
    old_red = (np.abs(np.asarray(image, int)[15:125, 20:440] - red).max(axis=2) < 30).mean()
    r = render_text_in_box(image, BOX, cldr_text("ta"), "ta", CFG)
    assert r.ok and r.background == beige and r.color is not None
    assert max(abs(c - e) for c, e in zip(r.color, red, strict=True)) <= 10
    assert contrast_ratio(r.color, beige) >= CFG.min_contrast
    box = np.asarray(image, float)[15:125, 20:440].reshape(-1, 3)
    assert _on_segment(box, beige, red, tol=20).mean() > 0.999
    new_red = (np.abs(box - red).max(axis=1) < 30).mean()
    assert new_red < old_red / 2  # the old text was erased, not drawn over


@pytest.mark.parametrize("iso", ["zh", "ja"])
def test_cjk_breaks_by_character_but_never_before_closing_punctuation(iso: str) -> None:
    loc = babel.Locale.parse(languages.get(iso).cldr_locale)
    names = [loc.territories[c] for c in ("IN", "FR", "JP", "BR", "DE", "US", "CN", "EG", "MX", "CA")]
    text = "、".join(names) + "。" + "，".join(names) + "。"
    image = _white(200, 400)
    r = render_text_in_box(image, (5, 5, 120, 395), text, iso, RenderConfig(max_font_px=14))
    assert r.ok and len(r.lines) >= 4
    assert "".join(line.text for line in r.lines) == text
    for line in r.lines[1:]:
        assert line.text[0] not in "、。，）」", f"line starts with closing punctuation: {line.text!r}"
    _assert_no_notdef(r)


def test_thai_breaks_between_grapheme_clusters() -> None:
    text = cldr_text("th").replace(" ", "")  # no spaces at all: only cluster breaks are possible
    image = _white(200, 400)
    r = render_text_in_box(image, (5, 5, 150, 395), text, "th", RenderConfig(max_font_px=18))
    assert r.ok and len(r.lines) >= 3
    assert "".join(line.text for line in r.lines) == text
    for line in r.lines:
        assert unicodedata.category(line.text[0])[0] != "M", f"line starts with a mark: {line.text!r}"
        assert line.text[-1] not in "เแโใไ"  # a leading vowel stays with its consonant
    _assert_no_notdef(r)


def test_render_page_renders_translatable_regions_and_reports_failures() -> None:
    original = Image.new("RGB", (500, 400), (250, 250, 250))
    ImageDraw.Draw(original).rectangle((20, 300, 200, 380), fill=(10, 120, 10))  # a "figure"
    regions = [
        Region("title", (20, 10, 480, 60), 0.9, "भारत गणराज्य", True),
        Region("text", (20, 80, 480, 200), 0.9, cldr_text("hi"), True),
        Region("figure", (20, 300, 200, 380), 0.9, "", False),
        Region("caption", (220, 300, 480, 330), 0.8, "चित्र 😀", True),  # no font has the emoji
        Region("footer", (20, 220, 480, 240), 0.5, "   ", True),  # nothing to render
    ]
    before = original.tobytes()
    page = render_page(original, regions, "hi", CFG)
    assert original.tobytes() == before  # the input is copied, never mutated
    assert [r.rendered for r in page.regions] == [True, True, False, False, False]
    assert [(f.index, f.reason) for f in page.failures] == [(3, RejectReason.GLYPH_COVERAGE)]
    assert not page.ok
    out = np.asarray(page.image)
    np.testing.assert_array_equal(out[300:380, 20:200], np.asarray(original)[300:380, 20:200])
    np.testing.assert_array_equal(out[300:330, 220:480], np.asarray(original)[300:330, 220:480])
    title, body = page.boxes[0], page.boxes[1]
    assert title.ok and body.ok and title.font_px > body.font_px
    # titles are set in the bold face
    assert all(run.face.bold for line in title.lines for run in line.runs)
    assert not any(run.face.bold for line in body.lines for run in line.runs)


def _norm(s: str) -> str:
    return regex.sub(r"\s+", "", unicodedata.normalize("NFKC", s))


@pytest.mark.parametrize("iso", ["hi", "ar", "zh"])
def test_pdf_text_layer_round_trips(iso: str) -> None:
    # pdfium's own bidi reads a Latin+digit group ("PDF 2024") or Arabic-Indic digits inside an RTL
    # line back in the wrong order (the drawing follows the Unicode bidi algorithm): ar gets brackets
    # and a Latin word instead, which pdfium does read back exactly (a bracketed Latin word is not).
    extra = " «القاهرة» (مصر) PDF" if iso == "ar" else " PDF 2024 (v1.2)"
    image = Image.new("RGB", (600, 320), (255, 250, 240))
    ImageDraw.Draw(image).rectangle((30, 250, 200, 300), fill=(200, 40, 40))  # a figure kept as pixels
    regions = [
        Region("title", (20, 20, 580, 70), 0.9, cldr_text(iso)[:24].strip(), True),
        Region("text", (20, 90, 580, 230), 0.9, cldr_text(iso) + extra, True),
        Region("figure", (30, 250, 200, 300), 0.9, "", False),
    ]
    page = render_page(image, regions, iso, CFG)
    assert page.ok
    data = page_pdf(image, page.regions, iso, CFG)
    pdf = pdfium.PdfDocument(data)
    assert len(pdf) == 1
    w, h = pdf[0].get_size()
    assert (round(w), round(h)) == (450, 240)  # 600x320 px at 96 dpi
    got = pdf[0].get_textpage().get_text_range()
    assert _norm(got) == _norm(regions[0].text + regions[1].text)
    if iso != "ar":  # LTR text comes back exactly (ActualText), not as private-use glyph codes
        assert not any(0xE000 <= ord(c) <= 0xF8FF for c in got)
    # the page image lies underneath: the figure is still there, the text boxes were erased
    shown = np.asarray(pdf[0].render(scale=96 / 72).to_pil().convert("RGB"), int)
    assert np.abs(shown[270, 100] - (200, 40, 40)).max() < 20


_CJK_PDF = """
import hashlib, sys
import fontTools.ttLib.tables._h_e_a_d as head_table
head_table.timestampNow = lambda: int(sys.argv[1])  # this process's "now" (seconds since 1904)
from PIL import Image
from tasks.render.config import RenderConfig
from tasks.render.pdf import page_pdf
from tasks.render.png import render_page
from tasks.schema import Region
image = Image.new("RGB", (600, 200), (255, 255, 255))
regions = [Region("text", (20, 20, 580, 180), 0.9, "中文文本 北京 上海 一月 二月", True)]
page = render_page(image, regions, "zh", RenderConfig())
print(hashlib.sha256(page_pdf(image, page.regions, "zh", RenderConfig())).hexdigest())
"""


def test_cjk_pdf_bytes_do_not_depend_on_the_clock() -> None:
    """Noto CJK faces are subset into the PDF; fontTools stamps a saved font with the current time unless
    told not to, so the same page's PDF differed from one run (process) to the next."""
    import subprocess
    import sys

    digests = {
        subprocess.run(
            [sys.executable, "-c", _CJK_PDF, str(stamp)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for stamp in (3_000_000_000, 3_900_000_000)
    }
    assert len(digests) == 1 and len(digests.pop()) == 64
