"""Render QA by OCR round trip: CER units, broken renders rejected, good renders kept.

These tests need tesseract and its language packs (``make`` installs them). Without them they fail
with the install hint: render QA runs in every synthesize, so a machine without it is misconfigured.
"""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from tasks import languages
from tasks.render import fonts, qa
from tasks.render.config import RenderConfig
from tasks.render.png import render_page
from tasks.schema import PageRecord, Region, RejectReason, encode_png
from tasks.translate.shard import _render_qa

ES = "La casa es grande y tiene un jardín con flores rojas."
HI = "यह घर बड़ा है और इसमें लाल फूलों वाला एक बगीचा है।"
BOX = (20.0, 20.0, 580.0, 110.0)


@pytest.fixture(scope="module", autouse=True)
def _tesseract() -> None:
    try:
        qa.assert_tesseract(["es", "hi"])
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"render QA tests need tesseract: {exc}")


def _page(text: str, lang: str, cfg: RenderConfig | None = None) -> tuple[Image.Image, list[Region]]:
    image = Image.new("RGB", (600, 130), "white")
    result = render_page(image, [Region("plain text", BOX, 0.9, text, True)], lang, cfg or RenderConfig())
    assert result.ok, result.failures
    return result.image, result.regions


# ---------------------------------------------------------------------------- CER units
def test_edit_distance() -> None:
    assert qa.edit_distance("kitten", "sitting") == 3
    assert qa.edit_distance("", "abc") == qa.edit_distance("abc", "") == 3
    assert qa.edit_distance("abc", "abc") == 0


def _levenshtein_reference(a: str, b: str) -> int:
    """The textbook dynamic programme (what render QA computed in pure Python before rapidfuzz)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_edit_distance_equals_the_dynamic_programme_on_every_script() -> None:
    """rapidfuzz counts code points as Python iterates them: the same integer as the textbook DP on
    random strings of Latin, Devanagari (combining signs), Arabic, Thai, CJK and astral-plane
    characters, of lengths 0..70 (so the CER, and every QA verdict, is unchanged)."""
    import random

    alphabet = "abcdé " + "कखगिीुं्" + "عربية" + "ภาษาไทย" + "中文字" + "𠀀𝔸😀"
    rng = random.Random(7)
    for _ in range(400):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randrange(71)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randrange(71)))
        if rng.random() < 0.3:  # near-duplicates, what OCR read-back mostly gives
            b = a[: len(a) // 2] + b[:5] + a[len(a) // 2 :]
        assert qa.edit_distance(a, b) == _levenshtein_reference(a, b), (a, b)


def test_cer_ignores_whitespace_and_format_characters() -> None:
    assert qa.cer("a b\nc", "abc") == 0.0
    assert qa.cer("மாக்", "மாக்\u200c") == 0.0  # tesseract's ZWNJ after a visible virama
    assert qa.cer("abcd", "abxd") == 0.25
    assert qa.cer("abc", "") == 1.0
    assert qa.cer("", "") == 0.0
    assert qa.cer("", "x") == 1.0
    assert qa.cer_counts("ab cd", "abd") == (1, 4)


def test_cer_compares_nfc() -> None:
    assert qa.cer("e\u0301", "\u00e9") == 0.0


def test_page_cer_is_pooled_over_regions() -> None:
    page = qa.PageQA("es", 0.1, 0, [qa.RegionQA(0, "", "", 1, 10), qa.RegionQA(1, "", "", 9, 30)])
    assert page.cer == pytest.approx(0.25) and not page.ok
    assert qa.PageQA("es", 0.1).ok  # nothing drawn: nothing to fail


def test_every_language_has_a_threshold_and_a_tesseract_model() -> None:
    cfg = RenderConfig()
    for lang in languages.LANGUAGES.values():
        assert lang.tesseract and 0 < cfg.max_cer(lang.script) < 1
    assert "qa_max_cer" not in cfg.to_dict()  # thresholds decide rejects, not page ids
    assert RenderConfig(qa_max_cer={"Latn": 0.3}).max_cer("Latn") == 0.3


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(("text", "lang"), [(ES, "es"), (HI, "hi")])
def test_good_render_reads_back(text: str, lang: str) -> None:
    cfg = RenderConfig()
    image, regions = _page(text, lang)
    [page] = qa.check_pages([(image, regions)], lang, cfg.max_cer(languages.get(lang).script))
    assert page.ok, page.message()
    assert len(page.regions) == 1 and page.chars == len(qa.normalize(text))


def test_text_in_a_font_without_the_script_is_unreadable() -> None:
    """Devanagari drawn in the Latin font is tofu: the QA must reject it even though it is 'rendered'."""
    image = Image.new("RGB", (600, 130), "white")
    latin = fonts.font_chain("en")[0]
    ImageDraw.Draw(image).text((24, 40), HI, fill="black", font=fonts.pil_font(latin, 28))
    regions = [Region("plain text", BOX, 0.9, HI, True, True)]
    [page] = qa.check_pages([(image, regions)], "hi", RenderConfig().max_cer("Deva"))
    assert not page.ok and page.cer > 0.8, page.message()


def test_three_pixel_text_is_unreadable() -> None:
    image, regions = _page(ES, "es", RenderConfig(min_font_px=3, max_font_px=3))
    [page] = qa.check_pages([(image, regions)], "es", RenderConfig().max_cer("Latn"))
    assert not page.ok, page.message()


def test_shard_driver_rejects_unreadable_pages_and_keeps_good_ones() -> None:
    good, good_regions = _page(ES, "es")
    bad, bad_regions = _page(ES, "es", RenderConfig(min_font_px=3, max_font_px=3))

    def record(pid: str, image: Image.Image, regions: list[Region]) -> PageRecord:
        return PageRecord(pid, f"en-{pid}", "src", "file://x", 0, "es", encode_png(image), 600, 130, regions)

    stats = qa.QAStats()
    kept, rejects = _render_qa(
        [record("good", good, good_regions), record("bad", bad, bad_regions)], "es", RenderConfig(), stats
    )
    assert [r.page_id for r in kept] == ["good"]
    assert [(r.input_ref, r.reason, r.stage) for r in rejects] == [
        ("en-bad", RejectReason.RENDER_UNREADABLE, "render")
    ]
    assert stats.pages == 2 and stats.pages_rejected == 1 and stats.regions == 2 and stats.edits > 0


def test_qa_sample_checks_a_stable_share_of_pages() -> None:
    ids = [f"page-{i}" for i in range(2000)]
    half = RenderConfig(qa_sample=0.5)
    picked = [p for p in ids if half.qa_checks(p)]
    assert 850 < len(picked) < 1150 and picked == [p for p in ids if RenderConfig(qa_sample=0.5).qa_checks(p)]
    assert all(RenderConfig().qa_checks(p) for p in ids[:50])
    assert not any(RenderConfig(qa_sample=0.0).qa_checks(p) for p in ids[:50])
    assert not any(RenderConfig(qa=False).qa_checks(p) for p in ids[:50])
    with pytest.raises(ValueError, match="qa_sample"):
        RenderConfig(qa_sample=1.5)
