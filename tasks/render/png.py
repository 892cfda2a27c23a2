"""Render translated text back into the layout boxes of a page image (and optionally as a PDF text layer).

Pure functions, no Prefect. The pipeline per box:

1. coverage: every character must have a glyph in the language's font chain (``tasks.render.fonts``), else
   the box fails with ``RejectReason.GLYPH_COVERAGE`` (never draw tofu);
2. colours: the page background is the median of the box border pixels; the text keeps the original
   ink colour when it contrasts enough with the background, else black or white;
3. layout: the text is cut into line-break atoms (words; characters for zh/ja with no line starting
   with closing punctuation; grapheme clusters for Thai), each line is split into runs of one font
   and one bidi level (the Unicode bidi algorithm, UAX #9, via python-bidi: Arabic runs are RTL,
   Latin words and digits inside them LTR), runs are placed in visual order (RTL lines right-aligned),
   and the largest font size that fits the box is found by binary search;
4. drawing: every run is shaped by Pillow's RAQM engine (HarfBuzz + FriBiDi) into a mask; ink that
   sticks out of the box (negative side bearings) is nudged in, ink larger than the box makes the
   size smaller; text that does not fit at the script's smallest size (``RenderConfig.min_px``) fails with
   ``RejectReason.TEXT_DOES_NOT_FIT`` and leaves the image untouched.

``tasks.render.pdf.page_pdf`` sets the same layout (HarfBuzz-measured) as a real text layer with reportlab
``Paragraph`` objects (``shaping=1``) over the page image with the translated boxes erased.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from tasks import languages
from tasks.render import fonts
from tasks.render.config import RGB, Box, BoxRender, PageRender, RenderConfig, RenderedLine, RenderFailure
from tasks.render.text_layout import PilMeasurer, _layout, fit_text
from tasks.schema import Region, RejectReason


# ---------------------------------------------------------------------------- colours
def _luminance(c: Sequence[float]) -> float:
    def lin(v: float) -> float:
        v = v / 255.0
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(x) for x in c[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG 2 contrast ratio between two sRGB colours (1 … 21)."""
    la, lb = _luminance(a), _luminance(b)
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def _pixel_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Float bbox → integer pixel box clipped to the image (x0, y0, x1, y1), x1/y1 exclusive."""
    w, h = size
    x0, y0, x1, y1 = box
    return (
        max(0, min(w, int(np.floor(x0)))),
        max(0, min(h, int(np.floor(y0)))),
        max(0, min(w, int(np.ceil(x1)))),
        max(0, min(h, int(np.ceil(y1)))),
    )


def page_pixels(image: Image.Image) -> np.ndarray:
    """The page as an (h, w, 3) int16 array: converted once per page, read by every box's planning."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def estimate_colors(
    image: Image.Image | np.ndarray, pbox: tuple[int, int, int, int], cfg: RenderConfig
) -> tuple[RGB, RGB]:
    """(background, text colour) for a pixel box: median of the border ring; ink by contrast.

    ``image``: the page, or its :func:`page_pixels` (a page with many boxes converts once)."""
    rgb = image if isinstance(image, np.ndarray) else page_pixels(image)
    x0, y0, x1, y1 = pbox
    h, w = rgb.shape[:2]
    ex0, ey0, ex1, ey1 = max(0, x0 - 1), max(0, y0 - 1), min(w, x1 + 1), min(h, y1 + 1)
    ring = np.concatenate(
        [
            rgb[ey0, ex0:ex1],
            rgb[ey1 - 1, ex0:ex1],
            rgb[ey0:ey1, ex0],
            rgb[ey0:ey1, ex1 - 1],
            rgb[y0, x0:x1],
            rgb[y1 - 1, x0:x1],
            rgb[y0:y1, x0],
            rgb[y0:y1, x1 - 1],
        ]
    )
    bg = tuple(int(v) for v in np.median(ring, axis=0))
    inside = rgb[y0:y1, x0:x1].reshape(-1, 3)
    dist = np.abs(inside - np.asarray(bg)).max(axis=1)
    ink_px = inside[dist > cfg.ink_threshold]
    color: RGB | None = None
    if len(ink_px) >= 4:
        far = ink_px[dist[dist > cfg.ink_threshold] >= np.percentile(dist[dist > cfg.ink_threshold], 75)]
        cand = tuple(int(v) for v in np.median(far, axis=0))
        if contrast_ratio(cand, bg) >= cfg.min_contrast:
            color = cand  # type: ignore[assignment]
    if color is None:
        color = (
            (0, 0, 0) if contrast_ratio((0, 0, 0), bg) >= contrast_ratio((255, 255, 255), bg) else (255,) * 3
        )
    return bg, color  # type: ignore[return-value]


