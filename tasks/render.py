"""Render translated text back into the layout boxes of a page image (and optionally as a PDF text layer).

Pure functions, no Prefect. The pipeline per box:

1. coverage: every character must have a glyph in the language's font chain (``tasks.fonts``), else
   the box fails with ``RejectReason.GLYPH_COVERAGE`` (never draw tofu);
2. colours: the page background is the median of the box border pixels; the text keeps the original
   ink colour when it contrasts enough with the background, else black or white;
3. layout: the text is cut into line-break atoms (words; characters for zh/ja with no line starting
   with closing punctuation; grapheme clusters for Thai), each line is split into runs of one font
   and one bidi level (simplified Unicode bidi algorithm: Arabic runs are RTL, Latin words and digits
   inside them LTR), runs are placed in visual order (RTL lines right-aligned), and the largest font
   size that fits the box is found by binary search;
4. drawing: every run is shaped by Pillow's RAQM engine (HarfBuzz + FriBiDi) into a mask; ink that
   sticks out of the box (negative side bearings) is nudged in, ink larger than the box makes the
   size smaller; text that does not fit at ``min_font_px`` fails with
   ``RejectReason.TEXT_DOES_NOT_FIT`` and leaves the image untouched.

``page_pdf`` sets the same layout (measured with HarfBuzz) as a real text layer with reportlab
``Paragraph`` objects (``shaping=1``) over the page image with the translated boxes erased.
"""

from __future__ import annotations

import hashlib
import io
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Protocol
from xml.sax.saxutils import escape

import numpy as np
import regex
from PIL import Image, ImageDraw, features

from tasks import fonts, languages
from tasks.fonts import FontFace
from tasks.schema import Region, RejectReason

Box = tuple[float, float, float, float]
RGB = tuple[int, int, int]


# ---------------------------------------------------------------------------- config
def assert_raqm() -> None:
    """Fail loudly when Pillow lacks RAQM: without it complex scripts render as broken, unshaped text."""
    if not features.check("raqm"):
        raise RuntimeError(
            "Pillow was built without RAQM support (or libraqm/libfribidi cannot be loaded): Indic, "
            "Arabic and Thai text would be drawn unshaped. Install the system libraries "
            "(Debian/Ubuntu: `apt-get install libfribidi0 libraqm0 libharfbuzz0b`) and check "
            "`python -c \"from PIL import features; print(features.check('raqm'))\"` prints True."
        )


