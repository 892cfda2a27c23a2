"""Render configuration, the raqm check, and the result types of rendering."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from PIL import Image, features

from tasks.render.fonts import FontFace
from tasks.schema import Region

Box = tuple[float, float, float, float]
RGB = tuple[int, int, int]


# ---------------------------------------------------------------------------- config
# Render QA thresholds per script: max pooled page CER (whitespace and format characters ignored) of
# tesseract reading our render back. Worst page of `make demo` (tiny NLLB output): Latn 3%, Cyrl 2%,
# Hans 4%, Deva 8%, Taml 2%, Arab 25%, Thai 41%; real CLDR text at >= 10 px reads back at <= 6% in
# every script, and a render in a font without the script (tofu) or at 3 px at >= 80%. A threshold is
# about twice the worst demo page. Arabic and Thai are high because tesseract misreads the Arabic comma
# (U+060C; 7.5% CER without punctuation) and the tiny model's non-orthographic Thai (vowel marks on
# leading vowels), not because the render is off: tighten them once pages come from a real NLLB.
QA_MAX_CER: dict[str, float] = {
    "Latn": 0.10,
    "Cyrl": 0.10,
    "Hans": 0.15,
    "Jpan": 0.15,
    "Kore": 0.15,
    "Deva": 0.20,
    "Taml": 0.15,
    "Arab": 0.45,
    "Thai": 0.65,
}
QA_DEFAULT_MAX_CER = 0.5  # scripts not measured on demo pages yet (Beng, Gujr, Guru, Orya, Knda, Telu, Mlym)
_COMPLEX = ("Deva", "Beng", "Gujr", "Guru", "Orya", "Knda", "Telu", "Mlym", "Thai", "Hans", "Jpan", "Kore")
MIN_FONT_PX_BY_SCRIPT: dict[str, int] = dict.fromkeys(_COMPLEX, 10)


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
    # Per-script floors above min_font_px (ISO 15924 script -> px): stacked marks, conjuncts and dense
    # CJK strokes need more pixels than Latin. Measured with the OCR round trip on real (CLDR) text:
    # at 8 px Devanagari, Thai and Han read back at 20-25% CER, at 10-12 px at 0-3% (Latin: 0% at 8 px).
    min_font_px_by_script: dict[str, int] = field(default_factory=dict)
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
    # Render QA (tasks.render.qa): every drawn region is read back by tesseract; a page whose pooled
    # CER (whitespace ignored) exceeds its script's threshold is a render_unreadable reject. The qa_*
    # fields decide which pages are kept, not how one looks, so they stay out of to_dict (page ids).
    qa: bool = True
    qa_max_cer: dict[str, float] = field(default_factory=dict)  # ISO 15924 script -> max CER
    qa_min_chars: int = 8  # pages drawing fewer characters are OCR'd but not judged (too few to tell)
    # share of pages checked (chosen by page id, so a rerun checks the same ones): OCR costs ~0.3 s a
    # page on one core, the render itself less; at a million pages a sample may be the better trade
    qa_sample: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bold_labels", tuple(self.bold_labels))  # TOML gives lists
        object.__setattr__(self, "qa_max_cer", {**QA_MAX_CER, **dict(self.qa_max_cer)})
        floors = {**MIN_FONT_PX_BY_SCRIPT, **dict(self.min_font_px_by_script)}
        object.__setattr__(self, "min_font_px_by_script", dict(sorted(floors.items())))
        if not 0.0 <= self.qa_sample <= 1.0:
            raise ValueError(f"qa_sample must be in [0, 1], got {self.qa_sample}")
        if any(v <= 0 for v in self.qa_max_cer.values()):
            raise ValueError(f"qa_max_cer thresholds must be > 0, got {self.qa_max_cer}")
        if not 1 <= self.min_font_px <= self.max_font_px:
            raise ValueError(
                f"need 1 <= min_font_px <= max_font_px, got {self.min_font_px}, {self.max_font_px}"
            )
        if self.grow_x < 0 or self.grow_y < 0:
            raise ValueError("grow_x and grow_y must be >= 0")
        if self.line_spacing <= 0 or self.padding_px < 0 or self.pdf_dpi <= 0:
            raise ValueError("line_spacing and pdf_dpi must be > 0, padding_px >= 0")

    def to_dict(self) -> dict[str, object]:
        """The fields that decide a page's pixels (hashed into translated page ids)."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if not k.startswith("qa")
        }

    def min_px(self, script: str) -> int:
        """The smallest font size drawn in ``script``: its floor, never below min_font_px nor above max."""
        return min(self.max_font_px, max(self.min_font_px, self.min_font_px_by_script.get(script, 0)))

    def qa_checks(self, page_id: str) -> bool:
        """Whether render QA reads this page back (all pages at ``qa_sample = 1``)."""
        if not self.qa or self.qa_sample <= 0.0:
            return False
        if self.qa_sample >= 1.0:
            return True
        return int(hashlib.sha256(page_id.encode()).hexdigest()[:8], 16) < self.qa_sample * 0xFFFFFFFF

    def max_cer(self, script: str) -> float:
        """The render QA threshold of a script (``QA_DEFAULT_MAX_CER`` for scripts not listed)."""
        return self.qa_max_cer.get(script, QA_DEFAULT_MAX_CER)

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
