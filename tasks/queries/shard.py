"""Queries shard driver: the pages of one group (an English shard + its translations) → a queries shard."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.schema import DEFAULT_QUERY_KINDS, PAGES_SCHEMA, PageRecord, queries_table
from tasks.shards import Manifest, ShardResult, commit_stage, completed, config_hash, config_key
from tasks.splits import DEFAULT_FRACTIONS, assign_split
from tasks.storage import Store
from tasks.translate.shard import lang_shard_name


@lru_cache(maxsize=2)
def _generator(cfg_json: str):
    import json

    from tasks.queries.engines import build_query_generator

    return build_query_generator(json.loads(cfg_json))


def queries_shard_name(en_shard: str) -> str:
    return en_shard.replace("pages-en-", "queries-", 1)


def _group_pages(manifest: Manifest, en_shard: str, langs: list[str]) -> tuple[list[PageRecord], list[str]]:
    """All pages of a group (English + each language's shard), minus superseded sources.

    Reads the group's own records (one per language), never the whole root's listing."""
    names = [en_shard] + [lang_shard_name(en_shard, lang) for lang in langs]
    gone = list(manifest.superseded())
    pages: list[PageRecord] = []
    shas: list[str] = []
    for entry in (e for e in map(manifest.get, dict.fromkeys(names)) if e is not None):
        shas.append(entry.sha256)
        table = manifest.live_table(entry, schema=PAGES_SCHEMA, superseded=gone)
        pages += [PageRecord.from_row(r) for r in table.to_pylist()]
    return pages, shas


def queries_shard(
    root: Store | str | Path,
    en_shard: str,
    langs: list[str],
    profile: dict[str, Any],
    *,
    cross_lingual: bool = True,
    split_fractions: dict[str, float] | None = None,
) -> ShardResult:
    """Pages of one group → queries shard (+ rejects: generation failures and filtered queries)."""
    from tasks.queries.filters import FilterConfig
    from tasks.queries.pairing import synthesize_queries

    manifest = Manifest(root)
    cfg = dict(profile.get("queries", {}))
    all_langs = ["en", *[lang for lang in langs if lang != "en"]]
    pages, shas = _group_pages(manifest, en_shard, all_langs)
    cfg_hash = config_hash(
        {"cfg": cfg, "inputs": shas, "langs": all_langs, "cross": cross_lingual, "splits": split_fractions}
    )
    name = queries_shard_name(en_shard)
    rel = f"queries/{name}.parquet"
    if done := completed(manifest, name, cfg_hash, "queries", "", rel):
        return done

    gen_cfg = {k: v for k, v in cfg.items() if k not in ("filter", "kinds", "n")}
    generator = _generator(config_key(gen_cfg))
    rows, rejects = synthesize_queries(
        pages,
        generator,
        split_of=lambda sid: assign_split(sid, split_fractions),
        kinds=cfg.get("kinds", DEFAULT_QUERY_KINDS),
        n=int(cfg.get("n", 1)),
        cross_langs=all_langs if cross_lingual else (),
        filter_cfg=FilterConfig.from_config(cfg.get("filter")),
    )
    rows.sort(key=lambda r: (r["page_id"], r["query_id"]))
    return commit_stage(
        root,
        queries_table(rows),
        rejects,
        name=name,
        kind="queries",
        lang="",
        rel=rel,
        cfg_hash=cfg_hash,
        inputs=[en_shard],
        # downstream readers (eval.build) split pages exactly as these queries were split
        extra={"split_fractions": dict(split_fractions or DEFAULT_FRACTIONS)},
    )