@dataclass(frozen=True)
class RenderConfig:
    """Everything that decides how a translated box looks (hashed into translated page ids)."""

    min_font_px: int = 9  # smallest readable size; text that only fits below it is rejected
    max_font_px: int = 96
    line_spacing: float = 1.0  # multiple of the fonts' own line height (hhea ascent + descent)
    padding_px: int = 1  # kept free inside each box edge
    bold_labels: tuple[str, ...] = ("title",)
    min_contrast: float = 3.0  # WCAG contrast ratio the original ink colour needs to be kept
    ink_threshold: int = 60  # max channel distance from the background for a pixel to count as ink
    pdf_dpi: float = 96.0  # page image pixels per inch in page_pdf (1 px = 72/dpi pt)
    # When a translation does not fit its box, the box may grow into adjoining empty page background
    # (never over another region or ink) by up to these fractions of its own width / height.
    grow_x: float = 1.5
    grow_y: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bold_labels", tuple(self.bold_labels))  # TOML gives lists
        if not 1 <= self.min_font_px <= self.max_font_px:
            raise ValueError(
                f"need 1 <= min_font_px <= max_font_px, got {self.min_font_px}, {self.max_font_px}"
            )
        if self.grow_x < 0 or self.grow_y < 0:
            raise ValueError("grow_x and grow_y must be >= 0")
        if self.line_spacing <= 0 or self.padding_px < 0 or self.pdf_dpi <= 0:
            raise ValueError("line_spacing and pdf_dpi must be > 0, padding_px >= 0")

    def to_dict(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def hash(self) -> str:
        """A stable short hash of the config (part of translated page ids)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RenderedRun:
    """A piece of one line set in one face and one direction; ``x`` is its offset from the line start."""

    text: str  # logical order
    face: FontFace
    rtl: bool
    x: float
    width: float


@dataclass(frozen=True)
class RenderedLine:
    text: str  # logical order
    runs: tuple[RenderedRun, ...]  # visual order, left to right
    width: float


@dataclass
class BoxRender:
    ok: bool
    reason: str = ""  # a RejectReason code when not ok
    message: str = ""
    font_px: int = 0
    lines: list[RenderedLine] = field(default_factory=list)
    ink_bbox: tuple[int, int, int, int] | None = None  # absolute pixel bbox of the drawn ink
    background: RGB | None = None
    color: RGB | None = None


@dataclass(frozen=True)
class RenderFailure:
    index: int  # region index in the page
    reason: str
    message: str


@dataclass
class PageRender:
    image: Image.Image
    regions: list[Region]
    failures: list[RenderFailure]
    boxes: dict[int, BoxRender]

    @property
    def ok(self) -> bool:
        return not self.failures


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


def estimate_colors(
    image: Image.Image, pbox: tuple[int, int, int, int], cfg: RenderConfig
) -> tuple[RGB, RGB]:
    """(background, text colour) for a pixel box: median of the border ring; ink by contrast."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
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


# ---------------------------------------------------------------------------- bidi + font runs
_STRONG_R = {"R", "AL"}


def bidi_levels(text: str, rtl_base: bool) -> list[int]:
    """Embedding levels per character (simplified UBA: rules W1–W7, N1–N2, I1–I2; no explicit embeddings).

    Enough for translated prose: Arabic letters level 1, Latin words and numbers inside RTL text
    level 2 (so they stay left-to-right), neutrals take the direction of their neighbours.
    """
    base = 1 if rtl_base else 0
    types = [unicodedata.bidirectional(ch) or "ON" for ch in text]
    if not rtl_base and not any(t in _STRONG_R or t == "AN" for t in types):
        return [0] * len(text)
    sos = "R" if rtl_base else "L"
    # W1: NSM takes the previous type.
    prev = sos
    for i, t in enumerate(types):
        if t == "NSM":
            types[i] = prev
        prev = types[i]
    # W2 / W3: EN after AL → AN; AL → R.
    last_strong = sos
    for i, t in enumerate(types):
        if t in ("L", "R", "AL"):
            last_strong = t
        elif t == "EN" and last_strong == "AL":
            types[i] = "AN"
    types = ["R" if t == "AL" else t for t in types]
    # W4: a single separator between two numbers of the same type joins them.
    for i in range(1, len(types) - 1):
        a, t, b = types[i - 1], types[i], types[i + 1]
        if (t == "ES" and a == b == "EN") or (t == "CS" and a == b and a in ("EN", "AN")):
            types[i] = a
    # W5: terminators next to European numbers become numbers.
    i = 0
    while i < len(types):
        if types[i] == "ET":
            j = i
            while j < len(types) and types[j] == "ET":
                j += 1
            if (i > 0 and types[i - 1] == "EN") or (j < len(types) and types[j] == "EN"):
                types[i:j] = ["EN"] * (j - i)
            i = j
        else:
            i += 1
    # W7: EN after an L context becomes L.
    last_strong = sos
    for i, t in enumerate(types):
        if t in ("L", "R"):
            last_strong = t
        elif t == "EN" and last_strong == "L":
            types[i] = "L"
    # N1 / N2: neutrals between same-direction context take it, else the base direction.
    strong = {"L": "L", "R": "R", "EN": "R", "AN": "R"}
    i = 0
    while i < len(types):
        if types[i] in strong:
            i += 1
            continue
        j = i
        while j < len(types) and types[j] not in strong:
            j += 1
        before = strong[types[i - 1]] if i > 0 else sos
        after = strong[types[j]] if j < len(types) else sos
        fill = before if before == after else sos
        types[i:j] = [fill] * (j - i)
        i = j
    levels = []
    for t in types:
        if base == 0:
            levels.append({"L": 0, "R": 1}.get(t, 2))
        else:
            levels.append(1 if t == "R" else 2)
    return levels


def _assign_faces(text: str, chain: list[FontFace]) -> list[FontFace | None]:
    """Per character: letters take the first face covering them; marks, digits, punctuation and spaces
    stay with the previous character's face when it covers them (so 'PDF 2024' is one Latin run)."""
    out: list[FontFace | None] = []
    prev: FontFace | None = None
    for ch in text:
        cat = unicodedata.category(ch)
        if fonts.ignorable(ch) or (cat[0] != "L" and prev is not None and fonts.covers(prev, ch)):
            face = prev
        else:
            face = fonts.face_for_char(ch, chain)
        out.append(face)
        if face is not None:
            prev = face
    # leading ignorables: take the first assigned face (or the primary face)
    first = next((f for f in out if f is not None), chain[0])
    for i, f in enumerate(out):
        if f is not None:
            break
        out[i] = first
    return out


def split_runs(text: str, lang: languages.Language, chain: list[FontFace]) -> list[tuple[str, FontFace, int]]:
    """Split a line into (text, face, bidi level) runs in visual order (left to right)."""
    if not text:
        return []
    faces = _assign_faces(text, chain)
    levels = bidi_levels(text, lang.direction == "rtl")
    runs: list[tuple[str, FontFace, int]] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or faces[i] is not faces[start] or levels[i] != levels[start]:
            runs.append((text[start:i], faces[start] or chain[0], levels[start]))
            start = i
    # L2: reverse contiguous runs at each level from the highest down to the lowest odd level.
    top = max(r[2] for r in runs)
    low_odd = min((r[2] for r in runs if r[2] % 2), default=top + 1)
    for level in range(top, low_odd - 1, -1):
        i = 0
        while i < len(runs):
            if runs[i][2] >= level:
                j = i
                while j < len(runs) and runs[j][2] >= level:
                    j += 1
                runs[i:j] = runs[i:j][::-1]
                i = j
            else:
                i += 1
    return runs


# ---------------------------------------------------------------------------- line breaking
_OPENING = set("([{‘“«‹〈《「『【〔〖〘〚（［｛｟＜")
_CLOSING = set(
    ")]}’”»›〉》」』】〕〗〙〛）］｝｠＞、。，．,.!?;:％%·・ー゛゜ゝゞヽヾ々〻"
    "ぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶ！？：；‐–—〜～…‥"
)
_PREFER_SPACE = 0.6
_THAI_NO_START = set("ะาำๅๆฯ")
_THAI_NO_END = set("เแโใไ")
_ALNUM_RUN = r"[\p{Latin}\p{Cyrillic}\p{Greek}\p{Nd}]+"
_ATOMS = {
    "char": regex.compile(rf"\s+|{_ALNUM_RUN}|\X"),
    "cluster": regex.compile(rf"\s+|{_ALNUM_RUN}|\X"),
}


def _segments(paragraph: str, mode: str) -> list[str]:
    """Unbreakable pieces of a paragraph; whitespace pieces are break opportunities (dropped at edges)."""
    if mode == "word":
        return [p for p in regex.split(r"(\s+)", paragraph) if p]
    atoms = _ATOMS[mode].findall(paragraph)
    segs: list[str] = []
    for atom in atoms:
        if segs and not atom.isspace() and not segs[-1].isspace():
            glue = atom[0] in _CLOSING or segs[-1][-1] in _OPENING
            if mode == "cluster":
                glue = glue or atom[0] in _THAI_NO_START or segs[-1][-1] in _THAI_NO_END
            if glue:
                segs[-1] += atom
                continue
        segs.append(atom)
    return segs


def _paragraphs(text: str) -> list[str]:
    """Hard line breaks split paragraphs; other whitespace runs collapse to one space."""
    out = []
    for para in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        para = regex.sub(r"[^\S\n]+", " ", para).strip()
        if para:
            out.append(para)
    return out


# ---------------------------------------------------------------------------- measuring
class Measurer(Protocol):
    def width(self, text: str, face: FontFace, size: int, rtl: bool) -> float: ...
    def metrics(self, face: FontFace, size: int) -> tuple[float, float]: ...


class PilMeasurer:
    """Widths from Pillow's RAQM layout (what render_text_in_box draws), in pixels."""

    def __init__(self, lang: str) -> None:
        self.lang = lang

    def width(self, text: str, face: FontFace, size: int, rtl: bool) -> float:
        return _pil_width(text, face.path, face.index, size, "rtl" if rtl else "ltr", self.lang)

    def metrics(self, face: FontFace, size: int) -> tuple[float, float]:
        asc, desc = fonts.pil_font(face, size).getmetrics()
        return float(asc), float(desc)


@lru_cache(maxsize=65536)
def _pil_width(text: str, path: Path, index: int, size: int, direction: str, lang: str) -> float:
    font = fonts.pil_font_file(path, index, size)
    return float(font.getlength(text, direction=direction, language=lang))


def _layout(
    text: str,
    lang: languages.Language,
    chain: list[FontFace],
    size: int,
    max_w: float,
    max_h: float,
    cfg: RenderConfig,
    m: Measurer,
) -> tuple[list[RenderedLine], float, float] | None:
    """Lines at ``size`` px that fit (max_w, max_h), with (ascent, line pitch); None if they do not fit."""
    used = {id(f): f for f in _assign_faces(text, chain) if f is not None}.values()
    asc = max(m.metrics(f, size)[0] for f in used)
    desc = max(m.metrics(f, size)[1] for f in used)
    pitch = (asc + desc) * cfg.line_spacing
    max_lines = int((max_h - (asc + desc)) // pitch) + 1 if max_h >= asc + desc else 0
    if max_lines < 1:
        return None
    primary = chain[0]

    def seg_width(seg: str) -> float:
        if seg.isspace():
            return m.width(" ", primary, size, False)
        return sum(m.width(t, f, size, lvl % 2 == 1) for t, f, lvl in split_runs(seg, lang, chain))

    # Greedy fill. Thai ("cluster") may break between any grapheme clusters, but a space (Thai puts
    # them between phrases) is preferred when it leaves the line at least PREFER_SPACE full.
    line_texts: list[str] = []
    for para in _paragraphs(text):
        cur: list[tuple[str, float]] = []
        for seg in _segments(para, lang.line_break):
            w = seg_width(seg)
            if seg.isspace():
                if cur:
                    cur.append((seg, w))
                continue
            if w > max_w:
                return None  # one unbreakable piece is wider than the box
            while cur and sum(x[1] for x in cur) + w > max_w:
                cut = len(cur)
                if lang.line_break == "cluster":
                    acc, best = 0.0, None
                    for k, (piece, pw) in enumerate(cur):
                        if piece.isspace() and acc >= _PREFER_SPACE * max_w:
                            best = k
                        acc += pw
                    cut = best if best is not None else cut
                line_texts.append("".join(x[0] for x in cur[:cut]).strip())
                cur = cur[cut:]
                while cur and cur[0][0].isspace():
                    cur.pop(0)
            cur.append((seg, w))
            if len(line_texts) >= max_lines:
                return None
        if cur:
            line_texts.append("".join(x[0] for x in cur).strip())
    if not line_texts or len(line_texts) > max_lines:
        return None
    lines: list[RenderedLine] = []
    for lt in line_texts:
        runs, x = [], 0.0
        for t, f, lvl in split_runs(lt, lang, chain):
            w = m.width(t, f, size, lvl % 2 == 1)
            runs.append(RenderedRun(t, f, lvl % 2 == 1, x, w))
            x += w
        if x > max_w + 0.5:  # shaping across segments made the line wider than the estimate
            return None
        lines.append(RenderedLine(lt, tuple(runs), x))
    return lines, asc, pitch


def fit_text(
    text: str, lang: str, width: float, height: float, cfg: RenderConfig, m: Measurer, *, bold: bool = False
) -> tuple[int, list[RenderedLine], float, float] | None:
    """Largest integer size in [min_font_px, max_font_px] whose layout fits; (size, lines, ascent, pitch)."""
    language = languages.get(lang)
    chain = fonts.font_chain(lang, bold)
    lo, hi = cfg.min_font_px, cfg.max_font_px
    best = _layout(text, language, chain, lo, width, height, cfg, m)
    if best is None:
        return None
    best_size = lo
    lo += 1
    while lo <= hi:
        mid = (lo + hi) // 2
        got = _layout(text, language, chain, mid, width, height, cfg, m)
        if got is None:
            hi = mid - 1
        else:
            best, best_size, lo = got, mid, mid + 1
    lines, asc, pitch = best
    return best_size, lines, asc, pitch


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
    image: Image.Image, box: Box, text: str, lang: str, cfg: RenderConfig, bold: bool
) -> _Plan | BoxRender:
    """Decide colours, size, lines and the ink mask of one box without touching the image."""
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
            f"{len(text)} characters do not fit a {iw}x{ih} px box at >= {cfg.min_font_px} px",
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
        got = _layout(text, language, chain, size, iw, ih, cfg, m) if size >= cfg.min_font_px else None
        if got is None:
            return BoxRender(
                False, RejectReason.TEXT_DOES_NOT_FIT, f"glyph ink is larger than the {iw}x{ih} px box"
            )
        lines, asc, pitch = got
    mask = mask.crop((margin - dx, margin - dy, margin - dx + iw, margin - dy + ih))
    bg, color = estimate_colors(image, pbox, cfg)
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


def grow_box(
    image: Image.Image, box: Box, others: Sequence[Box], cfg: RenderConfig, *, rtl: bool = False
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
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    h, w = rgb.shape[:2]
    bg, _ = estimate_colors(image, (x0, y0, x1, y1), cfg)
    free = np.abs(rgb - np.asarray(bg)).max(axis=2) <= cfg.ink_threshold // 2
    for ob in others:
        a0, b0, a1, b1 = _pixel_box(ob, image.size)
        if a1 > a0 and b1 > b0 and not (a0 >= x0 and b0 >= y0 and a1 <= x1 and b1 <= y1):
            free[b0:b1, a0:a1] = False  # other regions are walls (regions nested inside ours are not)
    margin = max(2, int(0.02 * w))
    gap = 2  # keep a couple of pixels clear of whatever stops the growth
    nx0, nx1 = x0, x1
    limit = int((x1 - x0) * cfg.grow_x)
    if rtl:
        while nx0 - 1 >= margin and x0 - (nx0 - 1) <= limit and free[y0:y1, nx0 - 1].all():
            nx0 -= 1
        nx0 = min(x0, nx0 + gap)
    else:
        while nx1 < w - margin and nx1 + 1 - x1 <= limit and free[y0:y1, nx1].all():
            nx1 += 1
        nx1 = max(x1, nx1 - gap)
    ny1 = y1
    ylimit = int((y1 - y0) * cfg.grow_y)
    while ny1 < h - margin and ny1 + 1 - y1 <= ylimit and free[ny1, nx0:nx1].all():
        ny1 += 1
    ny1 = max(y1, ny1 - gap)
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
    for i, region in enumerate(regions):
        if not _wants_render(region):
            continue
        bold = region.label in cfg.bold_labels
        plan = _plan_box(image, region.bbox, region.text, lang, cfg, bold)
        if isinstance(plan, BoxRender) and plan.reason == RejectReason.TEXT_DOES_NOT_FIT:
            others = [r.bbox for j, r in enumerate(regions) if j != i]
            grown = grow_box(image, region.bbox, others, cfg, rtl=rtl)
            if grown != tuple(region.bbox):
                retry = _plan_box(image, grown, region.text, lang, cfg, bold)
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


# ---------------------------------------------------------------------------- PDF
class HbMeasurer:
    """Widths from HarfBuzz (what reportlab's shaping draws), in pixel units of the page image."""

    def __init__(self, faces: dict[FontFace, bytes]) -> None:
        self.faces = faces

    def width(self, text: str, face: FontFace, size: int, rtl: bool) -> float:
        return _hb_width(self.faces[face], text) * size

    def metrics(self, face: FontFace, size: int) -> tuple[float, float]:
        asc, desc = _hb_metrics(self.faces[face])
        return asc * size, desc * size


@lru_cache(maxsize=32)
def _hb_font(data: bytes):
    import uharfbuzz as hb

    face = hb.Face(hb.Blob(data))
    return hb.Font(face), face.upem


@lru_cache(maxsize=65536)
def _hb_width(data: bytes, text: str) -> float:
    """Advance width of ``text`` at 1 px per em, shaped word by word like reportlab does."""
    import uharfbuzz as hb

    font, upem = _hb_font(data)
    total = 0.0
    for i, word in enumerate(text.split(" ")):
        if i:
            total += _hb_advance(font, " ")
        if word:
            total += _hb_advance(font, word)
    del hb
    return total / upem


def _hb_advance(font, text: str) -> int:
    import uharfbuzz as hb

    buf = hb.Buffer()
    buf.add_str(text)
    buf.guess_segment_properties()
    hb.shape(font, buf, {"kern": True, "liga": True, "dlig": True})
    return sum(p.x_advance for p in buf.glyph_positions)


@lru_cache(maxsize=32)
def _hb_metrics(data: bytes) -> tuple[float, float]:
    from fontTools.ttLib import TTFont

    f = TTFont(io.BytesIO(data), lazy=True)
    upem = f["head"].unitsPerEm
    return f["hhea"].ascent / upem, -f["hhea"].descent / upem


@lru_cache(maxsize=64)
def _face_bytes(face: FontFace, chars: frozenset[str] | None) -> bytes:
    """TrueType bytes reportlab can embed: the file itself, or for CFF-flavoured faces (Noto CJK, which
    reportlab rejects: 'postscript outlines are not supported') a subset to ``chars`` converted to
    quadratic glyf outlines."""
    from fontTools.ttLib import TTFont

    font = TTFont(str(face.path), fontNumber=face.index, lazy=True)
    if "glyf" in font and face.path.suffix.lower() == ".ttf":
        return face.path.read_bytes()
    return _cff_subset_to_ttf(face, chars or frozenset())


def _cff_subset_to_ttf(face: FontFace, chars: frozenset[str]) -> bytes:
    from fontTools import subset
    from fontTools.pens.cu2quPen import Cu2QuPen
    from fontTools.pens.ttGlyphPen import TTGlyphPen
    from fontTools.ttLib import TTFont, newTable

    font = TTFont(str(face.path), fontNumber=face.index, lazy=True)
    opts = subset.Options()
    opts.layout_features = ["*"]
    opts.name_IDs = ["*"]
    opts.notdef_outline = True
    opts.glyph_names = True
    opts.hinting = False
    opts.desubroutinize = True
    sub = subset.Subsetter(opts)
    sub.populate(text="".join(sorted(chars)) + " ")
    sub.subset(font)
    if "CFF " in font:
        glyph_set = font.getGlyphSet()
        order = font.getGlyphOrder()
        glyf = newTable("glyf")
        glyf.glyphOrder = order
        glyf.glyphs = {}
        for name in order:
            pen = TTGlyphPen(None)
            glyph_set[name].draw(Cu2QuPen(pen, 1.0, reverse_direction=True))
            glyf[name] = pen.glyph()
        font["glyf"] = glyf
        font["loca"] = newTable("loca")
        for tag in ("CFF ", "VORG"):
            if tag in font:
                del font[tag]
        font.sfntVersion = "\x00\x01\x00\x00"
        maxp = font["maxp"]
        maxp.tableVersion = 0x00010000
        for attr in [
            "maxZones",
            "maxTwilightPoints",
            "maxStorage",
            "maxFunctionDefs",
            "maxInstructionDefs",
            "maxStackElements",
            "maxSizeOfInstructions",
            "maxComponentElements",
            "maxPoints",
            "maxContours",
            "maxCompositePoints",
            "maxCompositeContours",
            "maxComponentDepth",
        ]:
            setattr(maxp, attr, 0)
        maxp.maxZones = 1
        font["head"].indexToLocFormat = 0
        post = font["post"]
        post.formatType = 2.0
        post.extraNames = []
        post.mapping = {}
    buf = io.BytesIO()
    font.save(buf)
    return buf.getvalue()


def _register(face: FontFace, data: bytes) -> str:
    """Register font bytes with reportlab under a content-derived name (idempotent)."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    name = f"m3dr-{face.name}-{hashlib.sha1(data).hexdigest()[:10]}"
    if name not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont(name, io.BytesIO(data)))
    return name


_MIRROR = dict(zip("()[]{}<>«»‹›", ")(][}{><»«›‹", strict=True))


def _mirror(text: str) -> str:
    """Bidi mirroring (rule L4) for the words of an RTL run that HarfBuzz would shape as LTR.

    reportlab shapes word by word and lets HarfBuzz guess the direction from the script: a word with
    Arabic letters is shaped RTL (HarfBuzz mirrors its brackets), a lone bracket or quote is not.
    """
    words = text.split(" ")
    return " ".join(
        w
        if any(unicodedata.bidirectional(c) in _STRONG_R for c in w)
        else "".join(_MIRROR.get(c, c) for c in w)
        for w in words
    )


def _actual_text(s: str) -> str:
    return "<FEFF" + s.encode("utf-16-be").hex().upper() + ">"


def page_pdf(image: Image.Image, regions: Sequence[Region], lang: str, cfg: RenderConfig) -> bytes:
    """A one-page PDF: the page image with translated boxes erased, and the translated text as real text.

    Page size is the image size at ``cfg.pdf_dpi``. Every region that ``render_page`` renders gets
    its text laid out by the same engine (line breaking, font runs, bidi, binary-searched size),
    measured with HarfBuzz, and each run is drawn as a reportlab ``Paragraph`` with ``shaping=1``.
    Text extraction (pypdfium2) in LTR languages is exact: every run carries an ``/ActualText``
    span, because shaped Indic conjuncts have no code point of their own and reportlab maps them to
    private-use characters. In RTL languages runs are emitted in visual order (reportlab has no bidi
    without rlbidi: the words of an RTL run are handed over reversed, lone brackets mirrored) with no
    ActualText, since pdfium reverses the letters of ActualText inside RTL lines; pdfium's own bidi
    then reads Arabic words, punctuation, brackets and Latin words back in logical order (Arabic as
    presentation forms: compare after NFKC). Known pdfium read-back errors, drawing correct: a
    Latin+digit group ("PDF 2024") or Arabic-Indic digits inside an RTL line.
    Raises ValueError when a region cannot be set (coverage, fit); the PNG renderer rejects those first.
    """
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen import canvas
    from reportlab.platypus import Paragraph

    _check_mode(image)
    language = languages.get(lang)
    scale = 72.0 / cfg.pdf_dpi
    base = image.convert("RGB")
    todo = [(i, r) for i, r in enumerate(regions) if _wants_render(r)]
    placed = []
    for i, region in todo:
        bold = region.label in cfg.bold_labels
        missing = fonts.uncovered_chars(region.text, lang, bold=bold)
        if missing:
            raise ValueError(f"region {i}: no font covers {missing[:5]}")
        chain = fonts.font_chain(lang, bold)
        chars = frozenset(region.text)
        data = {f: _face_bytes(f, chars if f.path.suffix.lower() == ".ttc" else None) for f in chain}
        pbox = _pixel_box(region.bbox, image.size)
        p = cfg.padding_px
        iw, ih = pbox[2] - pbox[0] - 2 * p, pbox[3] - pbox[1] - 2 * p
        fit = (
            fit_text(region.text, lang, iw, ih, cfg, HbMeasurer(data), bold=bold)
            if iw > 0 and ih > 0
            else None
        )
        if fit is None:
            raise ValueError(f"region {i}: text does not fit its box at >= {cfg.min_font_px} px")
        bg, color = estimate_colors(image, pbox, cfg)
        placed.append((pbox, fit, data, bg, color))
    for pbox, _fit, _data, bg, _color in placed:
        base.paste(bg, pbox)

    buf = io.BytesIO()
    width_pt, height_pt = image.width * scale, image.height * scale
    c = canvas.Canvas(buf, pagesize=(width_pt, height_pt), invariant=1, pageCompression=1)
    c.setTitle(f"m3dr page ({lang})")
    c.drawImage(ImageReader(base), 0, 0, width=width_pt, height=height_pt)
    rtl = language.direction == "rtl"
    for pbox, (size, lines, asc, pitch), data, _bg, color in placed:
        names = {f: _register(f, b) for f, b in data.items()}
        measurer = HbMeasurer(data)
        inner_x, inner_y, inner_w = pbox[0] + cfg.padding_px, pbox[1] + cfg.padding_px, pbox[2] - pbox[0]
        inner_w -= 2 * cfg.padding_px
        font_pt = size * scale
        hex_color = "#{:02x}{:02x}{:02x}".format(*color)
        for li, line in enumerate(lines):
            baseline_px = inner_y + asc + li * pitch
            left_px = inner_x + _line_x(line, inner_w, rtl)
            for run in line.runs:
                stripped = run.text.strip()
                if not stripped:
                    continue
                # Paragraph drops edge spaces: shift by the ones on the visual left (logical end if RTL)
                left_spaces = len(run.text) - len(run.text.rstrip() if run.rtl else run.text.lstrip())
                shift_px = measurer.width(" " * left_spaces, run.face, size, False) if left_spaces else 0.0
                # reportlab has no bidi of its own (rlbidi is not installable): give it the words of an
                # RTL run in visual order; HarfBuzz orders the glyphs inside each word.
                shown = _mirror(" ".join(reversed(stripped.split(" ")))) if run.rtl else stripped
                style = ParagraphStyle(
                    "m3dr",
                    fontName=names[run.face],
                    fontSize=font_pt,
                    leading=font_pt * 1.2,
                    textColor=hex_color,
                    shaping=1,
                )
                para = Paragraph(escape(shown), style)
                _, h = para.wrap(run.width * scale * 1.05 + font_pt * 2, height_pt)
                x_pt = (left_px + run.x + shift_px) * scale
                y_pt = height_pt - baseline_px * scale - (h - font_pt)
                actual = not rtl  # see the docstring: pdfium mis-reads ActualText inside RTL lines
                if actual:
                    c.addLiteral(f"/Span <</ActualText {_actual_text(stripped)}>> BDC")
                para.drawOn(c, x_pt, y_pt)
                if actual:
                    c.addLiteral("EMC")
    c.showPage()
    c.save()
    return buf.getvalue()


__all__ = [
    "BoxRender",
    "PageRender",
    "RenderConfig",
    "RenderFailure",
    "RenderedLine",
    "RenderedRun",
    "assert_raqm",
    "bidi_levels",
    "contrast_ratio",
    "estimate_colors",
    "fit_text",
    "page_pdf",
    "render_page",
    "render_text_in_box",
    "split_runs",
]
