"""Shard publication, completion records and the manifest index, content-hash ids, the rejects table.

The contract (DESIGN.md §2), safe on a local disk and on an object store shared by many machines:

1. A shard is published whole under its final name (:meth:`tasks.storage.Store.write_with`).
2. Then its **completion record** ``_records/<name>.json`` (rows, size, sha256, config hash, code
   version) is written: one small object per shard, one PUT, no global lock. A shard with a record is
   complete; a crash never leaves a half shard that looks done.
3. ``manifest.json`` is a **compacted index** of the records (:meth:`Manifest.compact`, at the end of a
   run and by ``m3dr manifest compact``), never a file every worker rewrites. Readers take the index
   and overlay the records it does not hold yet (one listing, then only the changed records are read).

A rerun skips a shard whose record matches the config hash and whose object has the recorded size: the
resume check reads one record and one object's size, never the shard's bytes. ``m3dr verify`` re-hashes
everything on demand. Writes are deterministic: same rows in ⇒ byte-identical file.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.schema import REJECTS_SCHEMA, SCHEMA_VERSION, Reject, rejects_table
from tasks.storage import Store, open_store

CODE_VERSION = f"m3dr-0.1.0+schema{SCHEMA_VERSION}"
MANIFEST_NAME = "manifest.json"
RECORDS_DIR = "_records"
SUPERSEDED_DIR = "_superseded"
MANIFEST_VERSION = 2
# Parquet writer options fixed here so every shard is written the same way (and reproducibly).
_PARQUET_OPTS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "row_group_size": 64,  # at most; see row_group_rows
    "write_statistics": True,
    "use_dictionary": ["lang", "text_source", "layout_model", "translation_model", "stage", "reason"],
}


def hash_id(*parts: str | bytes | int, n: int = 32) -> str:
    """Stable content-hash id from parts (joined unambiguously)."""
    h = hashlib.sha256()
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:n]


def config_hash(config: Any) -> str:
    """Hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# A row group is the unit a reader decodes: training reads one page by decoding its row group, so a
