"""Translation memory: per-shard (model, src, tgt, text) → translation, stored beside the shards.

Why per shard, and not one shared cache: on a cluster there is no safe shared SQLite (no locks on
object stores, and ``flock`` does not hold across machines), and a cache shared between shards would
let a value written by whichever shard ran first decide another shard's output (CTranslate2's int8
kernels differ between CPU kinds). A shard's memory holds only the translations of its own texts,
keyed by the translate config and model fingerprint, and is published in one PUT before the shard's
completion record. It makes a rerun of the same shard (a changed render config, a retried task, a
shard whose record was removed by ``m3dr verify --repair``) skip the translation, and its output can
only ever depend on that shard's own input. Within a shard, identical strings are translated once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.schema import MEMORY_SCHEMA
from tasks.storage import Store, open_store


class TranslationMemory:
    """An in-memory (model_id, src, tgt, text) → translation map, loaded from and saved to one object.

    Thread-safe for the translate stage's use (one shard's texts); ``save`` publishes it atomically.
    """

    def __init__(self, store: Store | str | Path | None = None, rel: str = "") -> None:
        self.store = None if store is None else open_store(store)
        self.rel = rel
        self._data: dict[tuple[str, str, str, str], str] = {}
        self._lock = threading.Lock()
        self.dirty = False
        if self.store is not None and rel and self.store.size(rel) is not None:
            table = self.store.read_table(rel, schema=MEMORY_SCHEMA)
            for r in table.to_pylist():
                self._data[(r["model_id"], r["src"], r["tgt"], r["text"])] = r["translation"]

    def get_many(self, model_id: str, src: str, tgt: str, texts: Iterable[str]) -> dict[str, str]:
        """Stored translations of those ``texts`` that are present."""
        with self._lock:
            return {
                t: self._data[(model_id, src, tgt, t)]
                for t in dict.fromkeys(texts)
                if (model_id, src, tgt, t) in self._data
            }

    def put_many(self, model_id: str, src: str, tgt: str, pairs: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            for text, translation in pairs:
                self._data[(model_id, src, tgt, text)] = translation
                self.dirty = True

    def __len__(self) -> int:
        return len(self._data)

    def table(self) -> pa.Table:
        rows = sorted(self._data.items())
        cols = list(zip(*[(*k, v) for k, v in rows], strict=True)) if rows else [[]] * 5
        return pa.table(dict(zip(MEMORY_SCHEMA.names, cols, strict=True)), schema=MEMORY_SCHEMA)

    def save(self) -> None:
        """Publish the memory under its name (one PUT; sorted rows, so the bytes are reproducible)."""
        if self.store is None or not self.rel or not self.dirty:
            return
        table = self.table()
        self.store.write_with(
            self.rel, lambda tmp: pq.write_table(table, tmp, compression="zstd"), suffix=".parquet"
        )
        self.dirty = False
