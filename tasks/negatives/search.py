"""Mining queries against a split's index: exact candidates per segment, then the one selection.

:func:`mine_with_index` gives, on the same pages, the rows :func:`~tasks.negatives.selection.mine_negatives`
gives by scoring every page (one segment; scores are the canonical ones of ``bm25.py`` /
``miners.dense_scores``), at the cost of a search per query. Per segment it collects candidates until
they provably contain, for every pool the selection samples from (all pages, or with a modality mix the
same- and the wrong-modality pool), the top ``top_n`` *allowed* pages (not of the positive's parallel
group, alive, scoring under the positive-aware threshold):

- **bm25**: postings of the rarest query terms are scored exactly; the other terms' upper bounds
  (``term_max``, restricted to terms occurring in the pool's languages) bound every page outside the
  candidates. Enough allowed candidates above that bound ⇒ done; else one more term is added (at worst
  all of them: exhaustive over the pages sharing a term). Pages sharing no term score exactly 0 and
  are taken, where the pool needs them, in row order (the exhaustive tie order).
- **dense**: FAISS proposes the top ``candidates`` pages (grown ×4 until the check holds), their
  scores are recomputed exactly from the stored vectors; the FAISS cut score is the bound (exact for a
  flat index up to float rounding at the cut; an IVF segment's hits are approximate by design).

A positive not in the index (not in the split's live pages) is a ``POSITIVE_NOT_IN_CORPUS`` reject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.negatives.base import Mined, MiningParams, QueryView, missing_positive
from tasks.negatives.bm25 import bound_of, tokenize
from tasks.negatives.index import LoadedSegment, Modalities, SplitIndex, first_pass, index_options
from tasks.negatives.miners import dense_scores
from tasks.negatives.selection import positive_threshold, query_rng, select_negatives
from tasks.schema import Reject

_ALL, _SAME, _WRONG = "all", "same", "wrong"


@dataclass(frozen=True)
class _Query:
    """What the candidate search of one query needs to know."""

    threshold: float
    group: int
    code: int  # the positive's modality code
    pools: tuple[str, ...]
    top_n: int


def _in_pool(codes: np.ndarray, pool: str, code: int) -> np.ndarray:
    if pool == _ALL:
        return np.ones(codes.shape, dtype=bool)
    return (codes == code) if pool == _SAME else (codes != code)


def _pool_codes(pool: str, code: int, n_codes: int) -> list[int]:
    if pool == _ALL:
        return list(range(n_codes))
    return [code] if pool == _SAME else [c for c in range(n_codes) if c != code]


def _allowed(
    index: SplitIndex, mod: Modalities, q: _Query, rows: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(allowed mask, modality codes) of candidate rows: alive, not the positive's group, under the
    positive-aware threshold."""
    allowed = (index.groups[rows] != q.group) & (scores < q.threshold)
    if not index.all_alive:
        allowed &= index.alive[rows]
    return allowed, mod.codes[rows]


def _enough(
    q: _Query, scores: np.ndarray, allowed: np.ndarray, codes: np.ndarray, bounds: list[float]
) -> bool:
    """Whether every pool has ``top_n`` allowed candidates scoring above that pool's outside bound."""
    for pool, bound in zip(q.pools, bounds, strict=True):
        if bound == -np.inf:
            continue  # every page of the segment is a candidate
        if int(np.count_nonzero(allowed & _in_pool(codes, pool, q.code) & (scores > bound))) < q.top_n:
            return False
    return True


