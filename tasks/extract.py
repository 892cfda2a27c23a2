"""Ingest and region text: source files → page images, and region text from the PDF text layer or OCR.

Reading sources (:func:`iter_source_pages`)
    PDFs are rendered with pypdfium2 at ``dpi`` (long side at least ``min_side``, at most ``max_side``);
    images are opened
    lazily, their header size checked against ``max_pixels`` *before* decoding, EXIF-transposed,
    flattened onto white, converted to RGB and downscaled to ``max_side``. Multi-frame TIFFs give one
    page per frame. A problem with the whole file raises :class:`SourceError` (a reject reason code
    from :class:`tasks.schema.RejectReason`); a problem with one page of a PDF is *yielded* as a
    :class:`SourceError` in that page's place, so the good pages still come through::

        for item in iter_source_pages(path):
            if isinstance(item, SourceError):   # one bad page
                ...record a reject; continue
            regions = extract_region_text(item, detector.detect(item.image), ocr)

    A PDF page whose text layer has (almost) no letters (a scan) is marked ``text_source="ocr"``.

Region text (:func:`extract_region_text`)
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

import ctypes
import hashlib
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.schema import TRANSLATABLE_LABELS, Region, Reject, RejectReason

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}
)
_MULTI_FRAME = {".tif", ".tiff"}
# PDFium is not thread-safe (not even across documents): every pypdfium2 call in this module holds this
# lock, so ingest can run in a thread pool. Other modules calling pypdfium2 in-process should take it too.
PDFIUM_LOCK = threading.RLock()
# A PDF page with fewer letters than this in its text layer is treated as a scan (OCR), e.g. a scanned
# page whose only text object is a stamped page number.
MIN_TEXT_LAYER_LETTERS = 10
# An uncovered text block with at least this many letters becomes a "text" region (a missed heading such
# as "Contents" or "Introduction"); smaller leftovers (page numbers, "Bug") are only counted.
MIN_BLOCK_LETTERS = 8


class SourceError(Exception):
    """A source (or one page of it) that cannot become a page; ``reason`` is a RejectReason code."""

    def __init__(self, reason: str, message: str, *, page_index: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.page_index = page_index

    def to_reject(self, input_ref: str, *, stage: str = "ingest", lang: str = "en") -> Reject:
        where = f" (page {self.page_index})" if self.page_index is not None else ""
        return Reject(
            stage=stage, input_ref=input_ref, reason=self.reason, message=self.message + where, lang=lang
        )


# ---------------------------------------------------------------------------- ids
def source_id(path: Path | str) -> str:
    """Content id of a source file: sha256 of its bytes (32 hex chars)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def page_id(source_id: str, page_index: int) -> str:
    """Content id of an English page: hash of its source's content id and its 0-based index."""
    return hashlib.sha256(f"page:{source_id}:{int(page_index)}".encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------- pages
@dataclass
class SourcePage:
    """One page image of a source, plus what is needed to read a PDF page's text layer.

    ``pdf_page`` is a live ``pypdfium2.PdfPage``: valid only until the iterator moves on (the document
    stays open while iterating). ``pt_to_px`` is the affine (a, b, c, d, e, f) mapping PDF page points
    to image pixels: ``x_px = a*x + c*y + e``, ``y_px = b*x + d*y + f``.
    """

    source_id: str
    source_uri: str
    page_index: int
    image: Image.Image
    text_source: str  # "pdf" | "ocr"
    pdf_page: Any | None = None
    page_size_pt: tuple[float, float] | None = None
    scale: float | None = None  # pixels per point
    pt_to_px: tuple[float, float, float, float, float, float] | None = None

    @property
    def page_id(self) -> str:
        return page_id(self.source_id, self.page_index)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def iter_source_pages(
    path: Path | str,
    *,
    dpi: float = 144,
    max_side: int = 2000,
    min_side: int = 1024,
    max_pixels: int = 40_000_000,
    source_uri: str | None = None,
) -> Iterator[SourcePage | SourceError]:
    """Yield the pages of a PDF or image file (see the module docstring for the error contract)."""
    path = Path(path)
    uri = source_uri if source_uri is not None else str(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise SourceError(
            RejectReason.UNSUPPORTED_TYPE,
            f"unsupported file type {suffix or '(no suffix)'!r};"
            f" supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}",
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SourceError(RejectReason.UNREADABLE, f"cannot read file: {exc}") from exc
    if size == 0:
        raise SourceError(RejectReason.EMPTY_FILE, "file is empty (0 bytes)")
    sid = source_id(path)
    if suffix == ".pdf":
        yield from _pdf_pages(path, sid, uri, dpi=dpi, max_side=max_side, min_side=min_side)
    else:
        yield from _image_pages(path, sid, uri, max_side=max_side, max_pixels=max_pixels)


def _pdf_pages(
    path: Path, sid: str, uri: str, *, dpi: float, max_side: int, min_side: int = 1024
) -> Iterator[SourcePage | SourceError]:
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    try:
        with PDFIUM_LOCK:
            pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == pdfium_c.FPDF_ERR_PASSWORD:
            raise SourceError(RejectReason.ENCRYPTED_PDF, "PDF is password protected") from exc
        raise SourceError(RejectReason.UNREADABLE, f"not a readable PDF: {exc}") from exc
    try:
        with PDFIUM_LOCK:
            n = len(pdf)
        if n == 0:
            raise SourceError(RejectReason.UNREADABLE, "PDF has no pages")
        for index in range(n):
            page = None
            try:
                with PDFIUM_LOCK:
                    page = pdf[index]
                    item: SourcePage | SourceError = _render_pdf_page(
                        page, sid, uri, index, dpi, max_side, min_side
                    )
            except SourceError as exc:
                item = exc
            except Exception as exc:  # pdfium errors, bad page dictionaries, ...
                item = SourceError(
                    RejectReason.UNREADABLE, f"page {index}: {type(exc).__name__}: {exc}", page_index=index
                )
            try:
                yield item
            finally:
                if page is not None:
                    with PDFIUM_LOCK:
                        page.close()
    finally:
        with PDFIUM_LOCK:
            pdf.close()


def _render_pdf_page(
    page: Any, sid: str, uri: str, index: int, dpi: float, max_side: int, min_side: int = 1024
) -> SourcePage:
    w_pt, h_pt = page.get_size()
    if not (w_pt > 1 and h_pt > 1):
        raise SourceError(
            RejectReason.UNREADABLE, f"page {index} has no area ({w_pt}×{h_pt} pt)", page_index=index
        )
    # dpi, but small pages (slides, A6) are scaled up to a long side of ``min_side`` so their text
    # stays legible; never beyond ``max_side``.
    scale = min(max(dpi / 72.0, min_side / max(w_pt, h_pt)), max_side / max(w_pt, h_pt))
    if min(w_pt, h_pt) * scale < 8:
        raise SourceError(
            RejectReason.UNREADABLE,
            f"page {index} is too thin to render ({w_pt:.0f}×{h_pt:.0f} pt)",
            page_index=index,
        )
    image = page.render(scale=scale).to_pil().convert("RGB")
    matrix = _page_to_device(page, image.width, image.height)
    textpage = page.get_textpage()
    try:
        has_text = _text_layer_has_letters(textpage)
    finally:
        textpage.close()
    return SourcePage(
        source_id=sid,
        source_uri=uri,
        page_index=index,
        image=image,
        text_source="pdf" if has_text else "ocr",
        pdf_page=page,
        page_size_pt=(float(w_pt), float(h_pt)),
        scale=float(scale),
        pt_to_px=matrix,
    )


def _page_to_device(page: Any, width: int, height: int) -> tuple[float, float, float, float, float, float]:
    """PDFium's page→pixel affine for a render of ``width``×``height`` (rotation and crop box included)."""
    import pypdfium2.raw as pdfium_c

    def d2p(x: int, y: int) -> tuple[float, float]:
        px, py = ctypes.c_double(), ctypes.c_double()
        pdfium_c.FPDF_DeviceToPage(page, 0, 0, width, height, 0, x, y, ctypes.byref(px), ctypes.byref(py))
        return px.value, py.value

    # device→page is affine: page = A @ device + t ; invert it.
    p0, px, py = np.array(d2p(0, 0)), np.array(d2p(width, 0)), np.array(d2p(0, height))
    a = np.column_stack([(px - p0) / width, (py - p0) / height])  # 2×2
    inv = np.linalg.inv(a)
    t = -inv @ p0
    return (float(inv[0, 0]), float(inv[1, 0]), float(inv[0, 1]), float(inv[1, 1]), float(t[0]), float(t[1]))


def _text_layer_has_letters(textpage: Any, minimum: int = MIN_TEXT_LAYER_LETTERS) -> bool:
    import pypdfium2.raw as pdfium_c

    seen = 0
    for i in range(textpage.count_chars()):
        if chr(pdfium_c.FPDFText_GetUnicode(textpage, i)).isalnum():
            seen += 1
            if seen >= minimum:
                return True
    return False


def _image_pages(
    path: Path, sid: str, uri: str, *, max_side: int, max_pixels: int
) -> Iterator[SourcePage | SourceError]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise SourceError(RejectReason.IMAGE_TOO_LARGE, f"image too large to open safely: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SourceError(RejectReason.UNREADABLE, f"not a readable image: {exc}") from exc
    with im:
        n_frames = getattr(im, "n_frames", 1) if path.suffix.lower() in _MULTI_FRAME else 1
        for index in range(n_frames):
            if index:
                im.seek(index)
            w, h = im.size
            if w * h > max_pixels:
                err = SourceError(
                    RejectReason.IMAGE_TOO_LARGE,
                    f"image is {w}×{h} = {w * h:,} pixels, over the {max_pixels:,} limit",
                    page_index=index if n_frames > 1 else None,
                )
                if n_frames == 1:
                    raise err
                yield err
                continue
            if im.format == "JPEG" and max(w, h) > 2 * max_side:
                im.draft("RGB", (max_side, max_side))  # let libjpeg decode at 1/2..1/8 scale (≥ max_side)
            try:
                image = _to_rgb(im)
            except (OSError, SyntaxError, ValueError) as exc:
                err = SourceError(RejectReason.UNREADABLE, f"cannot decode image: {exc}")
                if n_frames == 1:
                    raise err from exc
                err.page_index = index
                yield err
                continue
            if max(image.size) > max_side:
                s = max_side / max(image.size)
                size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
                image = image.resize(size, Image.Resampling.LANCZOS)
            yield SourcePage(source_id=sid, source_uri=uri, page_index=index, image=image, text_source="ocr")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Decode one frame: EXIF orientation applied, transparency flattened onto white, RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im.load()
        frame = ImageOps.exif_transpose(im) or im
        if frame.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(frame, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
            frame = Image.fromarray(arr.astype(np.uint8), "L")
        if frame.mode == "P" and "transparency" in frame.info:
            frame = frame.convert("RGBA")
        if frame.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = frame.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return frame.convert("RGB")


# ---------------------------------------------------------------------------- OCR
Box = tuple[float, float, float, float]


@runtime_checkable
class OcrEngine(Protocol):
    """Full-page OCR: ``recognize`` returns text lines as (x0, y0, x1, y1) pixel box, text, score."""

    model_id: str

    def recognize(self, image: Image.Image) -> list[tuple[Box, str, float]]: ...


class RapidOcrEngine:
    """rapidocr 3.x with the PP-OCRv6 det/rec and PP-OCR cls ONNX models bundled in its wheel.

    The model files are passed explicitly, so rapidocr never reaches its downloader. PP-OCRv6 ``small``
    recognises English among ~50 Latin-script languages (and Chinese/Japanese).
    """

    def __init__(
        self,
        *,
        text_score: float = 0.5,
        use_cls: bool = True,
        det_model: str | Path | None = None,
        rec_model: str | Path | None = None,
        cls_model: str | Path | None = None,
        threads: int = -1,
    ) -> None:
        import rapidocr
        from rapidocr import RapidOCR

        from tasks.models import fingerprint

        bundled = Path(rapidocr.__file__).parent / "models"
        paths = {
            "Det": Path(det_model) if det_model else bundled / "PP-OCRv6_det_small.onnx",
            "Rec": Path(rec_model) if rec_model else bundled / "PP-OCRv6_rec_small.onnx",
            "Cls": Path(cls_model) if cls_model else bundled / "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
        }
        for key, p in paths.items():
            if not p.is_file():
                raise FileNotFoundError(
                    f"rapidocr {key} model not found: {p} (m3dr never downloads at run time)"
                )
        params: dict[str, Any] = {
            "Global.log_level": "warning",
            "Global.text_score": float(text_score),
            "Global.use_cls": bool(use_cls),
            "EngineConfig.onnxruntime.intra_op_num_threads": int(threads),
        }
        params.update({f"{k}.model_path": str(p) for k, p in paths.items()})
        self.engine = RapidOCR(params=params)
        self.model_id = "rapidocr:" + ",".join(f"{p.stem}:{fingerprint(p)[:8]}" for p in paths.values())
        self._lock = threading.Lock()

    def recognize(self, image: Image.Image) -> list[tuple[Box, str, float]]:
        with self._lock:
            out = self.engine(image.convert("RGB"))
        if out.boxes is None or out.txts is None:
            return []
        lines: list[tuple[Box, str, float]] = []
        for poly, text, score in zip(out.boxes, out.txts, out.scores, strict=True):
            pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            box = (
                float(pts[:, 0].min()),
                float(pts[:, 1].min()),
                float(pts[:, 0].max()),
                float(pts[:, 1].max()),
            )
            lines.append((box, str(text), float(score)))
        return lines


OCR_ENGINES: dict[str, Callable[..., OcrEngine]] = {"rapidocr": RapidOcrEngine}


def build_ocr(cfg: Mapping[str, Any]) -> OcrEngine | None:
    """Build the OCR engine a profile's ``[extract]`` table names; ``engine = "none"`` (or absent) → None."""
    engine = cfg.get("engine", "none")
    if engine in (None, "", "none"):
        return None
    if engine not in OCR_ENGINES:
        raise ValueError(f"unknown OCR engine {engine!r}; known: {sorted(OCR_ENGINES)} or 'none'")
    options = {k: v for k, v in cfg.items() if k != "engine"}
    return OCR_ENGINES[engine](**options)


# ---------------------------------------------------------------------------- text normalisation
_LIGATURES = str.maketrans({"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st", "ﬆ": "st"})
_HYPHEN_BREAK = re.compile(r"(\w)[-\u2010\u00ad][ \t]*\n[ \t]*(?=[a-z])")
_COMPOUND_BREAK = re.compile(r"(\w)([-\u2010])[ \t]*\n[ \t]*(?=[A-Z0-9])")


def normalize_text(text: str) -> str:
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
    one word with a hyphen mark; it becomes ``"exam-\\nple"`` so :func:`normalize_text` rejoins it.
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
                # keep it as "-\n" so normalize_text decides (join, or keep a compound's hyphen).
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
    return normalize_text("".join(parts))


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
    from tasks.layout import reading_order

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
