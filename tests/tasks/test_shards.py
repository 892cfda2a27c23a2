import json
import threading
from pathlib import Path

import pytest

from tasks.schema import PAGES_SCHEMA, REJECTS_SCHEMA, PageRecord, Region, Reject, pages_table
from tasks.shards import Manifest, commit_rejects, commit_shard, config_hash, hash_id, read_rejects


def _page(i: int) -> PageRecord:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (255, 255, i)).save(buf, format="PNG")
    return PageRecord(
        page_id=hash_id("p", i),
        source_page_id=hash_id("p", i),
        source_id="s",
        source_uri="x.pdf",
        page_index=i,
        lang="en",
        image_png=buf.getvalue(),
        width=20,
        height=10,
        regions=[Region("text", (0, 0, 10, 5), 0.9, f"hello {i}", True, False)],
    )


def test_hash_ids_are_stable_and_unambiguous():
    assert hash_id("a", "bc") == hash_id("a", "bc")
    assert hash_id("a", "bc") != hash_id("ab", "c")
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})


def test_commit_writes_deterministic_bytes_and_manifest(tmp_path: Path):
    table = pages_table([_page(i) for i in range(3)])
    e1 = commit_shard(
        tmp_path / "a",
        table,
        name="s1",
        kind="pages",
        lang="en",
        rel_path="pages/en/s1.parquet",
        cfg_hash="c1",
        sources=["s"],
    )
    e2 = commit_shard(
        tmp_path / "b",
        table,
        name="s1",
        kind="pages",
        lang="en",
        rel_path="pages/en/s1.parquet",
        cfg_hash="c1",
        sources=["s"],
    )
    assert e1.sha256 == e2.sha256
    assert (tmp_path / "a/pages/en/s1.parquet").read_bytes() == (
        tmp_path / "b/pages/en/s1.parquet"
    ).read_bytes()
    m = Manifest(tmp_path / "a")
    assert m.is_complete("s1", "c1")
    assert not m.is_complete("s1", "other-config")
    assert m.covered_sources() == {"s"}
    assert not list((tmp_path / "a/pages/en").glob(".*tmp")), "no temp files left behind"


def test_tampered_or_missing_shard_is_not_complete(tmp_path: Path):
    commit_shard(
        tmp_path,
        pages_table([_page(0)]),
        name="s",
        kind="pages",
        lang="en",
        rel_path="pages/en/s.parquet",
        cfg_hash="c",
    )
    path = tmp_path / "pages/en/s.parquet"
    path.write_bytes(path.read_bytes()[:-10])
    assert not Manifest(tmp_path).is_complete("s", "c")
    path.unlink()
    assert not Manifest(tmp_path).is_complete("s", "c")


def test_failed_write_keeps_previous_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    good = pages_table([_page(0)])
    commit_shard(
        tmp_path, good, name="s", kind="pages", lang="en", rel_path="pages/en/s.parquet", cfg_hash="c"
    )
    before = (tmp_path / "pages/en/s.parquet").read_bytes()

    def disk_full(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tasks.shards.pq.write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        commit_shard(
            tmp_path, good, name="s", kind="pages", lang="en", rel_path="pages/en/s.parquet", cfg_hash="c2"
        )
    assert (tmp_path / "pages/en/s.parquet").read_bytes() == before
    assert Manifest(tmp_path).is_complete("s", "c"), "the old entry still describes the intact old shard"
    assert not list((tmp_path / "pages/en").glob(".*")), "temp file removed"


def test_concurrent_manifest_updates_lose_nothing(tmp_path: Path):
    def work(k: int) -> None:
        commit_rejects(tmp_path, [Reject("ingest", f"f{k}", "empty_file", "x")], name=f"r{k}", cfg_hash="c")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(Manifest(tmp_path).entries()) == 16, "every writer's record is seen before compaction"
    assert not (tmp_path / "manifest.json").exists(), "no writer touched a global file"
    Manifest(tmp_path).compact()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert len(data["shards"]) == 16
    rejects = read_rejects(tmp_path)
    assert rejects.schema.equals(REJECTS_SCHEMA, check_metadata=False)
    assert sorted(rejects.column("input_ref").to_pylist()) == sorted(f"f{k}" for k in range(16))


def test_pages_shard_loads_with_datasets_as_pil_images(tmp_path: Path):
    import datasets
    from PIL import Image

    commit_shard(
        tmp_path,
        pages_table([_page(i) for i in range(2)]),
        name="s",
        kind="pages",
        lang="en",
        rel_path="pages/en/s.parquet",
        cfg_hash="c",
    )
    ds = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "pages/en/s.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert isinstance(ds[0]["image"], Image.Image)
    assert ds[0]["image"].size == (20, 10)
    assert set(ds.column_names) == set(PAGES_SCHEMA.names)
    assert ds[1]["regions"][0]["text"] == "hello 1"


def test_row_groups_hold_about_two_mebibytes_so_a_page_read_decodes_few_pages(tmp_path) -> None:
    """A reader decodes a whole row group to read one row: page shards (~200 KB images) get groups of
    ~10 pages, small rows (train rows) stay at 64; the same table always gets the same groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.shards import ROW_GROUP_BYTES, row_group_rows, write_table
    from tasks.storage import open_store

    pages = pa.table({"page_id": [f"p{i}" for i in range(40)], "image": [bytes(200_000)] * 40})
    small = pa.table({"query": [f"q{i}" for i in range(300)]})
    assert row_group_rows(pages) == ROW_GROUP_BYTES // (pages.nbytes // 40) == 10
    assert row_group_rows(small) == 64
    assert row_group_rows(pa.table({"image": [bytes(5_000_000)] * 5})) == 4  # at least 4 rows
    store = open_store(tmp_path)
    write_table(store, "pages.parquet", pages)
    md = pq.ParquetFile(tmp_path / "pages.parquet").metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [10, 10, 10, 10]
