"""One shard life cycle, written once (in the spirit of datatrove's ``PipelineStep``).

Every stage makes one output shard from recorded inputs the same way:

1. :meth:`ShardStage.plan` names the shard and hashes what decides its content, from completion records
   only (one record per input, never a shard's bytes), so the resume check is cheap;
2. a shard whose record matches is skipped (:func:`tasks.shards.completed`);
3. :meth:`ShardStage.process` loads the engine once per process (:data:`ENGINES`, thread-safe), reads the
   inputs and returns rows + rejects (bad input);
4. :func:`tasks.shards.commit_stage` publishes the rejects, the shard, then its completion record.

A broken world (``tasks.faults``) raises out of ``process``: nothing is written for the shard, the
Prefect task fails and is retried. Shard names of a group come from :func:`shard_name`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from tasks.schema import Reject
from tasks.shards import Manifest, ShardResult, commit_stage, completed
from tasks.storage import Store

T = TypeVar("T")

EN_PREFIX = "pages-en-"


def group_id(en_shard: str) -> str:
    """The group id of an English pages shard name (``pages-en-<id>`` → ``<id>``)."""
    if not en_shard.startswith(EN_PREFIX):
        raise ValueError(f"not an English pages shard name: {en_shard!r} (expected {EN_PREFIX}<id>)")
    return en_shard[len(EN_PREFIX) :]


def shard_name(kind: Literal["pages", "queries", "train"], en_shard: str, lang: str = "en") -> str:
    """The name of a group's shard: ``pages-<lang>-<id>``, ``queries-<id>`` or ``train-<id>``."""
    gid = group_id(en_shard)
    return f"pages-{lang}-{gid}" if kind == "pages" else f"{kind}-{gid}"


class EngineCache:
    """Engines of this process by key, least recently used dropped past ``maxsize``.

    Thread-safe: threads missing the same key at once load it once (the others wait for it); a load
    that raises caches nothing, so the next call tries again.
    """

    def __init__(self, maxsize: int = 8) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}
        self.loads = 0  # engines loaded (tests read it)

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = load()
            with self._lock:
                self.loads += 1
                self._items[key] = value
                while len(self._items) > self.maxsize:
                    self._items.popitem(last=False)
                self._loading.pop(key, None)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


ENGINES = EngineCache()


@dataclass
class ShardPlan:
    """What a stage will make, decided from records only: the name, where, and the config hash."""

    name: str
    lang: str
    rel: str
    cfg_hash: str
    entry: dict[str, Any] = field(default_factory=dict)  # more fields of the completion record


@dataclass
class StageOutput:
    """What :meth:`ShardStage.process` returns: the shard's table and the rejects of bad input."""

    table: Any
    rejects: list[Reject]
    extra: dict[str, Any] = field(default_factory=dict)  # stored in the record and reported


class ShardStage(ABC):
    """A stage that makes one shard: subclasses say what (``plan``) and how (``process``)."""

    kind: ClassVar[str]  # the record's kind: pages, queries or train

    def __init__(self, root: Store | str | Path) -> None:
        self.manifest = Manifest(root)
        self.store = self.manifest.store

    @abstractmethod
    def plan(self) -> ShardPlan:
        """Name and config hash of the shard, from the inputs' completion records (no shard bytes)."""

    @abstractmethod
    def process(self, plan: ShardPlan) -> StageOutput:
        """Read the inputs, run the engine: rows + rejects. A broken world raises."""

    def run(self) -> ShardResult:
        """Skip a complete shard; else process and commit it (rejects, shard, then its record)."""
        plan = self.plan()
        if done := completed(self.manifest, plan.name, plan.cfg_hash, self.kind, plan.lang, plan.rel):
            return done
        out = self.process(plan)
        entry = dict(plan.entry)
        if out.extra:
            entry["extra"] = {**entry.get("extra", {}), **out.extra}
        result = commit_stage(
            self.store,
            out.table,
            out.rejects,
            name=plan.name,
            kind=self.kind,
            lang=plan.lang,
            rel=plan.rel,
            cfg_hash=plan.cfg_hash,
            **entry,
        )
        result.stats = dict(out.extra)  # reported to the flow (the plan's record fields are not)
        return result
