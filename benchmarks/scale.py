"""Scale-out of `synthesize`: the same run on a Dask LocalCluster with 1 and with 2 worker processes.

Prints wall times side by side and the 1 → 2 worker speed-up, and checks both runs wrote byte-identical
shards. Usage: python benchmarks/scale.py [--sources assets/samples] [--langs hi,ar,zh,ru]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def shard_bytes(out: Path) -> dict[str, bytes]:
    files = [*out.glob("pages/*/*.parquet"), *out.glob("queries/*.parquet"), *out.glob("train/*.parquet")]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(files)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sources", default="assets/samples")
    ap.add_argument("--langs", default="hi,ar,zh,ru")
    ap.add_argument("--pages-per-shard", type=int, default=4, help="small shards so there is work to spread")
    args = ap.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from flows.synthesize import SynthesizeParams, synthesize

    times: dict[int, float] = {}
    outs: dict[int, Path] = {}
    with prefect_test_harness(server_startup_timeout=120), tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            outs[workers] = Path(tmp) / f"out-{workers}"
            params = SynthesizeParams(
                sources=args.sources,
                langs=args.langs,
                out=str(outs[workers]),
                pages_per_shard=args.pages_per_shard,
                dask_workers=workers,
            )
            t0 = time.perf_counter()
            synthesize(params)
            times[workers] = time.perf_counter() - t0
        same = shard_bytes(outs[1]) == shard_bytes(outs[2])
    print(f"{'dask workers':>12} {'seconds':>9}")
    for w, t in times.items():
        print(f"{w:>12} {t:>9.1f}")
    print(f"speed-up 1 -> 2 workers: {times[1] / times[2]:.2f}x   (shards byte-identical: {same})")


if __name__ == "__main__":
    main()
