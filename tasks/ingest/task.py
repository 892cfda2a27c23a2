"""Prefect task of the ingest stage (one task per shard, never per page)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.ingest.config import IngestStageConfig
from tasks.ingest.shard import ingest_shard
from tasks.ingest.sources import SourceRef
from tasks.shards import timed


@task(name="ingest-shard", task_run_name="ingest {shard_name}", retries=1, retry_delay_seconds=5)
def ingest_shard_task(
    root: str, shard_name: str, sources: list[SourceRef], cfg: IngestStageConfig, model_fps: dict[str, str]
) -> dict[str, Any]:
    """Prefect wrapper of :func:`ingest_shard` (one task per shard, never per page)."""
    return timed(ingest_shard, root, shard_name, sources, cfg, model_fps=model_fps)
