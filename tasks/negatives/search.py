"""Mining queries against a split's index: exact candidates per segment, then the one selection.

:func:`mine_with_index` gives, on the same pages, the rows :func:`~tasks.negatives.selection.mine_negatives`
gives by scoring every page (one segment; scores are the canonical ones of ``bm25.py`` /
``miners.dense_scores``), at the cost of a search per query. Per segment it collects candidates until
they provably contain, for every pool the selection samples from (all pages, or with a modality mix the
same- and the wrong-modality pool), the top ``top_n`` *allowed* pages (not of the positive's parallel
group, alive, scoring under the positive-aware threshold):

- **bm25**: a query whose postings number at most ``[negatives.index] prune_postings`` (0: 64 ×
  ``candidates``) scores every page it shares a term with. Otherwise *impact windows*: each query term
  relevant to a pool (occurring in the pool's languages) contributes the entries of its impact-ordered
  list with ``cut < count·weight`` and below the positive-aware threshold (an entry at or above it
  means a page that can never be allowed). Cuts summing under a pool's ``theta`` prove every page
  outside the windows scores below ``theta`` (:class:`_Planner` splits ``theta`` among the terms to
  keep the windows small); windows grow round by round until the pool's n-th best allowed candidate
  scores ``>= theta``. When the windows would cost about as much as one pass over the query's
  postings (many pages share common words and sit just under the threshold), that pass is made
  instead (:func:`_bm25_dense`). Scores are always the canonical ones, computed for candidates only.
  Pages sharing no term score exactly 0 and are taken, where the pool needs them, in row order (the
  exhaustive tie order).
- **dense**: FAISS proposes the top ``candidates`` pages (grown ×4 until the check holds), their
  scores are recomputed exactly from the stored vectors; the FAISS cut score is the bound (exact for a
  flat index up to float rounding at the cut; an IVF segment's hits are approximate by design).

A positive not in the index (not in the split's live pages) is a ``POSITIVE_NOT_IN_CORPUS`` reject.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.negatives.base import Mined, MiningParams, QueryView, missing_positive
from tasks.negatives.bm25 import tokenize
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


_GRID = 64  # resolution of the split of a pool's cut among query terms
_KJ = np.subtract.outer(np.arange(_GRID), np.arange(_GRID))  # [j, k] = j - k (budget left after k)
_SAFE = 1e-6  # relative slack on every window edge: float rounding never drops a page that may count
_FIRST_WINDOW = 4  # × top_n: window entries of a pool's first round
_GROW = (8, 3)  # growth of the windows per round: short of top_n allowed candidates, then past it
_DENSE = 3  # windows holding more than 1/_DENSE of the query's postings: score every posting instead
_SWITCH = True  # leave the windows for one pass over the postings when that is cheaper (tests: False)


def _weights(x: Any) -> np.ndarray:
    """Weight bounds as float32, the impact lists' dtype: ``searchsorted`` would otherwise cast the
    whole list per call. The rounding (2^-24) is inside ``_SAFE``, so no window loses an entry."""
    return np.asarray(x, dtype=np.float32)


def _pool_bits(bm: Any, mod: Modalities, q: _Query) -> list[np.uint64]:
    """Per pool, the language bitmask of the segment's languages the pool's pages can have."""
    n_codes = len(mod.code_langs)
    return [
        np.uint64(bm.lang_bits(set().union(*(mod.code_langs[c] for c in _pool_codes(p, q.code, n_codes)))))
        for p in q.pools
    ]


class _Planner:
    """Cuts of one pool's query terms for any ``theta``: contribution cuts ``c`` (``sum(c) < theta``)
    whose impact windows ``c < count·weight <= hi`` are small; a page outside every window scores
    below ``theta``.

    Window sizes on a grid of cuts ``k · top / _GRID`` come from binary searches in each impact list;
    one min-plus dynamic programme over the terms gives, for every grid budget, the smallest windows
    (Fagin's threshold argument with the cuts chosen per query rather than by equal depth). A cut is
    then capped at its term's largest contribution and the slack left goes to the one term whose
    window it shrinks most."""

    def __init__(
        self, lists: list[np.ndarray], counts: np.ndarray, ub: np.ndarray, hi: np.ndarray, terms: np.ndarray
    ) -> None:
        self.lists, self.counts, self.ub, self.hi, self.terms = lists, counts, ub, hi, terms
        self.top = float(ub[terms].sum())
        self.unit = self.top / _GRID
        sizes = [self._sizes(t, np.arange(_GRID) * self.unit) for t in terms.tolist()]
        best = sizes[0].astype(np.float64)  # best[j]: fewest window entries with grid cuts summing to j
        self.picks = []
        for size in sizes[1:]:
            total = np.where(_KJ >= 0, best[np.maximum(_KJ, 0)] + size[None, :], np.inf)  # [j, k]
            pick = np.argmin(total, axis=1)
            best = total[np.arange(_GRID), pick]
            self.picks.append(pick)
        # budgets up to j: the best of them (window entries never grow with the budget)
        improves = np.concatenate([[True], best[1:] < np.minimum.accumulate(best)[:-1]])
        self.arg = np.maximum.accumulate(np.where(improves, np.arange(_GRID), 0))
        self.best = best[self.arg]

    def _sizes(self, t: int, cuts: np.ndarray) -> np.ndarray:
        lo = np.searchsorted(self.lists[t], _weights(cuts / self.counts[t] * (1.0 - _SAFE)), side="right")
        return np.maximum(self.hi[t] - lo, 0)

    def theta_for(self, entries: int) -> float:
        """The largest grid ``theta`` whose windows hold at least ``entries`` (0: no theta does)."""
        if self.terms.size == 1:  # one list: the exact weight ``entries`` below its top
            t = int(self.terms[0])
            at = int(self.hi[t]) - entries
            return float(self.counts[t] * self.lists[t][at]) if at >= 0 else 0.0
        ok = np.flatnonzero(self.best >= entries)
        return float((ok[-1] + 1) * self.unit) if ok.size else 0.0

    def cuts(self, theta: float, n_terms: int) -> np.ndarray:
        """Cuts of every query term (inf: not this pool's term) for ``theta``."""
        out = np.full(n_terms, np.inf)
        limit = theta * (1.0 - 4 * _SAFE)
        if self.terms.size == 1:
            out[self.terms[0]] = min(limit, float(self.ub[self.terms[0]]))
            return out
        j = min(_GRID - 1, math.ceil(theta / self.unit) - 1) if theta > 0 else -1
        if j < 0:
            out[self.terms] = 0.0
            return out
        j = int(self.arg[j])
        ks = []
        for pick in reversed(self.picks):
            ks.append(int(pick[j]))
            j -= ks[-1]
        ks.append(j)
        ks.reverse()
        c = np.minimum(np.array(ks, dtype=np.float64) * self.unit, self.ub[self.terms])
        c *= min(1.0, limit / max(float(c.sum()), 1e-300))  # the grid step may exceed theta·(1 - 4·_SAFE)
        slack = limit - float(c.sum())
        if slack > theta * _SAFE:  # the slack to the term whose window it shrinks most
            room = np.minimum(c + slack, self.ub[self.terms])
            gain = [
                int(self._sizes(t, np.array([c[i]]))[0] - self._sizes(t, np.array([room[i]]))[0])
                for i, t in enumerate(self.terms.tolist())
            ]
            i = int(np.argmax(gain))
            if gain[i] > 0:
                c[i] = room[i]
        out[self.terms] = c
        return out


def _lows(kept: list[list[np.ndarray]], top_n: int) -> list[float]:
    """Per pool, the n-th best of the allowed scores found (0 with fewer than n)."""
    out = []
    for parts in kept:
        vals = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        out.append(
            float(np.partition(vals, vals.size - top_n)[vals.size - top_n]) if vals.size >= top_n else 0.0
        )
    return out


def _bm25_dense(
    index: SplitIndex,
    bm: Any,
    qt: Any,
    lo: int,
    q: _Query,
    mod: Modalities,
    relevant: list[np.ndarray],
    lows: list[float],
) -> tuple[np.ndarray, np.ndarray, list[float]] | None:
    """One pass over the query's postings, then only the pages scoring in a band ``[cut, threshold)``
    that holds every pool's top n: (global rows ascending, scores, bounds), or None when no band
    short of every page with a non-zero score does (then :meth:`Bm25Segment.nonzero`).

    ``cut`` is the lowest of the pools' known n-th bests (``lows``) or, without them, a score picked
    so the band holds ``8 × top_n + 64`` pages (×8 until every pool has n allowed ones in it); the
    pages outside the band score below ``cut·(1 - _SAFE)``, strictly below each pool's n-th best."""
    full = bm.sums(qt)
    under = np.flatnonzero((full > 0) & (full < q.threshold * (1.0 + _SAFE)))
    vals = full[under]
    known = [lw for lw, r in zip(lows, relevant, strict=True) if r.any()]
    size = 8 * q.top_n + 64
    while True:
        if known and min(known) > 0.0:
            cut = min(known)
        elif size < under.size:
            cut = float(np.partition(vals, under.size - size)[under.size - size])
        else:
            return None
        keep = vals >= cut * (1.0 - _SAFE)
        rows, scores = under[keep] + lo, vals[keep].astype(np.float32)
        allowed, codes = _allowed(index, mod, q, rows, scores)
        bounds = [0.0] * len(q.pools)
        for p, pool in enumerate(q.pools):
            if relevant[p].any():
                got = scores[allowed & _in_pool(codes, pool, q.code)]
                if got.size < q.top_n:
                    break
                bounds[p] = float(np.partition(got, got.size - q.top_n)[got.size - q.top_n])
        else:
            return rows, scores, bounds
        known, size = [], size * 8


def _bm25_windows(
    index: SplitIndex, bm: Any, qt: Any, lo: int, q: _Query, mod: Modalities, relevant: list[np.ndarray]
) -> tuple[np.ndarray | None, np.ndarray | None, list[float]]:
    """Exact candidates of one segment by impact windows: (global rows ascending, scores, pool bounds).
    When the windows would cost more than one pass over the query's postings: (None, None, per pool
    the n-th best allowed score found so far, or 0 with fewer than n) for :func:`_bm25_dense`.

    Per pool, rounds of growing windows: the planned ``theta`` is the highest whose windows hold
    ``_FIRST_WINDOW × top_n`` entries, growing by ``_GROW`` per round. Every page scoring in ``[theta,
    threshold)`` lies in a window (:class:`_Planner`), so once the pool's n-th best allowed candidate
    scores ``>= theta`` its top n is exact and every other page scores below ``theta`` (the bound).
    Else the next round's ``theta`` is never below the n-th best allowed candidate so far (planning
    for it ends the pool); when no ``theta`` gives the windows asked for, the pool's terms' whole lists
    are scored (every page with a non-zero score, which the zero-score fills must skip; bound 0)."""
    n_terms = qt.ids.size
    impacts = [bm.impact(int(t)) for t in qt.ids.tolist()]
    lists = [w for _, w in impacts]
    counts = qt.weights
    ub = bm.upper_bounds(qt)
    limit = q.threshold * (1.0 + _SAFE)  # count·weight above this: the page scores >= the threshold
    hi = np.array(
        [
            int(np.searchsorted(w, _weights(limit / c), side="right"))
            for w, c in zip(lists, counts, strict=True)
        ]
    )
    dense_at = sum(w.size for w in lists) // _DENSE
    n_pools = len(q.pools)
    terms = [np.flatnonzero(r) for r in relevant]
    planners = [_Planner(lists, counts, ub, hi, t) if t.size else None for t in terms]
    want = [_FIRST_WINDOW * q.top_n] * n_pools
    theta = [pl.theta_for(want[p]) if pl is not None else 0.0 for p, pl in enumerate(planners)]
    done = [pl is None for pl in planners]
    bounds = [0.0] * n_pools
    # each term's window, [a, b) in its impact list, only grows: [a, b) ∪ the new one is contiguous
    a_of, b_of = hi.copy(), hi.copy()
    seen = np.zeros(0, np.int64)  # local rows scored so far, ascending
    found: list[tuple[np.ndarray, np.ndarray]] = []  # (global rows, scores) per round
    kept: list[list[np.ndarray]] = [[] for _ in range(n_pools)]  # allowed scores per pool
    over = 0  # candidates scoring at or above the threshold
    while not all(done):
        cuts = np.full(n_terms, np.inf)
        top = hi.copy()
        for p, pl in enumerate(planners):
            if not done[p]:
                cuts = np.minimum(cuts, pl.cuts(theta[p], n_terms))
                if theta[p] == 0.0:
                    top[terms[p]] = [lists[t].size for t in terms[p].tolist()]
        spans = []
        for t in np.flatnonzero(cuts < np.inf).tolist():
            a = int(np.searchsorted(lists[t], _weights(cuts[t] / counts[t] * (1.0 - _SAFE)), side="right"))
            b = int(top[t])
            if a < a_of[t]:
                spans.append((t, a, int(a_of[t])))
                a_of[t] = a
            if b > b_of[t]:
                spans.append((t, int(b_of[t]), b))
                b_of[t] = b
        if _SWITCH and int((b_of - a_of).sum()) > dense_at:
            return None, None, _lows(kept, q.top_n)
        new = np.zeros(0, np.int64)
        if spans:
            new = bm.distinct(np.concatenate([impacts[t][0][a:b] for t, a, b in spans]))
            if seen.size:
                pos = np.minimum(np.searchsorted(seen, new), seen.size - 1)
                new = new[seen[pos] != new]
        if _SWITCH and bm.dense_cheaper(
            qt, 2 * (seen.size + new.size)
        ):  # half a pass over the postings spent
            return None, None, _lows(kept, q.top_n)
        if new.size:
            got = bm.score_rows(qt, new)
            seen = np.sort(np.concatenate([seen, new]), kind="stable")  # a merge of two sorted runs
            found.append((new + lo, got))
            over += int(np.count_nonzero(got >= q.threshold))
            allowed, codes = _allowed(index, mod, q, new + lo, got)
            for p, pool in enumerate(q.pools):
                kept[p].append(got[allowed & _in_pool(codes, pool, q.code)])
        for p in range(n_pools):
            if done[p]:
                continue
            vals = np.concatenate(kept[p]) if kept[p] else np.zeros(0, np.float32)
            kept[p] = [vals]
            if vals.size >= q.top_n:
                nth = float(np.partition(vals, vals.size - q.top_n)[vals.size - q.top_n])
                if nth >= theta[p]:
                    done[p], bounds[p] = True, theta[p]
                    continue
            elif theta[p] == 0.0:
                done[p] = True  # every page that may be allowed is a candidate: bound 0
                continue
            else:
                nth = 0.0
                if _SWITCH and 2 * over >= seen.size >= _FIRST_WINDOW * q.top_n:
                    # most candidates score above the threshold: many pages share the query's terms
                    return None, None, _lows(kept, q.top_n)
            # grow the windows; never below a real n-th best (planning for it ends the pool)
            want[p] *= _GROW[vals.size >= q.top_n]
            theta[p] = max(nth, planners[p].theta_for(want[p]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), bounds
    rows = np.concatenate([r for r, _ in found])
    order = np.argsort(rows, kind="stable")
    return rows[order], np.concatenate([s for _, s in found])[order], bounds


def _bm25_segment(
    index: SplitIndex, i: int, tokens: list[str], q: _Query, mod: Modalities, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """(global rows, exact scores) of one bm25 segment's candidates for one query: every page with a
    non-zero score when the query's postings number at most ``budget``, else the impact windows."""
    seg = index.segments[i]
    lo, n = int(index.offsets[i]), seg.n
    empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
    if n == 0 or q.top_n <= 0:
        return empty
    bm = seg.bm25
    qt = bm.terms(tokens) if bm is not None else None
    rows, scores = empty
    bounds = [0.0] * len(q.pools)
    if qt is not None and not qt.empty:
        if int(bm.df(qt).sum()) <= budget:
            local, scores = bm.nonzero(qt)
            rows = local + lo
        else:
            tb = np.asarray(bm.term_langs[qt.ids], dtype=np.uint64)
            relevant = [(tb & bits) != 0 for bits in _pool_bits(bm, mod, q)]
            got, got_scores, bounds = _bm25_windows(index, bm, qt, lo, q, mod, relevant)
            if got is not None and got_scores is not None:
                rows, scores = got, got_scores
            elif (band := _bm25_dense(index, bm, qt, lo, q, mod, relevant, bounds)) is not None:
                rows, scores, bounds = band
            else:  # a pool short of n allowed pages: every page with a non-zero score
                local, scores = bm.nonzero(qt)
                rows, bounds = local + lo, [0.0] * len(q.pools)
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
