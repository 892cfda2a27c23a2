"""Ingest + region text: real pypdfium2, Pillow, rapid-layout and rapidocr on inputs made here."""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tasks.ingest.ocr import RapidOcrEngine, build_ocr
from tasks.ingest.region_text import extract_page_text, extract_region_text, join_region_lines, pdf_words
from tasks.ingest.sources import (
    SUPPORTED_SUFFIXES,
    SourceError,
    SourcePage,
    iter_source_pages,
    page_id,
    source_id,
)
from tasks.schema import LABELS, TRANSLATABLE_LABELS, Region, RejectReason

TITLE = "Annual Report on Mountain Weather"
LEFT = (
    "Alpine glaciers retreat every summer because warmer air melts the ice faster than winter snow can "
    "replace it. Shepherds move their flocks to higher meadows while farmers harvest barley in the "
    "valleys. The exam-ple of the old glacier shows how quickly the landscape changes."
)
RIGHT = (
    "Coastal harbours handle container ships that carry electronics, clothing and grain between distant "
    "continents. Cranes lift heavy boxes onto trucks and trains that leave the port every night. Sailors "
    "check the weather forecast before they cross the stormy ocean."
)
LEFT_ONLY = {"glaciers", "shepherds", "barley", "meadows", "landscape", "valleys"}
RIGHT_ONLY = {"harbours", "container", "cranes", "sailors", "trucks", "ocean"}


# ---------------------------------------------------------------------------- inputs
def _column_lines(text: str, width: float, font: str, size: float) -> list[str]:
    """Wrap ``text`` to ``width``; a word written 'exam-ple' is broken after its hyphen on purpose."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    lines: list[str] = []
    cur = ""
    for word in text.split():
        if "-" in word and cur:
            head, tail = word.split("-", 1)
            lines.append(f"{cur} {head}-")
            cur = tail
            continue
        trial = f"{cur} {word}".strip()
        if stringWidth(trial, font, size) > width and cur:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    if cur:
        lines.append(cur)
    return lines


def make_two_column_pdf(path: Path, *, pages: int = 1) -> Path:
    """A born-digital A4 page: a centred title and two columns of known text (drawn line by line)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    w, h = A4
    c = canvas.Canvas(str(path), pagesize=A4, invariant=1)
    for _ in range(pages):
        c.setFont("Helvetica-Bold", 22)
        c.drawCentredString(w / 2, h - 80, TITLE)
        col_w = (w - 2 * 56 - 28) / 2
        for x, text in ((56, LEFT), (56 + col_w + 28, RIGHT)):
            y = h - 140
            for _ in range(2):  # two paragraphs per column
                for line in _column_lines(text, col_w, "Helvetica", 11):
                    c.setFont("Helvetica", 11)
                    c.drawString(x, y, line)
                    y -= 14
                y -= 14
        c.showPage()
    c.save()
    return path


def _words(text: str) -> set[str]:
    return {w.strip(".,;:()").lower() for w in text.split() if w.strip(".,;:()")}


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height, with almost no pixel data (cheap bomb / truncated input)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def two_col_pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_two_column_pdf(tmp_path_factory.mktemp("pdf") / "two_col.pdf")


@pytest.fixture(scope="module")
def detector():
    from tasks.ingest.layout import build_layout_detector

    return build_layout_detector({"engine": "rapid-layout", "conf": 0.5})


@pytest.fixture(scope="module")
def ocr() -> RapidOcrEngine:
    engine = build_ocr({"engine": "rapidocr"})
    assert isinstance(engine, RapidOcrEngine)
    return engine


_OPEN: list[Iterator] = []


@pytest.fixture(autouse=True, scope="module")
def _close_open_iterators():
    yield
    while _OPEN:
        _OPEN.pop().close()


def _first_page(path: Path, **kw) -> SourcePage:
    """First page of a source; its iterator is kept alive so a PDF page's text layer stays readable."""
    pages = iter_source_pages(path, **kw)
    item = next(pages)
    assert isinstance(item, SourcePage)
    _OPEN.append(pages)
    return item


