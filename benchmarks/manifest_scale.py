"""Completion records at the paper's scale and beyond, simulated: 100,000 shard records on local disk.

What a million-page run does to the manifest, without running one: record a shard (goal O(1), < 5 ms
whatever the number already recorded), resume-check every shard of a complete run without reading a
shard byte (goal < 60 s at 100k), compact the records into ``manifest.json``, and read the full view
(index + records not yet compacted). The record cost is measured at 1k, 10k and 100k existing records,
side by side with the old design (one JSON manifest rewritten whole per record, under a lock), whose
cost grows with the entries already there.

    .venv/bin/python benchmarks/manifest_scale.py [--records 100000] [--dir /tmp/m3dr-manifest]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tasks.shards import Manifest, ShardEntry, completed
from tasks.storage import write_bytes_atomic


def _entry(i: int) -> ShardEntry:
    return ShardEntry(
        name=f"pages-hi-{i:08x}",
        kind="pages",
        lang="hi",
        path=f"pages/hi/pages-hi-{i:08x}.parquet",
        rows=512,
        sha256=f"{i:064x}",
        config_hash="0123456789abcdef",
        inputs=[f"pages-en-{i:08x}"],
        extra={"translation": {"segments_in": 4096, "cache_hits": 0}},
        bytes=64,
    )


def fill(root: Path, start: int, stop: int) -> None:
    """Records (and 64-byte stand-in shard objects) for shards start..stop-1."""
    m = Manifest(root)
    data_dir = root / "pages" / "hi"
    data_dir.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        e = _entry(i)
        (root / e.path).write_bytes(b"x" * 64)
        m.record(e)


def time_records(root: Path, first: int, n: int = 200) -> float:
    """Median ms per record with ``first`` records already present (data object published before)."""
    m = Manifest(root)
    samples = []
    for i in range(first, first + n):
        e = _entry(i)
        (root / e.path).write_bytes(b"x" * 64)
        t0 = time.perf_counter()
        m.record(e)
        samples.append(time.perf_counter() - t0)
    return 1000 * statistics.median(samples)


def time_old_design(entries: int, n: int = 20) -> float:
    """ms per record of the old manifest: read the JSON, add one entry, rewrite it whole atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.json"
        data = {"version": 1, "shards": {e.name: asdict(e) for e in map(_entry, range(entries))}}
        path.write_text(json.dumps(data))
        samples = []
        for i in range(entries, entries + n):
            t0 = time.perf_counter()
            d = json.loads(path.read_text())
            d["shards"][_entry(i).name] = asdict(_entry(i))
            write_bytes_atomic(json.dumps(d, indent=1, sort_keys=True).encode(), path)
            samples.append(time.perf_counter() - t0)
        return 1000 * statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="m3dr-manifest-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        print(f"simulating {args.records:,} shard records under {root}")
        points = [p for p in (1_000, 10_000, 100_000) if p <= args.records] or [args.records]
        done = 0
        rec_ms = {}
        t_fill = time.perf_counter()
        for p in points:
            fill(root, done, p)
            done = p
            rec_ms[p] = time_records(root, 10_000_000 + p)  # names outside the filled range
        fill_s = time.perf_counter() - t_fill
        old = {p: time_old_design(p) for p in (500, 2_000, 8_000)}

        m = Manifest(root)
        t0 = time.perf_counter()
        n_complete = sum(
            completed(m, e.name, e.config_hash, e.kind, e.lang, e.path) is not None
            for e in map(_entry, range(done))
        )
        resume_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        view_before = len(Manifest(root).entries())
        view_uncompacted_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = Manifest(root).compact()
        compact_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        view_after = len(Manifest(root).entries())
        view_compacted_s = time.perf_counter() - t0
        index_mb = os.path.getsize(root / "manifest.json") / 1e6
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print(f"(filled in {fill_s:.0f} s)")
    print("\nrecord one shard (median of 200), by records already present")
    print("| records present | new: ms/record | old design: entries | old: ms/record |")
    print("|---:|---:|---:|---:|")
    olds = list(old.items())
    for i, p in enumerate(points):
        o = olds[i] if i < len(olds) else ("", "")
        print(
            f"| {p:,} | {rec_ms[p]:.3f} | {o[0]:,} | {o[1]:.1f} |"
            if o[0]
            else f"| {p:,} | {rec_ms[p]:.3f} | | |"
        )
    print(
        f"\nratio record cost {points[-1]:,} : {points[0]:,} records = "
        f"{rec_ms[points[-1]] / rec_ms[points[0]]:.2f}"
    )
    print(
        f"resume check of {done:,} complete shards (record + object size, no shard bytes): "
        f"{resume_s:.1f} s ({1e6 * resume_s / done:.0f} µs/shard), {n_complete:,} complete"
    )
    print(
        f"full view before compaction: {view_uncompacted_s:.1f} s "
        f"({view_before:,} entries, every record read)"
    )
    print(f"compaction: {compact_s:.1f} s → manifest.json {index_mb:.1f} MB, {stats['shards']:,} shards")
    print(
        f"full view after compaction: {view_compacted_s:.1f} s ({view_after:,} entries, one listing + index)"
    )


if __name__ == "__main__":
    main()
