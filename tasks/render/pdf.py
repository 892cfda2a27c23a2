"""Translated page as a one-page PDF with a real, shaped text layer (reportlab ``Paragraph`` with
``shaping=1``) over the page image with the translated boxes erased.
"""

from __future__ import annotations

import hashlib
import io
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from xml.sax.saxutils import escape

from bidi.mirror import MIRRORED
from PIL import Image

from tasks import languages
from tasks.render import fonts
from tasks.render.config import RenderConfig
from tasks.render.fonts import FontFace
from tasks.render.png import _check_mode, _line_x, _pixel_box, _wants_render, estimate_colors, page_pixels
from tasks.render.text_layout import _STRONG_R, fit_text
from tasks.schema import Region


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

    # recalcTimestamp=False: saving would stamp head.modified with the clock, and the PDF bytes with it
    font = TTFont(str(face.path), fontNumber=face.index, lazy=True, recalcTimestamp=False)
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


def _mirror(text: str) -> str:
    """Bidi mirroring (rule L4) for the words of an RTL run that HarfBuzz would shape as LTR.

    reportlab shapes word by word and lets HarfBuzz guess the direction from the script: a word with
    Arabic letters is shaped RTL (HarfBuzz mirrors its brackets), a lone bracket or quote is not. The
    mirror glyphs are Unicode's Bidi_Mirroring_Glyph pairs (BidiMirroring.txt) as python-bidi ships them.
    """
    words = text.split(" ")
    return " ".join(
        w
        if any(unicodedata.bidirectional(c) in _STRONG_R for c in w)
        else "".join(MIRRORED.get(c, c) for c in w)
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
    pixels = page_pixels(image)  # once per page, read by every region's colour estimate
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
        bg, color = estimate_colors(pixels, pbox, cfg)
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