# ---------------------------------------------------------------------------- ids
def test_content_hash_ids(tmp_path: Path, two_col_pdf: Path) -> None:
    copy = tmp_path / "renamed.pdf"
    copy.write_bytes(two_col_pdf.read_bytes())
    other = tmp_path / "other.pdf"
    other.write_bytes(two_col_pdf.read_bytes() + b"\n%")
    sid = source_id(two_col_pdf)
    assert len(sid) == 32 and int(sid, 16) >= 0
    assert source_id(copy) == sid  # content, not name
    assert source_id(other) != sid
    assert page_id(sid, 0) == page_id(sid, 0) != page_id(sid, 1)
    assert page_id(sid, 0) != page_id(source_id(other), 0)
    page = _first_page(two_col_pdf)
    assert page.source_id == sid and page.page_id == page_id(sid, 0)


# ---------------------------------------------------------------------------- PDF pages
def test_pdf_pages_are_rendered_within_limits(tmp_path: Path) -> None:
    pdf = make_two_column_pdf(tmp_path / "three.pdf", pages=3)
    items = list(iter_source_pages(pdf, dpi=144, max_side=1000))
    assert [p.page_index for p in items] == [0, 1, 2]
    for p in items:
        assert isinstance(p, SourcePage)
        assert p.text_source == "pdf" and p.image.mode == "RGB"
        assert max(p.image.size) <= 1000
        w_pt, h_pt = p.page_size_pt
        assert (round(w_pt), round(h_pt)) == (595, 842)
        assert p.scale == pytest.approx(1000 / h_pt)
        assert abs(p.image.height - h_pt * p.scale) <= 1
    # at a low dpi the dpi decides, not max_side (min_side=0: no upscaling of small pages)
    small = _first_page(pdf, dpi=36, max_side=2000, min_side=0)
    assert small.scale == pytest.approx(0.5) and small.image.height == pytest.approx(421, abs=1)
    # ... and by default a page rendered that small is scaled up to a legible long side of min_side
    legible = _first_page(pdf, dpi=36, max_side=2000)
    assert max(legible.image.size) == pytest.approx(1024, abs=1)


def test_text_layer_fills_regions_in_reading_order(two_col_pdf: Path, detector) -> None:
    page = _first_page(two_col_pdf)
    regions = detector.detect(page.image)
    res = extract_page_text(page, regions, None)
    out = res.regions
    assert all(r.label in LABELS for r in out)
    texts = [r for r in out if r.text]
    assert texts[0].label == "title" and texts[0].text == TITLE
    mid = page.image.width / 2
    left = [r for r in texts if r.label == "text" and r.bbox[2] < mid]
    right = [r for r in texts if r.label == "text" and r.bbox[0] > mid]
    assert left and right
    left_words = set().union(*(_words(r.text) for r in left))
    right_words = set().union(*(_words(r.text) for r in right))
    assert left_words >= LEFT_ONLY and not (RIGHT_ONLY & left_words)
    assert right_words >= RIGHT_ONLY and not (LEFT_ONLY & right_words)
    # reading order: title, then the whole left column, then the right column
    idx = {id(r): i for i, r in enumerate(out)}
    assert max(idx[id(r)] for r in left) < min(idx[id(r)] for r in right)
    # every word of the page lands in exactly one region; the hyphenated word is joined
    full = " ".join(r.text for r in out)
    assert "example" in full and "exam-" not in full
    assert full.count("Shepherds") == 2 and full.count("Sailors") == 2
    assert res.uncovered_chars == 0
    for r in out:
        assert r.translatable == (r.label in TRANSLATABLE_LABELS and bool(r.text.strip()))


