"""Benchmark IO: round trips through the Parquet (flat, HF) and BEIR layouts, validation, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from eval.beir import (
    Benchmark,
    BenchmarkError,
    MemoryImages,
    load_benchmark,
    load_with_datasets,
    read_beir_dir,
    write_beir,
    write_parquet,
)

REPO = Path(__file__).resolve().parents[2]


def _png(i: int) -> bytes:
    im = Image.new("RGB", (40 + i, 30), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle([2, 2, 10 + i, 20], fill=(20 * i % 256, 100, 200))
    d.text((12, 8), str(i), fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def bench() -> Benchmark:
    """7 pages (one JPEG, one id unsafe as a file name) in 2 languages; graded 2/1 qrels."""
    cids = ["p0-en", "p0-hi", "p1-en", "p1-hi", "p2-en", "weird/id with space", "p3-ar"]
    corpus = {c: (_jpeg(7) if c == "p3-ar" else _png(i)) for i, c in enumerate(cids)}
    queries = {"q0": "what is p0?", "q1": "पी1 क्या है?", "q2": "p2 please", "q3": "ما هو"}
    qrels = {
        "q0": {"p0-en": 2, "p0-hi": 1},
        "q1": {"p1-hi": 2, "p1-en": 1},
        "q2": {"p2-en": 2, "weird/id with space": 1},
        "q3": {"p3-ar": 2},
    }
    return Benchmark.from_memory(
        corpus,
        queries,
        qrels,
        query_languages={"q0": "en", "q1": "hi", "q2": "en", "q3": "ar"},
        corpus_languages={c: c.rsplit("-", 1)[-1] if "/" not in c else "en" for c in cids},
        corpus_doc_ids={c: c.split("-")[0] for c in cids},
        name="synthetic",
    )


def assert_same(a: Benchmark, b: Benchmark) -> None:
    assert a.corpus_ids == b.corpus_ids
    assert a.queries == b.queries
    assert a.qrels == b.qrels
    assert a.query_languages == b.query_languages
    assert a.corpus_languages == b.corpus_languages
    assert a.corpus_doc_ids == b.corpus_doc_ids
    for (ids_a, imgs_a), (ids_b, imgs_b) in zip(a.iter_images(3), b.iter_images(3), strict=True):
        assert ids_a == ids_b and imgs_a == imgs_b
    assert a.corpus_fingerprint() == b.corpus_fingerprint()


def test_flat_parquet_round_trip(bench: Benchmark, tmp_path: Path) -> None:
    out = write_parquet(bench, tmp_path / "flat")
    assert sorted(p.name for p in out.iterdir()) == ["corpus.parquet", "qrels.parquet", "queries.parquet"]
    schema = pq.read_schema(out / "corpus.parquet")
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert pq.read_schema(out / "qrels.parquet").names == ["query-id", "corpus-id", "score"]
    back = load_benchmark(out)
    assert back.validate() == []
    assert_same(bench, back)
    assert back.languages == ["ar", "en", "hi"]
    with Image.open(io.BytesIO(back.image("p1-en"))) as im:
        assert im.format == "PNG" and im.size == (42, 30)
    with Image.open(io.BytesIO(back.image("p3-ar"))) as im:
        assert im.format == "JPEG"
    with pytest.raises(BenchmarkError, match="unknown corpus-id"):
        back.image("nope")


def test_hf_layout_sharded_round_trip_and_datasets_reads_it(bench: Benchmark, tmp_path: Path) -> None:
    out = write_parquet(bench, tmp_path / "hf", layout="hf", rows_per_file=3, row_group_size=2)
    files = sorted(p.name for p in (out / "corpus").iterdir())
    assert files == [f"test-0000{i}-of-00003.parquet" for i in range(3)]
    assert (out / "queries" / "test-00000-of-00001.parquet").is_file()
    back = load_benchmark(out)
    assert_same(bench, back)
    for c in reversed(bench.corpus_ids):  # random access across files and row groups
        assert back.image(c) == bench.image(c)
    # The same directory opens with Hugging Face datasets (README configs), images decode to PIL.
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(str(out), "corpus", split="test", cache_dir=str(tmp_path / "hf-cache"))
    assert ds[1]["corpus-id"] == "p0-hi" and ds[1]["image"].size == (41, 30)
    assert_same(bench, load_with_datasets(str(out)))


def test_beir_round_trip_and_layout_chain(bench: Benchmark, tmp_path: Path) -> None:
    out = write_beir(bench, tmp_path / "beir")
    assert (out / "qrels" / "test.tsv").read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"
    recs = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert set(recs[0]) >= {"_id", "title", "text", "image"}
    assert recs[6]["image"] == "images/p3-ar.jpg" and recs[5]["image"].startswith("images/h-")
    assert all((out / r["image"]).is_file() for r in recs)
    q = [json.loads(line) for line in (out / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    assert q[1] == {"_id": "q1", "text": "पी1 क्या है?", "language": "hi"}
    back = load_benchmark(out)
    assert_same(bench, back)
    # BEIR → Parquet → BEIR keeps everything.
    again = read_beir_dir(write_beir(load_benchmark(write_parquet(back, tmp_path / "p")), tmp_path / "b2"))
    assert_same(bench, again)


def test_vidore_style_int_ids_and_float_scores_become_str_and_int(tmp_path: Path) -> None:
    d = tmp_path / "vidore"
    d.mkdir()
    img = pa.array(
        [{"bytes": _png(1), "path": None}, {"bytes": None, "path": "pages/b.png"}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    (d / "pages").mkdir()
    (d / "pages" / "b.png").write_bytes(_png(2))
    pq.write_table(
        pa.table({"corpus-id": pa.array([10, 11], pa.int64()), "image": img}), d / "corpus.parquet"
    )
    pq.write_table(pa.table({"query-id": [1], "query": ["q"]}), d / "queries.parquet")
    pq.write_table(
        pa.table({"query-id": [1, 1], "corpus-id": [10, 11], "score": [2.0, 1.0]}), d / "qrels.parquet"
    )
    b = load_benchmark(d)
    assert b.corpus_ids == ["10", "11"] and b.qrels == {"1": {"10": 2, "11": 1}}
    assert b.validate() == []
    assert b.image("11") == _png(2)  # image given by path (relative to the benchmark directory)


def test_validation_errors_are_specific(bench: Benchmark) -> None:
    bad = Benchmark(
        corpus_ids=["a", "a", "b"],
        images=MemoryImages([b"x", b"y"]),
        query_ids=["q1", "q1", "q2"],
        query_texts=["t", "t", ""],
        qrels_rows=[("q1", "a", 1), ("q1", "a", 2), ("q9", "b", 1), ("q2", "zz", 1), ("q2", "b", 0.5)],
        name="broken",
    )
    with pytest.raises(BenchmarkError) as err:
        bad.validate()
    msg = str(err.value)
    for needle in (
        "benchmark 'broken' is invalid",
        "1 duplicate corpus ids, e.g. ['a']",
        "1 duplicate query ids",
        "1 duplicate qrels (query-id, corpus-id) pairs, e.g. [('q1', 'a')]",
        "1 qrels with an unknown query-id, e.g. [('q9', 'b')]",
        "1 qrels with an unknown corpus-id, e.g. [('q2', 'zz')]",
        "1 qrels with a non-integer score",
        "1 empty query texts",
        "2 images for 3 corpus ids",
    ):
        assert needle in msg, (needle, msg)
    with pytest.raises(BenchmarkError, match="corpus is empty"):
        Benchmark([], MemoryImages([]), ["q"], ["t"], [("q", "a", 1)]).validate()
    # A query without a relevant doc is valid but warned about.
    warn = bench.select_queries(["q0", "q1"])
    warn.qrels_rows = [(q, c, 0 if q == "q1" else s) for q, c, s in warn.qrels_rows]
    assert warn.validate() == ["1 queries have no relevant document, e.g. ['q1']"]


def test_select_queries_by_language(bench: Benchmark) -> None:
    en = bench.select_queries(bench.queries_in("en"), name="en")
    assert en.query_ids == ["q0", "q2"] and set(en.qrels) == {"q0", "q2"}
    assert en.corpus_ids == bench.corpus_ids and en.validate() == []


def test_writers_are_atomic_and_refuse_invalid_input(bench: Benchmark, tmp_path: Path) -> None:
    out = tmp_path / "b"
    write_parquet(bench, out)
    with pytest.raises(FileExistsError):
        write_parquet(bench, out)
    small = bench.select_queries(["q3"])
    write_parquet(small, out, overwrite=True)
    assert load_benchmark(out).query_ids == ["q3"]

    class Exploding(MemoryImages):
        def iter_batches(self, batch_size: int):
            yield self.items[:2]
            raise OSError("disk went away")

    broken = Benchmark.from_memory({"a": _png(0), "b": _png(1), "c": _png(2)}, {"q": "t"}, {"q": {"a": 1}})
    broken.images = Exploding(broken.images.items)  # type: ignore[attr-defined]
    for writer in (write_parquet, write_beir):
        with pytest.raises(OSError, match="disk went away"):
            writer(broken, tmp_path / "half", overwrite=True)
        assert not (tmp_path / "half").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp dirs left behind
    invalid = Benchmark.from_memory({"a": _png(0)}, {"q": "t"}, {"q": {"missing": 1}})
    with pytest.raises(BenchmarkError, match="unknown corpus-id"):
        write_beir(invalid, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_read_errors_are_clear(bench: Benchmark, tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="not a hub id"):
        load_benchmark(str(tmp_path / "does-not-exist"))
    with pytest.raises(BenchmarkError, match="not a benchmark directory"):
        load_benchmark(tmp_path)
    out = write_beir(bench, tmp_path / "beir")
    (out / "images" / "p0-en.png").unlink()
    b = load_benchmark(out)
    with pytest.raises(BenchmarkError, match=r"cannot read image file .*p0-en\.png"):
        b.image("p0-en")
    (out / "qrels" / "test.tsv").write_text("qid\tdocid\trel\nq0\tp0-en\t1\n")
    with pytest.raises(BenchmarkError, match="header must be"):
        load_benchmark(out)
    flat = write_parquet(bench, tmp_path / "flat")
    (flat / "qrels.parquet").unlink()
    with pytest.raises(BenchmarkError, match=r"missing config\(s\) \['qrels'\]"):
        load_benchmark(flat)


def test_hub_id_without_network_fails_with_a_clear_message(tmp_path: Path) -> None:
    code = (
        "from eval.beir import load_benchmark, BenchmarkError\n"
        "try:\n    load_benchmark('Cognitive-Lab/NayanaIR-CrossBench')\n"
        "except BenchmarkError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "could not load config 'corpus' of 'Cognitive-Lab/NayanaIR-CrossBench'" in res.stdout, res.stderr
    assert "local directory" in res.stdout


def test_composed_query_images_round_trip_every_layout(bench: Benchmark, tmp_path: Path) -> None:
    """Composed queries carry their crop: an HF Image ``image`` column in the queries config (Parquet,
    readable by ``datasets``) and ``query-images/`` files in BEIR; text queries stay null."""
    from dataclasses import replace

    crops = [_png(9), None, _png(11), None]
    composed = replace(bench, query_images=crops)
    for out in (
        write_parquet(composed, tmp_path / "flat"),
        write_parquet(composed, tmp_path / "hf", layout="hf"),
        write_beir(composed, tmp_path / "beir"),
    ):
        back = load_benchmark(out)
        assert_same(composed, back)
        assert back.query_images == crops
        assert back.select_queries(["q2"]).query_images == [crops[2]]
    schema = pq.read_schema(tmp_path / "flat" / "queries.parquet")
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(str(tmp_path / "hf"), "queries", split="test", cache_dir=str(tmp_path / "c"))
    assert ds[0]["image"].size == (49, 30) and ds[1]["image"] is None
    with pytest.raises(BenchmarkError, match="query_images has 1 rows"):
        replace(bench, query_images=[_png(1)]).validate()
