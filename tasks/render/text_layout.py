"""Text layout for rendering: bidi levels, font runs per script, line breaking, measuring and fitting."""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import regex
from bidi import get_display

from tasks import languages
from tasks.render import fonts
from tasks.render.config import RenderConfig, RenderedLine, RenderedRun
from tasks.render.fonts import FontFace

# ---------------------------------------------------------------------------- bidi + font runs
_STRONG_R = {"R", "AL"}
# Bidi classes that can make a level other than 0 in an LTR paragraph: strong RTL, Arabic numbers and
# the explicit embeddings/overrides/isolates. Text without any of them skips the library (all level 0).
_NOT_PLAIN_LTR = _STRONG_R | {"AN", "LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}
# python-bidi (0.6.x, a binding of the Rust crate unicode-bidi) exposes the resolved levels only as the
# pretty-printed `BidiInfo` of `get_display(..., debug=True)`: one `Level(n)` per UTF-8 byte in its
# `levels` field. The field is anchored on a real newline, which the escaped `text` field cannot hold.
_LEVELS_FIELD = regex.compile(r"\n    levels: \[\n(.*?)\n    \],\n", regex.DOTALL)
_LEVEL = regex.compile(r"Level\(\s*(\d+),\s*\)")


def bidi_levels(text: str, rtl_base: bool) -> list[int]:
    """Embedding levels per character from the Unicode Bidirectional Algorithm (UAX #9), via python-bidi.

    The paragraph level is given (1 if ``rtl_base``), not guessed from the text. Levels are the resolved
    ones of rules X1–I2 (before the per-line rule L1): Arabic/Hebrew letters at level 1, Latin words and
    numbers inside RTL text at level 2, neutrals by their neighbours and bracket pairs. Pure-LTR text in
    an LTR paragraph is all level 0 without calling the library.
    """
    if not text:
        return []
    if not rtl_base and not any(unicodedata.bidirectional(ch) in _NOT_PLAIN_LTR for ch in text):
        return [0] * len(text)
    return list(_uba_levels(text, rtl_base))


@lru_cache(maxsize=65536)
def _uba_levels(text: str, rtl_base: bool) -> tuple[int, ...]:
    """The library's per-character levels (cached: line fitting measures the same words at many sizes)."""
    info = get_display(text, base_dir="R" if rtl_base else "L", debug=True)
    field = _LEVELS_FIELD.search(info)
    per_byte = [int(n) for n in _LEVEL.findall(field.group(1))] if field else []
    if len(per_byte) != len(text.encode("utf-8")):
        raise RuntimeError(f"cannot read python-bidi's levels for {text!r} (its debug output changed?)")
    levels, at = [], 0
    for ch in text:  # a character's level is the level of its first UTF-8 byte
        levels.append(per_byte[at])
        cp = ord(ch)
        at += 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4
    return tuple(levels)


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
    """Largest size in [cfg.min_px(script), max_font_px] whose layout fits; (size, lines, ascent, pitch)."""
    language = languages.get(lang)
    chain = fonts.font_chain(lang, bold)
    lo, hi = cfg.min_px(language.script), cfg.max_font_px
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
