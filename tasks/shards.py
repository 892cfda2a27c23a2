"""Atomic shard IO, the run manifest, content-hash ids and the rejects table.

The contract (DESIGN.md §2): a shard is written to a temporary name, fsynced and renamed; the manifest
entry (rows, sha256, config hash, code version) is recorded last, so a shard that is in the manifest is
complete and a crash never leaves a half shard that looks done. A rerun skips shards whose entry is
complete for the same config hash. Writes are deterministic: same rows in ⇒ byte-identical file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.schema import REJECTS_SCHEMA, SCHEMA_VERSION, Reject, rejects_table

CODE_VERSION = f"m3dr-0.1.0+schema{SCHEMA_VERSION}"
MANIFEST_NAME = "manifest.json"
# Parquet writer options fixed here so every shard is written the same way (and reproducibly).
_PARQUET_OPTS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "row_group_size": 64,  # pages carry PNG bytes: small row groups keep readers' memory bounded
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it and rename it onto ``path``.

    Readers never see a partial file; on any failure the temp file is removed and ``path`` keeps its
    old content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write bytes to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_table_atomic(table: pa.Table, path: Path) -> str:
    """Write a Parquet table atomically with the project's fixed writer options; returns its sha256."""
    opts = dict(_PARQUET_OPTS)
    opts["use_dictionary"] = [c for c in opts["use_dictionary"] if c in table.column_names]
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, **opts))
    return file_sha256(path)


def read_table(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    return pq.read_table(path, schema=schema)


@dataclass
class ShardEntry:
    """One manifest entry: a complete shard on disk."""

    name: str
    kind: str  # pages | rejects
    lang: str
    path: str  # relative to the output root
    rows: int
    sha256: str
    config_hash: str
    code_version: str = CODE_VERSION
    sources: list[str] = field(default_factory=list)  # source_ids covered (pages-en shards)
    inputs: list[str] = field(default_factory=list)  # shard names this one was derived from
    extra: dict[str, Any] = field(default_factory=dict)


class Manifest:
    """The JSON manifest of an output root, updated under an exclusive file lock.

    The lock (``fcntl.flock`` on a side file) makes concurrent updates from threads and processes
    on one machine safe; each update re-reads the file, so writers never drop each other's entries.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / MANIFEST_NAME
        self._lock_path = self.root / ".manifest.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": 1, "shards": {}}
        return json.loads(self.path.read_text())

    def entries(self) -> dict[str, ShardEntry]:
        return {k: ShardEntry(**v) for k, v in self._read()["shards"].items()}

    def get(self, name: str) -> ShardEntry | None:
        return self.entries().get(name)

    def record(self, entry: ShardEntry) -> None:
        with self._locked():
            data = self._read()
            data["shards"][entry.name] = asdict(entry)
            data["shards"] = dict(sorted(data["shards"].items()))
            write_bytes_atomic(json.dumps(data, indent=1, sort_keys=True).encode() + b"\n", self.path)

    def supersede(self, source_ids: dict[str, str]) -> None:
        """Mark sources whose file changed (``{source_id: reason}``); readers skip their pages."""
        if not source_ids:
            return
        with self._locked():
            data = self._read()
            data.setdefault("superseded", {}).update(source_ids)
            data["superseded"] = dict(sorted(data["superseded"].items()))
            write_bytes_atomic(json.dumps(data, indent=1, sort_keys=True).encode() + b"\n", self.path)

    def superseded(self) -> dict[str, str]:
        return dict(self._read().get("superseded", {}))

    def is_complete(self, name: str, cfg_hash: str, *, verify: bool = True) -> bool:
        """True when ``name`` is recorded for this config and its file is intact on disk."""
        entry = self.get(name)
        if entry is None or entry.config_hash != cfg_hash:
            return False
        path = self.root / entry.path
        if not path.is_file():
            return False
        return not verify or file_sha256(path) == entry.sha256

    def covered_sources(self) -> set[str]:
        """source_ids that already have a complete English pages shard."""
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
        shards pass ``superseded`` (read once) so the manifest is not re-read per shard."""
        gone = sorted(self.superseded() if superseded is None else superseded)
        cols = None if columns is None else list(dict.fromkeys([*columns, "source_id"]))
        table = pq.read_table(self.root / entry.path, columns=cols, schema=schema)
        if gone:
            table = table.filter(pc.invert(pc.is_in(table["source_id"], value_set=pa.array(gone))))
        return table if columns is None else table.select(columns)

    def live_rows(self, kind: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Live rows (see :meth:`live_table`) of every shard of ``kind``, shards in name order; the
        manifest is read once for the whole pass."""
        data = self._read()
        gone = list(data.get("superseded", {}))
        entries = [ShardEntry(**v) for v in data["shards"].values() if v["kind"] == kind]
        for entry in sorted(entries, key=lambda e: e.name):
            yield from self.live_table(entry, columns, superseded=gone).to_pylist()


def commit_shard(
    root: Path,
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
    """Write ``table`` atomically under ``root/rel_path`` and record it in the manifest (last)."""
    sha = write_table_atomic(table, root / rel_path)
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
    )
    Manifest(root).record(entry)
    return entry


def commit_rejects(root: Path, rejects: list[Reject], *, name: str, cfg_hash: str) -> ShardEntry:
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


def read_rejects(root: Path) -> pa.Table:
    """All rejects of an output root as one table (the rejects table)."""
    tables = [read_table(Path(root) / e.path, REJECTS_SCHEMA) for e in Manifest(root).shards("rejects")]
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def completed(
    manifest: Manifest, name: str, cfg_hash: str, kind: str, lang: str, rel: str
) -> ShardResult | None:
    """The skip result when ``name`` is already complete for this config (the resume check of every stage)."""
    if not manifest.is_complete(name, cfg_hash):
        return None
    entry = manifest.get(name)
    assert entry is not None
    return ShardResult(name, kind, lang, rel, entry.rows, 0, skipped=True)


def commit_stage(
    root: Path,
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
