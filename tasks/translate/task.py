"""Prefect task of the translate + render stage (one task per shard and language)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.shards import timed
from tasks.translate.config import TranslateStageConfig
from tasks.translate.shard import translate_shard


@task(name="translate-shard", task_run_name="translate {en_shard} → {lang}", retries=1, retry_delay_seconds=5)
def translate_shard_task(
    root: str,
    en_shard: str,
    lang: str,
    cfg: TranslateStageConfig,
    formats: list[str],
    model_fps: dict[str, str],
) -> dict[str, Any]:
    """Prefect wrapper of :func:`translate_shard`."""
    return timed(translate_shard, root, en_shard, lang, cfg, formats, model_fps=model_fps)
