"""Sources: files (PDF, images) → page images, content ids, and the source list of a run.

PDFs are rendered with pypdfium2 at ``dpi`` (long side at least ``min_side``, at most ``max_side``);
images are opened lazily, their header size checked against ``max_pixels`` *before* decoding,
EXIF-transposed, flattened onto white, converted to RGB and downscaled to ``max_side``. Multi-frame
TIFFs give one page per frame. A problem with the whole file raises :class:`SourceError` (a reject
reason code from :class:`tasks.schema.RejectReason`); a problem with one page of a PDF is *yielded* as
a :class:`SourceError` in that page's place, so the good pages still come through. A PDF page whose
text layer has (almost) no letters (a scan) is marked ``text_source="ocr"``.

:func:`scan_sources` expands a directory, glob or list file into content-addressed :class:`SourceRef`;
a spec that names nothing (a missing path, an empty glob, list or prefix) raises :class:`SourcesNotFound`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.schema import (
    Reject,
    RejectReason,
)
from tasks.storage import is_url, split_url, storage_options_for

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


@dataclass(frozen=True)
class SourceRef:
    """A source file to ingest (or a page range of it): where it is (local path or URL), its content id,
    and the name it is recorded under.

    ``pages`` is ``(start, stop)`` when a shard holds only part of a long source; ids do not change
    (a page id is the hash of the source's bytes and its page index, whatever range it was read in).
    """

    path: str
    source_id: str
    uri: str
    pages: tuple[int, int] | None = None

    @property
    def unit(self) -> str:
        """What a shard records it covers: the source id, or ``<source id>@<start>-<stop>``."""
        return self.source_id if self.pages is None else f"{self.source_id}@{self.pages[0]}-{self.pages[1]}"


def parse_unit(unit: str) -> tuple[str, tuple[int, int] | None]:
    """``"<sid>"`` → (sid, None); ``"<sid>@a-b"`` → (sid, (a, b))."""
    sid, _, span = unit.partition("@")
    if not span:
        return sid, None
    a, _, b = span.partition("-")
    return sid, (int(a), int(b))


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


class SourcesNotFound(ValueError):
    """A ``--sources`` spec that names no source at all: a missing path, a glob or URL prefix matching
    nothing, a list file listing nothing (or a missing file). Raised before any work, so a typo stops
    the run instead of ending it as an empty dataset."""

    def __init__(self, spec: str | Path, why: str) -> None:
        super().__init__(f"sources {str(spec)!r}: {why}")
        self.spec = str(spec)
        self.why = why


# ---------------------------------------------------------------------------- ids
def source_id(path: Path | str) -> str:
    """Content id of a source file (local path or URL): sha256 of its bytes (32 hex chars)."""
    h = hashlib.sha256()
    with _open_source(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def _open_source(path: Path | str) -> Any:
    if is_url(path):
        import fsspec

        return fsspec.open(str(path), "rb", **storage_options_for(str(path))).open()
    return Path(path).open("rb")


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
    page_range: tuple[int, int] | None = None,
) -> Iterator[SourcePage | SourceError]:
    """Yield the pages of a PDF or image file (see the module docstring for the error contract);
    only pages ``start <= index < stop`` when ``page_range`` is given."""
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
        yield from _pdf_pages(
            path, sid, uri, dpi=dpi, max_side=max_side, min_side=min_side, page_range=page_range
        )
    else:
        yield from _image_pages(
            path, sid, uri, max_side=max_side, max_pixels=max_pixels, page_range=page_range
        )


def _pdf_pages(
    path: Path,
    sid: str,
    uri: str,
    *,
    dpi: float,
    max_side: int,
    min_side: int = 1024,
    page_range: tuple[int, int] | None = None,
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
        start, stop = page_range if page_range is not None else (0, n)
        for index in range(max(start, 0), min(stop, n)):
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
    path: Path,
    sid: str,
    uri: str,
    *,
    max_side: int,
    max_pixels: int,
    page_range: tuple[int, int] | None = None,
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
        start, stop = page_range if page_range is not None else (0, n_frames)
        for index in range(max(start, 0), min(stop, n_frames)):
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


def scan_sources(spec: str | Path, *, base: Path | None = None) -> list[SourceRef]:
    """Expand a directory, a glob or a manifest file (one path per line) into SourceRefs; ``spec`` may
    be a URL (``s3://bucket/prefix``, ``s3://bucket/docs/*.pdf``, ``hf://datasets/…``).

    Files are sorted, hashed by content (the source id) and de-duplicated by content. Unsupported
    suffixes are kept: the ingest stage turns them into rejects rows with a clear reason. A spec that
    names no source file raises :class:`SourcesNotFound` (checked before any file is hashed); a
    directory whose files are all done already is not that: it lists them, and the run is a no-op.
    """
    if is_url(spec):
        return _scan_url(str(spec))
    spec_path = Path(spec)
    if spec_path.is_dir():
        files = sorted(p for p in spec_path.rglob("*") if p.is_file() and not p.name.startswith("."))
        rel_base = spec_path
        empty = "directory holds no source file (PDF or image)"
    elif spec_path.is_file() and spec_path.suffix in {".txt", ".lst"}:
        files = [Path(line.strip()) for line in spec_path.read_text().splitlines() if line.strip()]
        rel_base = spec_path.parent
        files = [f if f.is_absolute() else rel_base / f for f in files]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise SourcesNotFound(spec, f"list file names missing files: {', '.join(missing[:3])}{more}")
        empty = "list file lists no source file"
    elif spec_path.is_file():
        files, rel_base = [spec_path], spec_path.parent
        empty = "is not a source file (PDF or image)"
    else:
        import glob

        if not glob.has_magic(str(spec)):
            raise SourcesNotFound(spec, "no such file or directory")
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        rel_base = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
        empty = "glob matches no source file"
    files = [f for f in files if not _not_a_source(f.name, f.parent.name)]
    if not files:
        raise SourcesNotFound(spec, empty)
    base = base or rel_base
    refs: dict[str, SourceRef] = {}
    for f in files:
        sid = source_id(f)
        if sid not in refs:
            refs[sid] = SourceRef(str(f), sid, os.path.relpath(f, base))
    return sorted(refs.values(), key=lambda r: r.uri)


def _not_a_source(name: str, parent: str) -> bool:
    """Documentation that lives beside samples (README, licences) is not a source."""
    return Path(name).suffix.lower() in {".md", ".txt", ".toml", ".py", ".json"} or parent == "licenses"


def _scan_url(spec: str) -> list[SourceRef]:
    """Sources under a URL prefix (recursive) or matching a URL glob; uris relative to the prefix."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec, **storage_options_for(spec))
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
        base = path.split("*", 1)[0].rsplit("/", 1)[0]
        empty = "glob matches no source object"
    elif fs.isdir(path):
        files = sorted(fs.find(path))
        base = path.rstrip("/")
        empty = "prefix holds no source object (PDF or image)"
    elif fs.exists(path):
        files, base = [path], path.rsplit("/", 1)[0]
        empty = "is not a source object (PDF or image)"
    else:
        raise SourcesNotFound(spec, "no object or prefix of that name")

    def is_source(f: str) -> bool:
        name, parent = f.rsplit("/", 1)[-1], f.rsplit("/", 2)[-2] if f.count("/") >= 1 else ""
        return not (name.startswith(".") or _not_a_source(name, parent))

    files = [f for f in files if is_source(f)]
    if not files:
        raise SourcesNotFound(spec, empty)
    refs: dict[str, SourceRef] = {}
    for f in files:
        name = f.rsplit("/", 1)[-1]
        url = f"{protocol}://{f}"
        sid = source_id(url)
        if sid not in refs:
            rel = f[len(base) + 1 :] if f.startswith(base + "/") else name
            refs[sid] = SourceRef(url, sid, rel)
    return sorted(refs.values(), key=lambda r: r.uri)


@contextlib.contextmanager
def local_source(ref: SourceRef) -> Iterator[Path]:
    """A local path with the source's bytes (the file itself, or a temp copy of a remote object)."""
    if not is_url(ref.path):
        yield Path(ref.path)
        return
    store, name = split_url(ref.path)
    with store.local_file(name) as path:
        yield path


def source_page_count(ref: SourceRef) -> int:
    """Cheap page count for shard planning (frames of a multi-frame TIFF; 1 for other images and for
    unreadable files, which then become one rejects row)."""
    suffix = Path(ref.path).suffix.lower()
    if suffix not in {".pdf", *_MULTI_FRAME}:
        return 1
    try:
        with local_source(ref) as path:
            if suffix == ".pdf":
                import pypdfium2 as pdfium

                with PDFIUM_LOCK:
                    doc = pdfium.PdfDocument(str(path))
                    n = len(doc)
                    doc.close()
                return max(n, 1)
            with Image.open(path) as im:
                return max(int(getattr(im, "n_frames", 1)), 1)
    except Exception:
        return 1
