"""Composed queries (MM-Embed's text + image queries): which page regions to crop, the crops, their text.

A composed query is a crop of one region a page keeps as pixels (``COMPOSED_LABELS``: figure, table,
formula) with a question about it; its positive is the page. Everything here is a pure function of the
page PNG and its regions, so the same page gives the same crops (byte for byte) on every run, and the
parallel pages of every language give the same crops too: those regions are never re-rendered, and the
margin around a crop stops at any other region's box (text that a translation redraws).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import regex

from tasks.llm.images import fitted_size
from tasks.queries.config import ComposedConfig
from tasks.schema import COMPOSED_LABELS, TRANSLATABLE_LABELS, Region, encode_png

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in page-image pixels (x1, y1 exclusive)

# Regions whose text may describe a crop: its caption first, else the nearest body text.
CAPTION_LABELS: tuple[str, ...] = ("caption",)
CONTEXT_LABELS: tuple[str, ...] = ("text", "list", "title")
_LETTER_RE = regex.compile(r"\p{L}")


@dataclass(frozen=True)
class ComposedRegion:
    """One region picked for a composed query: where it is, its crop and the text near it."""

    index: int  # position in the page's regions
    label: str  # one of COMPOSED_LABELS
    box: Box  # the crop box (region box + margin) in page-image pixels
    png: bytes  # the crop (PNG, longest side <= max_side)
    context: str  # the nearest caption / text region's text in the page's language ('' if none)


def _int_box(bbox: Sequence[float]) -> Box:
    return (math.floor(bbox[0]), math.floor(bbox[1]), math.ceil(bbox[2]), math.ceil(bbox[3]))


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def composed_candidates(
    regions: Sequence[Region], size: tuple[int, int], cfg: ComposedConfig | None = None
) -> list[int]:
    """Indices of the regions that may become composed queries, largest box first (ties: reading order).

    A candidate has a label in ``COMPOSED_LABELS``, kept its original pixels (never ``rendered``), has
    both sides at least ``min_side`` px, covers at least ``min_area_share`` of the page, and holds no
    text region a translation redraws (a text-like label with letters overlapping it: a mis-detected
    "figure" over a list, a caption inside the box), so its crop is the same in every language.
    """
    cfg = cfg or ComposedConfig()
    page_area = max(1, size[0] * size[1])
    redrawn = [
        _int_box(r.bbox)
        for r in regions
        if r.label in TRANSLATABLE_LABELS and _LETTER_RE.search(r.text or "")
    ]
    found = []
    for i, r in enumerate(regions):
        x0, y0, x1, y1 = (min(max(v, 0.0), float(lim)) for v, lim in zip(r.bbox, (*size, *size), strict=True))
        w, h = x1 - x0, y1 - y0
        if r.label not in COMPOSED_LABELS or r.rendered or min(w, h) < cfg.min_side:
            continue
        if w * h / page_area < cfg.min_area_share or any(_overlaps(_int_box(r.bbox), b) for b in redrawn):
            continue
        found.append((-(w * h), i))
    return [i for _, i in sorted(found)]


def crop_box(regions: Sequence[Region], index: int, size: tuple[int, int], margin: int) -> Box:
    """The region's box grown by ``margin`` px on each side, clipped to the page, and stopped at the
    edge of any other region the grown box would reach into (so no neighbour's pixels enter the crop)."""
    w, h = size
    r = _int_box(regions[index].bbox)
    r = (max(0, r[0]), max(0, r[1]), min(w, r[2]), min(h, r[3]))
    x0, y0, x1, y1 = (
        max(0, r[0] - margin),
        max(0, r[1] - margin),
        min(w, r[2] + margin),
        min(h, r[3] + margin),
    )
    for j, other in enumerate(regions):
        b = _int_box(other.bbox)
        if j == index or _overlaps(b, r) or not _overlaps(b, (x0, y0, x1, y1)):
            continue
        if b[1] >= r[3]:  # below
            y1 = min(y1, max(r[3], b[1]))
        elif b[3] <= r[1]:  # above
            y0 = max(y0, min(r[1], b[3]))
        elif b[0] >= r[2]:  # right
            x1 = min(x1, max(r[2], b[0]))
        else:  # left
            x0 = max(x0, min(r[0], b[2]))
    return (x0, y0, x1, y1)


def crop_png(page_png: bytes, box: Box, max_side: int) -> bytes:
    """The PNG of ``box`` of the page, downscaled (Lanczos, aspect kept) when its longest side exceeds
    ``max_side``; same page and box ⇒ same bytes (``encode_png``'s fixed options)."""
    from PIL import Image

    with Image.open(io.BytesIO(page_png)) as page:
        img = page.convert("RGB").crop(box)
    target = fitted_size(img.size, max_side)
    if target != img.size:
        img = img.resize(target, Image.Resampling.LANCZOS)
    return encode_png(img)


def _gap(a: Box, b: Box) -> tuple[int, int]:
    """(vertical, horizontal) distance between two boxes (0 where they overlap on that axis)."""
    return max(0, b[1] - a[3], a[1] - b[3]), max(0, b[0] - a[2], a[0] - b[2])


def _in_page_language(r: Region, lang: str) -> bool:
    """True when the region's text is in the page's language: the English source text on an English
    page, text a translation drew (``rendered``) on any other page."""
    ok = r.translatable if lang == "en" else r.rendered
    return ok and bool(_LETTER_RE.search(r.text or ""))


def _distance(target: Box, box: Box, label: str) -> tuple[int, int]:
    """How far ``box`` is from ``target`` for caption matching: the vertical gap (doubled on the side a
    caption of ``label`` is not usually on: tables are captioned above, figures and formulas below), then
    the horizontal gap."""
    v, h = _gap(target, box)
    above = box[3] <= target[1]
    return (v if above == (label == "table") else 2 * v), h


def nearest_text(regions: Sequence[Region], index: int, lang: str) -> str:
    """The text of the caption nearest to region ``index`` (see ``_distance``; ties: reading order), else
    of the nearest text / list / title region; '' when the page has neither in its own language."""
    target = _int_box(regions[index].bbox)
    label = regions[index].label
    for labels in (CAPTION_LABELS, CONTEXT_LABELS):
        near = [
            (_distance(target, _int_box(r.bbox), label), j)
            for j, r in enumerate(regions)
            if j != index and r.label in labels and _in_page_language(r, lang)
        ]
        if near:
            return regions[min(near)[1]].text
    return ""


def pick_composed(
    page_png: bytes | None, regions: Sequence[Region], lang: str, n: int, cfg: ComposedConfig | None = None
) -> list[ComposedRegion]:
    """Up to ``n`` composed regions of one page (largest first) with their crops and nearby text; none
    for a page without an image or without a usable figure, table or formula."""
    from PIL import Image

    cfg = cfg or ComposedConfig()
    if not page_png or n < 1 or not any(r.label in COMPOSED_LABELS for r in regions):
        return []
    with Image.open(io.BytesIO(page_png)) as page:
        size = (int(page.width), int(page.height))
    out = []
    for i in composed_candidates(regions, size, cfg)[:n]:
        box = crop_box(regions, i, size, cfg.margin)
        out.append(
            ComposedRegion(
                i,
                regions[i].label,
                box,
                crop_png(page_png, box, cfg.max_side),
                nearest_text(regions, i, lang),
            )
        )
    return out
