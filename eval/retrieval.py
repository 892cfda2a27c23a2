"""Exact retrieval for evaluation: dense top-k, ColBERT MaxSim, optional FAISS, on-disk embedding cache.

Everything here is exact (no approximation) unless you choose a FAISS HNSW index. Search
(``dense_topk``, ``maxsim_topk``) keeps a running top-k per query: memory beyond the embeddings is
bounded by chunk sizes and ``queries × k``, not by corpus size, so 100k-page corpora score on a laptop.
``maxsim_scores`` returns the whole ``[queries × docs]`` matrix (same scores, bitwise): for small sets.

fp16 on CPU (measured on this machine, 2 shared cores, torch 2.14.1, 1k queries × 100k docs × 768-d,
top-10, best of 3): fp32 0.47 s; fp16 stored + each 4096-doc chunk up-cast to fp32 for the GEMM
0.49 s; native fp16 GEMM 0.58 s, and it *returns fp16* scores (error ≈ 6e-5 on unit vectors, so
near-ties collapse; top-10 overlap with fp32 0.997). So on CPU ``float16`` means fp16 *storage*
(half the corpus memory) with fp32 accumulation and fp32 scores; on CUDA it runs the native fp16
GEMM. Chunks of 4096 docs keep the up-cast copy cache-sized (65536-doc chunks were ~1.4× slower).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.storage import atomic_write, write_bytes_atomic

TensorLike = torch.Tensor | np.ndarray


def _as_tensor(x: TensorLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------------------------------
# exact dense top-k


def dense_topk(
    queries: TensorLike,
    docs: TensorLike,
    k: int,
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1024,
    doc_batch_size: int = 4096,
    device: str | torch.device = "cpu",
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k: ``queries [nq, d]``, ``docs [nd, d]`` → ``scores, indices [nq, k']``.

    ``k' = min(k, nd)``; rows are sorted by score descending (order among exactly tied scores is
    unspecified). Work is tiled into ``[batch_size, doc_batch_size]`` score blocks whose top-k are
    merged, so peak extra memory is ≈ ``4 · batch_size · doc_batch_size`` bytes. ``dtype`` is the
    storage/compute type (float32, float16, bfloat16); ``upcast`` (default: on CPU for float16) does
    the GEMM in fp32 on fp16-stored chunks — see the module docstring for why. Scores return as fp32
    on CPU, indices as int64.
    """
    q = _as_tensor(queries)
    d = _as_tensor(docs)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"need queries [nq, d] and docs [nd, d], got {tuple(q.shape)} and {tuple(d.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = torch.device(device)
    if upcast is None:
        upcast = device.type == "cpu" and dtype == torch.float16
    nq, nd = q.shape[0], d.shape[0]
    kk = min(k, nd)
    out_s = torch.empty((nq, kk), dtype=torch.float32)
    out_i = torch.empty((nq, kk), dtype=torch.int64)
    if nq == 0 or nd == 0:
        return out_s, out_i
    compute = torch.float32 if upcast else dtype
    d_store = d.to(device=device, dtype=dtype)  # the corpus as it would be kept in memory/on the GPU
    with torch.inference_mode():
        # one score block for the call, reused through `out=` (no per-chunk allocation churn)
        block = torch.empty(min(batch_size, nq) * min(doc_batch_size, nd), dtype=compute, device=device)
        for q0 in range(0, nq, batch_size):
            qb = q[q0 : q0 + batch_size].to(device=device, dtype=dtype).to(compute)
            best_s: torch.Tensor | None = None
            best_i: torch.Tensor | None = None
            for d0 in range(0, nd, doc_batch_size):
                db = d_store[d0 : d0 + doc_batch_size].to(compute)
                out = block[: qb.shape[0] * db.shape[0]].view(qb.shape[0], db.shape[0])
                s = torch.matmul(qb, db.T, out=out).float()
                s_top, i_top = torch.topk(s, min(kk, s.shape[1]), dim=1)
                i_top += d0
                if best_s is None:
                    best_s, best_i = s_top, i_top
                else:
                    cat_s = torch.cat([best_s, s_top], dim=1)
                    cat_i = torch.cat([best_i, i_top], dim=1)
                    # fewer than k candidates so far when doc chunks are narrower than k
                    best_s, pos = torch.topk(cat_s, min(kk, cat_s.shape[1]), dim=1)
                    best_i = torch.gather(cat_i, 1, pos)
            assert best_s is not None and best_i is not None
            out_s[q0 : q0 + batch_size] = best_s.cpu()
            out_i[q0 : q0 + batch_size] = best_i.cpu()
    return out_s, out_i


