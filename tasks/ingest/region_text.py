"""Region text: fill layout regions from the PDF text layer or OCR.

Text comes in *units* with pixel boxes: words of the PDF text layer (pypdfium2 characters, mapped
to pixels with PDFium's own page→device transform, so rotation and crop boxes are handled), or
lines of one full-page OCR pass. Each unit goes to the region its box overlaps most (ties: the
smaller region, so a caption inside a figure box gets its own words); a unit outside every box but
right beside an assigned unit on the same text line joins that unit's region. Unlike clipping the text
layer to each box (``get_text_bounded``), this never cuts words at a tight box edge and never
gives the same words to two overlapping regions. Translatable regions then grow to cover the
units they received, so the render stage erases all of the original words.
Units that touch no region are not dropped silently: they are grouped into blocks, and a block
with at least ``MIN_BLOCK_LETTERS`` (8) letters becomes a new ``text`` region with ``score=0.0`` (no
detector produced it); smaller leftovers are counted in :attr:`ExtractResult.uncovered_chars`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tasks.ingest.ocr import Box, OcrEngine
from tasks.ingest.sources import MIN_BLOCK_LETTERS, PDFIUM_LOCK, SourcePage
from tasks.schema import TRANSLATABLE_LABELS, Region

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- text normalisation
_LIGATURES = str.maketrans({"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st", "ﬆ": "st"})
_HYPHEN_BREAK = re.compile(r"(\w)[-\u2010\u00ad][ \t]*\n[ \t]*(?=[a-z])")
_COMPOUND_BREAK = re.compile(r"(\w)([-\u2010])[ \t]*\n[ \t]*(?=[A-Z0-9])")


def join_region_lines(text: str) -> str:
    """Region text as one clean paragraph.

    Line-end hyphenation is undone when the next line starts in lower case ("exam-\\nple" → "example");
    before a capital or digit the hyphen is a compound's and stays ("Jean-\\nPaul" → "Jean-Paul"). Soft
    hyphens and ligatures are resolved, all whitespace runs become one space.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_LIGATURES)
    text = text.replace("\ufffe", "-").replace("\x02", "-")  # PDFium's marks for a line-end hyphen
    text = _HYPHEN_BREAK.sub(r"\1", text)
    text = _COMPOUND_BREAK.sub(r"\1\2", text)
    text = text.replace("\u00ad", "")
    return " ".join(text.split())


# ---------------------------------------------------------------------------- units
@dataclass
class TextUnit:
    """A piece of page text with its pixel box: a PDF word or an OCR line. ``line`` groups units."""

    text: str
    bbox: Box
    line: int
    order: int


def _affine_box(m: tuple[float, ...], box: tuple[float, float, float, float]) -> Box:
    left, bottom, right, top = box
    a, b, c, d, e, f = m
    xs, ys = [], []
    for x, y in ((left, bottom), (right, top), (left, top), (right, bottom)):
        xs.append(a * x + c * y + e)
        ys.append(b * x + d * y + f)
    return (min(xs), min(ys), max(xs), max(ys))


def pdf_words(page: SourcePage) -> list[TextUnit]:
    """Words of a PDF page's text layer with pixel boxes, in content-stream order.

    Words split at whitespace (including PDFium's generated spaces and line breaks); a line break
    (``\\r``/``\\n``) starts a new ``line``. PDFium reports a word hyphenated across a line end as
    one word with a hyphen mark; it becomes ``"exam-\\nple"`` so :func:`join_region_lines` rejoins it.
    """
    import pypdfium2.raw as pdfium_c

    if page.pdf_page is None or page.pt_to_px is None:
        raise ValueError("not a PDF page (no text layer)")
    if getattr(page.pdf_page, "raw", None) is None:
        raise ValueError("the PDF page is closed: read its text while iter_source_pages is on that page")
    with PDFIUM_LOCK:
        return _pdf_words_locked(page, page.pdf_page.get_textpage(), pdfium_c)


