"""Where ingest and translate spend their time: inside their engines, or in our glue around them.

A sampling profiler (a thread reading the stage thread's Python stack every ``--interval`` ms) runs
while one English pages shard is ingested and then translated into ``--lang`` with render QA on (tiny
profile: the tiny DocLayout-YOLO recipe and tiny NLLB; the renderer, tesseract, pdfium and the PNG
codec are the real ones). Each sample is charged to the innermost frame that belongs to an engine:

    layout model   doclayout_yolo / ultralytics / torch / onnxruntime code
    translator     CTranslate2's ``translate_batch`` call and the HF tokenizer (transformers, tokenizers)
    renderer       Pillow's text shaping and drawing (ImageFont / ImageDraw: raqm, HarfBuzz, FreeType)
    tesseract      waiting on the tesseract process (OCR and render QA run it through ``subprocess``)
    image codec    Pillow's PNG decoder and encoder (PngImagePlugin, ImageFile, zlib)
    pdfium         the PDF rasteriser and text layer (pypdfium2)
    parquet        pyarrow (reading and writing shards)
    pixel ops      Pillow image primitives (convert, crop, paste, getbbox: C loops over pixels)

and every other sample is glue (our Python, numpy we call, the standard library). A C call that holds
the GIL is charged to the Python frame that made it, so a numpy median in our code counts as glue and a
FreeType render inside ``ImageDraw.text`` as renderer. Goal: glue <= 25% of each stage's time.

    .venv/bin/python benchmarks/stage_profile.py [--pages 24] [--lang hi] [--json FILE]

Input: single pages of the R reference manual (born-digital, see ``scale_corpus.refman``), or generated
PDFs when it cannot be had.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# (engine, substrings of a frame's file path); the first engine frame from the innermost one wins
ENGINE_FILES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("layout model", ("/doclayout_yolo/", "/ultralytics/", "/torch/", "/onnxruntime/", "/rapid_layout/")),
    ("translator", ("/transformers/", "/tokenizers/", "/ctranslate2/")),
    ("renderer", ("/PIL/ImageFont.py", "/PIL/ImageDraw.py")),
    ("tesseract", ("/subprocess.py",)),
    ("image codec", ("/PIL/PngImagePlugin.py", "/PIL/ImageFile.py", "/PIL/JpegImagePlugin.py")),
    ("pdfium", ("/pypdfium2/",)),
    ("parquet", ("/pyarrow/",)),
    ("pixel ops", ("/PIL/Image.py", "/PIL/ImageOps.py", "/PIL/ImageChops.py")),
)
# our frames whose own lines are one engine call (CTranslate2's C++ translate_batch has no Python frame)
# (submitting a call, and waiting on the futures of an asynchronous one, is the translator's time)
ENGINE_FUNCS = {
    ("tasks/translate/engine.py", "_submit"): "translator",
    ("tasks/translate/engine.py", "_hypotheses"): "translator",
    ("tasks/translate/engine.py", "translate_tokens"): "translator",
}


def classify(frame: FrameType | None) -> str:
    """The engine a stack sample belongs to, or ``"glue"``."""
    f = frame
    while f is not None:
        path = f.f_code.co_filename
        for engine, parts in ENGINE_FILES:
            if any(p in path for p in parts):
                return engine
        for (suffix, func), engine in ENGINE_FUNCS.items():
            if path.endswith(suffix) and f.f_code.co_name == func:
                return engine
        f = f.f_back
    return "glue"


class Sampler(threading.Thread):
    """Counts, every ``interval`` seconds, which engine the watched thread is in."""

    def __init__(self, thread_id: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.thread_id, self.interval = thread_id, interval
        self.counts: Counter[str] = Counter()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.counts[classify(sys._current_frames().get(self.thread_id))] += 1

    def stop(self) -> Counter[str]:
        self._done.set()
        self.join()
        return self.counts


def profiled(fn, interval: float) -> tuple[float, Counter[str]]:
    """Run ``fn()`` in this thread under the sampler: (wall seconds, samples per engine)."""
    sampler = Sampler(threading.get_ident(), interval)
    sampler.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        wall = time.perf_counter() - t0
        counts = sampler.stop()
    return wall, counts


def summary(name: str, wall: float, pages: int, counts: Counter[str]) -> dict:
    total = max(1, sum(counts.values()))
    shares = {k: round(v / total, 4) for k, v in counts.most_common()}
    glue = shares.get("glue", 0.0)
    print(f"\n{name}: {pages} pages, {wall:.2f} s wall, {wall / max(1, pages):.3f} s/page, {total} samples")
    for k, v in shares.items():
        print(f"  {k:<14} {100 * v:5.1f}%")
    print(f"  glue share {100 * glue:.1f}% (goal <= 25%)")
    s_per_page = round(wall / max(1, pages), 4)
    return {"s_per_page": s_per_page, "glue_share": glue, "shares": shares, "pages": pages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=24)
    ap.add_argument("--lang", default="hi")
    ap.add_argument("--interval", type=float, default=2.0, help="sampling interval, ms")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep the output root here")
    args = ap.parse_args()

    from scale_corpus import make_pages

    from tasks.ingest.shard import ingest_shard
    from tasks.ingest.sources import scan_sources
    from tasks.models import load_profile
    from tasks.translate.shard import translate_shard

    profile = load_profile("tiny")
    profile["render"] = {**profile.get("render", {}), "qa": True, "qa_sample": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        origin = make_pages(args.pages, work / "sources")
        print(f"input: {args.pages} single-page PDFs from {origin}")
        root, en = work / "out", "pages-en-profile"
        refs = scan_sources(work / "sources")
        # warm the engines (model loads are per process, not per page)
        warm = work / "warm"
        ingest_shard(warm, en, refs[:1], profile)
        translate_shard(warm, en, args.lang, profile, ["png"])
        iv = args.interval / 1000
        wall_i, ci = profiled(lambda: ingest_shard(root, en, refs, profile), iv)
        wall_t, ct = profiled(lambda: translate_shard(root, en, args.lang, profile, ["png"]), iv)
        out = {
            "ingest": summary("ingest", wall_i, len(refs), ci),
            "translate": summary(f"translate ({args.lang}, render QA on)", wall_t, len(refs), ct),
        }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
