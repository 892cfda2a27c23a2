"""End-to-end `synthesize` (pages half) on real engines and the tiny profile, through Prefect."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow


def _small_sources(tmp_path: Path, bad: Path) -> Path:
    """Three bundled sample pages (born-digital PDFs in the train split, an image page in the benchmark
    split: splits are a hash of the content) plus every broken input."""
    src = tmp_path / "sources"
    src.mkdir()
    for name in ("title_page.pdf", "table_page.pdf", "page_image.png"):
        shutil.copy(SAMPLES / name, src / name)
    for f in bad.iterdir():
        shutil.copy(f, src / f.name)
    return src


def _run(sources: Path, out: Path, langs: str = "hi,ar,xx", formats: tuple[str, ...] = ("png",), **kw):
    from flows.synthesize import SynthesizeParams, synthesize

    return synthesize(
        SynthesizeParams(
            sources=str(sources), langs=langs, out=str(out), formats=list(formats), pages_per_shard=64, **kw
        )
    )


def _shard_bytes(out: Path) -> dict[str, bytes]:
    files = [*out.glob("pages/*/*.parquet"), *out.glob("queries/*.parquet"), *out.glob("train/*.parquet")]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(files)}


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory, tiny_models, prefect_harness):
    """Run the flow twice into one output root, and once into a second root, on the same inputs."""
    from tests.conftest import encrypted_pdf_bytes, png_with_header_size

    tmp = tmp_path_factory.mktemp("flow")
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "empty.pdf").write_bytes(b"")
    (bad / "corrupt.png").write_bytes(png_with_header_size(64, 64)[:30] + b"garbage" * 10)
    (bad / "huge.png").write_bytes(png_with_header_size(30000, 30000))
    (bad / "locked.pdf").write_bytes(encrypted_pdf_bytes())
    sources = _small_sources(tmp, bad)
    first = _run(sources, tmp / "out-a")
    bytes_after_first = _shard_bytes(tmp / "out-a")
    from tasks.stage import ENGINES

    ENGINES.clear()
    loads_before = ENGINES.loads
    second = _run(sources, tmp / "out-a")
    models_loaded_in_second = ENGINES.loads - loads_before
    third = _run(sources, tmp / "out-b")
    return {
        "tmp": tmp,
        "first": first,
        "second": second,
        "third": third,
        "bytes_first": bytes_after_first,
        "models_loaded_in_second": models_loaded_in_second,
    }


def test_first_run_writes_english_and_translated_shards(flow_runs):
    first = flow_runs["first"]
    assert first["pages_per_lang"]["en"] >= 2
    assert first["pages_per_lang"].get("hi", 0) >= 1
    assert first["pages_per_lang"].get("ar", 0) >= 1
    out = Path(first["out"])
    for lang in ("en", "hi", "ar"):
        files = list(out.glob(f"pages/{lang}/*.parquet"))
        assert files, lang
    en = pq.read_table(next(out.glob("pages/en/*.parquet"))).to_pylist()
    hi = pq.read_table(next(out.glob("pages/hi/*.parquet"))).to_pylist()
    en_ids = {r["page_id"] for r in en}
    assert all(r["source_page_id"] in en_ids for r in hi), "every translation points at its English page"
    assert all(r["page_id"] not in en_ids for r in hi)
    assert any(r["translatable"] and r["rendered"] for p in hi for r in p["regions"])
    artifact = Path(first["artifact"]).read_text()
    pages_table = artifact.split("## Pages per language", 1)[1].split("\n## ", 1)[0]
    assert pages_table.count("| hi |") == 1  # one row per language in the pages table


def test_bad_inputs_end_as_rejects_and_the_run_completes(flow_runs):
    from tasks.shards import read_rejects

    rejects = read_rejects(Path(flow_runs["first"]["out"])).to_pylist()
    by_ref = {r["input_ref"]: r["reason"] for r in rejects}
    assert by_ref["empty.pdf"] == "empty_file"
    assert by_ref["corrupt.png"] == "unreadable_file"
    assert by_ref["huge.png"] == "image_too_large"
    assert by_ref["locked.pdf"] == "encrypted_pdf"
    assert by_ref["xx"] == "unknown_language"
    assert all(r["message"] for r in rejects), "every reject carries a readable message"


def test_second_run_does_no_stage_work_and_changes_no_bytes(flow_runs):
    second = flow_runs["second"]
    assert second["shards_worked"] == 0
    assert all(s["skipped"] for s in second["shards"])
    assert flow_runs["models_loaded_in_second"] == 0, "no model was even loaded"
    assert _shard_bytes(Path(second["out"])) == flow_runs["bytes_first"]


def test_fresh_run_on_same_input_is_byte_identical(flow_runs):
    a = flow_runs["bytes_first"]
    b = _shard_bytes(Path(flow_runs["third"]["out"]))
    assert a.keys() == b.keys()
    assert a == b


def test_translated_pages_load_with_datasets(flow_runs):
    import datasets
    from PIL import Image

    out = Path(flow_runs["first"]["out"])
    ds = datasets.load_dataset(
        "parquet",
        data_files=[str(p) for p in out.glob("pages/*/*.parquet")],
        split="train",
        cache_dir=str(flow_runs["tmp"] / "hf"),
    )
    assert isinstance(ds[0]["image"], Image.Image)
    assert set(ds["lang"]) >= {"en", "hi", "ar"}


def test_pdf_format_writes_a_searchable_text_layer(tmp_path, tiny_models, prefect_harness):
    """--formats pdf: each translated page also as a PDF whose text layer holds the translated text."""
    import re
    import unicodedata

    import pypdfium2 as pdfium

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SAMPLES / "title_page.pdf", src / "title_page.pdf")
    result = _run(src, tmp_path / "out", langs="hi,ar", formats=("png", "pdf"))
    out = Path(result["out"])

    def norm(text: str) -> str:
        return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))

    checked = 0
    for lang in ("hi", "ar"):
        for shard in out.glob(f"pages/{lang}/*.parquet"):
            for page in pq.read_table(shard).to_pylist():
                assert page["pdf"], "pdf bytes present when --formats pdf"
                doc = pdfium.PdfDocument(page["pdf"])
                layer = norm(doc[0].get_textpage().get_text_range())
                doc.close()
                for region in page["regions"]:
                    if not region["rendered"]:
                        continue
                    if lang == "hi":
                        assert norm(region["text"]) in layer
                    else:  # Arabic: every Arabic word comes back (pdfium may reorder digits/Latin runs)
                        for word in re.findall(
                            r"[\u0600-\u06FF]+", unicodedata.normalize("NFKC", region["text"])
                        ):
                            assert word in layer
                    checked += 1
    assert checked >= 4


def test_rerun_with_one_new_document_processes_only_its_shards(tmp_path, tiny_models, prefect_harness):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SAMPLES / "title_page.pdf", src / "title_page.pdf")
    first = _run(src, tmp_path / "out", langs="hi")
    group = [s for s in first["shards"] if s["kind"] != "index"]
    assert sum(not s["skipped"] for s in group) == 4  # English, Hindi, queries, train shards of the group
    shutil.copy(SAMPLES / "table_page.pdf", src / "table_page.pdf")
    second = _run(src, tmp_path / "out", langs="hi")
    # the split's mining index is extended by a segment for the new pages (never rebuilt)
    extended = [s for s in second["shards"] if s["kind"] == "index" and not s["skipped"]]
    assert len(extended) <= 2 and all(s["stats"].get("segments", 1) >= 1 for s in extended)
    worked = [s for s in second["shards"] if not s["skipped"] and s["kind"] != "index"]
    assert len(worked) == 4, worked  # only the new document's group
    key = next(s["name"] for s in worked if s["lang"] == "en").removeprefix("pages-en-")
    assert all(s["name"].endswith(key) for s in worked)
    from tasks.ingest.sources import source_id
    from tasks.shards import Manifest

    new_en = Manifest(tmp_path / "out").get(next(s["name"] for s in worked if s["lang"] == "en"))
    assert new_en is not None and new_en.sources == [source_id(src / "table_page.pdf")]
    assert second["pages_per_lang"]["en"] == first["pages_per_lang"]["en"] + 1
    # A changed file (same name, new bytes) is ingested as a new source; the old version is superseded.
    old_id = source_id(src / "title_page.pdf")
    shutil.copy(SAMPLES / "contents_page.pdf", src / "title_page.pdf")
    third = _run(src, tmp_path / "out", langs="hi")
    assert len([s for s in third["shards"] if not s["skipped"] and s["kind"] != "index"]) == 4
    assert Manifest(tmp_path / "out").superseded() == {old_id: "changed: title_page.pdf"}
    # the summary counts live pages: the old version's page left, the new one came in
    assert third["pages_per_lang"]["en"] == second["pages_per_lang"]["en"]


def _table(out: Path, kind: str) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(out.glob(f"{kind}/*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def test_queries_cover_every_requested_language_pair(flow_runs):
    out = Path(flow_runs["first"]["out"])
    queries = _table(out, "queries")
    pages = _table(out, "pages/*")
    langs_of_group: dict[str, set[str]] = {}
    for p in pages:
        langs_of_group.setdefault(p["source_page_id"], set()).add(p["lang"])
    mono = {(q["query_lang"], q["source_page_id"]) for q in queries if not q["cross_lingual"]}
    pairs = {(q["query_lang"], q["target_lang"]) for q in queries if q["cross_lingual"]}
    expected = set()
    for lang_a, group in mono:
        for lang_b in langs_of_group[group]:
            if lang_b != lang_a:
                expected.add((lang_a, lang_b))
    assert expected, "some parallel groups have queries"
    assert expected <= pairs
    assert {a for a, _ in pairs} >= {"en"} and {"hi", "ar"} & {b for _, b in pairs}
    for q in queries:
        assert q["cross_lingual"] == (q["query_lang"] != q["target_lang"])


def test_train_rows_never_use_parallel_pages_as_negatives(flow_runs):
    out = Path(flow_runs["first"]["out"])
    pages = {p["page_id"]: p for p in _table(out, "pages/*")}
    rows = _table(out, "train")
    assert rows, "train shards written"
    mined = 0
    for r in rows:
        assert r["positive_page_id"] in r["parallel_page_ids"]
        assert not set(r["negative_page_ids"]) & set(r["parallel_page_ids"])
        for neg, score in zip(r["negative_page_ids"], r["negative_scores"], strict=True):
            assert pages[neg]["source_page_id"] != r["source_page_id"]
            assert score < 0.95 * r["positive_score"]
            mined += 1
    assert mined > 0, "the bm25 miner found negatives"


def test_no_source_document_is_in_two_splits(flow_runs):
    out = Path(flow_runs["first"]["out"])
    split_of: dict[str, set[str]] = {}
    for r in _table(out, "queries") + _table(out, "train"):
        split_of.setdefault(r["source_id"], set()).add(r["split"])
    assert split_of and all(len(s) == 1 for s in split_of.values())
    assert all(r["split"] in ("train", "dev") for r in _table(out, "train"))
