"""Page images for chat servers: fit a PNG under a longest-side limit, then wrap it as a data URL.

A vision server rejects (or silently blows its context on) an image larger than it accepts, and a
rendered page can be several thousand pixels tall. The client, not the server, enforces the limit:
``fit_png`` downscales an oversized image with its aspect ratio kept (Lanczos, re-encoded as PNG) and
leaves one that fits byte-for-byte unchanged, so sending never depends on the server's resize policy.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

# Longest image side a client sends by default: above what production VLM processors look at per view
# (Gemma-3: 896 px crops), small enough that no server rejects the image or the request for its size.
DEFAULT_MAX_IMAGE_SIDE = 1536


class ImageError(ValueError):
    """Bytes that are not a decodable image (or one past PIL's decompression-bomb limit)."""


@dataclass(frozen=True)
class FittedImage:
    """The PNG to send, its size, and the size it came in with (equal when nothing was resized)."""

    png: bytes
    size: tuple[int, int]  # (width, height) sent
    original_size: tuple[int, int]

    @property
    def downscaled(self) -> bool:
        return self.size != self.original_size


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


def fit_png(data: bytes, max_side: int) -> FittedImage:
    """``data`` (PNG, or any format PIL reads) with its longest side at most ``max_side``.

    An image that fits is returned as is (same bytes, so a PNG stays the page's own PNG); a larger one
    is resized with Lanczos and re-encoded as PNG (palette / alpha / 16-bit modes become RGB first).
    Raises :class:`ImageError` for bytes PIL cannot decode.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            original = (int(img.width), int(img.height))
            target = fitted_size(original, max_side)
            if target == original and img.format == "PNG":
                return FittedImage(data, original, original)
            img.load()
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            out = img.resize(target, Image.Resampling.LANCZOS) if target != original else img
            buf = io.BytesIO()
            out.save(buf, format="PNG", compress_level=6)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"undecodable image ({type(exc).__name__}: {str(exc)[:80]})") from None
    return FittedImage(buf.getvalue(), target, original)


def png_data_url(png: bytes) -> str:
    """``data:image/png;base64,…``: what an OpenAI ``image_url`` content part carries inline."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_url_part(png: bytes) -> dict[str, Any]:
    """An OpenAI chat ``image_url`` content part with the PNG inline."""
    return {"type": "image_url", "image_url": {"url": png_data_url(png)}}


__all__ = [
    "DEFAULT_MAX_IMAGE_SIDE",
    "FittedImage",
    "ImageError",
    "fit_png",
    "fitted_size",
    "image_url_part",
    "png_data_url",
]
