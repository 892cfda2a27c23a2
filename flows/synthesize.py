"""`synthesize` flow: English sources → pages shards in every language → queries → train shards.

Orchestration only: what runs after what, one Prefect task per shard, artifacts. The work lives in the
stage packages (``tasks/ingest``, ``tasks/translate`` + ``tasks/render``, ``tasks/queries``,
``tasks/negatives``); run-level preparation and the summary in ``tasks/run``. Every task reads and
writes shards by path, so no page data crosses Prefect.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from flows.params import SynthesizeParams
from tasks.ingest.task import ingest_shard_task
from tasks.negatives.task import train_shard_task
from tasks.queries.task import queries_shard_task
from tasks.run.prepare import prepare_run
from tasks.run.summary import run_result, write_run_report
from tasks.translate.task import translate_shard_task


def task_runner(params: SynthesizeParams):
    """Threads by default; a Dask cluster (existing, or a LocalCluster of worker processes) on request."""
    if params.dask_address or params.dask_workers:
        from prefect_dask import DaskTaskRunner

        if params.dask_address:
            return DaskTaskRunner(address=params.dask_address)
        # one thread per worker process: stage engines keep per-process model caches
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": params.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    return ThreadPoolTaskRunner(max_workers=params.workers)


@flow(name="synthesize", log_prints=True)
def synthesize(params: SynthesizeParams | None = None) -> dict[str, Any]:
    """English sources → pages shards in every language → queries → train shards; returns counts and paths.

    The shard tasks run in a subflow whose task runner follows the parameters (threads or Dask).
    """
    params = params or SynthesizeParams()
    return synthesize_shards.with_options(task_runner=task_runner(params))(params)


@flow(name="synthesize-shards", log_prints=True)
def synthesize_shards(params: SynthesizeParams) -> dict[str, Any]:
    """The body of `synthesize` (a subflow so the task runner can be chosen per run)."""
    logger = get_run_logger()
    run = prepare_run(
        params.out,
        params.profile,
        params.langs,
        params.sources,
        pages_per_shard=params.pages_per_shard,
        build_models=params.build_models,
    )
    if run.unknown_langs:
        logger.warning("skipping unknown language codes: %s", ", ".join(run.unknown_langs))
    logger.info(run.describe())
    root, prof, fps = str(run.root), run.profile, run.fingerprints

    ingest = {
        en: ingest_shard_task.submit(root, en, group, prof, {"layout": fps["layout"]})
        for en, group in run.new_en_shards.items()
    }

    def after_ingest(en: str) -> list[Any]:
        return [ingest[en]] if en in ingest else []

    translate = {
        (en, lang): translate_shard_task.submit(
            root,
            en,
            lang,
            prof,
            list(params.formats),
            {"translate": fps["translate"]},
            wait_for=after_ingest(en),
        )
        for en in run.en_shards
        for lang in run.langs
    }
    futures = [*ingest.values(), *translate.values()]
    if params.queries:
        # queries per group once its pages exist; negatives once every page of the corpus exists
        queries = [
            queries_shard_task.submit(
                root,
                en,
                run.langs,
                prof,
                params.cross_lingual,
                params.split_fractions,
                wait_for=[translate[en, lang] for lang in run.langs] + after_ingest(en),
            )
            for en in run.en_shards
        ]
        train = [
            train_shard_task.submit(
                root, en, prof, params.split_fractions, wait_for=queries + list(translate.values())
            )
            for en in run.en_shards
        ]
        futures += queries + train
    results = collect(futures, key="synthesize-progress")

    report = write_run_report(run.root, run.langs, with_queries=params.queries)
    create_markdown_artifact(
        report.markdown, key="synthesize-summary", description="pages per language, rejects, gallery"
    )
    worked = sum(not r["skipped"] for r in results)
    logger.info(
        "%d shard tasks, %d did work, %d skipped (complete)", len(results), worked, len(results) - worked
    )
    return run_result(run.root, run.langs, run.en_shards, results, report)


def collect(futures: list[Any], *, key: str) -> list[dict[str, Any]]:
    """Results of shard futures as they complete, with a Prefect progress artifact and a CLI bar."""
    progress_id = create_progress_artifact(0.0, key=key, description="shards done")
    results: list[dict[str, Any]] = []
    with tqdm(total=len(futures), desc="shards", unit="shard", disable=None) as bar:
        for fut in as_completed(futures):
            results.append(fut.result())
            bar.update(1)
            update_progress_artifact(progress_id, 100.0 * len(results) / max(len(futures), 1))
    return results