def _pdf_words_locked(page: SourcePage, textpage: Any, pdfium_c: Any) -> list[TextUnit]:
    assert page.pt_to_px is not None
    try:
        n = textpage.count_chars()
        units: list[TextUnit] = []
        chars: list[str] = []
        box: list[float] | None = None
        line = 0

        def flush() -> None:
            nonlocal chars, box
            if chars and box is not None:
                word = "".join(chars).encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                units.append(TextUnit(word, (box[0], box[1], box[2], box[3]), line, len(units)))
            chars, box = [], None

        for i in range(n):
            u = pdfium_c.FPDFText_GetUnicode(textpage, i)
            ch = chr(u)
            if ch in "\r\n":
                flush()
                if ch == "\n" or (i + 1 < n and chr(pdfium_c.FPDFText_GetUnicode(textpage, i + 1)) != "\n"):
                    line += 1
                continue
            if ch.isspace() or u == 0:
                flush()
                continue
            if pdfium_c.FPDFText_IsHyphen(textpage, i) or ch in "\x02\ufffe":
                # PDFium glues a word hyphenated at a line end into one word and marks the hyphen;
                # keep it as "-\n" so join_region_lines decides (join, or keep a compound's hyphen).
                ch = "-\n"
                line += 1
            chars.append(ch)
            try:
                cb = textpage.get_charbox(i, loose=True)
            except Exception:  # a char with no box (rare): keep the text, not the geometry
                continue
            x0, y0, x1, y1 = _affine_box(page.pt_to_px, cb)
            if x1 - x0 <= 0 and y1 - y0 <= 0:
                continue
            box = (
                [x0, y0, x1, y1]
                if box is None
                else [min(box[0], x0), min(box[1], y0), max(box[2], x1), max(box[3], y1)]
            )
        flush()
    finally:
        textpage.close()
    # text outside the rendered page (off-page or beyond the crop box) is not on the image: drop it
    w, h = page.image.size
    kept = []
    for u in units:
        x0, y0, x1, y1 = (
            max(0.0, u.bbox[0]),
            max(0.0, u.bbox[1]),
            min(float(w), u.bbox[2]),
            min(float(h), u.bbox[3]),
        )
        if x1 > x0 and y1 > y0:
            kept.append(TextUnit(u.text, (x0, y0, x1, y1), u.line, len(kept)))
    return kept


