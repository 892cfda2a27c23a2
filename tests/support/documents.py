"""Born-digital English PDF documents made on the spot (reportlab, ``invariant=1`` so the bytes, and so
the content ids, are the same on every run): the multi-shard inputs of the scale, kill/resume and
object-store tests and of ``benchmarks/scale_corpus.py``. Not a test module."""

from __future__ import annotations

import random
from pathlib import Path

from tests.support.toy_corpus import vocabulary


def write_pdfs(
    out: Path, n_docs: int, *, pages_per_doc: int = 1, seed: int = 0, lines: int = 6
) -> list[Path]:
    """``n_docs`` PDFs of ``pages_per_doc`` pages, each page a heading and a few paragraphs of distinct
    English words (CLDR names), into ``out``; returns their paths."""
    from reportlab.lib.pagesizes import A5
    from reportlab.pdfgen import canvas

    words = vocabulary()
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for d in range(n_docs):
        path = out / f"doc-{seed:02d}-{d:04d}.pdf"
        c = canvas.Canvas(str(path), pagesize=A5, invariant=1)
        height = A5[1]
        for p in range(pages_per_doc):
            c.setFont("Helvetica-Bold", 16)
            c.drawString(
                40, height - 60, f"Chapter {d + 1}.{p + 1}: {' '.join(rng.sample(words, 3)).title()}"
            )
            c.setFont("Helvetica", 11)
            y = height - 100
            for _ in range(lines):
                c.drawString(40, y, " ".join(rng.sample(words, 7)).capitalize() + ".")
                y -= 22
            c.showPage()
        c.save()
        paths.append(path)
    return paths