# group of 64 pages of ~200 KB PNG cost 12.8 MB read per page drawn (measured with
# benchmarks/train_scale.py: 120 ms per batch of 24 documents at 1,024 pages). Groups of ~2 MiB.
ROW_GROUP_BYTES = 2 << 20
MIN_ROW_GROUP_ROWS = 4


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group: ~``ROW_GROUP_BYTES`` of in-memory data, between 4 and 64 rows (small rows,
    e.g. train rows, keep 64). A function of the table only, so a shard's bytes stay reproducible."""
    if table.num_rows == 0:
        return _PARQUET_OPTS["row_group_size"]
    per_row = max(1, table.nbytes // table.num_rows)
    return max(MIN_ROW_GROUP_ROWS, min(_PARQUET_OPTS["row_group_size"], ROW_GROUP_BYTES // per_row))


def write_table(store: Store, rel: str, table: pa.Table) -> tuple[str, int]:
    """Publish a Parquet table under ``rel`` with the project's fixed writer options; (sha256, size)."""
    opts = dict(_PARQUET_OPTS)
    opts["row_group_size"] = row_group_rows(table)
    opts["use_dictionary"] = [c for c in opts["use_dictionary"] if c in table.column_names]
    return store.write_with(rel, lambda tmp: pq.write_table(table, tmp, **opts), suffix=".parquet")


def read_table(store: Store | str | Path, rel: str, schema: pa.Schema | None = None) -> pa.Table:
    return open_store(store).read_table(rel, schema=schema)


@dataclass
class ShardEntry:
    """One completion record: a complete shard in the store."""

    name: str
    kind: str  # pages | queries | train | rejects | index
    lang: str
    path: str  # relative to the output root
    rows: int
    sha256: str
    config_hash: str
    code_version: str = CODE_VERSION
    sources: list[str] = field(default_factory=list)  # source units covered (pages-en shards)
    inputs: list[str] = field(default_factory=list)  # shard names this one was derived from
    extra: dict[str, Any] = field(default_factory=dict)
    bytes: int = -1  # object size; -1 in entries from before records (then resume re-hashes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardEntry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _stamp(info: dict[str, Any]) -> str:
    """What changes whenever a record object is rewritten (S3/GCS ETag; local size, mtime, inode)."""
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified')}:{info.get('ino', '')}"


def record_rel(name: str) -> str:
    return f"{RECORDS_DIR}/{name}.json"


class Manifest:
    """The completion records of an output root, with ``manifest.json`` as their compacted index.

    Writers only ever write their own record (no lock, no read-modify-write), so any number of threads,
    processes and machines can record shards into one root at once. ``entries()`` is the full view:
    the index overlaid by the records written (or rewritten) since it was compacted.
    """

    def __init__(self, root: Store | str | Path) -> None:
        self.store = open_store(root)
        self.root = self.store.url
        self.path = self.store.url_of(MANIFEST_NAME)
        self._index: dict[str, Any] | None = None

    # ---------------------------------------------------------------- the compacted index
    def _read_index(self) -> dict[str, Any]:
        data = self.store.read_json(MANIFEST_NAME) or {}
        data.setdefault("shards", {})
        data.setdefault("superseded", {})
        data.setdefault("stamps", {})
        return data

    def index(self) -> dict[str, Any]:
        """The compacted index as last read by this instance (read on first use)."""
        if self._index is None:
            self._index = self._read_index()
        return self._index

    def _view(self) -> tuple[dict[str, ShardEntry], dict[str, str]]:
        """(entries, superseded): the index overlaid by records it does not hold (one listing each)."""
        index = self._index = self._read_index()
        stamps = index["stamps"]
        raw = dict(index["shards"])
        for rel, info in self.store.list(RECORDS_DIR, ".json").items():
            name = rel[len(RECORDS_DIR) + 1 : -len(".json")]
            if stamps.get(name) == _stamp(info) and name in raw:
                continue
            data = self.store.read_json(rel)
            if data is not None:
                raw[name] = data
        entries = {k: ShardEntry.from_dict(v) for k, v in raw.items() if not v.get("removed")}
        return entries, self._superseded(index)

    def _superseded(self, index: dict[str, Any]) -> dict[str, str]:
        superseded = dict(index["superseded"])
        for rel in self.store.list(SUPERSEDED_DIR, ".json"):
            sid = rel[len(SUPERSEDED_DIR) + 1 : -len(".json")]
            if sid not in superseded:
                data = self.store.read_json(rel) or {}
                superseded[sid] = data.get("reason", "")
        return superseded

    def compact(self) -> dict[str, int]:
        """Rewrite ``manifest.json`` from the records (safe at any time: records stay the truth)."""
        index = self._read_index()
        stamps: dict[str, str] = {}
        shards: dict[str, Any] = {}
        for rel, info in self.store.list(RECORDS_DIR, ".json").items():
            name = rel[len(RECORDS_DIR) + 1 : -len(".json")]
            if index["stamps"].get(name) == _stamp(info) and name in index["shards"]:
                data = index["shards"][name]
            else:
                data = self.store.read_json(rel)
            if data is None:
                continue
            stamps[name] = _stamp(info)
            shards[name] = data
        for name, data in index["shards"].items():  # entries of a v1 manifest that have no record
            shards.setdefault(name, data)
        superseded = self._superseded(index)
        live = {k: v for k, v in sorted(shards.items()) if not v.get("removed")}
        out = {
            "version": MANIFEST_VERSION,
            "code_version": CODE_VERSION,
            "shards": live,
            "stamps": {k: stamps[k] for k in live if k in stamps},
            "superseded": dict(sorted(superseded.items())),
        }
        self.store.put_json(MANIFEST_NAME, out)
        self._index = out
        return {"shards": len(live), "records": len(stamps), "superseded": len(superseded)}

    # ---------------------------------------------------------------- records
    def record(self, entry: ShardEntry) -> None:
        """Write ``entry``'s completion record (one PUT; the shard's data must already be published)."""
        self.store.put_json(record_rel(entry.name), asdict(entry))

    def remove(self, name: str, reason: str) -> None:
        """Mark a shard as not done (a tombstone record): the next run recomputes it."""
        self.store.put_json(record_rel(name), {"name": name, "removed": True, "reason": reason})

    def get(self, name: str) -> ShardEntry | None:
        """One shard's entry: its record (one GET), else the compacted index's (roots from before records)."""
        data = self.store.read_json(record_rel(name))
        if data is None:
            data = self.index()["shards"].get(name)
        if data is None or data.get("removed"):
            return None
        return ShardEntry.from_dict(data)

    def entries(self) -> dict[str, ShardEntry]:
        return self._view()[0]

    def supersede(self, source_ids: dict[str, str]) -> None:
        """Mark sources whose file changed (``{source_id: reason}``); readers skip their pages."""
        for sid, reason in sorted(source_ids.items()):
            self.store.put_json(f"{SUPERSEDED_DIR}/{sid}.json", {"source_id": sid, "reason": reason})

    def superseded(self) -> dict[str, str]:
        index = self._index = self._read_index()
        return self._superseded(index)

    def is_complete(self, name: str, cfg_hash: str, *, verify: bool = False) -> bool:
        """True when ``name`` is recorded for this config and its object has the recorded size.

        Reads one record and one object's size; ``verify=True`` also re-hashes the object's bytes
        (what ``m3dr verify`` does), as does an entry from before sizes were recorded.
        """
        entry = self.get(name)
        if entry is None or entry.config_hash != cfg_hash:
            return False
        return self.intact(entry, verify=verify)

    def intact(self, entry: ShardEntry, *, verify: bool = False) -> bool:
        size = self.store.size(entry.path)
        if size is None or (entry.bytes >= 0 and size != entry.bytes):
            return False
        if verify or entry.bytes < 0:
            return self.store.sha256(entry.path) == entry.sha256
        return True

    def covered_sources(self) -> set[str]:
        """Source units that already have a complete English pages shard."""
        out: set[str] = set()
        for e in self.entries().values():
            if e.kind == "pages" and e.lang == "en":
                out.update(e.sources)
        return out

    def shards(self, kind: str, lang: str | None = None) -> list[ShardEntry]:
        return [e for e in self.entries().values() if e.kind == kind and (lang is None or e.lang == lang)]

    def live_table(
        self,
        entry: ShardEntry,
        columns: list[str] | None = None,
        *,
        schema: pa.Schema | None = None,
        superseded: Iterable[str] | None = None,
    ) -> pa.Table:
        """One shard's rows minus those of superseded sources (their file changed and a newer version
        was ingested): what every reader of pages, queries and train rows sees. Callers reading many
        shards pass ``superseded`` (read once) so the records are not listed again per shard."""
        gone = sorted(self.superseded() if superseded is None else superseded)
        cols = None if columns is None else list(dict.fromkeys([*columns, "source_id"]))
        table = self.store.read_table(entry.path, columns=cols, schema=schema)
        if gone:
            table = table.filter(pc.invert(pc.is_in(table["source_id"], value_set=pa.array(gone))))
        return table if columns is None else table.select(columns)

    def live_rows(
        self, kind: str, columns: list[str] | None = None, *, schema: pa.Schema | None = None
    ) -> Iterator[dict[str, Any]]:
        """Live rows (see :meth:`live_table`) of every shard of ``kind``, shards in name order; the
        records are listed once for the whole pass. ``schema`` reads shards written before a column was
        added (it comes back null)."""
        entries, superseded = self._view()
        gone = list(superseded)
        for entry in sorted((e for e in entries.values() if e.kind == kind), key=lambda e: e.name):
            yield from self.live_table(entry, columns, schema=schema, superseded=gone).to_pylist()


def commit_shard(
    root: Store | str | Path,
    table: pa.Table,
    *,
    name: str,
    kind: str,
    lang: str,
    rel_path: str,
    cfg_hash: str,
    sources: Iterable[str] = (),
    inputs: Iterable[str] = (),
    extra: dict[str, Any] | None = None,
) -> ShardEntry:
    """Publish ``table`` under ``root/rel_path``, then its completion record (last)."""
    store = open_store(root)
    sha, size = write_table(store, rel_path, table)
    entry = ShardEntry(
        name=name,
        kind=kind,
        lang=lang,
        path=rel_path,
        rows=table.num_rows,
        sha256=sha,
        config_hash=cfg_hash,
        sources=sorted(sources),
        inputs=sorted(inputs),
        extra=extra or {},
        bytes=size,
    )
    Manifest(store).record(entry)
    return entry


def commit_rejects(
    root: Store | str | Path, rejects: list[Reject], *, name: str, cfg_hash: str
) -> ShardEntry:
    """Write a rejects shard (possibly empty: an empty one proves the stage ran clean)."""
    return commit_shard(
        root,
        rejects_table(rejects),
        name=name,
        kind="rejects",
        lang="",
        rel_path=f"rejects/{name}.parquet",
        cfg_hash=cfg_hash,
    )


def read_rejects(root: Store | str | Path) -> pa.Table:
    """All rejects of an output root as one table (the rejects table)."""
    manifest = Manifest(root)
    tables = [manifest.store.read_table(e.path, schema=REJECTS_SCHEMA) for e in manifest.shards("rejects")]
    return pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()


def config_key(cfg: dict[str, Any]) -> str:
    """A canonical JSON string of an engine config: the key of per-process engine caches."""
    return json.dumps(cfg, sort_keys=True)


@dataclass
class ShardResult:
    """What a shard task reports back to the flow (small: names and counts, never page data)."""

    name: str
    kind: str
    lang: str
    path: str
    rows: int
    rejects: int
    skipped: bool
    stats: dict[str, Any] = field(default_factory=dict)

    seconds: float = 0.0  # the shard task's own wall time (set by the task wrapper)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def timed(fn: Callable[..., ShardResult], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a shard driver and return its result as a dict with the task's own wall time (for the
    flow's per-stage throughput: the sum of task seconds, not the stage's overlapping span)."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    result.seconds = round(time.perf_counter() - t0, 4)
    return result.to_dict()


def completed(
    manifest: Manifest, name: str, cfg_hash: str, kind: str, lang: str, rel: str
) -> ShardResult | None:
    """The skip result when ``name`` is already complete for this config (the resume check of every
    stage: one record read and one object size, no shard bytes)."""
    entry = manifest.get(name)
    if entry is None or entry.config_hash != cfg_hash or not manifest.intact(entry):
        return None
    return ShardResult(name, kind, lang, rel, entry.rows, 0, skipped=True)


def commit_stage(
    root: Store | str | Path,
    table: Any,
    rejects: list[Reject],
    *,
    name: str,
    kind: str,
    lang: str,
    rel: str,
    cfg_hash: str,
    **entry: Any,
) -> ShardResult:
    """Write a stage's rejects shard, then its output shard, whose manifest entry marks the stage done."""
    commit_rejects(root, rejects, name=f"rejects-{name}", cfg_hash=cfg_hash)
    commit_shard(root, table, name=name, kind=kind, lang=lang, rel_path=rel, cfg_hash=cfg_hash, **entry)
    return ShardResult(name, kind, lang, rel, table.num_rows, len(rejects), False, entry.get("extra") or {})


@dataclass
class VerifyReport:
    """What ``m3dr verify`` found: shards checked, damaged ones (name → why), and those removed."""

    checked: int = 0
    bytes: int = 0
    damaged: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)


def verify_root(root: Store | str | Path, *, repair: bool = False) -> VerifyReport:
    """Re-hash every recorded shard of an output root against its record (reads every byte, on demand).

    With ``repair`` each damaged (missing, resized or re-hashed) shard gets a tombstone record and its
    object is deleted, so the next synthesize run with the run's parameters recomputes exactly those
    shards (deterministic writes: the same bytes as before, so shards derived from them stay valid).
    """
    manifest = Manifest(root)
    store = manifest.store
    report = VerifyReport()
    for name, entry in sorted(manifest.entries().items()):
        report.checked += 1
        size = store.size(entry.path)
        if size is None:
            report.damaged[name] = f"missing: {entry.path}"
            continue
        report.bytes += size
        if entry.bytes >= 0 and size != entry.bytes:
            report.damaged[name] = f"size {size} bytes, recorded {entry.bytes}"
        elif store.sha256(entry.path) != entry.sha256:
            report.damaged[name] = "sha256 differs from the record"
    if repair and report.damaged:
        for name, why in report.damaged.items():
            entry = manifest.get(name)
            manifest.remove(name, f"verify: {why}")
            if entry is not None:
                store.delete(entry.path)
            report.removed.append(name)
        manifest.compact()
    return report


RUNS_DIR = "_runs"


def record_run_params(root: Store | str | Path, params: dict[str, Any]) -> str:
    """Keep a run's parameters (no secrets: paths, languages, profile name) under ``_runs/``, so
    ``m3dr verify --repair`` can rerun what made the root. One object per distinct parameter set."""
    store = open_store(root)
    rel = f"{RUNS_DIR}/{config_hash(params)}.json"
    if store.size(rel) is None:
        store.put_json(rel, params)
    return rel


def recorded_runs(root: Store | str | Path) -> list[dict[str, Any]]:
    store = open_store(root)
    return [store.read_json(rel) or {} for rel in store.list(RUNS_DIR, ".json")]