def _as_mode(color: RGB, mode: str) -> int | tuple[int, ...]:
    if mode == "L":
        return round(0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2])
    if mode == "RGBA":
        return (*color, 255)
    return color


# ---------------------------------------------------------------------------- PNG rendering
def _line_x(line: RenderedLine, inner_w: float, rtl: bool) -> float:
    return inner_w - line.width if rtl else 0.0


def _draw_mask(
    lines: list[RenderedLine],
    size: int,
    asc: float,
    pitch: float,
    inner: tuple[int, int, int, int],
    lang: str,
) -> tuple[Image.Image, int]:
    """Draw the lines into an 'L' mask covering the inner box plus a margin (returned) on every side."""
    x0, y0, x1, y1 = inner
    margin = 2 * size
    mask = Image.new("L", (x1 - x0 + 2 * margin, y1 - y0 + 2 * margin), 0)
    draw = ImageDraw.Draw(mask)
    rtl = languages.get(lang).direction == "rtl"
    for i, line in enumerate(lines):
        baseline = margin + asc + i * pitch
        left = margin + _line_x(line, x1 - x0, rtl)
        for run in line.runs:
            draw.text(
                (left + run.x, baseline),
                run.text,
                fill=255,
                font=fonts.pil_font(run.face, size),
                anchor="ls",
                direction="rtl" if run.rtl else "ltr",
                language=lang,
            )
    return mask, margin


@dataclass
class _Plan:
    pbox: tuple[int, int, int, int]
    inner: tuple[int, int, int, int]
    size: int
    lines: list[RenderedLine]
    mask: Image.Image  # inner-box sized
    bg: RGB
    color: RGB


def _plan_box(
    image: Image.Image,
    box: Box,
    text: str,
    lang: str,
    cfg: RenderConfig,
    bold: bool,
    pixels: np.ndarray | None = None,
) -> _Plan | BoxRender:
    """Decide colours, size, lines and the ink mask of one box without touching the image
    (``pixels``: the page's :func:`page_pixels`, when the caller has them)."""
    missing = fonts.uncovered_chars(text, lang, bold=bold)
    if missing:
        shown = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '?')}" for c in missing[:5])
        return BoxRender(False, RejectReason.GLYPH_COVERAGE, f"no font in the {lang} chain covers: {shown}")
    pbox = _pixel_box(box, image.size)
    p = cfg.padding_px
    inner = (pbox[0] + p, pbox[1] + p, pbox[2] - p, pbox[3] - p)
    iw, ih = inner[2] - inner[0], inner[3] - inner[1]
    if iw <= 0 or ih <= 0:
        return BoxRender(False, RejectReason.TEXT_DOES_NOT_FIT, f"box {box} is too small to hold text")
    m = PilMeasurer(lang)
    fit = fit_text(text, lang, iw, ih, cfg, m, bold=bold)
    if fit is None:
        return BoxRender(
            False,
            RejectReason.TEXT_DOES_NOT_FIT,
            f"{len(text)} characters do not fit a {iw}x{ih} px box at >= "
            f"{cfg.min_px(languages.get(lang).script)} px",
        )
    size, lines, asc, pitch = fit
    language = languages.get(lang)
    chain = fonts.font_chain(lang, bold)
    while True:  # ink (not metrics) must stay inside the box: nudge it in, or shrink when it is too big
        mask, margin = _draw_mask(lines, size, asc, pitch, inner, lang)
        bb = mask.getbbox()
        if bb is None:
            dx = dy = 0
            break
        if bb[2] - bb[0] <= iw and bb[3] - bb[1] <= ih:
            # glyphs with negative side bearings (Bengali/Gurmukhi i-matra, Arabic swashes) may stick
            # out of the metric box by a pixel or two: move the block the least amount that fits it
            dx = max(0, margin - bb[0]) - max(0, bb[2] - (margin + iw))
            dy = max(0, margin - bb[1]) - max(0, bb[3] - (margin + ih))
            break
        size -= 1
        fits = size >= cfg.min_px(language.script)
        got = _layout(text, language, chain, size, iw, ih, cfg, m) if fits else None
        if got is None:
            return BoxRender(
                False, RejectReason.TEXT_DOES_NOT_FIT, f"glyph ink is larger than the {iw}x{ih} px box"
            )
        lines, asc, pitch = got
    mask = mask.crop((margin - dx, margin - dy, margin - dx + iw, margin - dy + ih))
    bg, color = estimate_colors(image if pixels is None else pixels, pbox, cfg)
    return _Plan(pbox, inner, size, lines, mask, bg, color)


