"""Cost of reading every live row of an output root (Manifest.live_rows) at N, 4N, 16N shards.

Each shard is a one-row Parquet file and one source is superseded, so the cost per shard is the
manifest reads plus one small file read. Prints manifest reads and ms per shard; the goal is a flat
curve (one manifest read per pass, not one per shard). Run: ``.venv/bin/python benchmarks/live_rows.py``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.shards import Manifest


def make_root(n: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="m3dr-live-rows-"))
    (root / "p").mkdir()
    shards = {}
    for i in range(n):
        pq.write_table(pa.table({"source_id": [f"s{i}"], "page_id": [f"p{i}"]}), root / "p" / f"{i}.parquet")
        name = f"pages-{i:05d}"
        shards[name] = {"name": name, "kind": "pages", "lang": "en", "path": f"p/{i}.parquet", "rows": 1}
        shards[name] |= {"sha256": "", "config_hash": ""}
    manifest = {"version": 1, "shards": shards, "superseded": {"s0": "changed"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def main() -> None:
    base = None
    for n in (64, 256, 1024):
        manifest = Manifest(make_root(n))
        reads = 0
        read = manifest._read

        def counted(read=read):
            nonlocal reads
            reads += 1
            return read()

        manifest._read = counted  # type: ignore[method-assign]
        t0 = time.perf_counter()
        rows = sum(1 for _ in manifest.live_rows("pages", ["page_id"]))
        per_shard = (time.perf_counter() - t0) / n * 1e3
        base = base or per_shard
        ratio = per_shard / base
        print(f"N={n:5d}: {rows} live rows, {reads} manifest reads, {per_shard:.3f} ms/shard ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
