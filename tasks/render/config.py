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
