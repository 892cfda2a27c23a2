"""Cost per page as the corpus grows: synthesize N = 64, 256, 1,024 real pages, side by side.

Pages are single-page documents cut from the R reference manual (Debian ``r-doc-pdf``: ~2,400
born-digital pages; fetched with ``apt-get download r-doc-pdf`` into ~/.cache/m3dr when not installed;
GPL-2, used here only as benchmark input), or generated PDFs when apt is unreachable. Each N runs in its
own process (so peak RSS is per run) against one Prefect API, with ``--pages-per-shard 32``, one
language and queries + negatives. Printed per N: seconds per page per stage (the stage's summed task
time / N), wall seconds per page, the flow process's peak RSS, and the ratio N=1024 : N=64 per page
(goal: within 1.2×, peak RSS flat). Then the largest run is resumed: no stage work, and its wall time.

    .venv/bin/python benchmarks/scale_corpus.py [--sizes 64,256,1024] [--langs hi] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "translate", "queries", "index", "train")
FIRST_PAGE = 30  # skip the manual's title pages and table of contents


def refman() -> Path | None:
    """The R reference manual: installed, cached, or downloaded from Debian into the cache."""
    for p in (Path("/usr/share/R/doc/manual/refman.pdf"), Path("/usr/share/doc/r-doc-pdf/manual/refman.pdf")):
        if p.is_file():
            return p
    cache = Path.home() / ".cache" / "m3dr" / "r-doc-pdf"
    found = list(cache.rglob("refman.pdf"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "r-doc-pdf"], cwd=cache, check=True, capture_output=True)
        deb = next(cache.glob("r-doc-pdf_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "x")], check=True)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return None
    found = list(cache.rglob("refman.pdf"))
    return found[0] if found else None


def make_pages(n: int, out: Path) -> str:
    """``n`` single-page PDFs in ``out``; returns where they came from."""
    out.mkdir(parents=True, exist_ok=True)
    manual = refman()
    if manual is None:
        sys.path.insert(0, str(REPO))
        from tests.support.documents import write_pdfs

        write_pdfs(out, n, seed=7)
        return "generated PDFs (r-doc-pdf unavailable)"
    import pypdfium2 as pdfium

    src = pdfium.PdfDocument(str(manual))
    for i in range(FIRST_PAGE, FIRST_PAGE + n):
        target = out / f"refman-p{i:04d}.pdf"
        if not target.exists():
            one = pdfium.PdfDocument.new()
            one.import_pages(src, [i])
            one.save(str(target))
            one.close()
    src.close()
    return f"{manual} pages {FIRST_PAGE}..{FIRST_PAGE + n - 1}"


def child(sources: str, out: str, langs: str, pages_per_shard: int) -> None:
    """One synthesize run in this process; prints a JSON line with its figures."""
    from flows.params import SynthesizeParams
    from flows.synthesize import synthesize

    t0 = time.perf_counter()
    result = synthesize(
        SynthesizeParams(sources=sources, langs=langs, out=out, pages_per_shard=pages_per_shard, workers=2)
    )
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps(
            {
                "wall": wall,
                "peak_rss_mb": peak_mb,
                "throughput": result["throughput"],
                "worked": result["shards_worked"],
                "tasks": len(result["shards"]),
                "pages": result["pages_per_lang"],
            }
        ),
        flush=True,
    )


def run_child(api: str, sources: Path, out: Path, langs: str, pps: int) -> dict:
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--child", "--sources", str(sources), "--out", str(out)]
    cmd += ["--langs", langs, "--pages-per-shard", str(pps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256,1024")
    ap.add_argument("--langs", default="hi")
    ap.add_argument("--pages-per-shard", type=int, default=32)
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sources", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.sources, args.out, args.langs, args.pages_per_shard)
        return

    from prefect.testing.utilities import prefect_test_harness

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.keep or tempfile.mkdtemp(prefix="m3dr-scale-"))
    pool = work / "pool"
    origin = make_pages(max(sizes), pool)
    files = sorted(pool.glob("*.pdf"))
    print(f"pages: {origin}; --pages-per-shard {args.pages_per_shard}; langs {args.langs}; queries on")
    rows = {}
    with prefect_test_harness(server_startup_timeout=180):
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
        for n in sizes:
            src = work / f"src-{n}"
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir(parents=True)
            for f in files[:n]:
                os.link(f, src / f.name)
            rows[n] = run_child(api, src, work / f"out-{n}", args.langs, args.pages_per_shard)
            print(f"N={n}: {rows[n]['wall']:.0f} s", flush=True)
        big = max(sizes)
        resume = run_child(api, work / f"src-{big}", work / f"out-{big}", args.langs, args.pages_per_shard)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    head = "| N pages | " + " | ".join(f"{s} s/page" for s in STAGES) + " | wall s/page | peak RSS MB |"
    print("\n" + head)
    print("|" + "---:|" * (len(STAGES) + 3))
    per_page = {}
    for n, r in rows.items():
        t = r["throughput"]
        cells = [t.get(s, {}).get("task_seconds", 0.0) / n for s in STAGES]
        per_page[n] = (cells, r["wall"] / n, r["peak_rss_mb"])
        print(
            f"| {n} | "
            + " | ".join(f"{c:.4f}" for c in cells)
            + f" | {r['wall'] / n:.4f} | {r['peak_rss_mb']:.0f} |"
        )
    lo, hi = min(sizes), max(sizes)
    ratios = [(a / b if b else float("nan")) for a, b in zip(per_page[hi][0], per_page[lo][0], strict=True)]
    print(
        f"\nratio N={hi} : N={lo} per page: "
        + ", ".join(f"{s} {x:.2f}" for s, x in zip(STAGES, ratios, strict=True))
        + f"; wall {per_page[hi][1] / per_page[lo][1]:.2f}; peak RSS {per_page[hi][2] / per_page[lo][2]:.2f}"
    )
    print(
        f"resume of the complete N={hi} run: {resume['worked']} of {resume['tasks']} shard tasks did work, "
        f"wall {resume['wall']:.1f} s"
    )


if __name__ == "__main__":
    main()
