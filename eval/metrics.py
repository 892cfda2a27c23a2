"""Retrieval metrics that equal trec_eval's (as wrapped by ``pytrec_eval``, which BEIR and MTEB use).

Conventions, each checked against ``pytrec_eval`` in tests/eval/test_metrics.py:

* **Ranking.** A query's run is sorted by score descending, ties broken by docid in *descending*
  lexicographic order (trec_eval's ``comp_sim_docno``). Scores are compared as **float32**, because
  trec_eval stores ``sim`` as a C ``float``: ``0.1 + 0.2`` and ``0.3`` tie there, and so here.
* **Relevance.** Qrels are integers; ``rel > 0`` is relevant (trec_eval ``relevance_level=1``), and
  ``rel <= 0`` is non-relevant with gain 0 (negative grades never subtract).
* **nDCG@k** (trec_eval ``ndcg_cut.k``): linear gain ``rel`` (not ``2**rel - 1``), discount
  ``log2(rank + 1)``; the ideal ranking is all judged docs sorted by gain, cut at k.
* **Recall@k** (``recall.k``): relevant in top k / all relevant. **MAP@k** (``map_cut.k``): sum of
  precision at each relevant rank ≤ k, divided by *all* relevant (not ``min(k, R)``).
  **MRR@k**: trec_eval ``recip_rank`` on the run cut at k. **P@k** (``P.k``): relevant in top k / k,
  even when fewer than k docs were retrieved. ``k`` larger than the run or the corpus is fine.
* **Which queries count** (pytrec_eval's rule, the default): a query is evaluated iff it has a
  non-empty judgement dict in ``qrels`` *and* a key in ``run`` (an empty run dict counts: all zeros).
  A judged query whose judgements are all ``<= 0`` is evaluated with every metric 0 and is part of
  the mean, exactly as pytrec_eval returns it and BEIR averages it. ``skip_no_relevant=True`` drops
  such queries instead; ``missing_as_zero=True`` scores judged queries absent from the run as 0
  (trec_eval ``-c``). Nayana-IR/ViDoRe qrels hold only positive grades, where the options agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

METRICS: tuple[str, ...] = ("ndcg", "recall", "map", "mrr", "precision")
MAIN_METRIC = "ndcg@5"
# Our metric names → pytrec_eval measure families (for cross-checks and reports).
PYTREC_NAMES: dict[str, str] = {
    "ndcg": "ndcg_cut",
    "recall": "recall",
    "map": "map_cut",
    "precision": "P",
    "mrr": "recip_rank",
}


def metric_name(metric: str, k: int) -> str:
    """Key used in result dicts, e.g. ``ndcg@5``."""
    return f"{metric}@{k}"


def rank_docs(scores: Mapping[str, float], k: int | None = None) -> list[str]:
    """Docids of one query's run in trec_eval order (score desc as float32, then docid desc), top k."""
    if not scores:
        return []
    ids = list(scores)
    vals = np.asarray([scores[d] for d in ids], dtype=np.float64)
    if np.isnan(vals).any():
        raise ValueError("run scores contain NaN; trec_eval's ordering is undefined for NaN")
    as_f32 = vals.astype(np.float32).tolist()  # trec_eval keeps `float sim`
    order = sorted(zip(as_f32, ids, strict=True), reverse=True)  # score desc, then docid desc
    top = order if k is None else order[:k]
    return [d for _, d in top]


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise ValueError(f"cut-offs must be positive integers, got {tuple(ks)!r}")
    return out


def query_metrics(
    judged: Mapping[str, int],
    scores: Mapping[str, float],
    ks: Sequence[int] = (1, 5, 10),
    metrics: Sequence[str] = METRICS,
) -> dict[str, float]:
    """All ``metric@k`` values of one query (``judged``: docid → grade; ``scores``: docid → score)."""
    ks = _check_ks(ks)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {METRICS}")
    kmax = ks[-1]
    ranked = rank_docs(scores, kmax)
    gains = [max(int(judged.get(d, 0)), 0) for d in ranked]
    ideal = sorted((g for g in (int(v) for v in judged.values()) if g > 0), reverse=True)
    n_rel = len(ideal)

    out: dict[str, float] = {}
    dcg = idcg = ap_sum = 0.0
    hits = 0
    first_hit: int | None = None
    cum: list[tuple[float, float, int, float]] = []  # per rank: dcg, idcg, hits, ap_sum
    for i in range(kmax):
        disc = math.log2(i + 2)
        if i < len(gains) and gains[i] > 0:
            dcg += gains[i] / disc
            hits += 1
            ap_sum += hits / (i + 1)
            if first_hit is None:
                first_hit = i + 1
        if i < n_rel:
            idcg += ideal[i] / disc
        cum.append((dcg, idcg, hits, ap_sum))
    for k in ks:
        d, i_d, h, ap = cum[k - 1]
        vals = {
            "ndcg": d / i_d if i_d > 0 else 0.0,
            "recall": h / n_rel if n_rel else 0.0,
            "map": ap / n_rel if n_rel else 0.0,
            "mrr": 1.0 / first_hit if first_hit is not None and first_hit <= k else 0.0,
            "precision": h / k,
        }
        for m in metrics:
            out[metric_name(m, k)] = vals[m]
    return out


