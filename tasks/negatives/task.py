"""Prefect task of the negatives stage (one train shard per group)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from tasks.negatives.shard import train_shard


@task(name="train-shard", task_run_name="negatives {en_shard}", retries=1, retry_delay_seconds=5)
def train_shard_task(
    root: str, en_shard: str, profile: dict[str, Any], split_fractions: dict[str, float] | None
) -> dict[str, Any]:
    """Prefect wrapper of :func:`train_shard`."""
    return train_shard(Path(root), en_shard, profile, split_fractions=split_fractions).to_dict()
