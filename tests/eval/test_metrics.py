"""eval.metrics must equal pytrec_eval (trec_eval) to 1e-6, per query and on the mean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.metrics import (
    METRICS,
    evaluate,
    evaluate_per_query,
    mean_over,
    pytrec_measures,
    query_metrics,
    rank_docs,
    truncate_run,
)

pytrec_eval = pytest.importorskip("pytrec_eval")

KS = (1, 3, 5, 10, 100)
OURS_TO_PYTREC = {"ndcg": "ndcg_cut_{k}", "recall": "recall_{k}", "map": "map_cut_{k}", "precision": "P_{k}"}


def pytrec_per_query(qrels, run, ks=KS) -> dict[str, dict[str, float]]:
    """Reference values under our metric names; MRR@k = recip_rank of the run cut at k."""
    ev = pytrec_eval.RelevanceEvaluator(qrels, pytrec_measures(ks, [m for m in METRICS if m != "mrr"]))
    base = ev.evaluate(run)
    out = {
        q: {f"{m}@{k}": v[OURS_TO_PYTREC[m].format(k=k)] for m in OURS_TO_PYTREC for k in ks}
        for q, v in base.items()
    }
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    for k in ks:
        for q, v in rr.evaluate(truncate_run(run, k)).items():
            out[q][f"mrr@{k}"] = v["recip_rank"]
    return out


def assert_same(ours: dict, ref: dict, tol: float = 1e-6) -> None:
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    for q in ref:
        assert set(ours[q]) == set(ref[q])
        for m, v in ref[q].items():
            assert math.isclose(ours[q][m], v, abs_tol=tol), (q, m, ours[q][m], v)


def random_case(seed: int):
    """Random graded qrels + run: coarse scores (many ties), some unjudged/empty/missing queries."""
    rng = np.random.default_rng(seed)
    n_docs = int(rng.integers(3, 60))
    docs = [f"d{int(i):03d}" if rng.random() < 0.7 else f"D-{i}" for i in range(n_docs)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for qi in range(int(rng.integers(1, 25))):
        q = f"q{qi}"
        n_j = int(rng.integers(0, min(12, n_docs) + 1))
        judged = rng.choice(n_docs, size=n_j, replace=False)
        qrels[q] = {docs[j]: int(rng.choice([-1, 0, 0, 1, 1, 2, 3])) for j in judged}
        r = rng.random()
        if r < 0.08:
            continue  # query absent from the run
        if r < 0.12:
            run[q] = {}  # empty run
            continue
        n_r = int(rng.integers(1, n_docs + 1))
        ret = rng.choice(n_docs, size=n_r, replace=False)
        levels = int(rng.choice([3, 10, 1000]))  # few levels → many ties
        run[q] = {docs[j]: float(rng.integers(0, levels)) / levels - 0.3 for j in ret}
    run["not-judged"] = {docs[0]: 1.0}
    return qrels, run


@pytest.mark.parametrize("seed", range(300))
def test_random_runs_equal_pytrec_eval(seed: int) -> None:
    qrels, run = random_case(seed)
    ref = pytrec_per_query(qrels, run)
    ours = evaluate_per_query(qrels, run, KS)
    assert_same(ours, ref)
    if ref:
        for m, v in evaluate(qrels, run, KS).items():
            assert math.isclose(v, float(np.mean([r[m] for r in ref.values()])), abs_tol=1e-9)


def test_ties_break_by_docid_descending() -> None:
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 0.5, "b": 0.5, "c": 0.5}}
    assert rank_docs(run["q"]) == ["c", "b", "a"]
    ours = evaluate_per_query(qrels, run, (1, 3))
    assert ours["q"]["mrr@3"] == pytest.approx(1 / 3)
    assert_same(ours, pytrec_per_query(qrels, run, (1, 3)))


def test_scores_compare_as_float32_like_trec_eval() -> None:
    # 0.1 + 0.2 > 0.3 in float64 but both round to the same float32: trec_eval sees a tie → "b" first.
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 0.1 + 0.2, "b": 0.3}}
    assert rank_docs(run["q"]) == ["b", "a"]
    assert_same(evaluate_per_query(qrels, run, (1,)), pytrec_per_query(qrels, run, (1,)))
    run = {"q": {"a": 1.0 + 2**-22, "b": 1.0}}  # distinct in float32
    assert rank_docs(run["q"]) == ["a", "b"]


def test_graded_relevance_uses_linear_gain() -> None:
    qrels = {"q": {"exact": 2, "parallel": 1, "other": 0}}
    run = {"q": {"parallel": 3.0, "exact": 2.0, "other": 1.0}}
    ours = evaluate_per_query(qrels, run, (2, 5))["q"]
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ours["ndcg@2"] == pytest.approx(dcg / idcg)
    assert_same(evaluate_per_query(qrels, run, (2, 5)), pytrec_per_query(qrels, run, (2, 5)))


def test_queries_without_relevant_docs_empty_runs_and_missing_queries() -> None:
    qrels = {
        "no_rel": {"a": 0, "b": -1},  # judged, nothing relevant: pytrec_eval scores it 0 and keeps it
        "empty_judgements": {},  # pytrec_eval ignores it
        "empty_run": {"a": 1},  # run dict present but empty: evaluated, all 0
        "absent": {"a": 1},  # not in the run: skipped (trec_eval without -c)
        "ok": {"a": 1},
    }
    run = {
        "no_rel": {"a": 1.0},
        "empty_judgements": {"a": 1.0},
        "empty_run": {},
        "ok": {"a": 1.0},
        "unjudged": {"a": 1.0},
    }
    ref = pytrec_per_query(qrels, run, (5,))
    ours = evaluate_per_query(qrels, run, (5,))
    assert set(ours) == {"no_rel", "empty_run", "ok"}
    assert_same(ours, ref)
    assert evaluate(qrels, run, (5,))["ndcg@5"] == pytest.approx(1 / 3)
    assert evaluate(qrels, run, (5,), skip_no_relevant=True)["ndcg@5"] == pytest.approx(1 / 2)
    assert evaluate(qrels, run, (5,), missing_as_zero=True)["ndcg@5"] == pytest.approx(1 / 4)


def test_k_larger_than_corpus_and_precision_denominator() -> None:
    qrels = {"q": {"a": 1, "b": 2, "z": 1}}  # "z" never retrieved
    run = {"q": {"a": 0.9, "b": 0.1}}
    ours = evaluate_per_query(qrels, run, (1, 10, 1000))["q"]
    assert ours["precision@10"] == pytest.approx(2 / 10)
    assert ours["recall@1000"] == pytest.approx(2 / 3)
    assert ours["map@10"] == pytest.approx((1 / 1 + 2 / 2) / 3)
    assert_same(evaluate_per_query(qrels, run, (1, 10, 1000)), pytrec_per_query(qrels, run, (1, 10, 1000)))


def test_single_query_api_and_validation() -> None:
    vals = query_metrics({"a": 1}, {"a": 0.2, "b": 0.9}, ks=(1, 2), metrics=("mrr",))
    assert vals == {"mrr@1": 0.0, "mrr@2": 0.5}
    with pytest.raises(ValueError, match="positive"):
        query_metrics({"a": 1}, {"a": 1.0}, ks=(0,))
    with pytest.raises(ValueError, match="unknown metrics"):
        query_metrics({"a": 1}, {"a": 1.0}, metrics=("bleu",))
    with pytest.raises(ValueError, match="NaN"):
        rank_docs({"a": float("nan")})
    with pytest.raises(ValueError, match="no evaluated query"):
        evaluate({"q": {"a": 1}}, {"other": {"a": 1.0}})


def test_mean_over_is_a_macro_average() -> None:
    per_set = {"hi": {"ndcg@5": 0.2, "recall@10": 0.5}, "ta": {"ndcg@5": 0.6, "recall@10": 0.7}}
    assert mean_over(per_set) == pytest.approx({"ndcg@5": 0.4, "recall@10": 0.6})
    with pytest.raises(ValueError, match="different metrics"):
        mean_over({"hi": {"ndcg@5": 0.2}, "ta": {"recall@10": 0.1}})
    assert mean_over({"hi": {"ndcg@5": 0.2, "x": 1.0}, "ta": {"ndcg@5": 0.4}}, strict=False) == pytest.approx(
        {"ndcg@5": 0.3}
    )
    # Macro, not micro: a dataset with many queries does not dominate.
    q1 = {f"q{i}": {"a": 1} for i in range(9)}
    r1 = {f"q{i}": {"a": 1.0} for i in range(9)}
    big = evaluate(q1, r1, (5,))
    small = evaluate({"q": {"a": 1}}, {"q": {"b": 1.0}}, (5,))
    assert mean_over({"big": big, "small": small})["ndcg@5"] == pytest.approx(0.5)
