"""Search memory and speed against corpus size: N, 4N and 16N documents, multi-vector and dense.

    nice .venv/bin/python benchmarks/eval_scale.py                      # N = 1000 docs, 256 queries
    nice .venv/bin/python benchmarks/eval_scale.py --docs 250 --json out/bench/eval_scale.json

Random unit vectors in realistic shapes: documents of ``--dlen`` 128-d tokens (¾ to all of them: the
padding path runs), queries of ``--qlen`` tokens (½ to all), dense vectors of ``--dense-dim``. Each
(size, variant) runs in a fresh subprocess, so each peak is its own; the peak is the kernel's RSS
high-water mark while the search runs (reset via /proc/self/clear_refs just before it) minus the RSS
at that moment: memory **beyond the embeddings**, which are built before. Variants:

- ``stream``: :func:`eval.retrieval.maxsim_topk` (running top-k; what the benchmark runner uses);
- ``full``: :func:`eval.retrieval.maxsim_scores` + ``torch.topk``, the old path (sizes ≤ ``--full-max``
  × N only: it holds the ``[queries × docs]`` matrix);
- ``colpali``: colpali-engine's ``BaseVisualRetrieverProcessor.score_multi_vector`` + ``torch.topk`` on
  the same tensors (its torch einsum path unless ``COLPALI_SCORES_BACKEND`` picks another);
- ``dense``: :func:`eval.retrieval.dense_topk`; ``colpali-dense``: ``score_single_vector`` + topk.

Queries/s is the best of ``--repeats`` (the first, measured call included). Goals: ``stream`` peak at
16N about its peak at N (**flat**), and ``stream`` queries/s ≥ colpali's. With ``--json FILE`` the
figures go there too: ``{"mem_ratio_16n": stream peak 16N / N, "speed_vs_colpali": stream q/s /
colpali q/s at 16N, …}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.search import unit  # noqa: E402
from eval.retrieval import dense_topk, maxsim_peak_bytes, maxsim_scores, maxsim_topk  # noqa: E402
from tests.support.memory import peak_extra  # noqa: E402

MULTI = ("stream", "full", "colpali")
DENSE = ("dense", "colpali-dense")
CHECK_ROWS = 32  # queries whose top-10 are compared across variants


def _lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _multivectors(n: int, lo: int, hi: int, dim: int, seed: int) -> list[torch.Tensor]:
    """``n`` unit-token matrices of ``lo``..``hi`` tokens, views into one block (as a cache holds them)."""
    lens = _lengths(n, lo, hi, seed)
    flat = unit(sum(lens), dim, seed=seed + 1)
    return list(torch.split(flat, lens))


def _search(kind: str, a: argparse.Namespace, q, d, k: int):
    """The ``(scores, indices)`` top-k of one variant."""
    if kind == "stream":
        return maxsim_topk(q, None, d, None, k, doc_chunk=a.doc_chunk, query_chunk=a.query_chunk)
    if kind == "full":
        full = maxsim_scores(q, None, d, None, doc_chunk=a.doc_chunk, query_chunk=a.query_chunk)
        return torch.topk(full, min(k, full.shape[1]), dim=1)
    if kind == "dense":
        return dense_topk(q, d, k)
    from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor as P

    if kind == "colpali":
        full = P.score_multi_vector(q, d, batch_size=a.colpali_batch, device="cpu")
    else:
        full = P.score_single_vector(q, d, device="cpu")
    return torch.topk(full, min(k, full.shape[1]), dim=1)


def worker(kind: str, nd: int, a: argparse.Namespace) -> dict:
    """One variant at one size in this (fresh) process."""
    if kind in MULTI:
        q = _multivectors(a.queries, max(1, a.qlen // 2), a.qlen, a.dim, seed=1)
        d = _multivectors(nd, max(1, 3 * a.dlen // 4), a.dlen, a.dim, seed=3)
        warm_q, warm_d = q[:8], d[:64]
    else:
        q, d = unit(a.queries, a.dense_dim, seed=5), unit(nd, a.dense_dim, seed=6)
        warm_q, warm_d = q[:8], d[:64]
    _search(kind, a, warm_q, warm_d, a.k)  # kernels and libraries paged in, at a small size

    def timed():
        t0 = time.perf_counter()
        out = _search(kind, a, q, d, a.k)
        return time.perf_counter() - t0, out

    peak, (secs, (_, ix)) = peak_extra(timed)
    for _ in range(a.repeats - 1):
        secs = min(secs, timed()[0])
    return {"peak": peak, "secs": secs, "top10": ix[:CHECK_ROWS, :10].tolist()}


def run_worker(kind: str, nd: int, a: argparse.Namespace) -> dict:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("json", "worker")]
    cmd = [sys.executable, __file__, f"--worker={kind}:{nd}", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} at {nd} docs failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _agree(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of the top-10 lists' members that two variants agree on."""
    same = sum(len(set(x) & set(y)) for x, y in zip(a, b, strict=True))
    return same / max(1, sum(len(x) for x in a))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1000, help="N: the sizes are N, 4N and 16N documents")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--qlen", type=int, default=20, help="query tokens (½ to all of them)")
    p.add_argument("--dlen", type=int, default=100, help="doc tokens (¾ to all); production: 256-1024")
    p.add_argument("--dim", type=int, default=128, help="multi-vector token width")
    p.add_argument("--dense-dim", type=int, default=768)
    p.add_argument("--k", type=int, default=100, help="run depth (the benchmark's default)")
    p.add_argument("--doc-chunk", type=int, default=64)
    p.add_argument("--query-chunk", type=int, default=16)
    p.add_argument("--colpali-batch", type=int, default=128, help="score_multi_vector's batch_size")
    p.add_argument("--full-max", type=int, default=4, help="run the full-matrix path up to this × N")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        kind, nd = a.worker.split(":")
        print(json.dumps(worker(kind, int(nd), a)))
        return

    sizes = [a.docs, 4 * a.docs, 16 * a.docs]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.queries} queries × "
        f"{a.qlen // 2}-{a.qlen} tokens, docs of {3 * a.dlen // 4}-{a.dlen} tokens, {a.dim}-d; "
        f"dense {a.dense_dim}-d; top-{a.k}; chunks q={a.query_chunk} d={a.doc_chunk}",
        flush=True,
    )
    rows: dict[tuple[str, int], dict] = {}
    for nd in sizes:
        for kind in (*MULTI, *DENSE):
            if kind == "full" and nd > a.full_max * a.docs:
                continue
            rows[kind, nd] = r = run_worker(kind, nd, a)
            print(
                f"  {kind:13s} {nd:6d} docs: {r['secs']:7.2f} s, peak +{r['peak'] / 2**20:7.1f} MB",
                flush=True,
            )

    emb_mb = {nd: a.dim * 4 * nd * (7 * a.dlen / 8) / 2**20 for nd in sizes}  # mean doc length
    block = maxsim_peak_bytes(a.query_chunk, a.doc_chunk, a.qlen, a.dlen, a.dim) / 2**20
    print(f"\n## search over N, 4N, 16N docs (peak = RSS beyond the embeddings; MaxSim block {block:.1f} MB)")
    print(
        f"{'variant':13s} {'docs':>6s} {'doc emb MB':>10s} {'peak MB':>8s} {'× at N':>7s} "
        f"{'queries/s':>10s} {'top-10 = stream':>15s}"
    )
    for (kind, nd), r in rows.items():
        first = rows[kind, sizes[0]]
        ref = rows["stream" if kind in MULTI else "dense", nd]
        print(
            f"{kind:13s} {nd:6d} {emb_mb[nd] if kind in MULTI else 0:10.0f} {r['peak'] / 2**20:8.1f} "
            f"{r['peak'] / max(first['peak'], 1):7.2f} {a.queries / r['secs']:10.1f} "
            f"{_agree(r['top10'], ref['top10']):15.3f}"
        )
    big = sizes[-1]
    qps = {kind: a.queries / rows[kind, big]["secs"] for kind in (*MULTI, *DENSE) if (kind, big) in rows}
    speed = {nd: rows["colpali", nd]["secs"] / rows["stream", nd]["secs"] for nd in sizes}
    dense_speed = {nd: rows["colpali-dense", nd]["secs"] / rows["dense", nd]["secs"] for nd in sizes}
    mem_ratio = rows["stream", big]["peak"] / max(rows["stream", sizes[0]]["peak"], 1)
    dense_ratio = rows["dense", big]["peak"] / max(rows["dense", sizes[0]]["peak"], 1)
    print(f"\nstream peak at 16N / at N: {mem_ratio:.2f} (goal: flat); dense: {dense_ratio:.2f}")
    print(
        "stream q/s ÷ colpali score_multi_vector q/s: " + ", ".join(f"{n}: {v:.2f}" for n, v in speed.items())
    )
    print(
        "dense_topk q/s ÷ colpali score_single_vector q/s: "
        + ", ".join(f"{n}: {v:.2f}" for n, v in dense_speed.items())
    )
    if a.json:
        result = {
            "mem_ratio_16n": mem_ratio,
            "speed_vs_colpali": speed[big],
            "dense_mem_ratio_16n": dense_ratio,
            "dense_speed_vs_colpali": dense_speed[big],
            "speed_vs_colpali_by_size": speed,
            "queries_per_s_16n": qps,
            "sizes": sizes,
            "settings": {k: v for k, v in vars(a).items() if k not in ("json", "worker")},
            "rows": [
                {"variant": kind, "docs": nd, "peak_bytes": r["peak"], "seconds": r["secs"]}
                for (kind, nd), r in rows.items()
            ],
        }
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
