"""Memory, time and file sizes of ``m3dr export-dataset`` against corpus size: N, 4N and 16N pages (issue 23).

Builds three output roots of synthetic pages (:mod:`tests.support.synthetic_pages`: the real PAGES and
TRAIN schemas, written with the project's shard writer, so the row groups are the production ones; each
image is a PNG signature + ``--image-kb`` of random bytes, incompressible like a real PNG), with one train
shard per pages shard as a synthesize run writes them (``tasks.negatives.shard``: a train shard per English
pages shard; the export reads train rows a shard at a time). The roots have no queries shards, so the
export leaves out the held-out suite; every other step runs. The export's corpus keeps only the pages of
documents that :func:`tasks.splits.assign_split` puts in train or dev (default fractions), and train rows
whose positive is a held-out page are dropped: the table counts what was exported (corpus rows, train
rows), and seconds per page are per *input* page (every input row group's id columns are read, and the
images of every group with a kept page).

Each size's :func:`eval.dataset_export.export_dataset` runs in a fresh subprocess, so each peak RSS is
its own; the modules the export imports on the way (pandas, matplotlib, PIL, huggingface_hub, tqdm) are
imported before the baseline, so *growth* (peak RSS − RSS after imports) is the export's own memory.
Fixed costs (the manifest, the plots, the card) weigh on seconds per page at small N, so the table also
gives the *marginal* ms per page between consecutive sizes (Δseconds / Δpages): flat when time is linear.
Files roll at ``--max-file-mb`` (small, so the corpus spans many files); the script exits 1 if any Parquet
file of an export is larger than that. Memory holds one write buffer of up to 100 corpus rows
(``eval.dataset_export.ROW_GROUP_ROWS``, a few copies of it), so take N well over 100 pages: below that the
buffer itself grows with N.

**Goal: peak RSS at 16N ≤ 1.2 × peak RSS at N (memory holds a row group and the corpus ids, not the
corpus); seconds per page at 16N within 1.5 × of N (time linear in the corpus); no file over the limit.**

    nice -n 10 .venv/bin/python benchmarks/export_scale.py --pages 200 --image-kb 100 \\
        --json out/bench/export_scale.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MB = 1000**2


def rss_mb(field: str = "VmRSS") -> float:
    """Resident set size of this process now (MiB); ``VmHWM``: its high-water mark.

    The peak is ``VmHWM``, not ``getrusage().ru_maxrss``: Linux carries the parent's peak RSS into a
    child's ``ru_maxrss`` across fork + exec, so a child's ``ru_maxrss`` is at least the peak of the
    process that built the roots."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_root(out: Path, n_pages: int, image_bytes: int, pages_per_shard: int, seed: int = 0) -> Path:
    """``n_pages`` synthetic pages under ``out``, and for each pages shard a train shard of its rows."""
    import random

    from tasks.schema import pages_table, train_table
    from tasks.shards import commit_shard
    from tests.support.synthetic_pages import synthetic_page, train_rows

    rng = random.Random(seed)
    for k, start in enumerate(range(0, n_pages, pages_per_shard)):
        stop = min(n_pages, start + pages_per_shard)
        records = [synthetic_page(i, seed, image_bytes, rng) for i in range(start, stop)]
        ids = [r.page_id for r in records]
        for kind, table in (
            ("pages", pages_table(records)),
            ("train", train_table(train_rows(ids, rng, negatives=min(2, len(ids) - 1)))),
        ):
            name = f"{kind}-en-{k:05d}"
            commit_shard(out, table, name=name, kind=kind, lang="en", rel_path=f"{kind}/{name}.parquet",
                         cfg_hash="synthetic")  # fmt: skip
    return out


