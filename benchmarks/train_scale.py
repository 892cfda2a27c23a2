"""Memory and speed of the training data path against corpus size: N, 4N and 16N pages.

Builds three page roots of synthetic pages in the real PAGES schema (a PNG signature + random bytes of
``--image-kb``, incompressible like real PNGs) written with the project's shard writer (production row
groups), plus a train shard referencing them. Then, in a fresh subprocess per size (so each peak is its
own), the training data path runs: :class:`training.data.PageStore` over the pages shards,
:func:`training.data.load_examples`, and ``--batches`` global batches of the real epoch plan
(:func:`training.data.batch_plan`) laid out by the real :class:`training.data.Collator` (positives and
sampled negatives), each document read with ``store.get`` and its group looked up (what the collator
does before the processor; the random bytes are not decodable images, so the processor is left out).

Prints peak RSS of each process, its growth over the process after imports, the index build time and
the time per batch. ``--baseline`` also runs the old store (``pq.read_table(memory_map=True)`` of every
shard, what PageStore did before) side by side. **Goal: peak RSS at 16N ≤ 1.2 × peak RSS at N.**

    python benchmarks/train_scale.py --pages 64 --baseline --json out/bench/train_scale.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb(field: str = "VmRSS") -> float:
    """Resident set size of this process now (MB); ``VmHWM``: its peak. (Not ``ru_maxrss``: Linux
    carries the forking parent's RSS into a child's ``ru_maxrss`` across exec, which hid the child's own
    peak under the parent's, the one that had just built the roots.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class TableStore:
    """The old PageStore: every shard read whole (``memory_map=True`` on compressed Parquet decodes it
    all into memory), ``page_id → (table, row)``."""

    def __init__(self, shards: list[str]) -> None:
        import pyarrow.parquet as pq

        cols = ["page_id", "source_page_id", "lang", "text", "image"]
        self.tables = [pq.read_table(p, columns=cols, memory_map=True) for p in shards]
        self.index = {
            pid: (t, row)
            for t, table in enumerate(self.tables)
            for row, pid in enumerate(table.column("page_id").to_pylist())
        }
        self._group = {
            pid: g
            for table in self.tables
            for pid, g in zip(table["page_id"].to_pylist(), table["source_page_id"].to_pylist(), strict=True)
        }

    def __contains__(self, page_id: str) -> bool:
        return page_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def group(self, page_id: str) -> str:
        return self._group[page_id]

    def get(self, page_id: str):
        from tasks.encoders import PageView

        t, row = self.index[page_id]
        return PageView.from_row(self.tables[t].slice(row, 1).to_pylist()[0])


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    from training.data import Collator, PageStore, batch_plan, load_examples

    root = Path(args.child)
    pages = sorted(str(p) for p in (root / "pages").glob("*.parquet"))
    train = sorted(str(p) for p in (root / "train").glob("*.parquet"))
    base = rss_mb()
    t0 = time.perf_counter()
    store = TableStore(pages) if args.mode == "baseline" else PageStore(pages)
    examples, _ = load_examples(train, store)  # type: ignore[arg-type]
    build_s = time.perf_counter() - t0
    collator = Collator(None, store, examples, num_negatives=2, seed=0)  # type: ignore[arg-type]
    plan = batch_plan(examples, args.batch_size, seed=0, epoch=0, bucket_batches=1)
    t0 = time.perf_counter()
    n_docs = 0
    for step, batch in enumerate(plan[: args.batches]):
        for _, docs in collator.layout(batch, step):
            for pid in docs:
                store.group(pid)
                n_docs += len(store.get(pid).image_png or b"") > 0
    per_batch = (time.perf_counter() - t0) / max(1, min(args.batches, len(plan)))
    peak = rss_mb("VmHWM")
    out = {"mode": args.mode, "pages": len(store)}
    out |= {"peak_rss_mb": peak, "base_rss_mb": base, "build_s": build_s, "s_per_batch": per_batch}
    out |= {"docs_read": n_docs}
    print(json.dumps(out))


def measure(root: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(root), "--mode", mode]
    cmd += ["--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} on {root} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=64, help="N: the sizes are N, 4N and 16N pages")
    ap.add_argument("--image-kb", type=int, default=200)
    ap.add_argument("--pages-per-shard", type=int, default=256)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--baseline", action="store_true", help="also run the old whole-table store")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="lazy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        child(args)
        return
    from tests.support.synthetic_pages import build_synthetic_root

    sizes = [args.pages, 4 * args.pages, 16 * args.pages]
    modes = ["lazy", "baseline"] if args.baseline else ["lazy"]
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="m3dr-train-scale-") as tmp:
        for n in sizes:
            t0 = time.perf_counter()
            root = build_synthetic_root(
                Path(tmp) / f"root-{n}",
                n,
                image_bytes=args.image_kb * 1000,
                pages_per_shard=args.pages_per_shard,
            ).root
            mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 1e6
            print(f"built {n} pages ({mb:.0f} MB of shards) in {time.perf_counter() - t0:.1f} s", flush=True)
            for mode in modes:
                rows.append({"size": n, "shards_mb": mb, **measure(root, mode, args)})
    print()
    print(f"{'store':9s} {'pages':>6s} {'shards MB':>9s} {'peak RSS MB':>11s} {'growth MB':>9s} "
          f"{'index s':>8s} {'ms/batch':>8s}")  # fmt: skip
    for r in rows:
        print(
            f"{r['mode']:9s} {r['size']:6d} {r['shards_mb']:9.0f} {r['peak_rss_mb']:11.0f} "
            f"{r['peak_rss_mb'] - r['base_rss_mb']:9.0f} {r['build_s']:8.2f} {1000 * r['s_per_batch']:8.1f}"
        )
    result: dict[str, object] = {"sizes": sizes, "image_kb": args.image_kb, "rows": rows}
    for mode in modes:
        peaks = {r["size"]: r["peak_rss_mb"] for r in rows if r["mode"] == mode}
        key = "rss_ratio_16n" if mode == "lazy" else "baseline_rss_ratio_16n"
        result[key] = peaks[sizes[2]] / peaks[sizes[0]]
        print(f"{mode}: peak RSS 16N / N = {result[key]:.3f}" + ("  (goal ≤ 1.2)" if mode == "lazy" else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
