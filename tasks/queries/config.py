"""Config models of the queries stage: ``[queries]`` (engine + kinds) and ``[queries.filter]``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tasks.config import StrictModel, engine_union
from tasks.llm.client import EndpointConfig
from tasks.llm.images import DEFAULT_IMAGE_FORMAT, DEFAULT_MAX_IMAGE_SIDE, ImageFormat
from tasks.queries.base import DEFAULT_KINDS


class ComposedConfig(StrictModel):
    """``[queries.composed]``: which page regions become composed (crop + question) queries, and how
    the crops are cut (see ``tasks.queries.composed``)."""

    min_side: int = Field(default=32, ge=1)  # px: both sides of the region box at least this
    min_area_share: float = Field(default=0.01, ge=0.0, le=1.0)  # region box area / page area
    max_side: int = Field(default=896, ge=1)  # px: longer crops are downscaled (aspect ratio kept)
    margin: int = Field(default=8, ge=0)  # px around the box, never reaching into another region


class QueriesStage(StrictModel):
    """Keys of ``[queries]`` every engine shares: which kinds, how many per kind, the filter table."""

    kinds: tuple[str, ...] = DEFAULT_KINDS
    n: int = 1  # queries per kind and page; composed: up to n regions per page, one query each
    filter: dict[str, Any] | None = None  # FilterConfig fields (checked on their own)
    composed: ComposedConfig = ComposedConfig()


class ExtractiveConfig(QueriesStage):
    """``[queries] engine = "extractive"``: spans of the page's own text (deterministic)."""

    engine: Literal["extractive"] = "extractive"
    keywords: tuple[int, int] = (2, 4)  # words per keyword query (min, max)
    phrase_units: tuple[int, int] = (4, 8)  # word-equivalents per phrase query


class VllmQueriesConfig(QueriesStage, EndpointConfig):
    """``[queries] engine = "vllm"``: an OpenAI-compatible server (``vllm serve <VLM>``)."""

    engine: Literal["vllm"] = "vllm"
    prompt: str = "queries_v1"
    composed_prompt: str = "composed_v1"  # prompt of kind "composed" (one question about a region crop)
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int | None = None
    max_query_chars: int = 200
    max_page_chars: int = Field(default=6000, ge=0)  # page text of a request without an image
    # page text of a request that carries the page image (or a region crop): the image shows the page
    max_page_chars_with_image: int = Field(default=1500, ge=0)
    vision: bool = False  # send the page image (base64 data URL) to a vision model
    # longest side of the image sent (px): the model's input size (Gemma-3: 896); larger images are
    # downscaled by the client, aspect ratio kept
    max_image_side: int = Field(default=DEFAULT_MAX_IMAGE_SIDE, ge=1)
    image_format: ImageFormat = DEFAULT_IMAGE_FORMAT  # jpeg (fixed quality) or png
    strip_page_instructions: bool = True
    bad_reply_retries: int = 1
    seed: int | None = None


QUERY_CONFIGS = {"extractive": ExtractiveConfig, "vllm": VllmQueriesConfig}
DEFAULT_ENGINE = "extractive"  # the [queries] engine when the table names none

QueriesConfig = engine_union("engine", DEFAULT_ENGINE, QUERY_CONFIGS)
