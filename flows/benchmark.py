"""`benchmark-nayana` flow: Nayana-IR style evaluation of dense and multi-vector retrievers.

Orchestration only: build the suite from a synthesize run's held-out documents (`eval.build`), score
each set in its own task (`eval.evaluate`), then write the report (`eval.benchmark_report`): results.json, one
TREC run file per set and retriever, report.md + report.png, rejects.parquet, and Prefect artifacts
(markdown with the plot, summary table, progress); with ``mteb_results``, mteb TaskResult JSON too
(`eval.mteb`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from eval.benchmark_report import write_benchmark_outputs
from eval.build import SetInfo, build_suite, resolve_sets
from eval.evaluate import evaluate_location, runner_for
from flows.params import BenchmarkParams


@task(name="build-benchmark-suite", task_run_name="build suite from {params.data} ({params.split})")
def build_suite_task(params: BenchmarkParams) -> str:
    """The held-out split of a synthesize run → Nayana-IR sets under out/datasets (reused when unchanged)."""
    assert params.data is not None
    suite = build_suite(
        params.data,
        Path(params.out) / "datasets",
        split=params.split,
        split_fractions=params.split_fractions,
        langs=params.lang_list(),
        max_queries_per_lang=params.max_queries_per_lang,
        overwrite=True,
    )
    get_run_logger().info(
        "suite %s: %s", suite.root, ", ".join(f"{s.name} ({s.queries} q / {s.corpus} p)" for s in suite.sets)
    )
    return str(suite.root)


@task(name="evaluate-set", task_run_name="evaluate {info.name}")
def evaluate_set_task(params: BenchmarkParams, info: SetInfo, location: str) -> dict[str, Any]:
    """Score every retriever on one set; a set that cannot be read becomes an error result (+ reject)."""
    logger = get_run_logger()
    runner = runner_for(params.encoder, params.settings(), params.out, params.rerank)
    result = evaluate_location(runner, info, location, Path(params.out), progress=logger.info)
    if not result.error:
        main = {k: round(v.metrics.get("ndcg@5", float("nan")), 4) for k, v in result.retrievers.items()}
        logger.info("%s: %d queries, %d pages, NDCG@5 %s", info.name, result.queries, result.corpus, main)
    return result.to_json()


@task(name="benchmark-mteb-results")
def mteb_results_task(
    params: BenchmarkParams, sets: list[tuple[SetInfo, str]], results: list[dict[str, Any]]
) -> list[str]:
    """The scored sets as mteb TaskResult JSON (one model per retriever view) under params.mteb_results."""
    from eval.mteb import write_mteb_results

    assert params.mteb_results is not None
    locations = {f"{info.suite}/{info.name}": location for info, location in sets}
    paths = write_mteb_results(params.mteb_results, params.encoder, results, locations=locations)
    get_run_logger().info("mteb results: %d files under %s", len(paths), params.mteb_results)
    return [str(p) for p in paths]


@task(name="benchmark-report")
def report_task(params: BenchmarkParams, results: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json, report.md + report.png, rejects.parquet and the Prefect artifacts."""
    outputs = write_benchmark_outputs(
        Path(params.out), params.encoder, params.model_dump(mode="json"), results
    )
    create_markdown_artifact(
        outputs.artifact_markdown,
        key="benchmark-nayana-report",
        description="Nayana-IR style report: per-language NDCG@5, Matryoshka sweep, storage, latency",
    )
    create_table_artifact(outputs.table, key="benchmark-nayana-summary", description="per retriever")
    return {
        "summary": outputs.summary,
        "results": str(outputs.results_path),
        "report": str(outputs.report_path),
    }


def benchmark_sets(params: BenchmarkParams) -> list[tuple[SetInfo, str]]:
    """Every set of the run, the held-out suite (built by a task) first."""
    sources = ([build_suite_task(params)] if params.data else []) + list(params.benchmarks)
    sets = resolve_sets(sources, params.lang_list())
    if not sets:
        raise ValueError("nothing to benchmark: set `data` (a synthesize output) and/or `benchmarks`")
    return sets


@flow(name="benchmark-nayana", log_prints=True)
def benchmark_nayana(params: BenchmarkParams | None = None) -> dict[str, Any]:
    """Score a retriever Nayana-IR style: cross-lingual set + per-language monolingual sets."""
    params = params or BenchmarkParams()
    sets = benchmark_sets(params)
    progress = create_progress_artifact(0.0, key="benchmark-nayana-progress", description="sets scored")
    results = []
    for i, (info, location) in enumerate(sets, start=1):
        results.append(evaluate_set_task(params, info, location))
        update_progress_artifact(progress, 100.0 * i / len(sets))
    report = report_task(params, results)
    if params.mteb_results:
        report["mteb_results"] = mteb_results_task(params, sets, results)
    return report


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if benchmark_nayana() else 1)
