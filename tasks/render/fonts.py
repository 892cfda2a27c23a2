"""Bundled fonts: the ``fonts/fonts.toml`` manifest, integrity checks, per-language font chains, coverage.

The renderer walks a language's font chain (``tasks.languages``) per character: the script's own Noto
family first, Noto Sans (Latin/Cyrillic/Greek) after it, because Indic, Thai and Arabic Noto fonts carry
no Latin letters. Coverage comes from each face's cmap (fontTools), cached per (file, face index);
Pillow font objects (always the RAQM layout engine: HarfBuzz shaping + FriBiDi) are cached per
(file, face index, size).
"""

from __future__ import annotations

import hashlib
import threading
import tomllib
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from PIL import ImageFont

from tasks import languages
from tasks.paths import FONTS_DIR

MANIFEST = FONTS_DIR / "fonts.toml"


class FontError(RuntimeError):
    """A bundled font is missing, corrupted, or not in the manifest."""


@dataclass(frozen=True)
class FontFace:
    """One concrete face: a file plus the face index inside it (``.ttc`` collections hold several)."""

    key: str
    family: str
    path: Path
    index: int
    bold: bool

    @property
    def name(self) -> str:
        """A short unique name (used e.g. to register the face with reportlab)."""
        return f"{self.key}-{'bold' if self.bold else 'regular'}"


@dataclass(frozen=True)
class FontSpec:
    """One ``[[font]]`` entry of fonts.toml: a family with a regular and a bold file."""

    key: str
    family: str
    scripts: tuple[str, ...]
    index: int
    license: str
    regular_path: Path
    regular_sha256: str
    bold_path: Path
    bold_sha256: str

    def face(self, bold: bool = False) -> FontFace:
        """The regular or bold face of this family."""
        return FontFace(
            self.key, self.family, self.bold_path if bold else self.regular_path, self.index, bold
        )


@cache
def load_manifest(path: Path = MANIFEST) -> dict[str, FontSpec]:
    """Parse fonts.toml into FontSpecs keyed by font key (file paths resolved next to the manifest)."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    specs: dict[str, FontSpec] = {}
    for entry in data.get("font", []):
        key = entry["key"]
        if key in specs:
            raise FontError(f"{path}: font key {key!r} appears twice")
        specs[key] = FontSpec(
            key=key,
            family=entry["family"],
            scripts=tuple(entry.get("scripts", ())),
            index=int(entry.get("index", 0)),
            license=entry.get("license", ""),
            regular_path=path.parent / entry["regular"]["file"],
            regular_sha256=entry["regular"]["sha256"],
            bold_path=path.parent / entry["bold"]["file"],
            bold_sha256=entry["bold"]["sha256"],
        )
    return specs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_fonts(path: Path = MANIFEST) -> list[FontSpec]:
    """Check every font file of the manifest exists and matches its sha256; return the specs.

    Also checks every language's font chain names known keys. Raises FontError listing all problems,
    so a corrupted or replaced font never silently changes the rendered corpus.
    """
    specs = load_manifest(path)
    problems: list[str] = []
    checked: dict[Path, str] = {}
    for spec in specs.values():
        for file, expected in ((spec.regular_path, spec.regular_sha256), (spec.bold_path, spec.bold_sha256)):
            if not file.is_file():
                problems.append(f"{spec.key}: missing file {file}")
                continue
            if file not in checked:
                checked[file] = _sha256(file)
            if checked[file] != expected:
                problems.append(
                    f"{spec.key}: sha256 mismatch for {file.name}: "
                    f"got {checked[file]}, manifest says {expected}"
                )
    for lang in languages.LANGUAGES.values():
        problems += [f"language {lang.iso}: unknown font key {k!r}" for k in lang.fonts if k not in specs]
    if problems:
        raise FontError("font check failed:\n  " + "\n  ".join(problems))
    return list(specs.values())


def font_chain(lang_iso: str, bold: bool = False) -> list[FontFace]:
    """The faces a language's text is set in, in fallback order (primary script font first)."""
    specs = load_manifest()
    try:
        return [specs[key].face(bold) for key in languages.get(lang_iso).fonts]
    except KeyError as exc:
        raise FontError(f"language {lang_iso!r} names font key {exc.args[0]!r}, not in {MANIFEST}") from None


@lru_cache(maxsize=64)
def coverage(path: Path, index: int = 0) -> frozenset[int]:
    """The code points a face maps to a glyph (its best cmap), cached per file and face index."""
    from fontTools.ttLib import TTFont

    with TTFont(str(path), fontNumber=index, lazy=True) as font:
        return frozenset(font.getBestCmap() or {})


def covers(face: FontFace, ch: str) -> bool:
    """Whether ``face`` has a glyph for the single character ``ch``."""
    return ord(ch) in coverage(face.path, face.index)


def ignorable(ch: str) -> bool:
    """Characters that need no glyph of their own: whitespace, format (ZWJ/ZWNJ, bidi marks), controls."""
    return ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc")


def face_for_char(ch: str, chain: list[FontFace]) -> FontFace | None:
    """The first face of the chain that covers ``ch`` (None when no face does)."""
    for face in chain:
        if covers(face, ch):
            return face
    return None


def uncovered_chars(text: str, lang: str, *, bold: bool = False) -> list[str]:
    """Characters of ``text`` no face in the language's chain covers (unique, in order of appearance)."""
    chain = font_chain(lang, bold)
    missing: list[str] = []
    for ch in dict.fromkeys(text):
        if not ignorable(ch) and face_for_char(ch, chain) is None:
            missing.append(ch)
    return missing


_LOCAL = threading.local()


def pil_font(face: FontFace, size: int) -> ImageFont.FreeTypeFont:
    """A Pillow font (RAQM layout engine) for ``face`` at ``size`` px, cached by (file, index, size).

    The cache is per thread: a FreeType face must not be used by two threads at once, and shard
    tasks render in parallel threads.
    """
    return pil_font_file(face.path, face.index, size)


def pil_font_file(path: Path, index: int, size: int) -> ImageFont.FreeTypeFont:
    """:func:`pil_font` by file path and face index (same per-thread cache)."""
    cache: dict[tuple[Path, int, int], ImageFont.FreeTypeFont] = _LOCAL.__dict__.setdefault("fonts", {})
    key = (path, index, int(size))
    font = cache.get(key)
    if font is None:
        if len(cache) > 512:
            cache.clear()
        font = cache[key] = ImageFont.truetype(
            str(path), int(size), index=index, layout_engine=ImageFont.Layout.RAQM
        )
    return font