def child(args: argparse.Namespace) -> None:
    """One export in this (fresh) process; prints one JSON line."""
    # what the export imports on the way (a fixed cost, not its data): pandas (pyarrow's
    # Table.from_pylist), PIL and matplotlib (the card's plots), huggingface_hub (the card's YAML), tqdm
    import matplotlib
    import pandas  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401
    import tqdm.auto  # noqa: F401
    from huggingface_hub import DatasetCardData  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot

    from eval.dataset_export import export_dataset

    root, dest = Path(args.child), Path(args.dest)
    base = rss_mb()
    t0 = time.perf_counter()
    result = export_dataset(root, dest, max_file_bytes=int(args.max_file_mb * MB))
    seconds = time.perf_counter() - t0
    peak = rss_mb("VmHWM")
    parquet = {p.relative_to(dest).as_posix(): p.stat().st_size for p in dest.rglob("*.parquet")}
    stats = result.stats
    out = {"peak_rss_mb": peak, "base_rss_mb": base, "seconds": seconds}
    out |= {"corpus_rows": sum(sum(per.values()) for per in stats.pages.values())}
    out |= {"train_rows": sum(sum(per.values()) for per in stats.train_rows.values())}
    out |= {"dropped": stats.dropped}
    out |= {"output_bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())}
    out |= {"files": len(parquet), "corpus_files": sum(k.startswith("data/corpus/") for k in parquet)}
    out |= {"largest_file": max(parquet.items(), key=lambda kv: kv[1], default=("", 0))}
    limit = int(args.max_file_mb * MB)
    out |= {"files_over_limit": {k: v for k, v in sorted(parquet.items()) if v > limit}}
    print(json.dumps(out))


def measure(root: Path, dest: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Export ``root`` to ``dest`` in a subprocess; its JSON line."""
    cmd = [sys.executable, __file__, "--child", str(root), "--dest", str(dest)]
    cmd += ["--max-file-mb", str(args.max_file_mb)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"export of {root} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=200, help="N: the sizes are N, 4N and 16N pages")
    ap.add_argument("--image-kb", type=int, default=100, help="bytes of each page image (kB)")
    ap.add_argument("--pages-per-shard", type=int, default=256)
    ap.add_argument("--max-file-mb", type=float, default=8.0, help="the export's file limit (MB = 10^6 B)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        child(args)
        return
    limit = int(args.max_file_mb * MB)
    sizes = [args.pages, 4 * args.pages, 16 * args.pages]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="m3dr-export-scale-") as tmp:
        for n in sizes:  # one root at a time on disk: 16N pages of images are the largest
            t0 = time.perf_counter()
            root = build_root(Path(tmp) / f"root-{n}", n, args.image_kb * 1000, args.pages_per_shard)
            in_mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / MB
            print(
                f"built {n} pages ({in_mb:.0f} MB of shards) in {time.perf_counter() - t0:.1f} s", flush=True
            )
            r = measure(root, Path(tmp) / f"export-{n}", args)
            rows.append({"pages": n, "input_mb": in_mb, **r})
            print(f"exported {n} pages in {r['seconds']:.1f} s", flush=True)
            shutil.rmtree(root)
            shutil.rmtree(Path(tmp) / f"export-{n}")
    first = rows[0]
    print()
    print(f"{'pages':>6s} {'in MB':>6s} {'corpus':>6s} {'train':>6s} {'peak RSS MB':>11s} {'growth MB':>9s} "
          f"{'s':>6s} {'ms/page':>7s} {'Δms/page':>8s} {'pages/s':>7s} {'out MB':>7s} {'files':>5s} "
          f"{'largest MB':>10s} {'over':>4s} {'RSS×N':>6s} {'s/page×N':>8s}")  # fmt: skip
    prev: dict[str, Any] = {"seconds": 0.0, "pages": 0}
    for r in rows:
        r["s_per_page"] = r["seconds"] / r["pages"]
        r["marginal_s_per_page"] = (r["seconds"] - prev["seconds"]) / (r["pages"] - prev["pages"])
        prev = r
        r["rss_ratio"] = r["peak_rss_mb"] / first["peak_rss_mb"]
        r["s_per_page_ratio"] = r["s_per_page"] / first["s_per_page"]
        print(
            f"{r['pages']:6d} {r['input_mb']:6.0f} {r['corpus_rows']:6d} {r['train_rows']:6d} "
            f"{r['peak_rss_mb']:11.0f} {r['peak_rss_mb'] - r['base_rss_mb']:9.0f} "
            f"{r['seconds']:6.1f} {1000 * r['s_per_page']:7.2f} {1000 * r['marginal_s_per_page']:8.2f} "
            f"{1 / r['s_per_page']:7.0f} {r['output_bytes'] / MB:7.0f} {r['files']:5d} "
            f"{r['largest_file'][1] / MB:10.2f} {len(r['files_over_limit']):4d} "
            f"{r['rss_ratio']:6.3f} {r['s_per_page_ratio']:8.3f}"
        )
    last = rows[-1]
    result: dict[str, Any] = {
        "sizes": sizes,
        "image_kb": args.image_kb,
        "max_file_bytes": limit,
        "rows": rows,
        "rss_ratio_16n": last["rss_ratio"],
        "s_per_page_ratio_16n": last["s_per_page_ratio"],
    }
    print(
        f"\npeak RSS 16N / N = {last['rss_ratio']:.3f} (goal ≤ 1.2); "
        f"s/page 16N / N = {last['s_per_page_ratio']:.3f} (goal ≤ 1.5); file limit {limit / MB:g} MB"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    over = {r["pages"]: r["files_over_limit"] for r in rows if r["files_over_limit"]}
    if over:
        sys.exit(f"files over --max-file-mb {args.max_file_mb:g} ({limit} B), by size: {over}")


if __name__ == "__main__":
    main()
