"""Queries stage: the pages of one group (an English shard + its translations) → a queries shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import check_config, plain
from tasks.queries.config import QueriesConfig
from tasks.schema import PAGES_SCHEMA, PageRecord, queries_table
from tasks.shards import ShardEntry, ShardResult, config_hash, config_key
from tasks.splits import DEFAULT_FRACTIONS, assign_split
from tasks.stage import ENGINES, ShardPlan, ShardStage, StageOutput, shard_name
from tasks.storage import Store


def queries_config(profile: Any) -> Any:
    """The ``[queries]`` table, typed and normalised (from a Profile, a profile mapping or the model)."""
    from pydantic import TypeAdapter

    from tasks.queries.filters import FilterConfig

    if not isinstance(profile, dict):
        return getattr(profile, "queries", profile)
    cfg = TypeAdapter(QueriesConfig).validate_python(profile.get("queries") or {})
    return cfg.model_copy(update={"filter": check_config("queries.filter", cfg.filter, FilterConfig)})


def load_generator(cfg: Any) -> Any:
    """The query generator of a ``[queries]`` config, once per process (its engine keys only)."""
    from tasks.queries.engines import build_query_generator

    gen_cfg = {k: v for k, v in plain(cfg).items() if k not in ("filter", "kinds", "n")}
    return ENGINES.get(("queries", config_key(gen_cfg)), lambda: build_query_generator(gen_cfg))


def queries_shard_name(en_shard: str) -> str:
    """The name of a group's queries shard."""
    return shard_name("queries", en_shard)


class QueriesStage(ShardStage):
    """Pages of one group → queries shard (+ rejects: bad replies and filtered queries). A query server
    that cannot answer raises (``tasks.faults.EndpointUnavailable``): nothing is recorded."""

    kind = "queries"

    def __init__(
        self,
        root: Store | str | Path,
        en_shard: str,
        langs: list[str],
        cfg: Any,
        *,
        cross_lingual: bool = True,
        split_fractions: dict[str, float] | None = None,
    ) -> None:
        super().__init__(root)
        self.en_shard = en_shard
        self.langs = ["en", *[lang for lang in langs if lang != "en"]]
        self.cfg = queries_config(cfg)
        self.cross_lingual = cross_lingual
        self.split_fractions = split_fractions

    def plan(self) -> ShardPlan:
        """From the group's completion records (one per language), never their pages."""
        names = [shard_name("pages", self.en_shard, lang) for lang in self.langs]
        self.entries: list[ShardEntry] = [e for e in map(self.manifest.get, dict.fromkeys(names)) if e]
        cfg_hash = config_hash(
            {
                "cfg": plain(self.cfg),
                "inputs": [e.sha256 for e in self.entries],
                "langs": self.langs,
                "cross": self.cross_lingual,
                "splits": self.split_fractions,
            }
        )
        name = queries_shard_name(self.en_shard)
        # downstream readers (eval.build) split pages exactly as these queries were split
        extra = {"split_fractions": dict(self.split_fractions or DEFAULT_FRACTIONS)}
        return ShardPlan(
            name, "", f"queries/{name}.parquet", cfg_hash, {"inputs": [self.en_shard], "extra": extra}
        )

    def process(self, plan: ShardPlan) -> StageOutput:
        from tasks.queries.filters import FilterConfig
        from tasks.queries.pairing import synthesize_queries

        gone = list(self.manifest.superseded())
        pages: list[PageRecord] = []
        for entry in self.entries:
            table = self.manifest.live_table(entry, schema=PAGES_SCHEMA, superseded=gone)
            pages += [PageRecord.from_row(r) for r in table.to_pylist()]
        rows, rejects = synthesize_queries(
            pages,
            load_generator(self.cfg),
            split_of=lambda sid: assign_split(sid, self.split_fractions),
            kinds=tuple(self.cfg.kinds),
            n=self.cfg.n,
            cross_langs=self.langs if self.cross_lingual else (),
            filter_cfg=FilterConfig.from_config(self.cfg.filter),
        )
        rows.sort(key=lambda r: (r["page_id"], r["query_id"]))
        return StageOutput(queries_table(rows), rejects)


def queries_shard(
    root: Store | str | Path,
    en_shard: str,
    langs: list[str],
    profile: Any,
    *,
    cross_lingual: bool = True,
    split_fractions: dict[str, float] | None = None,
) -> ShardResult:
    """Pages of one group → queries shard (+ rejects); ``profile``: the ``[queries]`` config or a profile."""
    stage = QueriesStage(
        root, en_shard, langs, profile, cross_lingual=cross_lingual, split_fractions=split_fractions
    )
    return stage.run()