def _fill(image: Image.Image, plan: _Plan) -> None:
    image.paste(_as_mode(plan.bg, image.mode), plan.pbox)


def _ink(image: Image.Image, plan: _Plan) -> BoxRender:
    x0, y0 = plan.inner[:2]
    solid = Image.new(image.mode, plan.mask.size, _as_mode(plan.color, image.mode))
    image.paste(solid, (x0, y0), plan.mask)
    bb = plan.mask.getbbox()
    ink = (x0 + bb[0], y0 + bb[1], x0 + bb[2], y0 + bb[3]) if bb else None
    return BoxRender(True, "", "", plan.size, plan.lines, ink, plan.bg, plan.color)


def _check_mode(image: Image.Image) -> None:
    if image.mode not in ("RGB", "RGBA", "L"):
        raise ValueError(f"render needs an RGB, RGBA or L image, got mode {image.mode!r}")


def render_text_in_box(
    image: Image.Image, box: Box, text: str, lang: str, cfg: RenderConfig, *, bold: bool = False
) -> BoxRender:
    """Erase ``box`` to the page background and draw ``text`` (language ``lang``) into it, in place.

    On failure (GLYPH_COVERAGE, TEXT_DOES_NOT_FIT) the image is not modified.
    """
    _check_mode(image)
    plan = _plan_box(image, box, text, lang, cfg, bold)
    if isinstance(plan, BoxRender):
        return plan
    _fill(image, plan)
    return _ink(image, plan)


def _leading_true(flags: np.ndarray) -> int:
    """How many of ``flags`` are True before the first False."""
    stop = np.flatnonzero(~flags)
    return int(stop[0]) if stop.size else int(flags.size)


