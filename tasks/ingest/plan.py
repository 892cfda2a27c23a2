"""Shard planning of the ingest stage: which source pages still need an English pages shard, and in
which shard.

No shard holds more than ``pages_per_shard`` pages: a longer source is split into page ranges
(``<source id>@<start>-<stop>`` units, ranges aligned to multiples of ``pages_per_shard``), and small
sources are packed together. Shard names and config hashes are content hashes, so the same sources and
config always plan the same shards, and a rerun (or a refresh) plans only the pages not yet covered.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tasks.config import plain, stage_config
from tasks.ingest.config import IngestStageConfig
from tasks.ingest.sources import SourceRef, parse_unit, source_page_count
from tasks.shards import Manifest, config_hash, hash_id


def ingest_config(profile: Any) -> IngestStageConfig:
    """The part of a profile that decides English pages shards' content, typed (a Profile, a profile
    mapping, or the sub-config itself)."""
    return stage_config(IngestStageConfig, profile)


# Layout keys that decide whether a checkpoint may load, not what it computes (the model fingerprint
# covers the weights): pinning a checkpoint must not invalidate shards made with it.
TRUST_KEYS = ("sha256", "trust_unpinned")
# Layout keys that decide where and how fast, not what: which of the machine's GPUs (always), and on CPU
# the pages per driver call (each page still gets its own model call there: bit-identical output,
# tests/tasks/ingest/test_layout_batch.py) and ``half`` (CPU runs fp32 whatever it says). On CUDA,
# batch_size and half stay in the hash: fp16, and kernels chosen by batch shape, move boxes.
PLACEMENT_KEYS = ("device_index",)
CPU_SPEED_KEYS = ("batch_size", "half")


def layout_hash_view(layout: dict[str, Any]) -> dict[str, Any]:
    """The part of a normalised ``[layout]`` table that decides the regions it detects."""
    drop = set(TRUST_KEYS) | set(PLACEMENT_KEYS)
    if not str(layout.get("device", "cpu")).strip().lower().startswith("cuda"):
        drop |= set(CPU_SPEED_KEYS)
    return {k: v for k, v in layout.items() if k not in drop}


def ingest_base_hash(profile: Any, layout_fp: str) -> str:
    """Hash of everything but the sources that decides an English shard (normalised config + layout
    model)."""
    cfg = plain(ingest_config(profile))
    cfg["layout"] = layout_hash_view(cfg["layout"])
    return config_hash({"cfg": cfg, "models": {"layout": layout_fp}})


def en_shard_name(units: list[str]) -> str:
    """Name of the English shard covering these source units (whole sources keep their old names)."""
    return f"pages-en-{hash_id(*sorted(units), n=16)}"


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
    """Complete English shards made with this ingest config: ``{shard name: its source units}``
    (only shards holding a unit of one of ``source_ids`` when given)."""
    out: dict[str, set[str]] = {}
    for e in manifest.shards("pages", "en"):
        if e.extra.get("ingest_base") != ingest_base:
            continue
        if source_ids is None or any(parse_unit(u)[0] in source_ids for u in e.sources):
            out[e.name] = set(e.sources)
    return out


def covered_pages(units: set[str]) -> dict[str, list[tuple[int, int | None]]]:
    """``{source id: [(start, stop)]}`` of the units already ingested (stop None = the whole source)."""
    out: dict[str, list[tuple[int, int | None]]] = {}
    for unit in units:
        sid, span = parse_unit(unit)
        out.setdefault(sid, []).append((0, None) if span is None else span)
    return out


def _uncovered(n: int, covered: list[tuple[int, int | None]]) -> list[tuple[int, int]]:
    """Spans of ``range(n)`` that no covered range holds."""
    if any(stop is None for _, stop in covered):
        return []
    taken = [False] * n
    for start, stop in covered:
        for i in range(max(start, 0), min(int(stop), n)):  # type: ignore[arg-type]
            taken[i] = True
    spans: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if taken[i]:
            i += 1
            continue
        j = i
        while j < n and not taken[j]:
            j += 1
        spans.append((i, j))
        i = j
    return spans


def plan_units(refs: list[SourceRef], pages_per_shard: int, done: set[str]) -> list[tuple[SourceRef, int]]:
    """The source units still to ingest, with their page counts.

    A source that fits a shard and has no page done stays whole (its unit is its source id); a longer
    one, or one partly done (a killed run), is cut into ranges aligned to multiples of
    ``pages_per_shard`` over its pages not yet covered, so a resumed run plans the same ranges the
    interrupted one did.
    """
    covered = covered_pages(done)
    units: list[tuple[SourceRef, int]] = []
    for ref in sorted(refs, key=lambda r: r.source_id):
        n = source_page_count(ref)
        have = covered.get(ref.source_id, [])
        if not have and n <= pages_per_shard:
            units.append((ref, n))
            continue
        for start, stop in _uncovered(n, have):
            a = start
            while a < stop:
                b = min(stop, (a // pages_per_shard + 1) * pages_per_shard)
                units.append((replace(ref, pages=(a, b)), b - a))
                a = b
    return units


def plan_en_shards(refs: list[SourceRef], pages_per_shard: int, done: set[str]) -> dict[str, list[SourceRef]]:
    """Pack the units not yet covered (see :func:`plan_units`) into shards of at most ``pages_per_shard``
    pages.

    Packing is by source id and page so the same new sources always give the same shards; units already
    in a complete shard (``done``) are left alone, which is what makes refreshes append-only.
    """
    if pages_per_shard < 1:
        raise ValueError(f"pages_per_shard must be at least 1, got {pages_per_shard}")
    shards: list[list[SourceRef]] = []
    current: list[SourceRef] = []
    pages = 0
    for ref, n in plan_units(refs, pages_per_shard, done):
        if current and pages + n > pages_per_shard:
            shards.append(current)
            current, pages = [], 0
        current.append(ref)
        pages += n
    if current:
        shards.append(current)
    return {en_shard_name([r.unit for r in group]): group for group in shards}
