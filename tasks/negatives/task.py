"""Prefect tasks of the negatives stage: the mining index of a split, then one train shard per group."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.encoders import EncoderTable
from tasks.negatives.config import NegativesConfig
from tasks.negatives.index import build_split_index
from tasks.negatives.shard import train_shard
from tasks.shards import timed


@task(name="mining-index", task_run_name="index {split}", retries=1, retry_delay_seconds=5)
def index_split_task(
    root: str,
    negatives: NegativesConfig,
    split_fractions: dict[str, float] | None,
    split: str,
    engines: EncoderTable | None = None,
) -> dict[str, Any]:
    """Prefect wrapper of :func:`build_split_index` (run once per split after all pages and queries);
    ``engines``: the flow's encoder engine table (module-level functions: they pickle for Dask)."""
    return timed(build_split_index, root, negatives, split_fractions, split, engines)


@task(name="train-shard", task_run_name="negatives {en_shard}", retries=1, retry_delay_seconds=5)
def train_shard_task(
    root: str,
    en_shard: str,
    negatives: NegativesConfig,
    split_fractions: dict[str, float] | None,
    engines: EncoderTable | None = None,
) -> dict[str, Any]:
    """Prefect wrapper of :func:`train_shard` (after the index tasks of its splits)."""
    return timed(train_shard, root, en_shard, negatives, split_fractions=split_fractions, engines=engines)
