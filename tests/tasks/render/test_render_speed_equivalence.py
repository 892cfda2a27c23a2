"""Render changes made for speed only give the same results as the code they replaced.

``grow_box`` looks at a window around the box with whole-column/row reductions instead of stepping a
pixel at a time over a page-sized mask; the reference below is the stepping loop it replaced, kept here
verbatim in behaviour. Pages are random blocks of ink on a background, boxes and neighbours random.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.render.config import RenderConfig
from tasks.render.png import _pixel_box, estimate_colors, grow_box, page_pixels


def grow_box_reference(image, box, others, cfg: RenderConfig, *, rtl: bool = False):
    """The per-pixel loop ``grow_box`` used before it was vectorised."""
    x0, y0, x1, y1 = _pixel_box(box, image.size)
    if x1 <= x0 or y1 <= y0:
        return tuple(box)
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    h, w = rgb.shape[:2]
    bg, _ = estimate_colors(image, (x0, y0, x1, y1), cfg)
    free = np.abs(rgb - np.asarray(bg)).max(axis=2) <= cfg.ink_threshold // 2
    for ob in others:
        a0, b0, a1, b1 = _pixel_box(ob, image.size)
        if a1 > a0 and b1 > b0 and not (a0 >= x0 and b0 >= y0 and a1 <= x1 and b1 <= y1):
            free[b0:b1, a0:a1] = False
    margin = max(2, int(0.02 * w))
    gap = 2
    nx0, nx1 = x0, x1
    limit = int((x1 - x0) * cfg.grow_x)
    if rtl:
        while nx0 - 1 >= margin and x0 - (nx0 - 1) <= limit and free[y0:y1, nx0 - 1].all():
            nx0 -= 1
        nx0 = min(x0, nx0 + gap)
    else:
        while nx1 < w - margin and nx1 + 1 - x1 <= limit and free[y0:y1, nx1].all():
            nx1 += 1
        nx1 = max(x1, nx1 - gap)
    ny1 = y1
    ylimit = int((y1 - y0) * cfg.grow_y)
    while ny1 < h - margin and ny1 + 1 - y1 <= ylimit and free[ny1, nx0:nx1].all():
        ny1 += 1
    ny1 = max(y1, ny1 - gap)
    return (float(nx0), float(y0), float(nx1), float(ny1))


def _page(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    bg = rng.integers(200, 256, size=3)
    arr = np.broadcast_to(bg, (h, w, 3)).astype(np.uint8).copy()
    for _ in range(int(rng.integers(0, 12))):  # ink blocks (text lines, rules, figures)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        arr[y : y + int(rng.integers(1, 40)), x : x + int(rng.integers(1, 120))] = rng.integers(0, 90, size=3)
    return Image.fromarray(arr)


def _box(rng: np.random.Generator, w: int, h: int) -> tuple[float, float, float, float]:
    x0, y0 = float(rng.uniform(-10, w - 5)), float(rng.uniform(-10, h - 5))
    return (x0, y0, x0 + float(rng.uniform(1, w / 2)), y0 + float(rng.uniform(1, h / 3)))


@pytest.mark.parametrize("seed", range(4))
def test_grow_box_equals_the_stepping_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cfgs = [RenderConfig(), RenderConfig(grow_x=2.0, grow_y=3.0), RenderConfig(grow_x=0.0, grow_y=0.0)]
    checked = grown = 0
    for _ in range(60):
        w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
        page = _page(rng, w, h)
        pixels = page_pixels(page)
        for _ in range(5):
            box = _box(rng, w, h)
            others = [_box(rng, w, h) for _ in range(int(rng.integers(0, 4)))]
            cfg = cfgs[int(rng.integers(0, len(cfgs)))]
            for rtl in (False, True):
                want = grow_box_reference(page, box, others, cfg, rtl=rtl)
                assert grow_box(page, box, others, cfg, rtl=rtl) == want, (seed, box, others, rtl)
                assert grow_box(page, box, others, cfg, rtl=rtl, pixels=pixels) == want
                checked += 1
                grown += want != tuple(box)
    assert grown > checked // 4  # the cases exercise growth, not only boxes that cannot grow


def test_estimate_colors_from_pixels_equals_from_image() -> None:
    rng = np.random.default_rng(5)
    cfg = RenderConfig()
    for mode in ("RGB", "L", "RGBA"):
        page = _page(rng, 300, 200).convert(mode)
        pixels = page_pixels(page)
        for _ in range(40):
            pbox = _pixel_box(_box(rng, 300, 200), page.size)
            if pbox[2] > pbox[0] and pbox[3] > pbox[1]:
                assert estimate_colors(pixels, pbox, cfg) == estimate_colors(page, pbox, cfg)
