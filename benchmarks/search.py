"""Search speed, side by side in one run: exact dense top-k fp32 vs fp16, chunked vs naive MaxSim.

    nice .venv/bin/python benchmarks/search.py                # defaults: 100k×768 docs, 1k queries
    nice .venv/bin/python benchmarks/search.py --docs 20000   # quicker

Dense: ``eval.retrieval.dense_topk`` over random unit vectors, best of ``--repeats`` runs, for fp32,
fp16 as dense_topk runs it on this device (on CPU: fp16 storage, fp32 GEMM per chunk) and, for the
record, fp16 with the native fp16 GEMM. Also reports top-10 overlap with fp32.
MaxSim: ``maxsim_scores`` (chunked) vs the naive one-block reference (einsum over the full
``[nq, nd, lq, ld]`` tensor), each in a fresh subprocess; peak memory = the kernel's RSS high-water
mark (reset via /proc/self/clear_refs just before the call) minus the RSS at that moment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.retrieval import dense_topk, maxsim_peak_bytes, maxsim_scores
from tests.support.memory import peak_extra


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_dense(args: argparse.Namespace) -> None:
    q, d = unit(args.queries, args.dim, seed=0), unit(args.docs, args.dim, seed=1)
    rows = []
    ref_ix = None
    variants = [("fp32", torch.float32, None), ("fp16 (fp16 store, fp32 GEMM)", torch.float16, None)]
    if args.native_fp16:
        variants.append(("fp16 (native fp16 GEMM)", torch.float16, False))
    for label, dtype, upcast in variants:
        d_store = d.to(dtype)  # corpus as held in memory; conversion not timed

        def run(dtype=dtype, upcast=upcast, d_store=d_store):
            return dense_topk(
                q,
                d_store,
                args.k,
                dtype=dtype,
                upcast=upcast,
                batch_size=args.batch_size,
                doc_batch_size=args.doc_batch_size,
            )

        run()  # warm-up
        secs, (_, ix) = best_of(run, args.repeats)
        if ref_ix is None:
            ref_ix = ix
        overlap = sum(len(set(a) & set(b)) for a, b in zip(ix.tolist(), ref_ix.tolist(), strict=True))
        rows.append((label, secs, overlap / ix.numel(), d_store.element_size() * d_store.numel()))
    base = rows[0][1]
    print(
        f"\n## exact dense top-{args.k}: {args.queries} queries × {args.docs} docs × {args.dim}-d "
        f"({torch.get_num_threads()} threads, best of {args.repeats})"
    )
    print(
        f"{'variant':32} {'seconds':>8} {'queries/s':>10} {'× fp32':>7} {'top-k=fp32':>10} {'corpus MB':>10}"
    )
    for label, secs, ov, nbytes in rows:
        print(
            f"{label:32} {secs:8.3f} {args.queries / secs:10.0f} {base / secs:7.2f} {ov:10.3f} "
            f"{nbytes / 2**20:10.0f}"
        )


def _maxsim_worker(
    kind: str, nq: int, lq: int, nd: int, ld: int, dim: int, dc: int, qc: int, reps: int
) -> dict:
    q, d = unit(nq, lq, dim, seed=2), unit(nd, ld, dim, seed=3)
    g = torch.Generator().manual_seed(4)
    qm = torch.arange(lq)[None] < torch.randint(lq // 2, lq + 1, (nq, 1), generator=g)
    dm = torch.arange(ld)[None] < torch.randint(ld // 2, ld + 1, (nd, 1), generator=g)

    def chunked():
        return maxsim_scores(q, qm, d, dm, doc_chunk=dc, query_chunk=qc)

    def naive():
        sim = torch.einsum("qid,pjd->qpij", q, d)  # [nq, nd, lq, ld] at once
        sim.masked_fill_(~dm[None, :, None, :], float("-inf"))
        return torch.where(qm[:, None, :], sim.amax(-1), 0.0).sum(-1)

    fn = chunked if kind == "chunked" else naive
    fn()  # warm-up at full size: BLAS allocates its packing buffers once per process (~20-30 MB here)
    peak, _ = peak_extra(fn)
    secs, out = best_of(fn, reps)
    return {"secs": secs, "peak": peak, "checksum": float(out.double().sum())}


def bench_maxsim(args: argparse.Namespace) -> None:
    shape = [args.ms_queries, args.ms_qlen, args.ms_docs, args.ms_dlen, args.ms_dim]
    res = {}
    for kind in ("naive", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--_worker",
            kind,
            *map(str, shape),
            str(args.doc_chunk),
            str(args.query_chunk),
            str(args.repeats),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    nq, lq, nd, ld, dim = shape
    block = nq * nd * lq * ld * 4
    bound = maxsim_peak_bytes(args.query_chunk, args.doc_chunk, lq, ld)
    same = abs(res["naive"]["checksum"] - res["chunked"]["checksum"]) <= 1e-6 * abs(res["naive"]["checksum"])
    print(
        f"\n## MaxSim: {nq} queries × {lq} tok vs {nd} docs × {ld} tok, {dim}-d "
        f"(chunks q={args.query_chunk} d={args.doc_chunk}; same scores: {same})"
    )
    print(f"{'variant':10} {'seconds':>8} {'pairs/s':>10} {'× naive':>8} {'peak MB':>8} {'block MB':>9}")
    for kind, blk in (("naive", block), ("chunked", bound)):
        r = res[kind]
        print(
            f"{kind:10} {r['secs']:8.3f} {nq * nd / r['secs']:10.0f} {res['naive']['secs'] / r['secs']:8.2f} "
            f"{r['peak'] / 2**20:8.1f} {blk / 2**20:9.1f}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        kind, *nums = sys.argv[2:]
        print(json.dumps(_maxsim_worker(kind, *map(int, nums))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--doc-batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-native-fp16", dest="native_fp16", action="store_false")
    p.add_argument("--ms-queries", type=int, default=32)
    p.add_argument("--ms-qlen", type=int, default=32)
    p.add_argument("--ms-docs", type=int, default=1000)
    p.add_argument("--ms-dlen", type=int, default=256)
    p.add_argument("--ms-dim", type=int, default=128)
    p.add_argument("--doc-chunk", type=int, default=64)
    p.add_argument("--query-chunk", type=int, default=16)
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--skip-maxsim", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_dense:
        bench_dense(args)
    if not args.skip_maxsim:
        bench_maxsim(args)


if __name__ == "__main__":
    main()
