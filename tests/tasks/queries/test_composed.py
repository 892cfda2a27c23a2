"""Composed queries (a region crop + a question about it): region picking, crops, nearest text, the
extractive and vLLM engines (no server here: tests/tasks/queries/test_vllm_vision.py has the real one),
filters, rows, and a real pipeline run: bundled sample pages through ingest (rapid-layout + PDF text) and
translation (tiny NLLB + render) into queries shards and train shards."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.config import ProfileError
from tasks.llm.client import ChatEndpoint
from tasks.queries.base import GeneratedQuery, PageRef, PairedQuery, QueryRequest
from tasks.queries.composed import (
    composed_candidates,
    crop_box,
    crop_png,
    nearest_text,
    pick_composed,
)
from tasks.queries.config import ComposedConfig
from tasks.queries.engines import build_query_generator
from tasks.queries.extractive import ExtractiveQueryGenerator
from tasks.queries.filters import filter_queries
from tasks.queries.pairing import query_rows
from tasks.queries.text import normalize, script_share
from tasks.queries.vllm import VllmQueryGenerator
from tasks.schema import (
    COMPOSED_KIND,
    QUERIES_SCHEMA,
    TRAIN_SCHEMA,
    PageRecord,
    QueryRecord,
    Region,
    RejectReason,
    encode_png,
    image_bytes,
)
from tasks.shards import hash_id
from tests.conftest import SAMPLES

W, H = 600, 800
CAPTION = (
    "Figure 1: Passenger numbers of the Northern Railway Company rose sharply after the terminal opened."
)
BODY = "The board approved a plan to electrify the coastal route by 2027 and to extend the station."


def _noise_png(seed: int = 0, size: tuple[int, int] = (W, H)) -> bytes:
    """A page whose every pixel differs from its neighbours: any crop offset or resample shows."""
    rng = np.random.default_rng(seed)
    return encode_png(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


def _regions(lang: str = "en") -> list[Region]:
    translated = lang != "en"
    return [
        Region("title", (40, 20, 560, 60), 0.9, "Annual report", True, translated),
        Region("figure", (100, 100, 500, 400), 0.9, "axis 2020 2021 2022", False, False),  # 400x300
        Region("caption", (100, 404, 500, 440), 0.9, CAPTION, True, translated),  # 4 px below the figure
        Region("table", (100, 500, 400, 700), 0.9, "year passengers", False, False),  # 300x200
        Region("caption", (100, 470, 400, 496), 0.9, "Table 1: Passengers per year.", True, translated),
        Region("figure", (520, 720, 540, 790), 0.9, "", False, False),  # 20 px wide: too small
        Region("text", (40, 745, 500, 790), 0.9, BODY, True, translated),
    ]


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


# ---------------------------------------------------------------------------- picking and crops
def test_candidates_are_kept_pixel_regions_largest_first():
    regions = _regions()
    assert composed_candidates(regions, (W, H)) == [1, 3]  # figure 400x300, table 300x200; 20 px: out
    assert composed_candidates(regions, (W, H), ComposedConfig(min_side=250)) == [1]
    assert composed_candidates(regions, (W, H), ComposedConfig(min_area_share=0.2)) == [1]  # 0.25 of page
    redrawn = [*regions[:1], Region("figure", (100, 100, 500, 400), 0.9, "", False, True), *regions[2:]]
    assert composed_candidates(redrawn, (W, H)) == [3]  # a re-rendered region is not the page's pixels
    # text a translation redraws inside the box (a "figure" over a list): its crop would differ per language
    listed = [*regions, Region("list", (120, 120, 300, 200), 0.9, "1 Using this package", True, False)]
    assert composed_candidates(listed, (W, H)) == [3]
    numbered = [*regions, Region("text", (480, 380, 498, 398), 0.9, "(3)", True, False)]  # no letters
    assert composed_candidates(numbered, (W, H)) == [1, 3]


def test_crop_margin_stops_at_neighbouring_regions():
    regions = _regions()
    # the caption starts 4 px below the figure: the 8 px margin stops there; elsewhere it is 8 px
    assert crop_box(regions, 1, (W, H), margin=8) == (92, 92, 508, 404)
    assert crop_box(regions, 1, (W, H), margin=0) == (100, 100, 500, 400)
    # the table's caption ends 4 px above it; clipped to the page at the edges
    assert crop_box(regions, 3, (W, H), margin=8) == (92, 496, 408, 708)
    edge = [Region("figure", (2, 3, 300, 200), 0.9)]
    assert crop_box(edge, 0, (W, H), margin=8) == (0, 0, 308, 208)


def test_crop_pixels_equal_the_page_region_and_are_deterministic():
    page = _noise_png()
    picked = pick_composed(page, _regions(), "en", n=5)
    assert [(p.index, p.label) for p in picked] == [(1, "figure"), (3, "table")]
    assert pick_composed(page, _regions(), "en", n=5) == picked  # same input, same bytes
    whole = _pixels(page)
    for p in picked:
        x0, y0, x1, y1 = p.box
        assert np.array_equal(_pixels(p.png), whole[y0:y1, x0:x1])
    assert pick_composed(page, _regions(), "en", n=1) == picked[:1]
    # a crop longer than max_side is downscaled, aspect ratio kept
    small = crop_png(page, (92, 92, 508, 404), max_side=104)
    with Image.open(io.BytesIO(small)) as img:
        assert img.size == (104, 78) and img.format == "PNG"
    assert pick_composed(None, _regions(), "en", n=1) == []
    assert pick_composed(page, [r for r in _regions() if r.label not in ("figure", "table")], "en", 2) == []


def test_nearest_text_prefers_the_caption_on_its_usual_side_and_the_page_language():
    regions = _regions()
    assert nearest_text(regions, 1, "en") == CAPTION  # figure: caption below
    assert nearest_text(regions, 3, "en") == "Table 1: Passengers per year."  # table: caption above
    no_caption = [r for r in regions if r.label != "caption"]
    assert nearest_text(no_caption, no_caption.index(regions[3]), "en") == BODY  # nearest text region
    # a Hindi page: only text a translation drew counts (the figure's own labels stay English)
    hi = _regions("hi")
    assert nearest_text(hi, 1, "hi") == CAPTION
    untranslated = [Region(r.label, r.bbox, r.score, r.text, r.translatable, False) for r in hi]
    assert nearest_text(untranslated, 1, "hi") == ""


# ---------------------------------------------------------------------------- extractive engine
def _request(lang: str = "en", regions: list[Region] | None = None, **kw) -> QueryRequest:
    regions = _regions(lang) if regions is None else regions
    text = "\n\n".join(r.text for r in regions if r.text)
    kw.setdefault("kinds", ("keyword", COMPOSED_KIND))
    return QueryRequest(f"p-{lang}", lang, text, _noise_png(), regions=tuple(regions), **kw)


def test_extractive_composed_query_is_a_caption_span_with_the_crop():
    gen = ExtractiveQueryGenerator()
    req = _request(n=2)
    out, rejects = gen.generate_with_rejects([req])
    assert rejects == [] and gen.generate([req]) == out
    composed = [q for q in out if q.kind == COMPOSED_KIND]
    crops = {p.index: p for p in pick_composed(req.image_png, req.regions, "en", 2)}
    assert [q.image_png for q in composed] == [crops[1].png, crops[3].png]
    assert normalize(composed[0].query) in normalize(CAPTION)  # a span of the figure's caption
    assert normalize(composed[1].query) in normalize("Table 1: Passengers per year.")
    assert all(q.image_png is None for q in out if q.kind != COMPOSED_KIND)
    # no text near the region: a span of the page text; no usable region: no composed query, no reject
    lone = [Region("figure", (100, 100, 500, 400), 0.9)]
    q = gen.generate(
        [QueryRequest("p-lone", "en", BODY, _noise_png(), kinds=(COMPOSED_KIND,), regions=(*lone,))]
    )
    assert [x.kind for x in q] == [COMPOSED_KIND] and normalize(q[0].query) in normalize(BODY)
    plain = [r for r in _regions() if r.label not in ("figure", "table")]
    out, rejects = gen.generate_with_rejects([_request(regions=plain, kinds=(COMPOSED_KIND,))])
    assert out == [] and rejects == []


def test_composed_config_reaches_the_engine_and_a_mistyped_key_names_itself():
    gen = build_query_generator({"engine": "extractive", "composed": {"min_side": 250}})
    assert gen.composed.min_side == 250
    assert [q.image_png for q in gen.generate([_request()]) if q.kind == COMPOSED_KIND] == [
        pick_composed(_noise_png(), _regions(), "en", 1)[0].png
    ]  # only the 400x300 figure is large enough
    with pytest.raises(ProfileError, match=r"composed\.min_sid"):
        build_query_generator({"engine": "extractive", "composed": {"min_sid": 3}})
    with pytest.raises(ProfileError, match="max_side"):
        build_query_generator(
            {"engine": "vllm", "base_url": "http://x/v1", "model": "m", "composed": {"max_side": 0}}
        )
    from tasks.models import load_profile
    from tasks.run.profile import validate_profile

    profile = load_profile("tiny")
    assert COMPOSED_KIND in profile["queries"]["kinds"]
    bad = profile | {"queries": profile["queries"] | {"composed": {"margn": 8}}}
    with pytest.raises(ProfileError, match=r"composed\.margn"):
        validate_profile(bad)


# ---------------------------------------------------------------------------- filters and rows
def _cq(text: str, png: bytes | None, generator: str = "extractive:spans-v1", kind: str = COMPOSED_KIND):
    return GeneratedQuery(text, "en", kind, "p1", generator, "", png)


def test_filters_key_composed_duplicates_on_the_crop_and_exempt_extractive_spans():
    a, b = _noise_png(1, (64, 64)), _noise_png(2, (64, 64))
    page = {"p1": CAPTION}
    span = "Passenger numbers of the Northern Railway Company rose sharply after the terminal"  # 12 words
    qs = [_cq(span, a), _cq(span, b), _cq(span, a), _cq(span, None, kind="phrase")]
    kept, dropped = filter_queries(qs, page)
    assert kept == qs[:2] + qs[3:]  # same text + other crop: kept; same text + same crop: duplicate
    assert [d.reason for d in dropped] == [RejectReason.QUERY_DUPLICATE] and "crop" in dropped[0].message
    # a generative engine's composed query that copies the caption is a copy like any other
    kept, dropped = filter_queries([_cq(span, a, generator="vllm:vlm")], page)
    assert kept == [] and [d.reason for d in dropped] == [RejectReason.QUERY_COPIED]


def test_query_rows_carry_the_crop_and_hash_it_into_the_id():
    a, b = _noise_png(1, (64, 64)), _noise_png(2, (64, 64))
    page = PageRef("p1", "p1", "d1", "en")
    qs = [_cq("what does the chart show", a), _cq("what does the chart show", b)]
    text = GeneratedQuery("what does the chart show", "en", "keyword", "p1", "extractive:spans-v1", "")
    rows = query_rows([PairedQuery(q, page, False) for q in [*qs, text]], lambda _: "train")
    assert len({r["query_id"] for r in rows}) == 3
    assert [image_bytes(r["image"]) for r in rows] == [a, b, None]
    assert rows[0]["image"]["path"] == f"{rows[0]['query_id']}.png"
    # text queries keep the ids they always had; composed ids also hash the crop
    assert rows[2]["query_id"] == hash_id("what does the chart show", "en", "p1", "extractive:spans-v1", "")
    assert rows[0]["query_id"] == hash_id(
        "what does the chart show", "en", "p1", "extractive:spans-v1", "", hashlib.sha256(a).hexdigest()
    )
    with pytest.raises(ValueError, match="composed"):
        QueryRecord.from_row(rows[0] | {"image": None})


# ---------------------------------------------------------------------------- vLLM engine (no server)
def _vllm(**kw) -> VllmQueryGenerator:
    return VllmQueryGenerator(ChatEndpoint(base_url="http://127.0.0.1:9/v1", model="m"), **kw)


def test_vllm_without_vision_rejects_composed_naming_the_key():
    gen = _vllm(vision=False)
    out, rejects = gen.generate_with_rejects([_request(kinds=(COMPOSED_KIND,))])
    assert out == [] and gen.stats.http_calls == 0
    assert [r.reason for r in rejects] == [RejectReason.QUERY_GENERATION_FAILED]
    assert "vision = true" in rejects[0].message and rejects[0].input_ref == "p-en"


def test_vllm_composed_body_sends_the_crop_and_its_caption():
    import base64

    gen = _vllm(vision=True)
    req = _request(kinds=("factual", COMPOSED_KIND), n=1)
    (region,) = gen.composed_regions(req)
    body = gen.composed_request_body(req, region)
    parts = body["messages"][1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    from tasks.llm.images import fit_image

    assert url.startswith("data:image/jpeg;base64,")  # the crop itself, as JPEG (the default format)
    assert base64.b64decode(url.split(",", 1)[1]) == fit_image(region.png, 896, "jpeg").data
    png_body = _vllm(vision=True, image_format="png").composed_request_body(req, region)
    png_part = next(p for p in png_body["messages"][1]["content"] if p["type"] == "image_url")
    png_url = png_part["image_url"]["url"]
    assert base64.b64decode(png_url.split(",", 1)[1]) == region.png  # PNG: the crop's own bytes (it fits)
    user = next(p["text"] for p in parts if p["type"] == "text")
    assert CAPTION in user and "figure" in user and "English" in user
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["required"] == [COMPOSED_KIND] and schema["properties"][COMPOSED_KIND]["maxItems"] == 1
    # the page request leaves composed out (it has its own requests)
    page_schema = gen.request_body(req)["response_format"]["json_schema"]["schema"]
    assert page_schema["required"] == ["factual"]


# ---------------------------------------------------------------------------- real pipeline
SOURCES = ("figure_caption_page.pdf", "table_page.pdf", "title_page.pdf")
LANGS = ["hi"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_models):
    """Sample pages → ingest → hi translation → queries shard (tiny profile) → train shard (bm25)."""
    from tasks.ingest.shard import ingest_shard
    from tasks.ingest.sources import scan_sources
    from tasks.models import load_profile
    from tasks.negatives.shard import train_shard
    from tasks.queries.shard import queries_shard
    from tasks.translate.shard import translate_shard

    tmp = tmp_path_factory.mktemp("composed")
    src = tmp / "sources"
    src.mkdir()
    for name in SOURCES:
        shutil.copy(SAMPLES / name, src / name)
    root = tmp / "out"
    profile = load_profile("tiny")
    en = "pages-en-composed"
    ingest_shard(root, en, scan_sources(src), profile)
    for lang in LANGS:
        translate_shard(root, en, lang, profile, ["png"])
    q = queries_shard(root, en, LANGS, profile)
    t = train_shard(root, en, profile)
    return {"root": root, "en": en, "profile": profile, "queries": q, "train": t}


def _pages(root: Path) -> dict[str, PageRecord]:
    from tasks.schema import PAGES_SCHEMA

    out = {}
    for f in sorted(root.glob("pages/*/*.parquet")):
        for row in pq.read_table(f, schema=PAGES_SCHEMA).to_pylist():
            out[row["page_id"]] = PageRecord.from_row(row)
    return out


def test_pipeline_composed_queries_per_language_share_the_crop(pipeline):
    root = pipeline["root"]
    pages = _pages(root)
    rows = pq.read_table(root / pipeline["queries"].path).to_pylist()
    composed = [r for r in rows if r["kind"] == COMPOSED_KIND]
    mono = [r for r in composed if not r["cross_lingual"]]
    assert {r["query_lang"] for r in mono} == {"en", *LANGS}
    for r in mono:
        page = pages[r["page_id"]]
        assert r["query_lang"] == page.lang
        crop = image_bytes(r["image"])
        # the crop is one of the page's picked regions, pixel for pixel
        picked = {p.png: p for p in pick_composed(page.image_png, page.regions, page.lang, 1)}
        assert crop in picked
        x0, y0, x1, y1 = picked[crop].box
        assert np.array_equal(_pixels(crop), _pixels(page.image_png)[y0:y1, x0:x1])
        # the text is a span of the page's own text, in its language (no English template)
        assert normalize(r["query"]) in normalize(page.text)
        if page.lang == "hi":
            assert script_share(r["query"], "Deva") >= 0.6
    # the same source page gives the same crop in every language (figures are never re-rendered)
    by_group: dict[str, set[bytes]] = {}
    for r in mono:
        by_group.setdefault(r["source_page_id"], set()).add(image_bytes(r["image"]))
    assert by_group and all(len(crops) == 1 for crops in by_group.values())
    # cross-lingual: a hi composed query also points at the parallel en page, with the same crop
    cross = [r for r in composed if r["cross_lingual"]]
    assert {(r["query_lang"], r["target_lang"]) for r in cross} == {("hi", "en"), ("en", "hi")}
    assert {image_bytes(r["image"]) for r in cross} <= {image_bytes(r["image"]) for r in mono}
    text_rows = [r for r in rows if r["kind"] != COMPOSED_KIND]
    assert text_rows and all(r["image"] is None for r in text_rows)


def test_pipeline_queries_shard_is_an_hf_image_column(pipeline):
    path = pipeline["root"] / pipeline["queries"].path
    table = pq.read_table(path)
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert table.schema.equals(QUERIES_SCHEMA, check_metadata=False)
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert isinstance(ds.features["image"], datasets.Image)
    kinds = ds["kind"]
    images = [ds[i]["image"] for i in range(len(ds))]
    assert all(
        isinstance(img, Image.Image) for img, k in zip(images, kinds, strict=True) if k == COMPOSED_KIND
    )
    assert all(img is None for img, k in zip(images, kinds, strict=True) if k != COMPOSED_KIND)


def test_pipeline_composed_rows_reach_the_train_shard_with_their_crop(pipeline):
    root = pipeline["root"]
    queries = {r["query_id"]: r for r in pq.read_table(root / pipeline["queries"].path).to_pylist()}
    train = pq.read_table(root / pipeline["train"].path)
    assert train.schema.equals(TRAIN_SCHEMA, check_metadata=False)
    rows = train.to_pylist()
    composed = [r for r in rows if r["kind"] == COMPOSED_KIND]
    assert composed and len({r["query_lang"] for r in composed}) == 2
    for r in rows:
        assert image_bytes(r["query_image"]) == image_bytes(queries[r["query_id"]]["image"])
        assert (r["kind"] == COMPOSED_KIND) == (r["query_image"] is not None)
    # mined on the query text like any other query (BM25 finds none across scripts: cross-lingual rows)
    assert all(r["negative_page_ids"] for r in composed if r["query_lang"] == r["positive_lang"])


def test_pipeline_old_queries_shard_without_image_still_trains(pipeline, tmp_path):
    """A queries shard written before the ``image`` column: read with the schema (null images), mined
    into train rows whose ``query_image`` is null."""
    from tasks.negatives.shard import train_shard

    root = tmp_path / "old"
    shutil.copytree(pipeline["root"], root)
    shutil.rmtree(root / "train")
    qpath = root / pipeline["queries"].path
    table = pq.read_table(qpath)
    old = table.filter(pa.compute.not_equal(table.column("kind"), COMPOSED_KIND)).drop_columns(["image"])
    pq.write_table(old, qpath)
    # another negatives config: the train shard is written anew (its completion record does not match)
    result = train_shard(root, pipeline["en"], pipeline["profile"] | {"negatives": {"miner": "bm25", "k": 3}})
    rows = pq.read_table(root / result.path).to_pylist()
    assert rows and all(r["query_image"] is None and r["kind"] != COMPOSED_KIND for r in rows)


def test_pipeline_summary_counts_composed_queries_per_language(pipeline):
    from tasks.run.summary import queries_summary, summarize_run, summary_markdown

    root = pipeline["root"]
    qsum = queries_summary(root)
    rows = pq.read_table(root / pipeline["queries"].path).to_pylist()
    expected: dict[str, int] = {}
    for r in rows:
        if r["kind"] == COMPOSED_KIND and not r["cross_lingual"]:
            expected[r["query_lang"]] = expected.get(r["query_lang"], 0) + 1
    assert qsum["composed_per_lang"] == dict(sorted(expected.items())) and set(expected) == {"en", *LANGS}
    md = summary_markdown(summarize_run(root), queries=qsum)
    assert "### Composed queries (region crop + question, monolingual)" in md
    for lang, n in expected.items():
        assert f"| {lang} | {n} |" in md
