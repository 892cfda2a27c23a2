"""Translation memory: a persistent (model, src, tgt, text) → translation store."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path


class TranslationCache:
    """Persistent (model_id, src, tgt, text) → translation store in SQLite.

    WAL mode plus a busy timeout make it safe to share between threads (one connection per thread)
    and processes (several Prefect workers on one disk).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS translations (model_id TEXT NOT NULL, src TEXT NOT NULL, "
                "tgt TEXT NOT NULL, text TEXT NOT NULL, translation TEXT NOT NULL, "
                "PRIMARY KEY (model_id, src, tgt, text)) WITHOUT ROWID"
            )

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def get_many(self, model_id: str, src: str, tgt: str, texts: Iterable[str]) -> dict[str, str]:
        """Cached translations of those ``texts`` that are present."""
        texts = list(dict.fromkeys(texts))
        found: dict[str, str] = {}
        con = self._conn()
        for i in range(0, len(texts), 500):
            part = texts[i : i + 500]
            marks = ",".join("?" * len(part))
            rows = con.execute(
                f"SELECT text, translation FROM translations WHERE model_id=? AND src=? AND tgt=? "
                f"AND text IN ({marks})",
                (model_id, src, tgt, *part),
            )
            found.update(rows)
        return found

    def put_many(self, model_id: str, src: str, tgt: str, pairs: Iterable[tuple[str, str]]) -> None:
        """Store translations (last writer wins; entries are deterministic per model_id anyway)."""
        rows = [(model_id, src, tgt, t, tr) for t, tr in pairs]
        if not rows:
            return
        con = self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?)", rows)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
