"""Selecting hard negatives for train shards: query → positive page + negatives, whatever the miner.

Miners (``tasks.negatives.miners.MINERS``, picked by a profile's ``[negatives]`` table):

- ``in-batch`` — no mined negatives (the M3DR paper's best setting for multilingual training: the
  trainer uses the other queries' positives of the batch). ``positive_score`` is nan.
- ``bm25`` — lexical scores (bm25s, Lucene variant, over our own tokens; ``bm25.py``). Tokenisation is
  language agnostic so it works for all 22 languages and for mixed-script text: NFKC + casefold, words =
  runs of letters/marks/digits (marks included, so Indic vowel signs stay inside their word), and
  runs of scripts written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar) become bigrams of
  grapheme clusters. BM25 cannot score across languages: a cross-lingual query's positive scores 0,
  so (see below) it gets no BM25 negatives.
- ``dense:<model>`` — cosine scores from any :class:`tasks.encoders.Encoder` (the base model, a
  checkpoint of ours, or the offline multilingual-e5-small).

Every scoring miner goes through :func:`select_negatives`, the single place negatives are chosen:

1. **Parallel-group exclusion.** No page with the positive's ``source_page_id`` (any language, the
   positive included) is ever a negative: all translations of the source page are relevant (graded 1
   or 2 in qrels). Miners that produce their own rows (the generic :class:`NegativeMiner` path) are
   re-filtered through the same function by :func:`mine_negatives`.
2. **Positive-aware filtering** (NV-Retriever, arXiv 2407.15831, "TopK-PercPos"): keep candidates
   whose score is below ``margin`` × the positive's score (default 0.95), i.e. drop likely false
   negatives that the scorer rates almost as relevant as the positive; take the top-N survivors and
   sample k of them, seeded by (seed, query_id) so reruns give identical rows. When the positive's
   score is not positive the relative threshold loses its meaning, so the threshold is defined as
   ``pos - (1 - margin) * |pos|``: equal to ``margin * pos`` for pos > 0, strictly below the
   positive by the same relative gap for pos < 0, and ``< 0`` for pos == 0 (BM25: the query shares
   no term with its positive → the scorer cannot tell hard from false negatives → BM25 scores are
   never negative, so no negatives). A nan positive score (in-batch) admits nothing. In every case
   each kept negative satisfies ``score < margin * positive_score``.
3. **Modality-aware selection** (MM-Embed, arXiv 2411.02571 §4): MM-Embed found that an MLLM
   retriever has a *modality bias* (given a text query asking for an image it returns the relevant
   text). It retrieves the top-50 candidates of each training query with a retriever trained on
   random negatives and samples two kinds of hard negatives: (C1) candidates whose modality is not
   the one the query asks for — they teach the model to respect the requested modality even when
   the content matches — and (C2) candidates of the requested modality that are not the positive,
   taken from the lower part of the top-50 (ranks past 45) to avoid false negatives.
   Our corpus maps this as follows. Every document is a page image that also has text and a
   language; a query asks for *the page in language B*. The "modality" of a page is its language
   (or, with ``match="script"``, its script) plus its kind (image page vs text-only page). The bias
   to fight is the multilingual analogue: a retriever prefers pages in the query's language or in
   English over the page in the target language. So:
   - **same-modality pool (C2)**: pages in the positive's language/kind from other source pages —
     the content distinction the model must learn within a language;
   - **wrong-modality pool (C1)**: pages in other languages (or of the other kind) from other source
     pages that the scorer ranks high — the ones the retriever confuses across languages.
   Parallel pages (C1's "right content, wrong modality" case in MM-Embed) are *relevant* here and
   stay excluded; NV-Retriever's positive-aware threshold replaces MM-Embed's "skip the top 45
   ranks" as the false-negative guard. ``wrong_ratio`` (default 0.25) of the k negatives come from
   the top-N of C1, the rest from the top-N of C2; with ``backfill`` a short pool is topped up from
   the other one.

Pure functions (:func:`mine_negatives`, :func:`select_negatives`, :func:`mined_to_train_rows`).
:func:`mine_negatives` scores every page of an in-memory corpus; train shards instead search the split's
mining index (``index.py``, built once per split; ``search.py``), which feeds the same
:func:`select_negatives` with candidates that provably hold the same top-N. The shard driver
(``shard.py``) applies them per split, ``task.py`` wraps the index build and the train shard in Prefect
tasks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from tasks.encoders import PageView
from tasks.negatives.base import (
    DEFAULT_K,
    DEFAULT_MARGIN,
    DEFAULT_TOP_N,
    Mined,
    MiningParams,
    ModalityMix,
    NegativeMiner,
    QueryView,
    ScoringMiner,
    missing_positive,
)
from tasks.schema import Reject, TrainRecord


def positive_threshold(positive_score: float, margin: float) -> float:
    """Scores strictly below this may be negatives: ``margin·pos`` for pos > 0 (see module docstring)."""
    if not math.isfinite(positive_score):
        return -math.inf
    if positive_score > 0:
        return margin * positive_score
    return positive_score - (1.0 - margin) * abs(positive_score)


def query_rng(seed: int, query_id: str) -> np.random.Generator:
    """A generator seeded by (seed, query_id): same rows on every rerun, independent per query."""
    h = int.from_bytes(hashlib.blake2b(query_id.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, h])


def _top(ix: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """The n best of candidate indices ``ix``: score descending, ties by index ascending."""
    if n <= 0 or ix.size == 0:
        return ix[:0]
    s = scores[ix]
    if ix.size > n:  # cut to everything scoring >= the n-th best (ties kept), then sort exactly
        cut = np.partition(s, ix.size - n)[ix.size - n]
        keep = s >= cut
        ix, s = ix[keep], s[keep]
    return ix[np.lexsort((ix, -s))][:n]


def _sample(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0 or pool.size == 0:
        return pool[:0]
    if pool.size <= n:
        return pool
    return pool[np.sort(rng.choice(pool.size, size=n, replace=False))]


def select_negatives(
    scores: np.ndarray,
    groups: np.ndarray,
    *,
    positive_group: int,
    positive_score: float,
    k: int,
    top_n: int,
    margin: float,
    rng: np.random.Generator,
    modalities: np.ndarray | None = None,
    positive_modality: int = -1,
    mix: ModalityMix | None = None,
) -> np.ndarray:
    """Indices of the chosen negatives among the candidates, best score first.

    The one place negatives are chosen: drops the positive's parallel group (``groups ==
    positive_group``) and everything not strictly under :func:`positive_threshold`, then samples k
    from the top-N (per modality pool when ``mix`` is given).
    """
    s = np.asarray(scores, dtype=np.float64)  # compare in float64: no rounding of the threshold
    allowed = (np.asarray(groups) != positive_group) & np.isfinite(s)
    allowed &= s < positive_threshold(positive_score, margin)
    ix = np.flatnonzero(allowed)
    if mix is None or modalities is None:
        picked = _sample(_top(ix, s, top_n), k, rng)
    else:
        same_mask = np.asarray(modalities)[ix] == positive_modality
        top_same, top_wrong = _top(ix[same_mask], s, top_n), _top(ix[~same_mask], s, top_n)
        n_same, n_wrong = mix.split(k)
        pick_same = _sample(top_same, n_same, rng)
        pick_wrong = _sample(top_wrong, n_wrong, rng)
        if mix.backfill:
            short_same, short_wrong = n_same - pick_same.size, n_wrong - pick_wrong.size
            if short_same > 0:
                rest = np.setdiff1d(top_wrong, pick_wrong, assume_unique=True)
                pick_wrong = np.concatenate([pick_wrong, _sample(_top(rest, s, rest.size), short_same, rng)])
            if short_wrong > 0:
                rest = np.setdiff1d(top_same, pick_same, assume_unique=True)
                pick_same = np.concatenate([pick_same, _sample(_top(rest, s, rest.size), short_wrong, rng)])
        picked = np.concatenate([pick_same, pick_wrong])
    return picked[np.lexsort((picked, -s[picked]))] if picked.size else picked


def miner_label(miner: NegativeMiner | ScoringMiner, params: MiningParams) -> str:
    """The ``miner`` column: name plus the options that shaped the rows."""
    if not isinstance(miner, ScoringMiner):  # in-batch (or a miner that picks its own): no options to show
        return miner.name
    return f"{miner.name};{params.describe()}"


def mine_negatives(
    queries: list[QueryView],
    corpus: list[PageView],
    miner: NegativeMiner | ScoringMiner,
    *,
    k: int = DEFAULT_K,
    top_n: int = DEFAULT_TOP_N,
    margin: float = DEFAULT_MARGIN,
    seed: int = 0,
    modality: ModalityMix | None = None,
    rejects: list[Reject] | None = None,
    block_size: int = 256,
) -> list[Mined]:
    """Mine negatives for every query whose positive page is in ``corpus`` (one Mined per such query).

    Scoring miners are scored in blocks of ``block_size`` queries (memory: block × n_pages floats)
    and selected by :func:`select_negatives`; any other :class:`NegativeMiner` runs its own ``mine``
    and its rows are re-filtered through the same function (parallel group, threshold). Queries
    whose positive is missing from the corpus are skipped and recorded in ``rejects``.
    """
    params = MiningParams(k=k, top_n=top_n, margin=margin, seed=seed, modality=modality)
    label = miner_label(miner, params)
    pos_of: dict[str, int] = {}
    for i, p in enumerate(corpus):
        if p.page_id in pos_of:
            raise ValueError(f"page_id {p.page_id!r} appears twice in the mining corpus")
        pos_of[p.page_id] = i
    group_ids: dict[str, int] = {}
    groups = np.array(
        [group_ids.setdefault(p.source_page_id, len(group_ids)) for p in corpus], dtype=np.int64
    )
    modalities = None
    if modality is not None:
        mod_ids: dict[str, int] = {}
        modalities = np.array([mod_ids.setdefault(modality.key(p), len(mod_ids)) for p in corpus], np.int64)

    kept: list[QueryView] = []
    for q in queries:
        if q.page_id in pos_of:
            kept.append(q)
        elif rejects is not None:
            rejects.append(missing_positive(q))

    def select(
        q: QueryView,
        cand: np.ndarray,
        cand_scores: np.ndarray,
        pos_score: float,
        kk: int,
        nn: int,
        mix: ModalityMix | None,
    ) -> tuple[list[str], list[float]]:
        pidx = pos_of[q.page_id]
        chosen = select_negatives(
            cand_scores,
            groups[cand],
            positive_group=int(groups[pidx]),
            positive_score=pos_score,
            k=kk,
            top_n=nn,
            margin=margin,
            rng=query_rng(seed, q.query_id),
            modalities=None if modalities is None else modalities[cand],
            positive_modality=-1 if modalities is None else int(modalities[pidx]),
            mix=mix,
        )
        return [corpus[int(cand[j])].page_id for j in chosen], [float(cand_scores[j]) for j in chosen]

    out: list[Mined] = []
    if isinstance(miner, ScoringMiner):
        if not kept:
            return out
        index = miner.index(corpus)
        all_ix = np.arange(len(corpus))
        for start in range(0, len(kept), block_size):
            block = kept[start : start + block_size]
            s = np.asarray(miner.score(index, block), dtype=np.float32)
            if s.shape != (len(block), len(corpus)):
                raise ValueError(
                    f"{miner.name}: scores of shape {s.shape}, expected {(len(block), len(corpus))}"
                )
            for q, row in zip(block, s, strict=True):
                pos = float(row[pos_of[q.page_id]])
                ids, scs = select(q, all_ix, row, pos, k, top_n, modality)
                out.append(Mined(q.query_id, ids, scs, pos, label))
        return out

    # Generic miner: trust nothing, re-filter its rows through the same selection (no re-sampling).
    by_id = {q.query_id: q for q in kept}
    for m in miner.mine(kept, corpus):
        q = by_id.get(m.query_id)
        if q is None:
            continue
        pairs = [
            (pos_of[pid], sc)
            for pid, sc in zip(m.negative_page_ids, m.negative_scores, strict=True)
            if pid in pos_of
        ]
        cand = np.array([c for c, _ in pairs], dtype=np.int64)
        cand_scores = np.array([sc for _, sc in pairs], dtype=np.float32)
        pos = float(np.float32(m.positive_score))
        ids, scs = select(q, cand, cand_scores, pos, len(pairs), len(pairs), None)
        out.append(Mined(q.query_id, ids, scs, pos, label))
    return out


# --------------------------------------------------------------------------------------------- rows


def group_page_ids(corpus: list[PageView]) -> dict[str, list[str]]:
    """source_page_id → sorted page_ids of that parallel group present in the corpus."""
    groups: dict[str, list[str]] = {}
    for p in corpus:
        groups.setdefault(p.source_page_id, []).append(p.page_id)
    return {g: sorted(ids) for g, ids in groups.items()}


def mined_to_train_rows(
    query_rows: list[dict[str, Any]],
    mined: list[Mined],
    corpus: list[PageView] | Mapping[str, list[str]],
) -> list[dict[str, Any]]:
    """Train-shard rows (``TRAIN_SCHEMA`` columns, in order) for the queries that were mined.

    ``query_rows`` are ``QUERIES_SCHEMA`` rows; queries without a Mined entry (rejected) are skipped.
    ``parallel_page_ids`` lists every corpus page of the positive's parallel group (positive included);
    ``corpus`` is the pages, or already ``source_page_id → sorted page_ids`` (from a mining index).
    """
    by_id = {m.query_id: m for m in mined}
    groups = corpus if isinstance(corpus, Mapping) else group_page_ids(corpus)
    rows: list[dict[str, Any]] = []
    for q in query_rows:
        m = by_id.get(q["query_id"])
        if m is None:
            continue
        record = TrainRecord(
            query_id=q["query_id"],
            query=q["query"],
            query_lang=q["query_lang"],
            kind=q["kind"],
            positive_page_id=q["page_id"],
            positive_lang=q["target_lang"],
            source_page_id=q["source_page_id"],
            source_id=q["source_id"],
            parallel_page_ids=groups.get(q["source_page_id"], [q["page_id"]]),
            negative_page_ids=list(m.negative_page_ids),
            negative_scores=[float(s) for s in m.negative_scores],
            positive_score=float(m.positive_score),
            miner=m.miner,
            split=q["split"],
            generator=q["generator"],
            prompt_version=q["prompt_version"],
            query_image=q.get("image"),
        )
        rows.append(record.to_row())
    return rows
