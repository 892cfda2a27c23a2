"""The storage layer on a local disk and on a real S3 API (moto's server): atomic publication,
completion records from many writers, the compacted index, and resume checks that read no shard bytes."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.shards import Manifest, ShardEntry, commit_shard, completed, verify_root
from tasks.storage import Store, open_store


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs/a"


def _table(n: int, tag: str = "") -> pa.Table:
    return pa.table({"page_id": [f"p{tag}{i}" for i in range(n)], "source_id": ["s"] * n})


def _commit(root: str, name: str, n: int = 3, cfg: str = "c") -> ShardEntry:
    return commit_shard(
        root,
        _table(n, name),
        name=name,
        kind="pages",
        lang="en",
        rel_path=f"pages/en/{name}.parquet",
        cfg_hash=cfg,
        sources=[name],
    )


def test_store_round_trip_and_urls(root: str) -> None:
    store = open_store(root)
    assert store.size("a/b.bin") is None and store.read_bytes("a/b.bin") is None
    store.put_bytes("a/b.bin", b"hello")
    assert store.read_bytes("a/b.bin") == b"hello" and store.size("a/b.bin") == 5
    sha, size = store.write_with(
        "t/x.parquet", lambda tmp: __import__("pyarrow.parquet").parquet.write_table(_table(2), tmp)
    )
    assert size == store.size("t/x.parquet") and sha == store.sha256("t/x.parquet")
    assert store.read_table("t/x.parquet").num_rows == 2
    assert sorted(store.list("")) == ["a/b.bin", "t/x.parquet"]
    if not store.local:
        assert store.url_of("t/x.parquet") == f"{root}/t/x.parquet"


def test_records_from_many_writers_and_the_compacted_index(root: str) -> None:
    threads = [threading.Thread(target=_commit, args=(root, f"s{k:02d}")) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = Manifest(root)
    assert m.store.size("manifest.json") is None, "writers never touch a global file"
    assert sorted(m.entries()) == [f"s{k:02d}" for k in range(12)]
    stats = m.compact()
    assert stats["shards"] == 12
    # after compaction, a new record and a rewritten one are both seen through the index
    _commit(root, "s99")
    _commit(root, "s00", n=5, cfg="c2")
    view = Manifest(root).entries()
    assert len(view) == 13 and view["s00"].rows == 5 and view["s00"].config_hash == "c2"
    Manifest(root).compact()
    index = open_store(root).read_json("manifest.json")
    assert index["shards"]["s00"]["rows"] == 5 and len(index["shards"]) == 13


def test_resume_check_reads_no_shard_bytes(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _commit(root, "s1")
    m = Manifest(root)

    def no_reads(*a, **k):
        raise AssertionError("the resume check read shard bytes")

    monkeypatch.setattr(Store, "sha256", no_reads)
    monkeypatch.setattr(Store, "read_table", no_reads)
    assert completed(m, "s1", "c", "pages", "en", entry.path) is not None
    assert completed(m, "s1", "other", "pages", "en", entry.path) is None
    m.store.put_bytes(entry.path, b"short")  # a resized object is not complete
    assert completed(m, "s1", "c", "pages", "en", entry.path) is None


def test_verify_finds_and_repair_removes_a_flipped_byte(root: str) -> None:
    good = _commit(root, "good")
    bad = _commit(root, "bad")
    store = open_store(root)
    data = bytearray(store.read_bytes(bad.path))
    data[len(data) // 2] ^= 0xFF  # same size: only a re-hash can see it
    store.put_bytes(bad.path, bytes(data))
    assert Manifest(root).is_complete("bad", "c"), "the cheap check trusts size"
    report = verify_root(root)
    assert report.checked == 2 and list(report.damaged) == ["bad"]
    repaired = verify_root(root, repair=True)
    assert repaired.removed == ["bad"]
    m = Manifest(root)
    assert m.get("bad") is None and m.get("good") is not None and store.size(bad.path) is None
    assert sorted(m.entries()) == ["good"] and m.is_complete("good", good.config_hash)
    assert sorted(store.read_json("manifest.json")["shards"]) == ["good"]


def test_credentials_from_a_prefect_secret_block(s3_server, s3_bucket, prefect_harness, monkeypatch) -> None:
    """With no AWS variables at all, the storage options come from the Secret block named by
    M3DR_STORAGE_BLOCK; the options never appear in the Store's repr."""
    import json

    from prefect.blocks.system import Secret

    from tasks.storage import Store

    Secret(value=json.dumps(s3_server.storage_options())).save("m3dr-test-storage", overwrite=True)
    for key in s3_server.env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("M3DR_STORAGE_BLOCK", "m3dr-test-storage")
    store = Store(f"{s3_bucket}/via-block")
    store.put_bytes("x.txt", b"ok")
    assert store.read_bytes("x.txt") == b"ok"
    assert s3_server.storage_options()["secret"] not in repr(store) + str(store)


def test_cli_compact_and_verify(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    root = str(tmp_path / "out")
    _commit(root, "a")
    bad = _commit(root, "b")
    runner = CliRunner()
    res = runner.invoke(app, ["manifest", "compact", root])
    assert res.exit_code == 0 and "2 shards" in res.output
    res = runner.invoke(app, ["verify", root])
    assert res.exit_code == 0 and "all shards match" in res.output
    p = Path(root) / bad.path
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", root])
    assert res.exit_code == 1 and "DAMAGED b: sha256" in res.output