def _trim(
    q: _Query, rows: np.ndarray, scores: np.ndarray, allowed: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Only what the selection can pick: per pool, the top ``top_n`` allowed candidates (score
    descending, row ascending: the selection's own order), so it never sorts large candidate sets."""
    keep = []
    for pool in q.pools:
        ix = np.flatnonzero(allowed & _in_pool(codes, pool, q.code))
        if ix.size > q.top_n:  # everything scoring >= the top_n-th best (ties kept), then exactly
            s = scores[ix]
            ix = ix[s >= np.partition(s, ix.size - q.top_n)[ix.size - q.top_n]]
            ix = ix[np.lexsort((rows[ix], -scores[ix].astype(np.float64)))[: q.top_n]]
        keep.append(ix)
    ix = np.unique(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    return rows[ix], scores[ix]


def _first_free(
    index: SplitIndex, lists: list[np.ndarray], lo: int, hi: int, need: int, taken: np.ndarray, group: int
) -> np.ndarray:
    """The ``need`` lowest alive rows in [lo, hi) of the pool's row lists, not ``taken`` nor of ``group``."""
    picks: list[np.ndarray] = []
    for rows in lists:
        a, b = int(np.searchsorted(rows, lo)), int(np.searchsorted(rows, hi))
        got, count, chunk = [], 0, max(2 * need, 64)
        while count < need and a < b:
            r = rows[a : min(b, a + chunk)]
            if taken.size:
                pos = np.minimum(np.searchsorted(taken, r), taken.size - 1)
                r = r[taken[pos] != r]
            r = r[index.groups[r] != group][: need - count]
            got.append(r)
            count += r.size
            a += chunk
            chunk *= 2
        if got:
            picks.append(np.concatenate(got))
    if not picks:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(picks))[:need]


def _bm25_segment(
    index: SplitIndex, i: int, tokens: list[str], q: _Query, mod: Modalities, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """(global rows, exact scores) of one bm25 segment's candidates for one query."""
    seg = index.segments[i]
    lo, n = int(index.offsets[i]), seg.n
    empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
    if n == 0:
        return empty
    bm = seg.bm25
    qt = bm.terms(tokens) if bm is not None else None
    rows, scores = empty
    bounds = [0.0] * len(q.pools)
    if qt is not None and not qt.empty:
        df, ub = bm.df(qt), bm.upper_bounds(qt)
        tb = np.asarray(bm.term_langs[qt.ids], dtype=np.uint64)
        bits = [
            np.uint64(
                bm.lang_bits(
                    set().union(*(mod.code_langs[c] for c in _pool_codes(p, q.code, len(mod.code_langs))))
                )
            )
            for p in q.pools
        ]
        order = np.argsort(df, kind="stable")  # rarest first
        cum = np.cumsum(df[order])
        # essential terms: the rarest ones whose postings fit the budget (at least one, unless that one
        # alone holds a quarter of all the query's postings: then scoring everything is as cheap)
        n_ess = int(np.searchsorted(cum, budget, side="right"))
        if n_ess == 0 and cum[0] <= cum[-1] // 4:
            n_ess = 1
        while True:
            if n_ess == 0 or n_ess >= order.size:
                local, scores = bm.nonzero(qt)
                rest = order[:0]
            else:
                rest = order[n_ess:]
                local = bm.union(qt.ids[order[:n_ess]])
                scores = bm.score_rows(qt, local)
            rows = local + lo
            bounds = [bound_of(ub[rest[(tb[rest] & b) != 0]]) for b in bits]
            # a pool whose outside bound is 0 has every page with a non-zero score among the candidates
            check = [(-np.inf if bd == 0.0 else bd) for bd in bounds]
            if rest.size == 0 or _enough(q, scores, *_allowed(index, mod, q, rows, scores), check):
                break
            # one more cheap term, else everything (adding expensive terms one by one costs more)
            n_ess = n_ess + 1 if cum[n_ess] <= budget else 0
    fills = []
    allowed, codes = _allowed(index, mod, q, rows, scores)
    if q.threshold > 0:  # pages sharing no term score exactly 0 < threshold: the pool's next candidates
        for pool, bound in zip(q.pools, bounds, strict=True):
            if bound > 0.0:
                continue
            need = q.top_n - int(np.count_nonzero(allowed & _in_pool(codes, pool, q.code)))
            if need > 0:
                lists = [mod.rows_by_code[c] for c in _pool_codes(pool, q.code, len(mod.rows_by_code))]
                fills.append(_first_free(index, lists, lo, lo + n, need, rows, q.group))
    rows, scores = _trim(q, rows, scores, allowed, codes)
    if fills:
        extra = np.unique(np.concatenate(fills))
        rows = np.concatenate([rows, extra])
        scores = np.concatenate([scores, np.zeros(extra.size, np.float32)])
    return rows, scores


def _dense_segment(
    index: SplitIndex,
    i: int,
    qvec: np.ndarray,
    first: np.ndarray,
    first_scores: np.ndarray,
    q: _Query,
    mod: Modalities,
    m: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(global rows, exact scores) of one dense segment's candidates for one query."""
    seg: LoadedSegment = index.segments[i]
    lo, n = int(index.offsets[i]), seg.n
    if n == 0 or seg.vectors is None:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    local, cut = first[first >= 0], first_scores[first >= 0]
    while True:
        exhaustive = local.size >= n
        local = np.sort(local)
        scores = dense_scores(qvec[None, :], seg.vectors[local])[0]
        bound = -np.inf if exhaustive else float(cut[-1]) if cut.size else np.inf
        rows = local + lo
        allowed, codes = _allowed(index, mod, q, rows, scores)
        if exhaustive or _enough(q, scores, allowed, codes, [bound] * len(q.pools)):
            break
        m *= 4
        if m >= n and not seg.exact_faiss:  # an IVF index cannot enumerate everything: brute force
            local, cut = np.arange(n, dtype=np.int64), np.zeros(0, np.float32)
            continue
        d, ids = seg.faiss.search(np.ascontiguousarray(qvec[None, :], dtype=np.float32), min(m, n))
        local, cut = ids[0][ids[0] >= 0].astype(np.int64), d[0][ids[0] >= 0]
        if m >= n:
            local = np.arange(n, dtype=np.int64)
    return _trim(q, rows, scores, allowed, codes)


def _positive_score(index: SplitIndex, row: int, tokens: list[str] | None, qvec: np.ndarray | None) -> float:
    i = index.segment_of(row)
    seg, local = index.segments[i], row - int(index.offsets[i])
    if index.miner == "bm25":
        if seg.bm25 is None:
            return 0.0
        return float(seg.bm25.score_rows(seg.bm25.terms(tokens or []), np.array([local]))[0])
    return float(dense_scores(qvec[None, :], seg.vectors[[local]])[0, 0])


def mine_with_index(
    queries: list[QueryView],
    index: SplitIndex,
    params: MiningParams,
    *,
    label: str,
    cfg: dict[str, Any] | None = None,
    encoder: Any = None,
    rejects: list[Reject] | None = None,
) -> list[Mined]:
    """One Mined per query whose positive is alive in ``index`` (others → ``rejects``), in query order.

    ``cfg``: the ``[negatives]`` table (``[negatives.index]`` search options); ``encoder``: the dense
    miner's encoder (queries are encoded here, in one batch).
    """
    cfg = cfg or {}
    opts = index_options(cfg)
    m0 = first_pass({**cfg, "top_n": params.top_n})
    budget = opts.prune_postings or 64 * m0
    mix = params.modality
    mod = index.modalities(mix)
    pools = (_ALL,) if mix is None else (_SAME, _WRONG)

    kept: list[tuple[QueryView, int]] = []
    for q in queries:
        row = index.row_of.get(q.page_id)
        if row is not None:
            kept.append((q, row))
        elif rejects is not None:
            rejects.append(missing_positive(q))
    if not kept:
        return []
    dense = index.miner == "dense"
    qvecs = None
    first: list[tuple[np.ndarray, np.ndarray] | None] = []
    if dense:
        qvecs = np.asarray(
            encoder.encode_queries([q.query for q, _ in kept], [q.query_lang for q, _ in kept]),
            dtype=np.float32,
        )
        for seg in index.segments:
            if seg.n == 0 or seg.faiss is None:
                first.append(None)
                continue
            d, ids = seg.faiss.search(np.ascontiguousarray(qvecs), min(m0, seg.n))
            first.append((d, ids))

    out: list[Mined] = []
    for qi, (q, row) in enumerate(kept):
        tokens = None if dense else tokenize(q.query)
        qvec = qvecs[qi] if qvecs is not None else None
        pos = _positive_score(index, row, tokens, qvec)
        ctx = _Query(
            positive_threshold(pos, params.margin),
            int(index.groups[row]),
            int(mod.codes[row]),
            pools,
            params.top_n,
        )
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        if params.k > 0 and (
            dense or ctx.threshold > 0
        ):  # bm25 scores are >= 0: nothing is below a threshold <= 0
            for i in range(len(index.segments)):
                if dense:
                    if first[i] is None:
                        continue
                    d, ids = first[i]
                    parts.append(_dense_segment(index, i, qvec, ids[qi], d[qi], ctx, mod, m0))
                else:
                    parts.append(_bm25_segment(index, i, tokens, ctx, mod, budget))
        if parts:
            cand = np.concatenate([p[0] for p in parts])
            cand_scores = np.concatenate([p[1] for p in parts])
            order = np.argsort(cand, kind="stable")
            cand, cand_scores = cand[order], cand_scores[order]
        else:
            cand, cand_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        chosen = select_negatives(
            cand_scores,
            index.groups[cand],
            positive_group=ctx.group,
            positive_score=pos,
            k=params.k,
            top_n=params.top_n,
            margin=params.margin,
            rng=query_rng(params.seed, q.query_id),
            modalities=None if mix is None else mod.codes[cand],
            positive_modality=-1 if mix is None else ctx.code,
            mix=mix,
        )
        out.append(
            Mined(
                q.query_id,
                [str(index.page_ids[cand[j]]) for j in chosen],
                [float(cand_scores[j]) for j in chosen],
                pos,
                label,
            )
        )
    return out
