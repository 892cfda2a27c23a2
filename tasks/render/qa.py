"""Render QA by OCR round trip: read every drawn region back with tesseract and compare with the text.

A page whose rendered text cannot be read back (tofu from a font without the script's glyphs, text
drawn too small, a broken shaping engine) is not a faithful training page. The shard driver calls
``check_pages`` once per shard: the regions of 32 pages at a time are cropped and OCR'd by one
tesseract process (tesseract reads a list of images and separates their texts with form feeds), so
the cost is one model load per batch of pages, not one per region.

Binding: the ``tesseract`` command line via ``subprocess``. It needs no Python dependency and no
compiler (tesserocr builds against libtesseract headers), pytesseract is itself a subprocess wrapper
that starts one process per image, and the CLI's list-file mode is what makes one process per batch.

CER ignores whitespace (tesseract's spacing of Thai, CJK and line ends is not what we test) and
applies NFC to both sides; it is edits / reference characters, so it may exceed 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from rapidfuzz.distance import Levenshtein

from tasks import languages
from tasks.schema import Region

TESSERACT_INSTALL_HINT = (
    "Debian/Ubuntu: `apt-get install -y tesseract-ocr` plus the language packs (`make` set-up installs "
    "them: tesseract-ocr-{eng,spa,fra,deu,ita,hin,mar,san,kan,tel,tam,mal,chi-sim,jpn,kor,ara,ben,guj,"
    "ori,pan,rus,tha})"
)

TARGET_LINE_PX = 32.0  # line height region crops are scaled to before OCR
MIN_SCALE, MAX_SCALE = 0.3, 4.0


# ---------------------------------------------------------------------------- CER
def normalize(text: str) -> str:
    """NFC without whitespace and invisible format characters: what the CER compares.

    Format characters (Cf: ZWNJ, ZWJ, soft hyphen) draw no ink; tesseract's Tamil model, for one,
    emits a ZWNJ after every visible virama, which would count as an error per consonant cluster.
    """
    return "".join(
        ch
        for ch in unicodedata.normalize("NFC", text)
        if not ch.isspace() and unicodedata.category(ch) != "Cf"
    )


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit costs) between two strings (rapidfuzz's bit-parallel C++: the pure-Python
    dynamic programme it replaced was 18 % of the translate stage's profile; same integer)."""
    return int(Levenshtein.distance(a, b))