def test_tight_box_grows_to_cover_its_words(two_col_pdf: Path, detector) -> None:
    page = _first_page(two_col_pdf)
    title = next(r for r in detector.detect(page.image) if r.label == "title")
    x0, y0, x1, y1 = title.bbox
    w = x1 - x0
    tight = Region("title", (x0 + 0.25 * w, y0 + 2, x1 - 0.25 * w, y1 - 2), 0.9)
    [got] = [r for r in extract_region_text(page, [tight], None) if r.label == "title"]
    assert got.text == TITLE  # words cut by the box edge are not lost or truncated
    assert got.bbox[0] <= x0 + 0.1 * w and got.bbox[2] >= x1 - 0.1 * w
    assert got.translatable


def test_uncovered_text_becomes_text_regions(two_col_pdf: Path, detector) -> None:
    page = _first_page(two_col_pdf)
    title = next(r for r in detector.detect(page.image) if r.label == "title")
    res = extract_page_text(page, [title], None)
    added = [r for r in res.regions if r.score == 0.0]
    assert res.added_regions == len(added) >= 2
    assert all(r.label == "text" and r.translatable for r in added)
    words = set().union(*(_words(r.text) for r in added))
    assert words >= LEFT_ONLY | RIGHT_ONLY
    # blocks follow the columns: no added block mixes the two columns
    for r in added:
        assert not (LEFT_ONLY & _words(r.text) and RIGHT_ONLY & _words(r.text))
    assert res.regions[0].label == "title"  # reading order re-applied
    # small leftovers are counted, not turned into regions
    strict = extract_page_text(page, [title], None, min_block_letters=10_000)
    assert strict.added_regions == 0 and strict.uncovered_chars > 500


def test_normalize_text() -> None:
    assert join_region_lines("exam-\nple  text") == "example text"
    assert join_region_lines("exam-\r\nple") == "example"
    assert join_region_lines("Jean-\nPaul") == "Jean-Paul"  # before a capital: a compound's hyphen, kept
    assert join_region_lines("co\u00adop-\n  eration") == "cooperation"
    assert join_region_lines("\ufb01sh and \ufb02our\n\n next") == "fish and flour next"
    assert join_region_lines("  \n\t ") == ""


def test_scanned_pdf_page_is_marked_for_ocr(tmp_path: Path, two_col_pdf: Path) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen import canvas

    img = _first_page(two_col_pdf, dpi=72).image
    path = tmp_path / "scan.pdf"
    c = canvas.Canvas(str(path), pagesize=A4)
    c.drawImage(ImageReader(img), 0, 0, *A4)
    c.showPage()
    c.save()
    page = _first_page(path)
    assert page.text_source == "ocr"
    with pytest.raises(ValueError, match="needs OCR"):
        extract_region_text(page, [Region("text", (0, 0, 10, 10), 1.0)], None)


def test_bad_pdf_page_is_reported_and_good_pages_kept(tmp_path: Path) -> None:
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R 4 0 R 5 0 R 6 0 R] /Count 4 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"42",  # not a page dictionary: PDFium cannot load it
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 0.5 800] >>",  # no area to render
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path = tmp_path / "mixed.pdf"
    path.write_bytes(bytes(out))
    items = list(iter_source_pages(path, dpi=72, min_side=0))
    assert [type(i).__name__ for i in items] == ["SourcePage", "SourceError", "SourceError", "SourcePage"]
    assert [(e.reason, e.page_index) for e in items[1:3]] == [
        (RejectReason.UNREADABLE, 1),
        (RejectReason.UNREADABLE, 2),
    ]
    assert [p.page_index for p in (items[0], items[3])] == [0, 3]
    assert items[3].image.size == (300, 200)
    reject = items[1].to_reject("mixed.pdf")
    assert reject.stage == "ingest" and "page 1" in reject.message


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_word_boxes_cover_the_ink_for_rotated_and_cropped_pages(tmp_path: Path, rotation: int) -> None:
    import numpy as np
    from reportlab.pdfgen import canvas

    path = tmp_path / f"rot{rotation}.pdf"
    c = canvas.Canvas(str(path), pagesize=(500, 400))
    c.setPageRotation(rotation)
    c.setCropBox((20, 10, 480, 390))  # crop box offset from the media box origin
    c.setFont("Helvetica", 14)
    for i in range(8):
        c.drawString(40 + 20 * i, 360 - 40 * i, f"line {i} with words")
    c.drawString(40, 1000, "text off the page")  # not on the image: dropped
    c.showPage()
    c.save()
    page = _first_page(path, dpi=72)
    units = pdf_words(page)
    assert [u.text for u in units[:4]] == ["line", "0", "with", "words"] and len(units) == 32
    ink = np.asarray(page.image.convert("L")) < 128
    covered = np.zeros_like(ink)
    for u in units:
        x0, y0, x1, y1 = (int(v) for v in u.bbox)
        covered[y0 : y1 + 1, x0 : x1 + 1] = True
        assert ink[y0 : y1 + 1, x0 : x1 + 1].any()  # every word box holds ink
    assert ink[covered].sum() == ink.sum()  # and all ink is inside word boxes
    assert covered.mean() < 0.15


