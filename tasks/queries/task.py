"""Prefect task of the queries stage (one task per group of shards)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.queries.shard import queries_shard
from tasks.shards import timed


@task(name="queries-shard", task_run_name="queries {en_shard}", retries=1, retry_delay_seconds=5)
def queries_shard_task(
    root: str,
    en_shard: str,
    langs: list[str],
    cfg: Any,  # tasks.queries.config.QueriesConfig
    cross_lingual: bool,
    split_fractions: dict[str, float] | None,
) -> dict[str, Any]:
    """Prefect wrapper of :func:`queries_shard`."""
    return timed(
        queries_shard,
        root,
        en_shard,
        langs,
        cfg,
        cross_lingual=cross_lingual,
        split_fractions=split_fractions,
    )