def topk_to_run(
    query_ids: Sequence[str], doc_ids: Sequence[str], scores: torch.Tensor, indices: torch.Tensor
) -> dict[str, dict[str, float]]:
    """``(scores [nq, k], indices [nq, k])`` → a run ``{qid: {docid: score}}`` for eval.metrics."""
    if scores.shape != indices.shape or scores.shape[0] != len(query_ids):
        raise ValueError("scores/indices must be [len(query_ids), k]")
    s, ix = scores.tolist(), indices.tolist()
    return {
        q: {doc_ids[j]: float(v) for v, j in zip(s[r], ix[r], strict=True)} for r, q in enumerate(query_ids)
    }


def scores_to_run(
    query_ids: Sequence[str], doc_ids: Sequence[str], scores: torch.Tensor, k: int | None = None
) -> dict[str, dict[str, float]]:
    """A full score matrix ``[nq, nd]`` (e.g. from maxsim_scores) → a run, optionally its top k."""
    if tuple(scores.shape) != (len(query_ids), len(doc_ids)):
        raise ValueError(f"scores must be [{len(query_ids)}, {len(doc_ids)}], got {tuple(scores.shape)}")
    if k is not None and k < scores.shape[1]:
        s, ix = torch.topk(scores.float(), k, dim=1)
        return topk_to_run(query_ids, doc_ids, s, ix)
    rows = scores.float().tolist()
    return {q: dict(zip(doc_ids, rows[r], strict=True)) for r, q in enumerate(query_ids)}


# ----------------------------------------------------------------------------------------------------
# ColBERT MaxSim


