"""Query synthesis data types and the engine protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tasks.schema import DEFAULT_QUERY_KINDS, PageRecord, Region, Reject

STAGE = "queries"


DEFAULT_KINDS = DEFAULT_QUERY_KINDS


# ---------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class QueryRequest:
    """Ask for ``n`` queries of each of ``kinds`` about one page, written in ``query_lang``.

    ``regions`` (the page's layout regions: label, bbox in page-image pixels, text, rendered) and
    ``image_png`` are what kind ``composed`` crops its figures, tables and formulas from.
    """

    page_id: str
    lang: str  # the page's language (ISO 639-1)
    text: str  # the page's region text in reading order
    image_png: bytes | None = None
    kinds: tuple[str, ...] = DEFAULT_KINDS
    n: int = 1
    query_lang: str = ""  # '' → the page's language (monolingual)
    regions: tuple[Region, ...] = ()

    @property
    def out_lang(self) -> str:
        return self.query_lang or self.lang


@dataclass(frozen=True)
class GeneratedQuery:
    """One query an engine wrote for one page (kind ``composed``: with the region crop it asks about)."""

    query: str
    query_lang: str
    kind: str
    page_id: str
    generator: str  # engine:model
    prompt_version: str
    image_png: bytes | None = None  # composed queries: the crop (PNG); None for text queries


@dataclass(frozen=True)
class PageRef:
    """The few page fields query rows need (no image bytes)."""

    page_id: str
    source_page_id: str
    source_id: str
    lang: str

    @classmethod
    def of(cls, page: PageRecord | dict[str, Any]) -> PageRef:
        if isinstance(page, PageRecord):
            return cls(page.page_id, page.source_page_id, page.source_id, page.lang)
        return cls(page["page_id"], page["source_page_id"], page["source_id"], page["lang"])


@dataclass(frozen=True)
class PairedQuery:
    """A query with its positive page (same language, or the parallel page in another language)."""

    query: GeneratedQuery
    page: PageRef
    cross_lingual: bool


@runtime_checkable
class QueryGenerator(Protocol):
    """What every query engine offers. ``generate`` is synchronous (engines may run asyncio inside)."""

    name: str
    model_id: str
    prompt_version: str

    def generate(self, requests: list[QueryRequest]) -> list[GeneratedQuery]: ...

    def generate_with_rejects(
        self, requests: list[QueryRequest]
    ) -> tuple[list[GeneratedQuery], list[Reject]]: ...
