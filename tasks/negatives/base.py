"""What miners see and return: query views, mined rows, mining parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tasks.encoders import PageView
from tasks.languages import LANGUAGES
from tasks.schema import Reject, RejectReason

POSITIVE_NOT_IN_CORPUS = RejectReason.POSITIVE_NOT_IN_CORPUS


DEFAULT_K = 4


DEFAULT_TOP_N = 30


DEFAULT_MARGIN = 0.95


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
        """From a normalised ``[negatives]`` table (``tasks.negatives.config.normalise_negatives``)."""
        mod = cfg["modality"]
        return cls(
            k=int(cfg["k"]),
            top_n=int(cfg["top_n"]),
            margin=float(cfg["margin"]),
            seed=int(cfg["seed"]),
            modality=ModalityMix(**mod) if mod else None,
        )


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


def missing_positive(q: QueryView) -> Reject:
    """The rejects row of a query whose positive page is not in the mining corpus / index."""
    return Reject(
        "negatives", q.query_id, POSITIVE_NOT_IN_CORPUS, f"positive {q.page_id} not in corpus", q.query_lang
    )
