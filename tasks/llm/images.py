"""Page images for chat servers: fit an image under a longest-side limit, encode it, wrap it as a data URL.

A vision server resizes every image to its model's input size (Gemma-3: 896 px squares), so pixels
beyond that are upload, base64 and decode work for nothing; a rendered page can be several thousand
pixels tall. The client, not the server, enforces the limit: ``fit_image`` downscales an oversized image
with its aspect ratio kept (Lanczos) and encodes it in the chosen format, so sending never depends on
the server's resize policy. An image that already fits and is already in that format goes out
byte-for-byte unchanged.

Format (``benchmarks/vlm_images.py``, rendered document pages fitted to 896 px): JPEG at quality
:data:`JPEG_QUALITY`, 4:4:4, is 0.57× the PNG bytes on English pages and 0.67× on translated renders,
encodes 10-17× faster (2 ms vs 21-36 ms a page), at 43-44 dB PSNR; vLLM decodes either.
Both encoders run with fixed options, so the same pixels give the same bytes (deterministic requests).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Literal

ImageFormat = Literal["jpeg", "png"]

# Longest image side a client sends by default: Gemma-3's vision tower looks at 896 px (SigLIP, one
# crop), and vLLM's processor resizes any larger image down to it anyway.
DEFAULT_MAX_IMAGE_SIDE = 896
DEFAULT_IMAGE_FORMAT: ImageFormat = "jpeg"
# Fixed (deterministic bytes); high enough that text strokes at 896 px keep their shape (4:4:4 chroma
# keeps coloured text and thin coloured rules sharp at little cost on mostly white pages).
JPEG_QUALITY = 90
_MIME = {"jpeg": "image/jpeg", "png": "image/png"}
_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG"}


class ImageError(ValueError):
    """Bytes that are not a decodable image (or one past PIL's decompression-bomb limit)."""


@dataclass(frozen=True)
class FittedImage:
    """The encoded image to send, its size, and the size it came in with (equal when not resized)."""

    data: bytes
    size: tuple[int, int]  # (width, height) sent
    original_size: tuple[int, int]
    format: ImageFormat = "png"

    @property
    def downscaled(self) -> bool:
        return self.size != self.original_size

    @property
    def png(self) -> bytes:
        """The bytes (kept for callers that predate the format choice; they may be JPEG)."""
        return self.data

    @property
    def mime(self) -> str:
        return _MIME[self.format]


def fitted_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is at most ``max_side``, aspect ratio kept (each side
    at least 1 px); ``size`` itself when it already fits."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    w, h = size
    if max(w, h) <= max_side:
        return (w, h)
    scale = max_side / max(w, h)
    return (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))


def encode(img: Any, fmt: ImageFormat) -> bytes:
    """A PIL image (RGB or L) as ``fmt`` bytes, with fixed options: same pixels ⇒ same bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def fit_image(data: bytes, max_side: int, fmt: ImageFormat = DEFAULT_IMAGE_FORMAT) -> FittedImage:
    """``data`` (PNG, JPEG or any format PIL reads) with its longest side at most ``max_side``, as ``fmt``.

    An image that fits and is already ``fmt`` is returned as is (same bytes); any other is resized with
    Lanczos when too large and encoded as ``fmt`` (palette / alpha / 16-bit modes become RGB first).
    Raises :class:`ImageError` for bytes PIL cannot decode.
    """
    from PIL import Image

    if fmt not in _MIME:
        raise ValueError(f"image format must be one of {sorted(_MIME)}, got {fmt!r}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            original = (int(img.width), int(img.height))
            target = fitted_size(original, max_side)
            if target == original and img.format == _PIL_FORMAT[fmt]:
                return FittedImage(data, original, original, fmt)
            img.load()
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            out = img.resize(target, Image.Resampling.LANCZOS) if target != original else img
            encoded = encode(out, fmt)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"undecodable image ({type(exc).__name__}: {str(exc)[:80]})") from None
    return FittedImage(encoded, target, original, fmt)


def fit_png(data: bytes, max_side: int) -> FittedImage:
    """:func:`fit_image` as PNG."""
    return fit_image(data, max_side, "png")


def data_url(data: bytes, mime: str = "image/png") -> str:
    """``data:<mime>;base64,…``: what an OpenAI ``image_url`` content part carries inline."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def png_data_url(png: bytes) -> str:
    return data_url(png, "image/png")


def image_url_part(image: bytes | FittedImage) -> dict[str, Any]:
    """An OpenAI chat ``image_url`` content part with the image inline (raw bytes are taken as PNG)."""
    url = data_url(image.data, image.mime) if isinstance(image, FittedImage) else png_data_url(image)
    return {"type": "image_url", "image_url": {"url": url}}


__all__ = [
    "DEFAULT_IMAGE_FORMAT",
    "DEFAULT_MAX_IMAGE_SIDE",
    "JPEG_QUALITY",
    "FittedImage",
    "ImageError",
    "ImageFormat",
    "data_url",
    "encode",
    "fit_image",
    "fit_png",
    "fitted_size",
    "image_url_part",
    "png_data_url",
]
