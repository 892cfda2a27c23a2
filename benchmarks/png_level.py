"""PNG encoding options of the ``image`` column: bytes vs encoding time on real document pages.

Every page image is PNG-encoded once when ingested and once per language when translated, so the zlib
settings of ``tasks.schema.encode_png`` trade storage (and S3 traffic) against CPU time in the two
busiest stages. Pages: the R reference manual rasterised at the ingest resolution (see
``scale_corpus.refman``), or generated PDFs. Printed per setting: MB per 100 pages and ms per page,
each relative to Pillow's default (level 6, default strategy), from one run side by side.

    .venv/bin/python benchmarks/png_level.py [--pages 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (name, Pillow save options); compress_type is zlib's strategy (1 FILTERED, 2 HUFFMAN_ONLY, 3 RLE)
SETTINGS = (
    ("level 6 (default)", {"compress_level": 6}),
    ("level 1", {"compress_level": 1}),
    ("level 3", {"compress_level": 3}),
    ("level 9", {"compress_level": 9}),
    ("level 1, RLE", {"compress_level": 1, "compress_type": 3}),
    ("level 6, RLE", {"compress_level": 6, "compress_type": 3}),
    ("level 6, FILTERED", {"compress_level": 6, "compress_type": 1}),
)


def pages(n: int, work: Path) -> list:
    """``n`` page images as the ingest stage rasterises them."""
    import pypdfium2 as pdfium
    from scale_corpus import make_pages

    from tasks.ingest.config import IngestOptions

    scale = IngestOptions().dpi / 72
    make_pages(n, work)
    out = []
    for pdf in sorted(work.glob("*.pdf"))[:n]:
        doc = pdfium.PdfDocument(str(pdf))
        out.append(doc[0].render(scale=scale).to_pil().convert("RGB"))
        doc.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = pages(args.pages, Path(tmp))
    print(f"{len(images)} pages, {images[0].width}x{images[0].height} px")
    results = {}
    for name, opts in SETTINGS:
        best, size = float("inf"), 0
        for _ in range(args.repeat):
            t0, size = time.perf_counter(), 0
            for im in images:
                buf = io.BytesIO()
                im.save(buf, format="PNG", optimize=False, **opts)
                size += buf.tell()
            best = min(best, time.perf_counter() - t0)
        results[name] = {"ms_per_page": 1000 * best / len(images), "mb_per_100": size / len(images) / 1e4}
    base = results[SETTINGS[0][0]]
    print(f"{'setting':<20} {'MB/100 pages':>13} {'ms/page':>9} {'size x':>7} {'time x':>7}")
    for name, r in results.items():
        r["size_ratio"] = r["mb_per_100"] / base["mb_per_100"]
        r["time_ratio"] = r["ms_per_page"] / base["ms_per_page"]
        print(
            f"{name:<20} {r['mb_per_100']:>13.2f} {r['ms_per_page']:>9.1f} "
            f"{r['size_ratio']:>7.2f} {r['time_ratio']:>7.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