def test_pdf_ingest_is_thread_safe(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    pdfs = [make_two_column_pdf(tmp_path / f"doc{i}.pdf", pages=3) for i in range(4)]
    fixed = [Region("text", (0, 0, 10_000, 10_000), 1.0)]  # one region covering the page

    def ingest(path: Path) -> list[str]:
        texts = []
        for page in iter_source_pages(path, dpi=72):
            assert isinstance(page, SourcePage)
            texts.append(extract_region_text(page, fixed, None)[0].text)
        return texts

    sequential = [ingest(p) for p in pdfs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(ingest, pdfs * 2))
    assert parallel == sequential * 2
    assert all("example" in t and "Sailors" in t for doc in sequential for t in doc)


# ---------------------------------------------------------------------------- images
def test_image_pages_exif_alpha_downscale_and_frames(tmp_path: Path) -> None:
    # EXIF orientation 6 (rotate 90° CW to display): a 400×200 JPEG shows as 200×400
    jpg = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (400, 200), (200, 30, 30)).save(jpg, exif=exif.tobytes())
    page = _first_page(jpg)
    assert page.image.size == (200, 400) and page.text_source == "ocr" and page.pdf_page is None

    # transparency is flattened onto white, not black
    png = tmp_path / "alpha.png"
    Image.new("RGBA", (50, 40), (0, 0, 0, 0)).save(png)
    page = _first_page(png)
    assert page.image.mode == "RGB" and page.image.getpixel((5, 5)) == (255, 255, 255)

    # long side capped at max_side
    big = tmp_path / "big.bmp"
    Image.new("L", (3000, 1500), 128).save(big)
    page = _first_page(big, max_side=1000)
    assert page.image.size == (1000, 500) and page.image.mode == "RGB"

    # a big JPEG is decoded at reduced scale, then capped; orientation still applied
    big_jpg = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 2000), (20, 20, 200)).save(big_jpg, exif=exif.tobytes())
    page = _first_page(big_jpg, max_side=900)
    assert page.image.size == (450, 900)

    # a multi-page TIFF gives one page per frame
    tif = tmp_path / "two.tiff"
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tif, save_all=True, append_images=frames[1:])
    pages = list(iter_source_pages(tif))
    assert [p.page_index for p in pages] == [0, 1]
    assert pages[1].image.getpixel((1, 1)) == (0, 0, 255)


# ---------------------------------------------------------------------------- rejects
def _reason(path: Path, **kw) -> str:
    with pytest.raises(SourceError) as info:
        list(iter_source_pages(path, **kw))
    assert info.value.message  # a human readable detail
    return info.value.reason


