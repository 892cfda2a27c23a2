"""Shard planning of the ingest stage: which sources still need an English pages shard, and in which shard.

Shard names and config hashes are content hashes, so the same sources and config always plan the same
shards and a rerun (or a refresh) plans only what is missing.
"""

from __future__ import annotations

from typing import Any

from tasks.ingest.sources import SourceRef, source_page_count
from tasks.shards import Manifest, config_hash, hash_id


def ingest_config(profile: dict[str, Any]) -> dict[str, Any]:
    """The part of a profile that decides English pages shards' content."""
    return {
        "ingest": profile.get("ingest", {}),
        "layout": profile.get("layout", {}),
        "extract": profile.get("extract", {}),
    }


def ingest_base_hash(profile: dict[str, Any], layout_fp: str) -> str:
    """Hash of everything but the sources that decides an English shard (config + layout model)."""
    return config_hash({"cfg": ingest_config(profile), "models": {"layout": layout_fp}})


def en_shard_name(source_ids: list[str]) -> str:
    return f"pages-en-{hash_id(*sorted(source_ids), n=16)}"


def changed_sources(refs: list[SourceRef], manifest: Manifest) -> dict[str, str]:
    """Recorded source ids whose file (same uri) now has different content: ``{old_id: uri}``.

    Their pages stay on disk (shards are immutable) but are marked superseded in the manifest, so
    later stages and readers skip them; the new content is ingested as a new source.
    """
    current = {r.uri: r.source_id for r in refs}
    out: dict[str, str] = {}
    for entry in manifest.shards("pages", "en"):
        for sid, uri in entry.extra.get("uris", {}).items():
            if uri in current and current[uri] != sid:
                out[sid] = uri
    return out


def done_en_shards(
    manifest: Manifest, ingest_base: str, source_ids: set[str] | None = None
) -> dict[str, set[str]]:
    """Complete English shards made with this ingest config: ``{shard name: its source ids}``
    (only shards holding one of ``source_ids`` when given)."""
    return {
        e.name: set(e.sources)
        for e in manifest.shards("pages", "en")
        if e.extra.get("ingest_base") == ingest_base and (source_ids is None or set(e.sources) & source_ids)
    }


def plan_en_shards(refs: list[SourceRef], pages_per_shard: int, done: set[str]) -> dict[str, list[SourceRef]]:
    """Pack sources that are not yet covered into shards of at most ``pages_per_shard`` pages.

    Packing is by source id so the same new sources always give the same shards; sources already in
    a complete shard (``done``) are left alone, which is what makes refreshes append-only.
    """
    todo = sorted((r for r in refs if r.source_id not in done), key=lambda r: r.source_id)
    shards: list[list[SourceRef]] = []
    current: list[SourceRef] = []
    pages = 0
    for ref in todo:
        n = source_page_count(ref)
        if current and pages + n > pages_per_shard:
            shards.append(current)
            current, pages = [], 0
        current.append(ref)
        pages += n
    if current:
        shards.append(current)
    return {en_shard_name([r.source_id for r in group]): group for group in shards}
