"""Config model of the negatives stage: ``[negatives]`` (miner, selection, modality mix, encoder)."""

from __future__ import annotations

from typing import Any, Literal

from tasks.config import StrictModel
from tasks.negatives.base import DEFAULT_K, DEFAULT_MARGIN, DEFAULT_TOP_N


class Bm25Options(StrictModel):
    """``[negatives.bm25]``: BM25 term-frequency saturation and length normalisation."""

    k1: float = 1.2
    b: float = 0.75


class NegativesConfig(StrictModel):
    """``[negatives]``: which miner, how many negatives, and how they are selected."""

    miner: Literal["in-batch", "bm25", "dense"] = "in-batch"
    k: int = DEFAULT_K  # negatives per query
    top_n: int = DEFAULT_TOP_N  # sampled from the top-N survivors of the positive-aware filter
    margin: float = DEFAULT_MARGIN  # keep candidates scoring < margin × the positive's score
    seed: int = 0
    encoder: dict[str, Any] | None = None  # [negatives.encoder]: an encoder table (miner = "dense")
    modality: dict[str, Any] | None = None  # [negatives.modality]: ModalityMix fields
    bm25: Bm25Options | None = None