def evaluated_queries(
    qrels: Qrels, run: Run, *, skip_no_relevant: bool = False, missing_as_zero: bool = False
) -> list[str]:
    """Query ids that count, in sorted order (see the module docstring for the rule)."""
    qids = []
    for qid, judged in qrels.items():
        if not judged:
            continue  # pytrec_eval ignores a query with an empty judgement dict
        if qid not in run and not missing_as_zero:
            continue
        if skip_no_relevant and not any(int(v) > 0 for v in judged.values()):
            continue
        qids.append(qid)
    return sorted(qids)


def evaluate_per_query(
    qrels: Qrels,
    run: Run,
    ks: Sequence[int] = (1, 5, 10),
    *,
    metrics: Sequence[str] = METRICS,
    skip_no_relevant: bool = False,
    missing_as_zero: bool = False,
) -> dict[str, dict[str, float]]:
    """``{qid: {"ndcg@5": …, …}}`` for every evaluated query (pytrec_eval's ``evaluate`` equivalent)."""
    qids = evaluated_queries(qrels, run, skip_no_relevant=skip_no_relevant, missing_as_zero=missing_as_zero)
    return {q: query_metrics(qrels[q], run.get(q, {}), ks, metrics) for q in qids}


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over queries of each metric (BEIR's aggregation)."""
    if not per_query:
        raise ValueError("no evaluated query: qrels and run share no query id with judgements")
    names = next(iter(per_query.values())).keys()
    n = len(per_query)
    return {m: math.fsum(v[m] for v in per_query.values()) / n for m in names}


def evaluate(
    qrels: Qrels,
    run: Run,
    ks: Sequence[int] = (1, 5, 10),
    *,
    metrics: Sequence[str] = METRICS,
    skip_no_relevant: bool = False,
    missing_as_zero: bool = False,
) -> dict[str, float]:
    """Mean ``metric@k`` over the evaluated queries, e.g. ``{"ndcg@5": 0.61, "recall@10": …}``."""
    per_query = evaluate_per_query(
        qrels, run, ks, metrics=metrics, skip_no_relevant=skip_no_relevant, missing_as_zero=missing_as_zero
    )
    return mean_metrics(per_query)


def mean_over(results: Mapping[str, Mapping[str, float]], *, strict: bool = True) -> dict[str, float]:
    """Macro average over datasets: ``{dataset: {metric: mean}}`` → ``{metric: mean of the means}``.

    This is "mean over the 22 monolingual sets": each dataset counts once whatever its query count.
    With ``strict`` every dataset must report the same metrics; otherwise only shared ones are kept.
    """
    if not results:
        raise ValueError("mean_over needs at least one dataset")
    keysets = [set(r) for r in results.values()]
    shared = set.intersection(*keysets)
    if strict and any(k != keysets[0] for k in keysets):
        diff = sorted(set.union(*keysets) - shared)
        raise ValueError(f"datasets report different metrics: {diff} missing from some")
    n = len(results)
    first = next(iter(results.values()))
    return {m: math.fsum(r[m] for r in results.values()) / n for m in first if m in shared}


def pytrec_measures(ks: Sequence[int], metrics: Sequence[str] = METRICS) -> set[str]:
    """pytrec_eval measure strings for the same metrics (``recip_rank`` has no cut: cut the run first)."""
    out: set[str] = set()
    for m in metrics:
        fam = PYTREC_NAMES[m]
        if m == "mrr":
            out.add(fam)
        else:
            out.update(f"{fam}.{k}" for k in ks)
    return out


def truncate_run(run: Run, k: int) -> dict[str, dict[str, float]]:
    """Each query's top k in trec_eval order (what ``recip_rank`` needs to become MRR@k)."""
    return {q: {d: float(s[d]) for d in rank_docs(s, k)} for q, s in run.items()}