def ocr_lines(page: SourcePage, ocr: OcrEngine) -> list[TextUnit]:
    """One OCR pass over the whole page; lines ordered top-to-bottom, then left-to-right within a row."""
    raw = [(box, text) for box, text, _score in ocr.recognize(page.image) if text.strip()]
    if not raw:
        return []
    heights = sorted(max(1.0, b[3] - b[1]) for b, _ in raw)
    tol = 0.5 * heights[len(heights) // 2]
    raw.sort(key=lambda bt: (bt[0][1] + bt[0][3]) / 2)
    rows: list[list[tuple[Box, str]]] = []
    row_y = -1e18
    for b, t in raw:
        yc = (b[1] + b[3]) / 2
        if rows and abs(yc - row_y) <= tol:
            rows[-1].append((b, t))
        else:
            rows.append([(b, t)])
            row_y = yc
    units: list[TextUnit] = []
    for row in rows:
        for b, t in sorted(row, key=lambda bt: bt[0][0]):
            units.append(TextUnit(t, b, len(units), len(units)))
    return units


# ---------------------------------------------------------------------------- assignment
@dataclass
class ExtractResult:
    """Regions with text, plus what happened to text that no detected region covered."""

    regions: list[Region]
    added_regions: int = 0  # uncovered text blocks turned into "text" regions (score 0.0)
    uncovered_chars: int = 0  # letters (str.isalpha) in smaller uncovered leftovers, not in any region
    units: int = 0  # words (PDF) or lines (OCR) read from the page


def assign_units(units: Sequence[TextUnit], boxes: Sequence[Box]) -> list[int]:
    """Index of the region each unit overlaps most (-1: none); ties go to the smaller region."""
    if not units:
        return []
    if not boxes:
        return [-1] * len(units)
    u = np.asarray([x.bbox for x in units], dtype=np.float64)
    r = np.asarray(boxes, dtype=np.float64)
    iw = np.clip(np.minimum(u[:, None, 2], r[None, :, 2]) - np.maximum(u[:, None, 0], r[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(u[:, None, 3], r[None, :, 3]) - np.maximum(u[:, None, 1], r[None, :, 1]), 0, None)
    inter = iw * ih
    area = (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])
    # primary key: intersection; tie-break: smaller region (scaled far below any real area difference)
    key = inter - 1e-9 * area[None, :]
    best = key.argmax(axis=1)
    has = inter[np.arange(len(units)), best] > 0
    return [int(b) if h else -1 for b, h in zip(best, has, strict=True)]


def absorb_line_neighbours(units: Sequence[TextUnit], owner: list[int], *, max_gap: float = 0.8) -> list[int]:
    """Give an unassigned unit to the region of an assigned unit beside it on the same text line.

    Layout boxes are often a little tight: a line's first or last word can fall wholly outside. A unit
    joins its nearest assigned neighbour when they overlap vertically by half a line and the horizontal
    gap is at most ``max_gap`` × line height (a word space, well under a column gutter). Repeats until
    nothing changes, so a run of outside words chains onto the line.
    """
    owner = list(owner)
    if not units or all(k >= 0 for k in owner) or all(k < 0 for k in owner):
        return owner
    b = np.asarray([u.bbox for u in units], dtype=np.float64)
    h = np.maximum(b[:, 3] - b[:, 1], 1.0)
    while True:
        own = np.asarray(owner)
        free, taken = np.flatnonzero(own < 0), np.flatnonzero(own >= 0)
        if not len(free) or not len(taken):
            return owner
        f, t = b[free][:, None, :], b[taken][None, :, :]
        minh = np.minimum(h[free][:, None], h[taken][None, :])
        v_overlap = np.minimum(f[..., 3], t[..., 3]) - np.maximum(f[..., 1], t[..., 1])
        gap = np.maximum(f[..., 0], t[..., 0]) - np.minimum(f[..., 2], t[..., 2])
        ok = (v_overlap >= 0.5 * minh) & (gap <= max_gap * minh)
        if not ok.any():
            return owner
        dist = np.where(ok, gap, np.inf)
        nearest = dist.argmin(axis=1)
        for row, i in enumerate(free):
            if np.isfinite(dist[row, nearest[row]]):
                owner[int(i)] = owner[int(taken[nearest[row]])]


def _join_units(units: Sequence[TextUnit]) -> str:
    parts: list[str] = []
    prev_line: int | None = None
    for x in sorted(units, key=lambda x: x.order):
        if prev_line is not None:
            parts.append("\n" if x.line != prev_line else " ")
        parts.append(x.text)
        prev_line = x.line
    return join_region_lines("".join(parts))


def _union(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _letters(text: str) -> int:
    return sum(1 for c in text if c.isalpha())


def uncovered_blocks(units: Sequence[TextUnit]) -> list[list[TextUnit]]:
    """Group leftover units into blocks: same-line neighbours first, then lines that touch vertically."""
    if not units:
        return []
    ordered = sorted(units, key=lambda x: x.order)
    lines: list[list[TextUnit]] = []
    for x in ordered:
        if lines:
            last = lines[-1][-1]
            h = max(1.0, min(x.bbox[3] - x.bbox[1], last.bbox[3] - last.bbox[1]))
            if x.line == last.line and x.bbox[0] - last.bbox[2] <= 2.0 * h and x.bbox[0] >= last.bbox[0]:
                lines[-1].append(x)
                continue
        lines.append([x])
    boxes = [_union([x.bbox for x in ln]) for ln in lines]
    n = len(lines)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        a = boxes[i]
        ha = a[3] - a[1]
        for j in range(i + 1, n):
            b = boxes[j]
            h = max(1.0, min(ha, b[3] - b[1]))
            if min(a[2], b[2]) + 0.5 * h > max(a[0], b[0]) and min(a[3], b[3]) + 1.0 * h > max(a[1], b[1]):
                parent[find(i)] = find(j)
    groups: dict[int, list[TextUnit]] = {}
    for i, ln in enumerate(lines):
        groups.setdefault(find(i), []).extend(ln)
    return sorted(groups.values(), key=lambda g: min(x.order for x in g))


def extract_page_text(
    page: SourcePage,
    regions: Sequence[Region],
    ocr: OcrEngine | None,
    *,
    min_block_letters: int = MIN_BLOCK_LETTERS,
    grow: bool = True,
) -> ExtractResult:
    """Fill region text from the page's text layer or OCR; see the module docstring for the rules."""
    from tasks.ingest.layout import reading_order

    if page.text_source == "pdf" and page.pdf_page is not None:
        units = pdf_words(page)
    else:
        if ocr is None:
            raise ValueError(
                f"page {page.page_index} of {page.source_uri} needs OCR but no OCR engine is configured"
            )
        units = ocr_lines(page, ocr)

    owner = absorb_line_neighbours(units, assign_units(units, [r.bbox for r in regions]))
    per_region: list[list[TextUnit]] = [[] for _ in regions]
    leftovers: list[TextUnit] = []
    for unit, k in zip(units, owner, strict=True):
        (per_region[k] if k >= 0 else leftovers).append(unit)

    w, h = page.image.size
    out: list[Region] = []
    for region, got in zip(regions, per_region, strict=True):
        text = _join_units(got) if got else ""
        bbox = region.bbox
        if grow and got and region.label in TRANSLATABLE_LABELS:
            u = _union([bbox, *(x.bbox for x in got)])
            bbox = (max(0.0, u[0]), max(0.0, u[1]), min(float(w), u[2]), min(float(h), u[3]))
        translatable = region.label in TRANSLATABLE_LABELS and text.strip() != ""
        out.append(replace(region, bbox=bbox, text=text, translatable=translatable))

    added, lost = 0, 0
    for block in uncovered_blocks(leftovers):
        text = _join_units(block)
        if _letters(text) >= min_block_letters:
            u = _union([x.bbox for x in block])
            bbox = (max(0.0, u[0]), max(0.0, u[1]), min(float(w), u[2]), min(float(h), u[3]))
            out.append(Region(label="text", bbox=bbox, score=0.0, text=text, translatable=True))
            added += 1
        else:
            lost += _letters(text)
    if added:
        out = reading_order(out, w)
    if added or lost:
        log.debug(
            "page %s/%d: %d uncovered blocks added, %d letters uncovered",
            page.source_uri,
            page.page_index,
            added,
            lost,
        )
    return ExtractResult(regions=out, added_regions=added, uncovered_chars=lost, units=len(units))


def extract_region_text(page: SourcePage, regions: Sequence[Region], ocr: OcrEngine | None) -> list[Region]:
    """Regions with ``text``/``translatable`` filled (plus regions for large uncovered text blocks)."""
    return extract_page_text(page, regions, ocr).regions
