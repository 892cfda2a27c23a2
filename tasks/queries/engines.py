"""The query engine table: profile ``[queries].engine`` → generator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tasks.config import check_config
from tasks.queries.base import QueryGenerator
from tasks.queries.extractive import ExtractiveQueryGenerator
from tasks.queries.vllm import VllmQueryGenerator

# ---------------------------------------------------------------------------- factory
ENGINES: dict[str, Callable[[dict[str, Any]], QueryGenerator]] = {
    "vllm": VllmQueryGenerator.from_config,
    "extractive": ExtractiveQueryGenerator.from_config,
}


def build_query_generator(cfg: dict[str, Any]) -> QueryGenerator:
    """A generator from a profile's ``[queries]`` table (``engine`` = one of ``ENGINES``)."""
    from tasks.queries.config import DEFAULT_ENGINE, QUERY_CONFIGS

    engine = dict(cfg).get("engine", DEFAULT_ENGINE)
    if engine not in ENGINES:
        raise ValueError(f"unknown query engine {engine!r}; known: {', '.join(sorted(ENGINES))}")
    return ENGINES[engine](check_config("queries", cfg, QUERY_CONFIGS[engine]))  # normalised
