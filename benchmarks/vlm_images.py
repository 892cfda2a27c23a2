"""Bytes and encode time of the page image a VLM request carries, PNG vs JPEG, at the model's input size.

Pages are real renders: the sample PDFs of ``assets/samples`` rasterised as ingest does (pypdfium2,
144 dpi), the sample scan ``page_image.png``, and the same PDF pages re-rendered with Hindi, Chinese and
Arabic text in their layout regions (rapid-layout + ``tasks.render.png.render_page``), as translated pages
are. Each page is fitted to ``--side`` px (Lanczos, once) and encoded with each candidate; the table shows
mean bytes (and base64 bytes, what goes on the wire), mean encode ms (best of ``--repeat``), and PSNR
against the fitted pixels. The engine's choice (``tasks.llm.images``) rests on these figures.

    python benchmarks/vlm_images.py                   # sample pages, 896 px
    python benchmarks/vlm_images.py --pdf refman.pdf --max-pages 40   # more pages (e.g. r-doc-pdf)
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "assets" / "samples"
TEXT = {
    "hi": "उत्तरी रेलवे कंपनी ने 2023 में 42 लाख यात्रियों को ढोया। माल ढुलाई राजस्व में वृद्धि हुई। ",
    "zh": "北方铁路公司在二零二三年运送了四百二十万名乘客。货运收入增长了百分之十二。",
    "ar": "نقلت شركة السكك الحديدية الشمالية 4.2 مليون راكب في عام 2023. ارتفعت إيرادات الشحن. ",
}


def _area(bbox: tuple[float, float, float, float]) -> float:
    return (bbox[2] - bbox[0]) * (bbox[3] - bbox[1])


def encoders() -> dict[str, dict]:
    """Candidate encodings: the PNG the engine sent so far, PNG at max effort, JPEG at a few qualities."""
    return {
        "png (level 6)": {"format": "PNG", "compress_level": 6},
        "png (optimize)": {"format": "PNG", "optimize": True},
        "jpeg q85 4:2:0": {"format": "JPEG", "quality": 85, "subsampling": 2},
        "jpeg q90 4:4:4": {"format": "JPEG", "quality": 90, "subsampling": 0},
        "jpeg q95 4:4:4": {"format": "JPEG", "quality": 95, "subsampling": 0},
    }


def source_pages(pdfs: list[Path], max_pages: int) -> list[tuple[str, Image.Image]]:
    from tasks.ingest.sources import iter_source_pages

    pages: list[tuple[str, Image.Image]] = []
    for pdf in pdfs:
        for page in iter_source_pages(pdf):
            if hasattr(page, "image") and len(pages) < max_pages:
                pages.append((f"{pdf.stem}#{page.page_index}", page.image))
    return pages


def translated_pages(pages: list[tuple[str, Image.Image]]) -> list[tuple[str, Image.Image]]:
    """Each page re-rendered per language, the text regions filled with that language's sample text."""
    from dataclasses import replace

    from tasks.ingest.layout import RapidLayoutDetector
    from tasks.render.config import RenderConfig
    from tasks.render.png import render_page

    detector, cfg, out = RapidLayoutDetector(), RenderConfig(), []
    for name, image in pages:
        regions = detector.detect(image)
        for lang, text in TEXT.items():
            filled = [
                replace(
                    r,
                    text=(text * 40)[: max(20, int(_area(r.bbox) / 900))],  # ~ what the box holds
                    translatable=r.label not in ("figure", "table", "formula"),
                )
                for r in regions
            ]
            out.append((f"{name}/{lang}", render_page(image, filled, lang, cfg).image))
    return out


def psnr(a: Image.Image, b: Image.Image) -> float:
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure(pages: list[tuple[str, Image.Image]], side: int, repeat: int) -> dict[str, dict[str, float]]:
    from tasks.llm.images import fitted_size

    fitted = [img.resize(fitted_size(img.size, side), Image.Resampling.LANCZOS) for _, img in pages]
    rows: dict[str, dict[str, float]] = {}
    for name, opts in encoders().items():
        sizes, times, quality = [], [], []
        for img in fitted:
            best = float("inf")
            for _ in range(repeat):
                buf = io.BytesIO()
                t0 = time.perf_counter()
                img.save(buf, **opts)
                best = min(best, time.perf_counter() - t0)
            data = buf.getvalue()
            sizes.append(len(data))
            times.append(best * 1000)
            quality.append(psnr(img, Image.open(io.BytesIO(data))))
        rows[name] = {
            "kb": statistics.mean(sizes) / 1024,
            "b64_kb": statistics.mean(4 * ((s + 2) // 3) for s in sizes) / 1024,
            "ms": statistics.mean(times),
            "psnr": statistics.mean(quality),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=896, help="longest side sent (Gemma-3: 896)")
    ap.add_argument("--pdf", type=Path, action="append", help="PDFs to add (default: assets/samples)")
    ap.add_argument("--max-pages", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-translated", action="store_true", help="skip the re-rendered hi/zh/ar pages")
    args = ap.parse_args()

    pdfs = args.pdf or sorted(SAMPLES.glob("*.pdf"))
    english = source_pages(pdfs, args.max_pages)
    scan = [("page_image.png", Image.open(SAMPLES / "page_image.png").convert("RGB"))]
    sets = {"english pages": english + scan}
    if not args.no_translated:
        sets["translated renders (hi/zh/ar)"] = translated_pages(english[:4])
    for title, pages in sets.items():
        sizes = sorted({img.size for _, img in pages})
        print(f"\n{title}: {len(pages)} pages, sizes {sizes[:4]}{' …' if len(sizes) > 4 else ''}, "
              f"fitted to {args.side} px")  # fmt: skip
        rows = measure(pages, args.side, args.repeat)
        base = rows["png (level 6)"]
        head = ("encoding", "KiB", "b64 KiB", "vs png", "enc ms", "vs png", "PSNR dB")
        print(
            f"{head[0]:<16} "
            + " ".join(f"{h:>{w}}" for h, w in zip(head[1:], (7, 8, 7, 7, 7, 8), strict=True))
        )
        for name, r in rows.items():
            print(
                f"{name:<16} {r['kb']:7.1f} {r['b64_kb']:8.1f} {r['kb'] / base['kb']:6.2f}× "
                f"{r['ms']:7.2f} {r['ms'] / base['ms']:6.2f}× {r['psnr']:8.1f}"
            )


if __name__ == "__main__":
    main()