def test_source_errors(tmp_path: Path, two_col_pdf: Path) -> None:
    from reportlab.pdfgen import canvas

    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    assert _reason(empty) == RejectReason.EMPTY_FILE

    good_png = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 200, 10)).save(good_png, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good_png.getvalue()[: len(good_png.getvalue()) // 2])
    assert _reason(truncated) == RejectReason.UNREADABLE
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(png_with_header_size(64, 64)[:30] + b"garbage" * 10)
    assert _reason(garbage) == RejectReason.UNREADABLE

    not_pdf = tmp_path / "not.pdf"
    not_pdf.write_bytes(b"this is not a pdf at all" * 20)
    assert _reason(not_pdf) == RejectReason.UNREADABLE
    cut_pdf = tmp_path / "cut.pdf"
    cut_pdf.write_bytes(two_col_pdf.read_bytes()[:200])
    assert _reason(cut_pdf) == RejectReason.UNREADABLE

    locked = tmp_path / "locked.pdf"
    c = canvas.Canvas(str(locked), encrypt="pw")
    c.drawString(72, 720, "This page is password protected.")
    c.save()
    assert _reason(locked) == RejectReason.ENCRYPTED_PDF

    # 30000×30000 = 900 M pixels: over Pillow's own bomb limit (its error is caught, not fatal)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_with_header_size(30000, 30000))
    assert _reason(huge) == RejectReason.IMAGE_TOO_LARGE
    # 8000×8000 = 64 M: under Pillow's limit, over ours; refused from the header, before decoding
    big = tmp_path / "big.png"
    big.write_bytes(png_with_header_size(8000, 8000))
    assert _reason(big, max_pixels=40_000_000) == RejectReason.IMAGE_TOO_LARGE

    for name in ("notes.docx", "README", "scan.gif"):
        f = tmp_path / name
        f.write_bytes(b"x")
        assert _reason(f) == RejectReason.UNSUPPORTED_TYPE
    assert _reason(tmp_path / "missing.png") == RejectReason.UNREADABLE
    assert {".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"} == SUPPORTED_SUFFIXES


# ---------------------------------------------------------------------------- OCR
def test_build_ocr_registry() -> None:
    assert build_ocr({"engine": "none"}) is None
    assert build_ocr({}) is None
    with pytest.raises(ValueError, match="unknown OCR engine"):
        build_ocr({"engine": "tesseract-9"})
    with pytest.raises(FileNotFoundError):
        build_ocr({"engine": "rapidocr", "det_model": "/nonexistent/det.onnx"})


def test_ocr_image_page(tmp_path: Path, two_col_pdf: Path, detector, ocr, monkeypatch) -> None:
    png = tmp_path / "page.png"
    _first_page(two_col_pdf, dpi=100).image.save(png)  # 827×1170: 11 pt text is still ~15 px high
    page = _first_page(png)
    assert page.text_source == "ocr"

    def no_network(*_a, **_k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    regions = detector.detect(page.image)
    title_strip = page.image.crop((0, 0, page.image.width, page.image.height // 8))
    lines = ocr.recognize(title_strip)
    assert [t for _, t, _ in lines] == [TITLE]
    (x0, y0, x1, y1), _, score = lines[0]
    assert 0 <= x0 < x1 <= title_strip.width and 0 <= y0 < y1 <= title_strip.height and 0.5 <= score <= 1
    out = extract_region_text(page, regions, ocr)
    texts = [r for r in out if r.text]
    recognised = set().union(*(_words(r.text) for r in texts))
    truth = _words(TITLE + " " + LEFT.replace("exam-ple", "example") + " " + RIGHT)
    assert len(truth & recognised) / len(truth) >= 0.8
    assert texts[0].label == "title" and _words(texts[0].text) == _words(TITLE)
    mid = page.image.width / 2
    left_words = set().union(*(_words(r.text) for r in texts if r.bbox[2] < mid))
    right_words = set().union(*(_words(r.text) for r in texts if r.bbox[0] > mid))
    assert len(LEFT_ONLY & left_words) >= 5 and not (RIGHT_ONLY & left_words)
    assert len(RIGHT_ONLY & right_words) >= 5 and not (LEFT_ONLY & right_words)
    # lines are read top to bottom: the left column's first sentence comes first
    left_text = " ".join(r.text for r in texts if r.bbox[2] < mid)
    assert left_text.index("Alpine") < left_text.index("Shepherds") < left_text.index("landscape")
