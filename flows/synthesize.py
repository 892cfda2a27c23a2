"""`synthesize` flow (pages half): English sources → English pages shards → translated pages shards.

Orchestration only: what runs after what, one Prefect task per shard, artifacts. The work lives in
:mod:`tasks.pages`; every task reads and writes shards by path, so no page data crosses Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field
from tqdm import tqdm

from tasks import languages
from tasks.models import build_recipe, load_profile
from tasks.pages import (
    changed_sources,
    done_en_shards,
    ingest_base_hash,
    ingest_config,
    ingest_shard_task,
    lang_shard_name,
    model_fingerprint,
    plan_en_shards,
    preload_engines,
    reject_unknown_langs,
    scan_sources,
    translate_config,
    translate_shard_task,
)
from tasks.report import summarize_run, summary_markdown
from tasks.shards import Manifest, write_bytes_atomic
from tasks.splits import DEFAULT_FRACTIONS
from tasks.trainset import queries_shard_task, queries_summary, train_shard_task

DEFAULT_LANGS = "hi,ar,zh,ta,th,ru"


class SynthesizeParams(BaseModel):
    """Parameters of the `synthesize` flow (rendered as a form in the Prefect UI)."""

    sources: str = Field("assets/samples", description="Directory, glob, or .txt list of PDF/image files.")
    langs: str = Field(
        DEFAULT_LANGS,
        description=f"Comma-separated ISO codes, or 'all' ({', '.join(languages.ALL_LANGS)}).",
    )
    profile: str = Field("tiny", description="Model profile name (assets/profiles/*.toml) or a TOML path.")
    out: str = Field("out/demo", description="Output root: shards, manifest, rejects, artifacts.")
    formats: list[Literal["png", "pdf"]] = Field(
        default_factory=lambda: ["png"],
        description="png: page images (always); pdf: also a one-page PDF with a shaped text layer.",
    )
    pages_per_shard: int = Field(512, ge=1, le=8192, description="Pages per shard (= per Prefect task).")
    workers: int = Field(2, ge=1, description="Shard tasks in parallel (threads) when no Dask is used.")
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler (tcp://host:8786): run shard tasks there."
    )
    dask_workers: int = Field(
        0, ge=0, description="> 0: start a local Dask cluster with this many worker processes for the run."
    )
    build_models: bool = Field(True, description="Build missing local recipe models before starting.")
    queries: bool = Field(True, description="Also synthesize queries and mine negatives into train shards.")
    cross_lingual: bool = Field(
        True, description="Also pair queries with the parallel pages in other languages."
    )
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_FRACTIONS),
        description="Share of source documents in train / dev / benchmark (split by document).",
    )


def prepare_models(profile: dict[str, Any], build: bool) -> dict[str, str]:
    """Build missing recipe models (if allowed) and fingerprint every stage's model once per run."""
    if build:
        for stage in ("layout", "translate"):
            source = profile.get(stage, {}).get("model", "")
            if source.startswith("recipe:"):
                build_recipe(source.split(":", 1)[1])
    return {
        "layout": model_fingerprint(ingest_config(profile)["layout"]),
        "translate": model_fingerprint(translate_config(profile, [])["translate"]),
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
    root = Path(params.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    profile = load_profile(params.profile)
    langs, unknown = languages.parse_langs(params.langs)
    fps = prepare_models(profile, params.build_models)
    preload_engines()
    manifest = Manifest(root)

    if unknown:
        reject_unknown_langs(root, unknown)
        logger.warning("skipping unknown language codes: %s", ", ".join(unknown))

    refs = scan_sources(params.sources)
    changed = changed_sources(refs, manifest)
    if changed:
        manifest.supersede({sid: f"changed: {uri}" for sid, uri in changed.items()})
        logger.info("%d source files changed since their last ingest; old versions superseded", len(changed))
    ingest_base = ingest_base_hash(profile, fps["layout"])
    source_ids = {r.source_id for r in refs}
    existing = done_en_shards(manifest, ingest_base, source_ids)
    done = set().union(*existing.values())
    plan = plan_en_shards(refs, params.pages_per_shard, done)
    logger.info(
        "%d sources, %d already done, %d new English shards, languages: %s",
        len(refs),
        len(done & source_ids),
        len(plan),
        ",".join(langs),
    )

    ingest_futures = {
        name: ingest_shard_task.submit(str(root), name, group, profile, {"layout": fps["layout"]})
        for name, group in plan.items()
    }
    en_shards = sorted(set(ingest_futures) | set(existing))
    translate_futures = {
        (en, lang): translate_shard_task.submit(
            str(root),
            en,
            lang,
            profile,
            list(params.formats),
            {"translate": fps["translate"]},
            wait_for=[ingest_futures[en]] if en in ingest_futures else [],
        )
        for en in en_shards
        for lang in langs
    }
    futures = list(ingest_futures.values()) + list(translate_futures.values())
    if params.queries:
        # queries per group once its pages exist; negatives once every page of the corpus exists
        query_futures = [
            queries_shard_task.submit(
                str(root),
                en,
                langs,
                profile,
                params.cross_lingual,
                params.split_fractions,
                wait_for=[f for (e, _), f in translate_futures.items() if e == en]
                + ([ingest_futures[en]] if en in ingest_futures else []),
            )
            for en in en_shards
        ]
        train_futures = [
            train_shard_task.submit(
                str(root),
                en,
                profile,
                params.split_fractions,
                wait_for=query_futures + list(translate_futures.values()),
            )
            for en in en_shards
        ]
        futures += query_futures + train_futures
    progress_id = create_progress_artifact(0.0, key="synthesize-progress", description="shards done")
    results: list[dict[str, Any]] = []
    with tqdm(total=len(futures), desc="shards", unit="shard", disable=None) as bar:
        for fut in as_completed(futures):
            results.append(fut.result())
            bar.update(1)
            update_progress_artifact(progress_id, 100.0 * len(results) / max(len(futures), 1))

    summary = summarize_run(root, gallery_langs=["en", *langs])
    qsum = queries_summary(root) if params.queries else None
    md = summary_markdown(summary, queries=qsum)
    write_bytes_atomic(
        summary_markdown(summary, queries=qsum, embed_images=False).encode(),
        root / "artifacts" / "summary.md",
    )
    create_markdown_artifact(md, key="synthesize-summary", description="pages per language, rejects, gallery")
    worked = [r for r in results if not r["skipped"]]
    logger.info(
        "%d shard tasks, %d did work, %d skipped (complete in manifest)",
        len(results),
        len(worked),
        len(results) - len(worked),
    )
    return {
        "out": str(root),
        "pages_per_lang": summary.pages_per_lang,
        "rejects_by_reason": summary.rejects_by_reason,
        "shards": sorted(results, key=lambda r: r["name"]),
        "shards_worked": len(worked),
        "queries": qsum,
        "manifest": str(manifest.path),
        "rejects_dir": str(root / "rejects"),
        "artifact": str(root / "artifacts" / "summary.md"),
        "lang_shards": {lang: [lang_shard_name(en, lang) for en in en_shards] for lang in langs},
    }
