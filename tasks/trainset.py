"""Shard-level work of the second half of `synthesize`: queries shards and train shards.

A *group* is one English pages shard plus its translations (shards derive 1:1 from English shards,
so every parallel group lies inside one group). Per group: pages → queries shard (monolingual and
cross-lingual queries, filtered) → train shard (negatives mined against the whole corpus of the
same split). Like :mod:`tasks.pages`, each function is idempotent through the manifest.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks.encoders import PageView
from tasks.pages import ShardResult, _key, commit_stage, completed, lang_shard_name
from tasks.schema import PAGES_SCHEMA, QUERIES_SCHEMA, TRAIN_SCHEMA, PageRecord
from tasks.shards import Manifest, config_hash, read_table
from tasks.splits import DEFAULT_FRACTIONS, assign_split


def queries_shard_name(en_shard: str) -> str:
    return en_shard.replace("pages-en-", "queries-", 1)


def train_shard_name(en_shard: str) -> str:
    return en_shard.replace("pages-en-", "train-", 1)


@lru_cache(maxsize=2)
def _generator(cfg_json: str):
    import json

    from tasks.queries import build_query_generator

    return build_query_generator(json.loads(cfg_json))


def _group_pages(manifest: Manifest, en_shard: str, langs: list[str]) -> tuple[list[PageRecord], list[str]]:
    """All pages of a group (English + each language's shard), minus superseded sources."""
    gone = set(manifest.superseded())
    names = [en_shard] + [lang_shard_name(en_shard, lang) for lang in langs]
    pages: list[PageRecord] = []
    shas: list[str] = []
    for name in names:
        entry = manifest.get(name)
        if entry is None:
            continue
        shas.append(entry.sha256)
        for row in read_table(manifest.root / entry.path, PAGES_SCHEMA).to_pylist():
            if row["source_id"] not in gone:
                pages.append(PageRecord.from_row(row))
    return pages, shas


def queries_shard(
    root: Path,
    en_shard: str,
    langs: list[str],
    profile: dict[str, Any],
    *,
    cross_lingual: bool = True,
    split_fractions: dict[str, float] | None = None,
) -> ShardResult:
    """Pages of one group → queries shard (+ rejects: generation failures and filtered queries)."""
    from tasks.queries import FilterConfig, synthesize_queries

    root = Path(root)
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
    generator = _generator(_key(gen_cfg))
    rows, rejects = synthesize_queries(
        pages,
        generator,
        split_of=lambda sid: assign_split(sid, split_fractions),
        kinds=cfg.get("kinds", ("keyword", "phrase", "factual", "paraphrase")),
        n=int(cfg.get("n", 1)),
        cross_langs=all_langs if cross_lingual else (),
        filter_cfg=FilterConfig.from_config(cfg.get("filter")),
    )
    rows.sort(key=lambda r: (r["page_id"], r["query_id"]))
    return commit_stage(
        root,
        pa.Table.from_pylist(rows, schema=QUERIES_SCHEMA),
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


def load_corpus(manifest: Manifest, *, with_images: bool = False) -> tuple[list[PageView], dict[str, str]]:
    """Every live page of the output root as PageViews (text only unless ``with_images``), and
    ``page_id → source_id`` (splits are decided per source document)."""
    gone = set(manifest.superseded())
    cols = ["page_id", "source_page_id", "source_id", "lang", "text"] + (["image"] if with_images else [])
    corpus: list[PageView] = []
    source_of: dict[str, str] = {}
    for entry in sorted(manifest.shards("pages"), key=lambda e: e.name):
        for row in pq.read_table(manifest.root / entry.path, columns=cols).to_pylist():
            if row["source_id"] not in gone:
                corpus.append(PageView.from_row(row))
                source_of[row["page_id"]] = row["source_id"]
    return corpus, source_of


def train_shard(
    root: Path,
    en_shard: str,
    profile: dict[str, Any],
    *,
    split_fractions: dict[str, float] | None = None,
    splits: tuple[str, ...] = ("train", "dev"),
) -> ShardResult:
    """Queries of one group (train/dev splits) + negatives mined over the same split's corpus."""
    from tasks.negatives import QueryView, build_miner, mine_negatives, mined_to_train_rows

    root = Path(root)
    manifest = Manifest(root)
    q_entry = manifest.get(queries_shard_name(en_shard))
    if q_entry is None:
        raise FileNotFoundError(f"queries shard of {en_shard} is not in the manifest of {root}")
    cfg = dict(profile.get("negatives", {}))
    # The corpus is not part of the hash on purpose: a refresh that adds documents mines the new
    # groups against the grown corpus and leaves the train shards already written alone (append-only).
    cfg_hash = config_hash({"cfg": cfg, "queries": q_entry.sha256, "splits": [split_fractions, splits]})
    name = train_shard_name(en_shard)
    rel = f"train/{name}.parquet"
    if done := completed(manifest, name, cfg_hash, "train", "", rel):
        return done

    miner = build_miner(cfg)
    query_rows = [
        r for r in read_table(root / q_entry.path, QUERIES_SCHEMA).to_pylist() if r["split"] in splits
    ]
    corpus_all, source_of = load_corpus(manifest)
    split_of_page = {pid: assign_split(sid, split_fractions) for pid, sid in source_of.items()}
    rows: list[dict[str, Any]] = []
    rejects = []
    for split in splits:
        qs = [r for r in query_rows if r["split"] == split]
        if not qs:
            continue
        corpus = [p for p in corpus_all if split_of_page[p.page_id] == split]
        params = getattr(miner, "params", None)
        kw = (
            {
                "k": params.k,
                "top_n": params.top_n,
                "margin": params.margin,
                "seed": params.seed,
                "modality": params.modality,
            }
            if params is not None
            else {}
        )
        mined = mine_negatives([QueryView.from_row(r) for r in qs], corpus, miner, rejects=rejects, **kw)
        for row in mined_to_train_rows(qs, mined, corpus):
            row["split"] = split
            rows.append(row)
    rows.sort(key=lambda r: r["query_id"])
    stats = {
        "negatives_per_query": (sum(len(r["negative_page_ids"]) for r in rows) / len(rows)) if rows else 0.0,
        "queries": len(rows),
        "miner": rows[0]["miner"] if rows else "",
    }
    return commit_stage(
        root,
        pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA),
        rejects,
        name=name,
        kind="train",
        lang="",
        rel=rel,
        cfg_hash=cfg_hash,
        inputs=[q_entry.name],
        extra=stats,
    )


def queries_summary(root: Path) -> dict[str, Any]:
    """Counts for the artifact: queries per language and kind, cross-lingual share, negatives per query."""
    manifest = Manifest(root)
    per_lang_kind: Counter[str] = Counter()
    cross = 0
    total = 0
    for e in manifest.shards("queries"):
        t = pq.read_table(root / e.path, columns=["query_lang", "kind", "cross_lingual"]).to_pylist()
        for r in t:
            if not r["cross_lingual"]:
                per_lang_kind[f"{r['query_lang']}/{r['kind']}"] += 1
            cross += int(r["cross_lingual"])
            total += 1
    negs = [
        len(r)
        for e in manifest.shards("train")
        for r in pq.read_table(root / e.path, columns=["negative_page_ids"]).column(0).to_pylist()
    ]
    return {
        "queries": total,
        "cross_lingual": cross,
        "mono_per_lang_kind": dict(sorted(per_lang_kind.items())),
        "train_rows": len(negs),
        "negatives_per_query": (sum(negs) / len(negs)) if negs else math.nan,
    }


@task(name="queries-shard", task_run_name="queries {en_shard}", retries=1, retry_delay_seconds=5)
def queries_shard_task(
    root: str,
    en_shard: str,
    langs: list[str],
    profile: dict[str, Any],
    cross_lingual: bool,
    split_fractions: dict[str, float] | None,
) -> dict[str, Any]:
    """Prefect wrapper of :func:`queries_shard`."""
    return queries_shard(
        Path(root), en_shard, langs, profile, cross_lingual=cross_lingual, split_fractions=split_fractions
    ).to_dict()


@task(name="train-shard", task_run_name="negatives {en_shard}", retries=1, retry_delay_seconds=5)
def train_shard_task(
    root: str, en_shard: str, profile: dict[str, Any], split_fractions: dict[str, float] | None
) -> dict[str, Any]:
    """Prefect wrapper of :func:`train_shard`."""
    return train_shard(Path(root), en_shard, profile, split_fractions=split_fractions).to_dict()
