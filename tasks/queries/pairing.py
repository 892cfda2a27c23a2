"""Pairing generated queries with pages (monolingual and cross-lingual) and query rows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tasks.queries.base import (
    DEFAULT_KINDS,
    GeneratedQuery,
    PageRef,
    PairedQuery,
    QueryGenerator,
    QueryRequest,
)
from tasks.queries.filters import FilterConfig, filter_queries
from tasks.schema import COMPOSED_KIND, QUERY_KINDS, PageRecord, QueryRecord, Reject, image_value
from tasks.shards import hash_id


# ---------------------------------------------------------------------------- pairing and rows
def monolingual_pairs(queries: Iterable[GeneratedQuery], pages: dict[str, PageRef]) -> list[PairedQuery]:
    """Each query with the page it was written for (query language = page language)."""
    out = []
    for q in queries:
        page = pages.get(q.page_id)
        if page is not None and page.lang == q.query_lang:
            out.append(PairedQuery(q, page, cross_lingual=False))
    return out


def pages_by_group_lang(pages: Iterable[PageRef]) -> dict[str, dict[str, PageRef]]:
    """source_page_id → {lang: page}: one page per language of each English original."""
    groups: dict[str, dict[str, PageRef]] = {}
    for p in pages:
        groups.setdefault(p.source_page_id, {})[p.lang] = p
    return groups


def cross_lingual_pairs(
    queries: Iterable[GeneratedQuery], pages: dict[str, PageRef], langs: Sequence[str]
) -> list[PairedQuery]:
    """For every ordered pair (A, B) of ``langs``, A ≠ B: each monolingual query written in A for a page
    paired with the parallel page in B (same ``source_page_id``), ``cross_lingual=True``.

    A pair is skipped only where the group has no page in B (e.g. its translation was rejected).
    """
    wanted = list(dict.fromkeys(langs))
    groups = pages_by_group_lang(pages.values())
    out = []
    for q in queries:
        page = pages.get(q.page_id)
        if page is None or page.lang != q.query_lang or page.lang not in wanted:
            continue
        group = groups.get(page.source_page_id, {})
        for b in wanted:
            if b != page.lang and b in group:
                out.append(PairedQuery(q, group[b], cross_lingual=True))
    return out


def query_id(q: GeneratedQuery, page_id: str) -> str:
    """Content hash of the query; a composed query's also covers its crop (same question, two crops:
    two queries). Text queries keep the ids they always had."""
    parts = [q.query, q.query_lang, page_id, q.generator, q.prompt_version]
    if q.image_png:
        parts.append(hashlib.sha256(q.image_png).hexdigest())
    return hash_id(*parts)


def query_rows(pairs: Iterable[PairedQuery], split_of: Callable[[str], str]) -> list[dict[str, Any]]:
    """Rows of :class:`tasks.schema.QueryRecord` (``QUERIES_SCHEMA``'s columns); ``split_of(source_id)``
    decides the split.

    ``query_id`` is a content hash of (query, query_lang, positive page_id, generator, prompt_version,
    + the crop's sha256 for composed queries); a repeated id is written once. A composed query's crop
    goes in the ``image`` cell (the same pixels for every positive: figures are never re-rendered).
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in pairs:
        q = p.query
        if q.kind not in QUERY_KINDS:
            raise ValueError(f"query kind {q.kind!r} is not one of {QUERY_KINDS}")
        qid = query_id(q, p.page.page_id)
        if qid in seen:
            continue
        seen.add(qid)
        record = QueryRecord(
            query_id=qid,
            query=q.query,
            query_lang=q.query_lang,
            kind=q.kind,
            page_id=p.page.page_id,
            target_lang=p.page.lang,
            cross_lingual=p.cross_lingual,
            source_page_id=p.page.source_page_id,
            source_id=p.page.source_id,
            split=split_of(p.page.source_id),
            generator=q.generator,
            prompt_version=q.prompt_version,
            image=image_value(q.image_png, qid) if q.kind == COMPOSED_KIND else None,
        )
        rows.append(record.to_row())
    return rows


def requests_for_pages(
    pages: Iterable[PageRecord], kinds: Sequence[str] = DEFAULT_KINDS, n: int = 1, *, with_image: bool = True
) -> list[QueryRequest]:
    """One monolingual request per page: its text and regions, its image when ``with_image`` or when
    ``composed`` is asked for (the crops are cut from it, whatever the engine)."""
    image = with_image or COMPOSED_KIND in kinds
    return [
        QueryRequest(
            p.page_id,
            p.lang,
            p.text,
            p.image_png if image else None,
            tuple(kinds),
            n,
            regions=tuple(p.regions),
        )
        for p in pages
    ]


def synthesize_queries(
    pages: Sequence[PageRecord],
    generator: QueryGenerator,
    *,
    split_of: Callable[[str], str],
    kinds: Sequence[str] = DEFAULT_KINDS,
    n: int = 1,
    cross_langs: Sequence[str] = (),
    filter_cfg: FilterConfig | None = None,
) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Pages → generated → filtered → monolingual (+ cross-lingual over ``cross_langs``) query rows."""
    requests = requests_for_pages(pages, kinds, n, with_image=bool(getattr(generator, "vision", False)))
    generated, rejects = generator.generate_with_rejects(requests)
    texts = {p.page_id: p.text for p in pages}
    kept, dropped = filter_queries(generated, texts, filter_cfg)
    refs = {p.page_id: PageRef.of(p) for p in pages}
    pairs = monolingual_pairs(kept, refs)
    if cross_langs:
        pairs += cross_lingual_pairs(kept, refs, cross_langs)
    return query_rows(pairs, split_of), rejects + dropped