def grow_box(
    image: Image.Image,
    box: Box,
    others: Sequence[Box],
    cfg: RenderConfig,
    *,
    rtl: bool = False,
    pixels: np.ndarray | None = None,
) -> Box:
    """The box extended into adjoining empty background: sideways (away from the text start), then down.

    Translations are often longer than the English they replace. Instead of rejecting the page, the
    box may take over page background next to it, up to ``cfg.grow_x`` / ``cfg.grow_y`` of its own
    size, stopping at the page edge, at any ink and at any other region. Returns ``box`` unchanged
    when there is no room.
    """
    x0, y0, x1, y1 = _pixel_box(box, image.size)
    if x1 <= x0 or y1 <= y0:
        return tuple(box)  # type: ignore[return-value]
    rgb = page_pixels(image) if pixels is None else pixels
    h, w = rgb.shape[:2]
    bg, _ = estimate_colors(rgb, (x0, y0, x1, y1), cfg)
    margin = max(2, int(0.02 * w))
    gap = 2  # keep a couple of pixels clear of whatever stops the growth
    # the box may reach [left, right) sideways and [y1, bottom) down: only that window is looked at
    left = max(margin, x0 - int((x1 - x0) * cfg.grow_x)) if rtl else x0
    right = x1 if rtl else max(x1, min(w - margin, x1 + int((x1 - x0) * cfg.grow_x)))
    bottom = max(y1, min(h - margin, y1 + int((y1 - y0) * cfg.grow_y)))
    left = min(left, x0)
    win = rgb[y0:bottom, left:right]
    free = np.abs(win - np.asarray(bg, dtype=np.int16)).max(axis=2) <= cfg.ink_threshold // 2
    for ob in others:
        a0, b0, a1, b1 = _pixel_box(ob, image.size)
        if a1 > a0 and b1 > b0 and not (a0 >= x0 and b0 >= y0 and a1 <= x1 and b1 <= y1):
            # other regions are walls (regions nested inside ours are not)
            free[max(0, b0 - y0) : max(0, b1 - y0), max(0, a0 - left) : max(0, a1 - left)] = False
    nx0, nx1 = x0, x1
    if rtl:  # columns x0-1, x0-2, … while free over the box's rows
        cols = free[: y1 - y0, : x0 - left].all(axis=0)[::-1]
        nx0 = min(x0, x0 - _leading_true(cols) + gap)
    else:
        cols = free[: y1 - y0, x1 - left :].all(axis=0)
        nx1 = max(x1, x1 + _leading_true(cols) - gap)
    rows = free[y1 - y0 :, nx0 - left : nx1 - left].all(axis=1)
    ny1 = max(y1, y1 + _leading_true(rows) - gap)
    return (float(nx0), float(y0), float(nx1), float(ny1))


def _wants_render(region: Region) -> bool:
    return bool(region.translatable and region.text and region.text.strip())


def render_page(image: Image.Image, regions: Sequence[Region], lang: str, cfg: RenderConfig) -> PageRender:
    """Render every translatable region with text into a copy of ``image``.

    All boxes are planned on the original pixels first (colours, size), then every successful box is
    erased, then all text is drawn, so overlapping boxes never erase each other's new text. Regions
    that fail keep their pixels and ``rendered=False``; the caller decides whether to keep the page.
    """
    _check_mode(image)
    languages.get(lang)
    out = image.copy()
    new_regions = [replace(r, rendered=False) for r in regions]
    plans: dict[int, _Plan] = {}
    failures: list[RenderFailure] = []
    boxes: dict[int, BoxRender] = {}
    rtl = languages.get(lang).direction == "rtl"
    pixels = page_pixels(image)
    for i, region in enumerate(regions):
        if not _wants_render(region):
            continue
        bold = region.label in cfg.bold_labels
        plan = _plan_box(image, region.bbox, region.text, lang, cfg, bold, pixels)
        if isinstance(plan, BoxRender) and plan.reason == RejectReason.TEXT_DOES_NOT_FIT:
            others = [r.bbox for j, r in enumerate(regions) if j != i]
            grown = grow_box(image, region.bbox, others, cfg, rtl=rtl, pixels=pixels)
            if grown != tuple(region.bbox):
                retry = _plan_box(image, grown, region.text, lang, cfg, bold, pixels)
                if not isinstance(retry, BoxRender):
                    plan = retry
                    new_regions[i].bbox = grown
        if isinstance(plan, BoxRender):
            failures.append(RenderFailure(i, plan.reason, plan.message))
            boxes[i] = plan
        else:
            plans[i] = plan
    for plan in plans.values():
        _fill(out, plan)
    for i, plan in plans.items():
        boxes[i] = _ink(out, plan)
        new_regions[i].rendered = True
    return PageRender(out, new_regions, failures, boxes)
