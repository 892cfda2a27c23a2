"""`synthesize` flow: English sources → pages shards in every language → queries → train shards.

Orchestration only: what runs after what, one Prefect task per shard, artifacts. The work lives in the
stage packages (``tasks/ingest``, ``tasks/translate`` + ``tasks/render``, ``tasks/queries``,
``tasks/negatives``); run-level preparation and the summary in ``tasks/run``. Every task reads and
writes shards by path, so no page data crosses Prefect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from flows.params import SynthesizeParams
from tasks.faults import ShardsFailed, describe, is_world_fault
from tasks.ingest.task import ingest_shard_task
from tasks.negatives.task import index_split_task, train_shard_task
from tasks.queries.task import queries_shard_task
from tasks.run.prepare import prepare_run
from tasks.run.summary import run_result, write_run_report
from tasks.shards import Manifest, record_run_params
from tasks.translate.task import translate_shard_task
from training.encoders import ENCODERS


def retry_options(retries: int, delay_s: float) -> dict[str, Any]:
    """Prefect task options of a shard task: ``retries`` more tries, exponential backoff from ``delay_s``
    (jittered), only when the failure is the world's (``tasks.faults.is_world_fault``)."""

    def world_fault(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except Exception as exc:  # the failed state's own exception, classified; the state stays failed
            return is_world_fault(exc)
        return False

    if not retries:
        return {"retries": 0}
    return {
        "retries": retries,
        "retry_delay_seconds": [delay_s * 2**i for i in range(retries)],
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": world_fault,
    }


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
    root, prof, fps, langs = run.root, run.profile, run.fingerprints, run.langs
    record_run_params(root, params.recorded())
    splits = ("train", "dev")
    # shard tasks retried with backoff on a broken world (tasks.faults), never on bad input or a bug
    retry = retry_options(params.shard_retries, params.retry_delay_s)
    ingest, translate, queries, index, train = (
        t.with_options(**retry)
        for t in (
            ingest_shard_task,
            translate_shard_task,
            queries_shard_task,
            index_split_task,
            train_shard_task,
        )
    )
    translate_cfg = prof.translate_stage(params.formats)
    # The shard graph, submitted through a window (see ShardWindow): a job runs once its inputs are done.
    window = ShardWindow(params.max_in_flight or max(16, 4 * params.workers), logger)
    for en, group in run.new_en_shards.items():
        window.add(
            ("ingest", en),
            (),
            lambda en=en, group=group: ingest.submit(
                root, en, group, prof.ingest_stage(), {"layout": fps["layout"]}
            ),
        )
    for en in run.en_shards:
        after = [("ingest", en)] if en in run.new_en_shards else []
        for lang in langs:
            window.add(
                ("translate", en, lang),
                after,
                lambda en=en, lang=lang: translate.submit(
                    root, en, lang, translate_cfg, list(params.formats), {"translate": fps["translate"]}
                ),
            )
    if params.queries:
        # queries per group once its pages exist; the mining index of a split once every page and
        # query exists; train shards query that index
        for en in run.en_shards:
            after = [("translate", en, lang) for lang in langs] + (
                [("ingest", en)] if en in run.new_en_shards else []
            )
            window.add(
                ("queries", en),
                after,
                lambda en=en: queries.submit(
                    root, en, langs, prof.queries, params.cross_lingual, params.split_fractions
                ),
            )
        everything = [k for k in window.jobs if k[0] in ("translate", "queries", "ingest")]
        for split in splits:
            window.add(
                ("index", split),
                everything,
                lambda split=split: index.submit(
                    root, prof.negatives, params.split_fractions, split, ENCODERS
                ),
            )
        for en in run.en_shards:
            window.add(
                ("train", en),
                [("index", s) for s in splits],
                lambda en=en: train.submit(root, en, prof.negatives, params.split_fractions, ENCODERS),
            )
    results = window.run(key="synthesize-progress")
    if window.failures:  # a rerun redoes exactly the failed shards (and those that need them)
        try:
            Manifest(root).compact()
        except Exception as exc:  # the store may be what failed: the shards' records are what count
            logger.warning("manifest.json not compacted: %s", describe(exc))
        raise ShardsFailed(window.failures, window.blocked)

    compacted = Manifest(root).compact()
    logger.info("manifest.json compacted: %(shards)d shards from %(records)d records", compacted)
    report = write_run_report(root, langs, with_queries=params.queries)
    create_markdown_artifact(
        report.markdown, key="synthesize-summary", description="pages per language, rejects, gallery"
    )
    worked = sum(not r["skipped"] for r in results)
    logger.info(
        "%d shard tasks, %d did work, %d skipped (complete)", len(results), worked, len(results) - worked
    )
    return run_result(root, langs, run.en_shards, results, report, throughput=window.throughput())


class ShardWindow:
    """Submit shard jobs as their inputs finish, with at most ``limit`` futures in flight.

    Jobs are added with the keys of the jobs they need; a job is submitted when all of those are done,
    downstream stages first (a group goes on to queries before more groups are ingested), so neither
    the flow process nor the task runner holds more than ``limit`` futures whatever the number of
    shards. Logs each stage's throughput (rows/s: pages for ingest and translate) as it goes, shows a
    Prefect progress artifact and a CLI bar.
    """

    ORDER = ("train", "index", "queries", "translate", "ingest")

    def __init__(self, limit: int, logger: Any, log_every_s: float = 15.0) -> None:
        self.limit = max(1, limit)
        self.logger = logger
        self.log_every_s = log_every_s
        self.jobs: dict[tuple[str, ...], tuple[list[tuple[str, ...]], Callable[[], Any]]] = {}
        self.stages: dict[str, dict[str, float]] = {}
        self.failures: dict[str, str] = {}  # failed job ("stage shard …") → why (after its retries)
        self.blocked: list[str] = []  # jobs not run because a job they need failed

    def add(self, key: tuple[str, ...], needs: Iterable[tuple[str, ...]], submit: Callable[[], Any]) -> None:
        self.jobs[key] = ([k for k in needs], submit)
        self.stages.setdefault(
            key[0], {"total": 0, "done": 0, "worked": 0, "rows": 0, "task_s": 0.0, "start": 0.0, "end": 0.0}
        )
        self.stages[key[0]]["total"] += 1

    def _stage_line(self, stage: str) -> str:
        st = self.stages[stage]
        busy = max(st["end"] - st["start"], 1e-9)
        unit = "pages" if stage in ("ingest", "translate") else "rows"
        return (
            f"{stage}: {int(st['done'])}/{int(st['total'])} shards ({int(st['worked'])} worked), "
            f"{int(st['rows'])} {unit}, {st['rows'] / busy:.2f} {unit}/s"
        )

    def throughput(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, st in self.stages.items():
            busy = max(st["end"] - st["start"], 1e-9)
            out[stage] = {
                "shards": int(st["total"]),
                "worked": int(st["worked"]),
                "rows": int(st["rows"]),
                "seconds": round(busy, 3),  # the stage's span (overlaps other stages)
                "task_seconds": round(st["task_s"], 3),  # summed over its tasks (cost, not span)
                "rows_per_s": round(st["rows"] / busy, 3) if st["worked"] else 0.0,
            }
        return out

    def _block(self, job: tuple[str, ...], dependents: dict, remaining: dict) -> None:
        """Drop every job that needs ``job``, transitively (recorded in ``blocked``)."""
        todo = list(dependents.pop(job, []))
        while todo:
            d = todo.pop()
            if remaining.pop(d, None) is not None:
                self.blocked.append(" ".join(d))
                self.stages[d[0]]["total"] -= 1
                todo += dependents.pop(d, [])

    def run(self, *, key: str) -> list[dict[str, Any]]:
        remaining = {k: set(needs) & set(self.jobs) for k, (needs, _) in self.jobs.items()}
        dependents: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for k, needs in remaining.items():
            for n in needs:
                dependents.setdefault(n, []).append(k)
        rank = {stage: i for i, stage in enumerate(self.ORDER)}
        ready = sorted((k for k, n in remaining.items() if not n), key=lambda k: (rank.get(k[0], 9), k))
        inflight: dict[Any, tuple[str, ...]] = {}
        results: list[dict[str, Any]] = []
        total = len(self.jobs)
        progress_id = create_progress_artifact(0.0, key=key, description="shards done")
        last_log = time.monotonic()
        blocked_before = 0
        with tqdm(total=total, desc="shards", unit="shard", disable=None) as bar:
            while ready or inflight:
                while ready and len(inflight) < self.limit:
                    job = ready.pop(0)
                    st = self.stages[job[0]]
                    st["start"] = st["start"] or time.monotonic()
                    inflight[self.jobs[job][1]()] = job
                fut = next(as_completed(list(inflight)))
                job = inflight.pop(fut)
                st = self.stages[job[0]]
                st["done"] += 1
                st["end"] = time.monotonic()
                newly = []
                try:
                    result = fut.result()
                except Exception as exc:  # failed after its retries: the jobs needing it never run
                    self.failures[" ".join(job)] = describe(exc)
                    self.logger.error("%s failed: %s", " ".join(job), describe(exc))
                    self._block(job, dependents, remaining)
                    total -= len(self.blocked) - blocked_before
                    blocked_before = len(self.blocked)
                    bar.total = total
                else:
                    results.append(result)
                    if not result["skipped"]:
                        st["worked"] += 1
                        st["rows"] += result["rows"]
                        st["task_s"] += float(result.get("seconds") or 0.0)
                    for d in dependents.pop(job, []):
                        if d not in remaining:  # blocked by another input that failed
                            continue
                        remaining[d].discard(job)
                        if not remaining[d]:
                            newly.append(d)
                if newly:
                    ready = sorted([*ready, *newly], key=lambda k: (rank.get(k[0], 9), k))
                bar.update(1)
                done = len(results) + len(self.failures)
                update_progress_artifact(progress_id, 100.0 * done / max(total, 1))
                now = time.monotonic()
                if st["done"] == st["total"] or now - last_log >= self.log_every_s:
                    self.logger.info(self._stage_line(job[0]))
                    last_log = now
        return results
