"""Train shard driver: the queries of one group + negatives mined over the same split's corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.encoders import PageView
from tasks.queries.shard import queries_shard_name
from tasks.schema import QUERIES_SCHEMA, train_table
from tasks.shards import Manifest, ShardResult, commit_stage, completed, config_hash, read_table
from tasks.splits import assign_split


def train_shard_name(en_shard: str) -> str:
    return en_shard.replace("pages-en-", "train-", 1)


def load_corpus(manifest: Manifest, *, with_images: bool = False) -> tuple[list[PageView], dict[str, str]]:
    """Every live page of the output root as PageViews (text only unless ``with_images``), and
    ``page_id → source_id`` (splits are decided per source document)."""
    cols = ["page_id", "source_page_id", "source_id", "lang", "text"] + (["image"] if with_images else [])
    corpus: list[PageView] = []
    source_of: dict[str, str] = {}
    for row in manifest.live_rows("pages", cols):
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
    from tasks.negatives.base import QueryView
    from tasks.negatives.miners import build_miner
    from tasks.negatives.selection import mine_negatives, mined_to_train_rows

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