def pad_multivectors(seqs: Sequence[TensorLike]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of ``[l_i, d]`` token matrices → ``(padded [n, max l, d], mask [n, max l] bool)``."""
    ts = [_as_tensor(t) for t in seqs]
    if not ts:
        raise ValueError("no sequences")
    dim = ts[0].shape[-1]
    if any(t.ndim != 2 or t.shape[1] != dim for t in ts):
        raise ValueError("every multi-vector must be a [tokens, d] matrix with the same d")
    lmax = max(t.shape[0] for t in ts)
    out = torch.zeros((len(ts), lmax, dim), dtype=ts[0].dtype)
    mask = torch.zeros((len(ts), lmax), dtype=torch.bool)
    for i, t in enumerate(ts):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def maxsim_peak_bytes(
    query_chunk: int, doc_chunk: int, lq: int, ld: int, dim: int = 0, itemsize: int = 4
) -> int:
    """Peak working memory of MaxSim beyond its inputs, its output and the query chunks, in bytes.

    Dominated by the one ``[query_chunk, lq, doc_chunk, ld]`` similarity buffer (allocated once per
    call, reused), reduced into ``[query_chunk, lq, doc_chunk]`` and ``[query_chunk, doc_chunk]``
    buffers (reused too); with ``dim`` it adds up to three copies of the one doc chunk in flight
    (``[doc_chunk, ld, dim + 1]``: gathered, padding zeroed, bias column appended). The query chunks
    (≈ ``2 × [nq, lq, dim + 1]``) are prepared once per call: they grow with the queries, never with
    the corpus.
    """
    block = query_chunk * lq * doc_chunk * ld
    reductions = query_chunk * lq * doc_chunk + query_chunk * doc_chunk
    return (block + reductions + 3 * doc_chunk * ld * (dim + 1 if dim else 0)) * itemsize


def _normalise_side(
    emb: TensorLike | Sequence[TensorLike], mask: TensorLike | None, what: str
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
    if isinstance(emb, (list, tuple)):
        if mask is not None:
            raise ValueError(f"{what}: give either a padded tensor with a mask or a list of tensors")
        return [_as_tensor(t) for t in emb], None
    t = _as_tensor(emb)
    if t.ndim != 3:
        raise ValueError(f"{what} must be [n, tokens, d], got {tuple(t.shape)}")
    m = torch.ones(t.shape[:2], dtype=torch.bool) if mask is None else _as_tensor(mask).bool()
    if tuple(m.shape) != tuple(t.shape[:2]):
        raise ValueError(f"{what} mask must be {tuple(t.shape[:2])}, got {tuple(m.shape)}")
    return t, m


def _used_width(mask: torch.Tensor) -> int:
    """Columns of a chunk's ``[c, l]`` mask up to the last one any row uses: trailing all-padding
    columns can go (masks need not be left-aligned, so not just the longest row's count)."""
    used = torch.nonzero(mask.any(0))
    return int(used.max()) + 1 if used.numel() else 0


def _chunk(
    emb: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None, idx: list[int], dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` as a padded ``[c, l, d]`` block + mask, trimmed to the longest row in the chunk."""
    if isinstance(emb, list):
        x, m = pad_multivectors([emb[i] for i in idx])
    else:
        assert mask is not None
        m = mask[idx]
        lmax = _used_width(m)
        x, m = emb[idx, :lmax], m[:, :lmax]
    return x.to(device=device, dtype=dtype), m.to(device)


def _lengths(x: torch.Tensor | list[torch.Tensor], m: torch.Tensor | None) -> list[int]:
    return [t.shape[0] for t in x] if isinstance(x, list) else m.sum(1).tolist()  # type: ignore[union-attr]


class _QueryBlock:
    """One query chunk on the device: its flat tokens, the same with a trailing 1 (for the doc-side
    bias column) and its mask. Built once per call and reused against every doc block."""

    __slots__ = ("aug", "flat", "lq", "pad", "q0", "qc")

    def __init__(self, q0: int, x: torch.Tensor, m: torch.Tensor) -> None:
        qc, lq, dim = x.shape
        self.q0, self.qc, self.lq = q0, qc, lq
        self.pad = (~m).unsqueeze(2)  # [qc, lq, 1]
        self.flat = x.reshape(qc * lq, dim)
        # Query tokens get a trailing 1 so a doc-side bias column (0 real, −inf padding) masks inside
        # the GEMM: a separate masked_fill over the block cost ~80 % of the GEMM's time.
        ones = torch.ones((qc * lq, 1), dtype=x.dtype, device=x.device)
        self.aug = torch.cat([self.flat, ones], dim=1)


class _Buffers:
    """The per-call work buffers, sized for the widest chunks and reused through ``out=`` / views for
    every block: no per-block allocation churn, so the peak really is one block and does not drift
    (glibc keeps freed sub-32 MB blocks in its heap: RSS grew to ~3 blocks with the similarity block
    alone, and by a varying 30–190 MB with the reductions and doc operands allocating too).

    ``doc`` holds the padded doc operand on the corpus side (its dtype and device); ``doc_dev`` its
    converted copy where the compute dtype or device differs."""

    def __init__(
        self, qc: int, lq: int, dc: int, ld: int, width: int, src: torch.Tensor, dtype: torch.dtype, device
    ) -> None:
        self.sim = torch.empty(qc * lq * dc * ld, dtype=dtype, device=device)
        self.best = torch.empty(qc * lq * dc, dtype=dtype, device=device)
        self.score = torch.empty(qc * dc, dtype=torch.float32, device=device)
        self.doc = torch.empty(dc * ld * width, dtype=src.dtype, device=src.device)
        same = src.dtype == dtype and src.device == torch.device(device)
        self.doc_dev = None if same else torch.empty(dc * ld * width, dtype=dtype, device=device)


class _DocBlock:
    """One doc chunk on the device as the GEMM's right operand ``[dc · ld, d]``, or ``[dc · ld, d + 1]``
    with a bias column (0 real, −inf padding; padding values zeroed, since they may be anything,
    NaN included) when the chunk has padding; and the corpus indices of its rows (on the device).

    Each doc is copied once into the padded operand (a reused buffer), which is then converted and
    moved once: the same values as padding, converting, zeroing and concatenating in turn."""

    __slots__ = ("augmented", "dc", "ids", "ld", "mat")

    def __init__(
        self,
        emb: torch.Tensor | list[torch.Tensor],
        mask: torch.Tensor | None,
        idx: list[int],
        buf: _Buffers,
        device: torch.device,
    ) -> None:
        neg_inf = float("-inf")
        if isinstance(emb, list):
            ts = [emb[i] for i in idx]
            lens = [t.shape[0] for t in ts]
            dc, ld, dim = len(ts), max(lens), ts[0].shape[1]
            self.augmented = min(lens) < ld
            width = dim + 1 if self.augmented else dim
            op = buf.doc[: dc * ld * width].view(dc, ld, width)
            if self.augmented:
                op.zero_()
                for i, t in enumerate(ts):
                    op[i, : t.shape[0], :dim] = t
                    op[i, t.shape[0] :, dim] = neg_inf
            else:
                torch.stack(ts, out=op)
        else:
            assert mask is not None
            m = mask[idx]
            ld = _used_width(m)
            x, m = emb[idx, :ld], m[:, :ld]
            dc, dim = x.shape[0], x.shape[2]
            self.augmented = not bool(m.all())
            width = dim + 1 if self.augmented else dim
            op = buf.doc[: dc * ld * width].view(dc, ld, width)
            op[..., :dim] = x
            if self.augmented:
                pad = ~m.to(x.device)
                op[..., :dim].masked_fill_(pad[..., None], 0.0)
                op[..., dim] = 0.0
                op[..., dim].masked_fill_(pad, neg_inf)
        self.dc, self.ld = dc, ld
        flat = op.view(dc * ld, width)
        if buf.doc_dev is not None:  # converted/moved into the device buffer, in stream order
            flat = buf.doc_dev[: dc * ld * width].view(dc * ld, width).copy_(flat)
        self.mat = flat
        self.ids = torch.tensor(idx, dtype=torch.int64, device=device)


def _block_scores(qb: _QueryBlock, db: _DocBlock, buf: _Buffers) -> torch.Tensor:
    """``[qc, dc]`` fp32 MaxSim scores of one query block against one doc block: a view into ``buf``,
    valid until the next call."""
    qc, lq, dc, ld = qb.qc, qb.lq, db.dc, db.ld
    sim2d = buf.sim[: qc * lq * dc * ld].view(qc * lq, dc * ld)
    torch.matmul(qb.aug if db.augmented else qb.flat, db.mat.T, out=sim2d)  # the peak block
    best = torch.amax(sim2d.view(qc, lq, dc, ld), dim=3, out=buf.best[: qc * lq * dc].view(qc, lq, dc))
    best = best.float().masked_fill_(qb.pad, 0.0)  # padding query tokens are not summed
    return torch.sum(best, dim=1, out=buf.score[: qc * dc].view(qc, dc))


class _MaxSimPlan:
    """Validated MaxSim inputs and the chunk plan shared by :func:`maxsim_scores` and
    :func:`maxsim_topk`, so both compute the very same blocks (bitwise-equal scores)."""

    def __init__(
        self,
        q_emb: TensorLike | Sequence[TensorLike],
        q_mask: TensorLike | None,
        d_emb: TensorLike | Sequence[TensorLike],
        d_mask: TensorLike | None,
        doc_chunk: int,
        query_chunk: int,
    ) -> None:
        if doc_chunk < 1 or query_chunk < 1:
            raise ValueError("chunk sizes must be >= 1")
        self.q, self.qm = _normalise_side(q_emb, q_mask, "queries")
        self.d, self.dm = _normalise_side(d_emb, d_mask, "docs")
        self.q_len, self.d_len = _lengths(self.q, self.qm), _lengths(self.d, self.dm)
        if any(n == 0 for n in self.q_len):
            raise ValueError("a query has no unmasked token")
        if any(n == 0 for n in self.d_len):
            raise ValueError("a document has no unmasked token")
        self.nq, self.nd = len(self.q_len), len(self.d_len)
        self.doc_chunk, self.query_chunk = doc_chunk, query_chunk

    def blocks(
        self, dtype: torch.dtype, device: torch.device
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(q0, doc indices [dc], scores [qc, dc] fp32)`` on ``device`` for every pair of query chunk
        and doc chunk, doc chunks in the outer loop (call under ``torch.inference_mode``); the scores
        are a view into a reused buffer: use them before asking for the next block.

        Each doc chunk is gathered, padded, converted and moved to ``device`` once per call (not
        once per query chunk); the query chunks are prepared once up front (≈ twice the query
        embeddings, independent of the corpus). Docs are grouped by length (stable sort) so chunks
        carry little padding. Chunk membership and arithmetic do not depend on the loop order.
        """
        nq, nd, q, qm, d, dm = self.nq, self.nd, self.q, self.qm, self.d, self.dm
        if nq == 0 or nd == 0:
            return
        d_order = sorted(range(nd), key=lambda j: self.d_len[j])
        q_cap = max(self.q_len) if isinstance(q, list) else q.shape[1]
        d_cap = max(self.d_len) if isinstance(d, list) else d.shape[1]
        src = d[0] if isinstance(d, list) else d
        width = src.shape[-1] + 1
        buf = _Buffers(
            min(self.query_chunk, nq), q_cap, min(self.doc_chunk, nd), d_cap, width, src, dtype, device
        )
        qblocks = [
            _QueryBlock(q0, *_chunk(q, qm, list(range(q0, min(q0 + self.query_chunk, nq))), dtype, device))
            for q0 in range(0, nq, self.query_chunk)
        ]
        for d0 in range(0, nd, self.doc_chunk):
            dj = d_order[d0 : d0 + self.doc_chunk]
            db = _DocBlock(d, dm, dj, buf, device)
            for qb in qblocks:
                yield qb.q0, db.ids, _block_scores(qb, db, buf)


def maxsim_scores(
    q_emb: TensorLike | Sequence[TensorLike],
    q_mask: TensorLike | None,
    d_emb: TensorLike | Sequence[TensorLike],
    d_mask: TensorLike | None,
    *,
    doc_chunk: int = 64,
    query_chunk: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """ColBERT late interaction: ``score[i, j] = Σ_t∈q_i max_s∈d_j ⟨q_i,t , d_j,s⟩`` → ``[nq, nd]`` fp32.

    ``q_emb [nq, lq, d]`` with ``q_mask [nq, lq]`` (True = real token), ``d_emb [nd, ld, d]`` with
    ``d_mask [nd, ld]``; either side may instead be a list of ``[l_i, d]`` tensors (mask ``None``),
    e.g. variable-length page embeddings. Padding doc tokens never win the max (filled with −inf),
    padding query tokens are not summed. Peak memory beyond inputs/output is one similarity buffer
    ``[qc, lq, dc, ld]`` (allocated once, reused) plus the query chunks and one doc chunk copy:
    ``maxsim_peak_bytes(query_chunk, doc_chunk, lq, ld, d)``, e.g. 16 × 32 × 64 × 1024 × 4 B = 128 MiB
    for the block. The output itself is ``4 · nq · nd`` bytes: to search a corpus, use
    :func:`maxsim_topk` (same scores, memory flat in corpus size). A doc or query with no real token
    is an error (its score would be undefined).
    """
    plan = _MaxSimPlan(q_emb, q_mask, d_emb, d_mask, doc_chunk, query_chunk)
    out = torch.empty((plan.nq, plan.nd), dtype=torch.float32)
    with torch.inference_mode():
        for q0, ids, s in plan.blocks(dtype, torch.device(device)):
            out[q0 : q0 + s.shape[0], ids.cpu()] = s.cpu()
    return out


def maxsim_topk(
    q_emb: TensorLike | Sequence[TensorLike],
    q_mask: TensorLike | None,
    d_emb: TensorLike | Sequence[TensorLike],
    d_mask: TensorLike | None,
    k: int,
    *,
    doc_chunk: int = 64,
    query_chunk: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MaxSim search: ``(scores, indices) [nq, k']``, ``k' = min(k, nd)``, rows sorted by score
    descending (order among exactly tied scores unspecified); scores fp32 and indices int64 on CPU.

    The scores are :func:`maxsim_scores`'s, bitwise, for the same chunk sizes (same inputs, masks,
    dtype and device rules); what differs is memory: a running top-k per query is merged after each
    doc chunk (like :func:`dense_topk`), so beyond the embeddings it holds ``O(nq · k)`` results, the
    query chunks and one block (``maxsim_peak_bytes``), never an ``[nq, nd]`` matrix.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    plan = _MaxSimPlan(q_emb, q_mask, d_emb, d_mask, doc_chunk, query_chunk)
    kk = min(k, plan.nd)
    best: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for q0, ids, s in plan.blocks(dtype, torch.device(device)):
            # the block's own top-k first, then a merge of two [qc, ≤ k] lists: no [qc, k + dc] copy
            top_s, pos = torch.topk(s, min(kk, s.shape[1]), dim=1)
            top_i = ids[pos]
            if q0 in best:
                cat_s, cat_i = torch.cat([best[q0][0], top_s], dim=1), torch.cat([best[q0][1], top_i], dim=1)
                top_s, pos = torch.topk(cat_s, min(kk, cat_s.shape[1]), dim=1)
                top_i = torch.gather(cat_i, 1, pos)
            best[q0] = (top_s, top_i)
    out_s = torch.empty((plan.nq, kk), dtype=torch.float32)
    out_i = torch.empty((plan.nq, kk), dtype=torch.int64)
    for q0, (top_s, top_i) in best.items():
        out_s[q0 : q0 + top_s.shape[0]] = top_s.cpu()
        out_i[q0 : q0 + top_s.shape[0]] = top_i.cpu()
    return out_s, out_i


# ----------------------------------------------------------------------------------------------------
# optional FAISS


class FaissIndex:
    """An inner-product FAISS index over ``[n, d]`` float32 vectors (``faiss-cpu`` is optional).

    ``kind="flat"`` is exact (IndexFlatIP, equals dense_topk up to ties); ``kind="hnsw"`` is HNSW
    (approximate, ``m`` links, ``ef_search`` at query time). faiss is imported on construction only.
    """

    def __init__(self, dim: int, kind: str = "flat", *, m: int = 32, ef_search: int = 128) -> None:
        try:
            import faiss
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "FaissIndex needs the optional package faiss-cpu (pip install faiss-cpu); "
                "dense_topk gives the same exact results without it"
            ) from exc
        self._faiss = faiss
        self.dim, self.kind = dim, kind
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        else:
            raise ValueError(f"kind must be 'flat' or 'hnsw', got {kind!r}")

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: TensorLike) -> None:
        """Append ``[n, dim]`` vectors (ids continue from the current size)."""
        x = np.ascontiguousarray(_as_tensor(vectors).float().numpy())
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"need [n, {self.dim}] vectors, got {x.shape}")
        self.index.add(x)

    def search(self, queries: TensorLike, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries [nq, dim]`` → ``(scores [nq, k'], indices [nq, k'])``, ``k' = min(k, len(self))``."""
        x = np.ascontiguousarray(_as_tensor(queries).float().numpy())
        kk = min(k, len(self))
        s, i = self.index.search(x, kk)
        return torch.from_numpy(s), torch.from_numpy(i.astype(np.int64))

    def save(self, path: Path) -> None:
        """Write the index atomically."""
        data = self._faiss.serialize_index(self.index).tobytes()
        write_bytes_atomic(data, Path(path))

    @classmethod
    def load(cls, path: Path) -> FaissIndex:
        try:
            import faiss
        except ImportError as exc:  # pragma: no cover
            raise ImportError("FaissIndex.load needs faiss-cpu (pip install faiss-cpu)") from exc
        index = faiss.deserialize_index(np.frombuffer(Path(path).read_bytes(), dtype=np.uint8))
        obj = cls.__new__(cls)
        obj._faiss, obj.index, obj.dim = faiss, index, index.d
        obj.kind = "hnsw" if isinstance(index, faiss.IndexHNSWFlat) else "flat"
        return obj


# ----------------------------------------------------------------------------------------------------
# embedding cache


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (e.g. a model's hub id + revision + pooling config)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pack_multivectors(seqs: Sequence[TensorLike]) -> dict[str, torch.Tensor]:
    """Variable-length ``[l_i, d]`` matrices → ``{"tokens": [Σ l_i, d], "offsets": [n + 1] int64}``."""
    ts = [_as_tensor(t) for t in seqs]
    lens = torch.tensor([t.shape[0] for t in ts], dtype=torch.int64)
    offsets = torch.zeros(len(ts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lens, 0)
    return {"tokens": torch.cat(ts, 0).contiguous(), "offsets": offsets}


def unpack_multivectors(packed: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of pack_multivectors (views into the token matrix, no copy)."""
    tok, off = packed["tokens"], packed["offsets"].tolist()
    return [tok[a:b] for a, b in itertools.pairwise(off)]


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class EmbeddingCache:
    """Corpus embeddings on disk, keyed by (model fingerprint, dataset fingerprint, kind).

    ``kind`` names what was stored, e.g. ``"dense-768"``, ``"dense-256"`` (a Matryoshka cut) or
    ``"multivector-128"``. Entries are safetensors files written atomically (temp + fsync + rename)
    whose metadata repeats the key, so a hit is verified, not assumed; an unreadable or mismatching
    file counts as a miss and is rewritten. Re-scoring a benchmark with new metrics costs no encoding.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, model_fp: str, dataset_fp: str, kind: str) -> Path:
        """Where an entry lives: ``<root>/<model>/<dataset>/<kind>.safetensors`` (names sanitised)."""
        parts = [_SAFE.sub("_", p)[:80] or "_" for p in (model_fp, dataset_fp, kind)]
        tag = fingerprint(model_fp, dataset_fp, kind)[:8]  # keeps sanitised-name collisions apart
        return self.root / parts[0] / parts[1] / f"{parts[2]}-{tag}.safetensors"

    def get(self, model_fp: str, dataset_fp: str, kind: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors, or ``None`` on a miss."""
        from safetensors import safe_open

        p = self.path(model_fp, dataset_fp, kind)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
                if (meta.get("model"), meta.get("dataset"), meta.get("kind")) != (model_fp, dataset_fp, kind):
                    return None
                return {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
        except Exception:
            return None

    def put(
        self,
        model_fp: str,
        dataset_fp: str,
        kind: str,
        tensors: Mapping[str, torch.Tensor],
        extra: Mapping[str, str] | None = None,
    ) -> Path:
        """Store tensors atomically; returns the file path."""
        from safetensors.torch import save_file

        meta = {"model": model_fp, "dataset": dataset_fp, "kind": kind, **(extra or {})}
        data = {k: _as_tensor(v).contiguous() for k, v in tensors.items()}
        p = self.path(model_fp, dataset_fp, kind)
        atomic_write(p, lambda tmp: save_file(data, tmp, metadata=meta))
        return p

    def get_or_compute(
        self,
        model_fp: str,
        dataset_fp: str,
        kind: str,
        compute: Callable[[], Mapping[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Cached tensors, computing and storing them (``compute()`` → ``{name: tensor}``) on a miss."""
        hit = self.get(model_fp, dataset_fp, kind)
        if hit is not None:
            return hit
        tensors = dict(compute())
        self.put(model_fp, dataset_fp, kind, tensors)
        return tensors
