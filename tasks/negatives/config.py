"""Config model of the negatives stage: ``[negatives]`` (miner, selection, modality mix, encoder, index)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tasks.config import StrictModel
from tasks.encoders import DEFAULT_ENCODER
from tasks.negatives.base import DEFAULT_K, DEFAULT_MARGIN, DEFAULT_TOP_N


class Bm25Options(StrictModel):
    """``[negatives.bm25]``: BM25 term-frequency saturation and length normalisation."""

    k1: float = 1.2
    b: float = 0.75


class IndexOptions(StrictModel):
    """``[negatives.index]``: the per-split mining index (``tasks/negatives/index.py``) and its search."""

    candidates: int = Field(0, ge=0)  # dense: first-pass FAISS hits per query (0: max(4 × top_n, 64))
    # bm25: a query with at most this many postings is scored exhaustively, else by the windowed search
    prune_postings: int = Field(0, ge=0)  # (0: 64 × candidates)
    max_segments: int = Field(16, ge=1)  # a build that would leave more live segments re-indexes the split
    ivf_threshold: int = Field(200_000, ge=1)  # dense: a segment with more pages gets a FAISS IVF index
    ivf_nlist: int = Field(0, ge=0)  # IVF lists (0: 4 × sqrt(pages))
    nprobe: int = Field(16, ge=1)  # IVF lists searched per query


class NegativesConfig(StrictModel):
    """``[negatives]``: which miner, how many negatives, and how they are selected."""

    miner: Literal["in-batch", "bm25", "dense"] = "in-batch"
    k: int = DEFAULT_K  # negatives per query
    top_n: int = DEFAULT_TOP_N  # sampled from the top-N survivors of the positive-aware filter
    margin: float = DEFAULT_MARGIN  # keep candidates scoring < margin × the positive's score
    seed: int = 0
    # [negatives.encoder]: an encoder table (miner = "dense"), checked by its engine's model
    encoder: dict[str, Any] = Field(default_factory=lambda: {"engine": DEFAULT_ENCODER})
    modality: dict[str, Any] | None = None  # [negatives.modality]: ModalityMix fields
    bm25: Bm25Options = Bm25Options()
    index: IndexOptions = IndexOptions()  # [negatives.index]: the per-split mining index


def normalise_negatives(value: Any) -> dict[str, Any]:
    """The ``[negatives]`` table normalised: every key, defaults filled in by the models (nested tables
    too), JSON-like; from a :class:`NegativesConfig`, an object with ``.negatives`` (a Profile) or a
    raw table. What miners read and what index and shard hashes are taken over."""
    from tasks.config import check_config, plain
    from tasks.encoders import check_encoder_config
    from tasks.negatives.base import ModalityMix

    value = getattr(value, "negatives", value)
    table = check_config(
        "negatives", plain(value) if isinstance(value, NegativesConfig) else value, NegativesConfig
    )
    table["encoder"] = check_encoder_config(table["encoder"], "negatives.encoder")
    if table["modality"]:
        table["modality"] = check_config("negatives.modality", table["modality"], ModalityMix)
    return table
