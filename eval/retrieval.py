"""Exact retrieval for evaluation: dense top-k, ColBERT MaxSim, optional FAISS, on-disk embedding cache.

Everything here is exact (no approximation) unless you choose a FAISS HNSW index. Memory is bounded
by chunk sizes, not by corpus size, so 100k-page corpora score on a laptop.

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
from collections.abc import Callable, Mapping, Sequence
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
        for q0 in range(0, nq, batch_size):
            qb = q[q0 : q0 + batch_size].to(device=device, dtype=dtype).to(compute)
            best_s: torch.Tensor | None = None
            best_i: torch.Tensor | None = None
            for d0 in range(0, nd, doc_batch_size):
                db = d_store[d0 : d0 + doc_batch_size].to(compute)
                s = (qb @ db.T).float()
                s_top, i_top = torch.topk(s, min(kk, s.shape[1]), dim=1)
                i_top += d0
                if best_s is None:
                    best_s, best_i = s_top, i_top
                else:
                    cat_s = torch.cat([best_s, s_top], dim=1)
                    cat_i = torch.cat([best_i, i_top], dim=1)
                    best_s, pos = torch.topk(cat_s, kk, dim=1)
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
    """Peak working memory of maxsim_scores beyond its inputs and ``[nq, nd]`` output, in bytes.

    Dominated by the one ``[query_chunk, lq, doc_chunk, ld]`` similarity buffer (allocated once,
    reused, reduced to ``[query_chunk, lq, doc_chunk]``); with ``dim`` it adds the query chunk
    copies (``2 × [query_chunk, lq, dim + 1]``) and up to three doc chunk copies
    (``[doc_chunk, ld, dim + 1]``: gathered, padding zeroed, bias column appended).
    """
    block = query_chunk * lq * doc_chunk * ld
    return (block + (2 * query_chunk * lq + 3 * doc_chunk * ld) * (dim + 1 if dim else 0)) * itemsize


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


def _chunk(
    emb: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None, idx: list[int], dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` as a padded ``[c, l, d]`` block + mask, trimmed to the longest row in the chunk."""
    if isinstance(emb, list):
        x, m = pad_multivectors([emb[i] for i in idx])
    else:
        assert mask is not None
        m = mask[idx]
        # Trailing all-padding columns can go; masks need not be left-aligned, so keep up to the
        # last column any row of the chunk uses.
        used = torch.nonzero(m.any(0))
        lmax = int(used.max()) + 1 if used.numel() else 0
        x, m = emb[idx, :lmax], m[:, :lmax]
    return x.to(device=device, dtype=dtype), m.to(device)


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
    ``[qc, lq, dc, ld]`` (allocated once, reused) plus one query and one doc chunk copy:
    ``maxsim_peak_bytes(query_chunk, doc_chunk, lq, ld, d)``, e.g. 16 × 32 × 64 × 1024 × 4 B = 128 MiB
    for the block. Docs are grouped by length so chunks carry little padding. A doc or
    query with no real token is an error (its score would be undefined).
    """
    if doc_chunk < 1 or query_chunk < 1:
        raise ValueError("chunk sizes must be >= 1")
    q, qm = _normalise_side(q_emb, q_mask, "queries")
    d, dm = _normalise_side(d_emb, d_mask, "docs")
    q_len = [t.shape[0] for t in q] if isinstance(q, list) else qm.sum(1).tolist()  # type: ignore[union-attr]
    d_len = [t.shape[0] for t in d] if isinstance(d, list) else dm.sum(1).tolist()  # type: ignore[union-attr]
    if any(n == 0 for n in q_len):
        raise ValueError("a query has no unmasked token")
    if any(n == 0 for n in d_len):
        raise ValueError("a document has no unmasked token")
    nq, nd = len(q_len), len(d_len)
    device = torch.device(device)
    out = torch.empty((nq, nd), dtype=torch.float32)
    # Group docs of similar length (stable sort) so each chunk pads/trims to a near-uniform length.
    d_order = sorted(range(nd), key=lambda j: d_len[j])
    neg_inf = float("-inf")
    # One similarity buffer for the whole call, sized for the widest chunk and reused through
    # `out=`: no per-chunk allocation churn, so the peak really is one block (glibc otherwise keeps
    # freed sub-32 MB blocks in its heap and RSS grew to ~3 blocks in measurements).
    q_cap = max(q_len) if isinstance(q, list) else q.shape[1]
    d_cap = max(d_len) if isinstance(d, list) else d.shape[1]
    buf = torch.empty(min(query_chunk, nq) * q_cap * min(doc_chunk, nd) * d_cap, dtype=dtype, device=device)
    with torch.inference_mode():
        for q0 in range(0, nq, query_chunk):
            qi = list(range(q0, min(q0 + query_chunk, nq)))
            qx, qmx = _chunk(q, qm, qi, dtype, device)  # [qc, lq, d], [qc, lq]
            qc, lq, dim = qx.shape
            q_flat = qx.reshape(qc * lq, dim)
            # Query tokens get a trailing 1 so a doc-side bias column (0 real, −inf padding) masks
            # inside the GEMM: a separate masked_fill over the block cost ~80 % of the GEMM's time.
            q_aug = torch.cat([q_flat, torch.ones((qc * lq, 1), dtype=dtype, device=device)], dim=1)
            for d0 in range(0, nd, doc_chunk):
                dj = d_order[d0 : d0 + doc_chunk]
                dx, dmx = _chunk(d, dm, dj, dtype, device)  # [dc, ld, d], [dc, ld]
                dc, ld, _ = dx.shape
                sim2d = buf[: qc * lq * dc * ld].view(qc * lq, dc * ld)
                if bool(dmx.all()):
                    torch.matmul(q_flat, dx.reshape(dc * ld, dim).T, out=sim2d)  # the peak block
                else:
                    dx = dx.masked_fill(~dmx[..., None], 0.0)  # padding values may be anything (NaN)
                    bias = torch.zeros((dc, ld, 1), dtype=dtype, device=device).masked_fill_(
                        ~dmx[..., None], neg_inf
                    )
                    d_aug = torch.cat([dx, bias], dim=2).reshape(dc * ld, dim + 1)
                    torch.matmul(q_aug, d_aug.T, out=sim2d)
                    del d_aug, bias
                del dx
                sim = sim2d.view(qc, lq, dc, ld)
                best = sim.amax(dim=3).float()  # [qc, lq, dc]
                del sim, sim2d
                best = torch.where(qmx.view(qc, lq, 1), best, 0.0)
                out[q0 : q0 + qc, torch.tensor(dj)] = best.sum(dim=1).cpu()
    return out


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
