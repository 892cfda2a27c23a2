"""Train shard driver: the queries of one group + negatives mined against the same split's index.

A train shard never reads the corpus: ``bm25`` / ``dense`` query the split's mining index
(``index.py``, loaded once per process), which also lists each positive's parallel pages; ``in-batch``
mines nothing and reads only its own group's pages shards (ids, for the parallel pages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.encoders import EncoderTable, PageView
from tasks.languages import LANGUAGES
from tasks.queries.shard import queries_shard_name
from tasks.schema import QUERIES_SCHEMA, Reject, train_table
from tasks.shards import Manifest, ShardResult, commit_stage, completed, config_hash
from tasks.splits import assign_split
from tasks.storage import Store
from tasks.translate.shard import lang_shard_name


def train_shard_name(en_shard: str) -> str:
    return en_shard.replace("pages-en-", "train-", 1)


def group_shards(en_shard: str) -> list[str]:
    """The pages shard names a group can have: its English shard and one per language."""
    return [en_shard, *(lang_shard_name(en_shard, lang) for lang in sorted(LANGUAGES) if lang != "en")]


def group_corpus(manifest: Manifest, en_shard: str) -> tuple[list[PageView], dict[str, str]]:
    """The live pages of one group (its English shard and its translations) as text-less PageViews, and
    ``page_id → source_id``: what ``in-batch`` needs (positives, parallel pages). One record read per
    language, no listing."""
    cols = ["page_id", "source_page_id", "source_id", "lang"]
    gone = list(manifest.superseded())
    corpus: list[PageView] = []
    source_of: dict[str, str] = {}
    for entry in (e for e in map(manifest.get, group_shards(en_shard)) if e is not None):
        for row in manifest.live_table(entry, cols, superseded=gone).to_pylist():
            corpus.append(PageView(row["page_id"], row["source_page_id"], row["lang"], ""))
            source_of[row["page_id"]] = row["source_id"]
    return corpus, source_of


def train_shard(
    root: Store | str | Path,
    en_shard: str,
    profile: dict[str, Any],
    *,
    split_fractions: dict[str, float] | None = None,
    splits: tuple[str, ...] = ("train", "dev"),
    engines: EncoderTable | None = None,
) -> ShardResult:
    """Queries of one group (train/dev splits) + negatives mined against the same split's index.

    Cost: its queries × one index search (the index is built by ``index_split_task`` beforehand; pages
    shards it does not cover yet are indexed here first, once). ``engines``: the dense encoder's engine
    table, from the flow (``training.encoders.ENCODERS``) when tasks/ lacks the engine.
    """
    from tasks.negatives.base import QueryView
    from tasks.negatives.index import negatives_config, split_index
    from tasks.negatives.miners import InBatchMiner, build_miner
    from tasks.negatives.search import mine_with_index
    from tasks.negatives.selection import mine_negatives, mined_to_train_rows, miner_label

    manifest = Manifest(root)
    store = manifest.store
    q_entry = manifest.get(queries_shard_name(en_shard))
    if q_entry is None:
        raise FileNotFoundError(f"queries shard of {en_shard} is not in the manifest of {store}")
    cfg = dict(profile.get("negatives", {}))
    # The corpus is not part of the hash on purpose: a refresh that adds documents mines the new
    # groups against the grown corpus (index) and leaves the train shards already written alone
    # (append-only).
    cfg_hash = config_hash({"cfg": cfg, "queries": q_entry.sha256, "splits": [split_fractions, splits]})
    name = train_shard_name(en_shard)
    rel = f"train/{name}.parquet"
    if done := completed(manifest, name, cfg_hash, "train", "", rel):
        return done

    cfg = negatives_config(profile)
    miner = build_miner(cfg, engines)
    params = miner.params
    label = miner_label(miner, params)
    query_rows = [
        r for r in store.read_table(q_entry.path, schema=QUERIES_SCHEMA).to_pylist() if r["split"] in splits
    ]
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    group: tuple[list[PageView], dict[str, str]] | None = None
    for split in splits:
        qs = [r for r in query_rows if r["split"] == split]
        if not qs:
            continue
        views = [QueryView.from_row(r) for r in qs]
        if isinstance(miner, InBatchMiner):
            if group is None:
                group = group_corpus(manifest, en_shard)
            corpus_all, source_of = group
            corpus = [p for p in corpus_all if assign_split(source_of[p.page_id], split_fractions) == split]
            mined = mine_negatives(views, corpus, miner, rejects=rejects)
            parallel: Any = corpus
        else:
            # the group's pages shards holding this split's positives must be in the index
            own = sorted({lang_shard_name(en_shard, r["target_lang"]) for r in qs} | {en_shard})
            index = split_index(store, profile, split_fractions, split, shards=own, engines=engines)
            encoder = getattr(miner, "encoder", None)
            mined = mine_with_index(
                views, index, params, label=label, cfg=cfg, encoder=encoder, rejects=rejects
            )
            parallel = {spid: index.parallel(spid) for spid in {q.source_page_id for q in views}}
        for row in mined_to_train_rows(qs, mined, parallel):
            row["split"] = split
            rows.append(row)
    rows.sort(key=lambda r: r["query_id"])
    stats = {
        "negatives_per_query": (sum(len(r["negative_page_ids"]) for r in rows) / len(rows)) if rows else 0.0,
        "queries": len(rows),
        "miner": rows[0]["miner"] if rows else "",
    }
    return commit_stage(
        store,
        train_table(rows),
        rejects,
        name=name,
        kind="train",
        lang="",
        rel=rel,
        cfg_hash=cfg_hash,
        inputs=[q_entry.name],
        extra=stats,
    )