def cer_counts(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edits, reference characters) with whitespace ignored: sums over regions give a pooled CER."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    return edit_distance(ref, hyp), len(ref)


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate with whitespace ignored; 0.0 for two empty texts, 1.0 for text read as empty."""
    edits, n = cer_counts(reference, hypothesis)
    if n == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / n


# ---------------------------------------------------------------------------- OCR
def tesseract_path() -> str:
    """The tesseract binary, or a RuntimeError that says how to install it (never a silent skip)."""
    path = shutil.which("tesseract")
    if path is None:
        raise RuntimeError(f"render QA needs the tesseract OCR command; {TESSERACT_INSTALL_HINT}")
    return path


def assert_tesseract(langs: Sequence[str]) -> None:
    """Fail loudly when tesseract or the traineddata of one of ``langs`` (m3dr iso codes) is missing."""
    out = subprocess.run(
        [tesseract_path(), "--list-langs"], capture_output=True, text=True, check=True
    ).stdout.split()
    have = set(out)
    missing = [lang for lang in langs if languages.get(lang).tesseract not in have]
    if missing:
        need = ", ".join(f"{m} ({languages.get(m).tesseract})" for m in missing)
        raise RuntimeError(f"tesseract has no traineddata for {need}; {TESSERACT_INSTALL_HINT}")


def ocr_images(
    images: Sequence[Image.Image], lang: str, *, psm: int = 6, timeout_s: float = 600
) -> list[str]:
    """OCR a batch of images (one tesseract process) in language ``lang``; one text per image.

    ``psm 6`` (one uniform block of text) suits region crops. Threads are limited to one: the caller
    runs shards in parallel, and tesseract's OpenMP threads slow small images down.
    """
    if not images:
        return []
    exe = tesseract_path()
    code = languages.get(lang).tesseract
    with tempfile.TemporaryDirectory(prefix="m3dr-qa-") as tmp:
        paths = []
        for k, img in enumerate(images):
            # uncompressed PNM: tesseract (leptonica) reads the same pixels, no zlib on either side
            p = Path(tmp) / f"{k:06d}.pnm"
            img.save(p, format="PPM")
            paths.append(str(p))
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(paths) + "\n")
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        proc = subprocess.run(
            [exe, str(listing), "stdout", "-l", code, "--psm", str(psm), "-c", "page_separator=\f"],
            capture_output=True,
            timeout=timeout_s,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"tesseract failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
            )
    texts = proc.stdout.decode("utf-8", errors="replace").split("\f")
    if len(texts) == len(images) + 1 and not texts[-1].strip():
        texts = texts[:-1]
    if len(texts) != len(images):
        raise RuntimeError(f"tesseract returned {len(texts)} texts for {len(images)} images")
    return texts


def line_height(gray: Image.Image, bg: int, ink_threshold: int = 60) -> float | None:
    """Median height in pixels of the bands of inked rows (≈ the text's line height), None if no ink."""
    ink = np.abs(np.asarray(gray, dtype=np.int16) - bg) > ink_threshold
    rows = ink.any(axis=1)
    bands, run = [], 0
    for r in rows:
        if r:
            run += 1
        elif run:
            bands.append(run)
            run = 0
    if run:
        bands.append(run)
    return float(np.median(bands)) if bands else None


def region_crop(
    image: Image.Image, bbox: Sequence[float], *, target_px: float = TARGET_LINE_PX, pad: int = 8
) -> Image.Image:
    """The region's pixels as dark-on-light grey, scaled so lines are ``target_px`` high, on a margin.

    Tesseract reads lines of about 20–30 px best: 9 px body text must be enlarged, and a 36 px CJK
    title read at twice its size came back at 81% CER where the same crop at 18 px read perfectly.
    """
    x0, y0, x1, y1 = (round(v) for v in bbox)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.width, x1), min(image.height, y1)
    crop = image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))).convert("L")
    corners = [crop.getpixel((x, y)) for x in (0, crop.width - 1) for y in (0, crop.height - 1)]
    bg = sorted(corners)[len(corners) // 2]
    if bg < 128:  # light text on a dark box: tesseract 5 reads dark-on-light far better
        crop, bg = ImageOps.invert(crop), 255 - bg
    h = line_height(crop, bg)
    scale = min(MAX_SCALE, max(MIN_SCALE, target_px / h)) if h else 1.0
    if abs(scale - 1.0) > 0.05:
        crop = crop.resize(
            (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.Resampling.LANCZOS
        )
    out = Image.new("L", (crop.width + 2 * pad, crop.height + 2 * pad), bg)
    out.paste(crop, (pad, pad))
    return out


# ---------------------------------------------------------------------------- page verdicts
@dataclass(frozen=True)
class RegionQA:
    index: int  # region index in the page
    text: str  # what was drawn
    ocr: str  # what tesseract read
    edits: int
    chars: int

    @property
    def cer(self) -> float:
        return self.edits / self.chars if self.chars else 0.0


@dataclass
class PageQA:
    lang: str
    max_cer: float
    min_chars: int = 0  # pages with fewer reference characters are not judged (a lone "1" read as 工)
    regions: list[RegionQA] = field(default_factory=list)

    @property
    def edits(self) -> int:
        return sum(r.edits for r in self.regions)

    @property
    def chars(self) -> int:
        return sum(r.chars for r in self.regions)

    @property
    def cer(self) -> float:
        """Pooled CER of the page (edits over all regions / reference characters)."""
        return self.edits / self.chars if self.chars else 0.0

    @property
    def judged(self) -> bool:
        return self.chars >= max(1, self.min_chars)

    @property
    def ok(self) -> bool:
        return not self.judged or self.cer <= self.max_cer

    def message(self) -> str:
        worst = max(self.regions, key=lambda r: r.cer, default=None)
        msg = f"OCR round trip CER {self.cer:.1%} > {self.max_cer:.0%} ({languages.get(self.lang).script})"
        if worst is not None:
            msg += f"; worst region {worst.index} CER {worst.cer:.0%}: "
            msg += f"drew {worst.text[:40]!r}, read {worst.ocr[:40]!r}"
        return msg


def check_pages(
    pages: Iterable[tuple[Image.Image, Sequence[Region]]],
    lang: str,
    max_cer: float,
    *,
    min_chars: int = 0,
    target_px: float = TARGET_LINE_PX,
    pad: int = 8,
    batch_pages: int = 32,
) -> list[PageQA]:
    """OCR every rendered region of every page and score each page against ``max_cer``.

    ``pages`` holds (rendered image, regions) with ``Region.rendered`` set by ``render_page``; regions
    that were not drawn keep their original pixels and are not checked. It may be a generator: pages
    are cropped and OCR'd ``batch_pages`` at a time (one tesseract run each), so a 2048-page shard
    never holds more than one batch of images.
    """
    out: list[PageQA] = []
    crops: list[Image.Image] = []
    where: list[tuple[int, int, str]] = []

    def flush() -> None:
        for (p, j, text), got in zip(where, ocr_images(crops, lang), strict=True):
            edits, n = cer_counts(text, got)
            out[p].regions.append(RegionQA(j, text, got.strip(), edits, n))
        crops.clear()
        where.clear()

    for p, (image, regions) in enumerate(pages):
        out.append(PageQA(lang, max_cer, min_chars))
        for j, r in enumerate(regions):
            if r.rendered and normalize(r.text):
                crops.append(region_crop(image, r.bbox, target_px=target_px, pad=pad))
                where.append((p, j, r.text))
        if (p + 1) % batch_pages == 0:
            flush()
    flush()
    return out


@dataclass
class QAStats:
    """Per-shard totals stored in the completion record (summed per language in the run summary)."""

    regions: int = 0
    chars: int = 0
    edits: int = 0
    pages: int = 0
    pages_rejected: int = 0

    def add(self, page: PageQA) -> None:
        self.regions += len(page.regions)
        self.chars += page.chars
        self.edits += page.edits
        self.pages += 1
        self.pages_rejected += int(not page.ok)
