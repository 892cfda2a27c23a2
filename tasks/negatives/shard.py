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
from tasks.shards import Manifest, ShardResult, config_hash
from tasks.splits import assign_split
from tasks.stage import ShardPlan, ShardStage, StageOutput, shard_name
from tasks.storage import Store
from tasks.translate.shard import lang_shard_name


def train_shard_name(en_shard: str) -> str:
    """The name of a group's train shard."""
    return shard_name("train", en_shard)


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


class TrainStage(ShardStage):
    """Queries of one group (train/dev splits) + negatives mined against the same split's index.

    Cost: its queries × one index search (the index is built by ``index_split_task`` beforehand; pages
    shards it does not cover yet are indexed here first, once). ``engines``: the dense encoder's engine
    table, from the flow (``training.encoders.ENCODERS``) when tasks/ lacks the engine.
    """

    kind = "train"

    def __init__(
        self,
        root: Store | str | Path,
        en_shard: str,
        cfg: Any,
        *,
        split_fractions: dict[str, float] | None = None,
        splits: tuple[str, ...] = ("train", "dev"),
        engines: EncoderTable | None = None,
    ) -> None:
        from tasks.negatives.config import NegativesConfig
        from tasks.negatives.index import negatives_config

        super().__init__(root)
        self.en_shard, self.cfg = en_shard, negatives_config(cfg)  # normalised table: miners read it
        self.config = NegativesConfig.model_validate(self.cfg)  # typed: what the index functions take
        self.split_fractions, self.splits, self.engines = split_fractions, splits, engines
        self._group: tuple[list[PageView], dict[str, str]] | None = None  # in-batch: read once, if needed

    def plan(self) -> ShardPlan:
        self.q_entry = self.manifest.get(queries_shard_name(self.en_shard))
        if self.q_entry is None:
            raise FileNotFoundError(
                f"queries shard of {self.en_shard} is not in the manifest of {self.store}"
            )
        # The corpus is not part of the hash on purpose: a refresh that adds documents mines the new
        # groups against the grown corpus (index) and leaves the train shards already written alone
        # (append-only).
        cfg_hash = config_hash(
            {"cfg": self.cfg, "queries": self.q_entry.sha256, "splits": [self.split_fractions, self.splits]}
        )
        name = train_shard_name(self.en_shard)
        return ShardPlan(name, "", f"train/{name}.parquet", cfg_hash, {"inputs": [self.q_entry.name]})

    def process(self, plan: ShardPlan) -> StageOutput:
        from tasks.negatives.miners import build_miner

        miner = build_miner(self.cfg, self.engines)
        query_rows = [
            r
            for r in self.store.read_table(self.q_entry.path, schema=QUERIES_SCHEMA).to_pylist()
            if r["split"] in self.splits
        ]
        rows: list[dict[str, Any]] = []
        rejects: list[Reject] = []
        for split in self.splits:
            qs = [r for r in query_rows if r["split"] == split]
            if qs:
                rows += self._mine(miner, split, qs, rejects)
        rows.sort(key=lambda r: r["query_id"])
        stats = {
            "negatives_per_query": (sum(len(r["negative_page_ids"]) for r in rows) / len(rows))
            if rows
            else 0.0,
            "queries": len(rows),
            "miner": rows[0]["miner"] if rows else "",
        }
        return StageOutput(train_table(rows), rejects, stats)

    def _mine(self, miner: Any, split: str, qs: list[dict], rejects: list[Reject]) -> list[dict[str, Any]]:
        """Train rows of one split's queries: in-batch over the group's own pages, else the split index."""
        from tasks.negatives.base import QueryView
        from tasks.negatives.index import split_index
        from tasks.negatives.miners import InBatchMiner
        from tasks.negatives.search import mine_with_index
        from tasks.negatives.selection import mine_negatives, mined_to_train_rows, miner_label

        views = [QueryView.from_row(r) for r in qs]
        if isinstance(miner, InBatchMiner):
            if self._group is None:
                self._group = group_corpus(self.manifest, self.en_shard)
            corpus_all, source_of = self._group
            corpus = [
                p for p in corpus_all if assign_split(source_of[p.page_id], self.split_fractions) == split
            ]
            mined = mine_negatives(views, corpus, miner, rejects=rejects)
            parallel: Any = corpus
        else:
            # the group's pages shards holding this split's positives must be in the index
            own = sorted({lang_shard_name(self.en_shard, r["target_lang"]) for r in qs} | {self.en_shard})
            index = split_index(
                self.store, self.config, self.split_fractions, split, shards=own, engines=self.engines
            )
            label = miner_label(miner, miner.params)
            encoder = getattr(miner, "encoder", None)
            mined = mine_with_index(
                views, index, miner.params, label=label, cfg=self.cfg, encoder=encoder, rejects=rejects
            )
            parallel = {spid: index.parallel(spid) for spid in {q.source_page_id for q in views}}
        rows = mined_to_train_rows(qs, mined, parallel)
        for row in rows:
            row["split"] = split
        return rows


def train_shard(
    root: Store | str | Path,
    en_shard: str,
    profile: Any,
    *,
    split_fractions: dict[str, float] | None = None,
    splits: tuple[str, ...] = ("train", "dev"),
    engines: EncoderTable | None = None,
) -> ShardResult:
    """Queries of one group + negatives (+ rejects); ``profile``: the ``[negatives]`` config or a profile."""
    stage = TrainStage(
        root, en_shard, profile, split_fractions=split_fractions, splits=splits, engines=engines
    )
    return stage.run()
