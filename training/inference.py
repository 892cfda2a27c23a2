"""Inference with a trained (or untrained) VLM retriever, behind ``tasks.encoders.Encoder``.

:class:`VlmRetrieverEncoder` loads any of:

- a training output dir (``final/`` or ``checkpoints/step-N``): ``retriever.json`` names the base model,
  the peft adapter is applied with ``PeftModel.from_pretrained``, heads from ``heads.safetensors``;
- an exported dir (:func:`training.export.export_merged`): LoRA merged, loaded with ``from_pretrained``;
- a bare backbone source (``recipe:gemma3-tiny``, ``hf:…``, a path) via :meth:`from_backbone` (the
  untrained baseline; multi-vector head randomly initialised from ``seed``).

Dense: ``encode_queries``/``encode_pages`` return ``[n, dim]`` float32 unit rows, where ``dim`` is the
Matryoshka truncation (default: full hidden size; truncation re-normalises). Multi-vector:
``encode_queries_multi``/``encode_pages_multi`` return ``(emb [n, L, D] float32 unit rows, mask [n, L]
bool)``, left-padded, scored with :func:`training.losses.maxsim`.

Listed as encoder engines ``vlm-retriever`` and ``vlm-base`` in ``training.encoders.ENCODERS`` (profile
table: ``{engine = "vlm-retriever", path = "...", dim = 768}``), so every flow can build them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.encoders import Encoder, PageView, l2_normalise
from tasks.models import fingerprint as model_fingerprint
from training.config import PromptSettings, TrainConfig
from training.data import PromptFormatter
from training.model import (
    ADAPTER_DIR,
    HEADS_FILE,
    RETRIEVER_FILE,
    RetrieverModel,
    hidden_size_of,
    load_backbone,
    load_processor,
)


def left_pad_cat(
    embs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate left-padded multi-vector batches ``[b_i, L_i, D]`` (+ masks ``[b_i, L_i]``) into
    ``[Σb, max L, D]``, padding each on the left so real tokens stay right-aligned."""
    width = max(e.shape[1] for e in embs)
    emb = torch.cat([torch.nn.functional.pad(e, (0, 0, width - e.shape[1], 0)) for e in embs])
    mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0), value=False) for m in masks])
    return emb, mask


def _kind_runs(pages: Sequence[PageView], size: int) -> list[list[PageView]]:
    """Batches of at most ``size`` consecutive pages of one kind (image / text-only), in order: the
    processor builds image and text-only documents in separate calls."""
    out: list[list[PageView]] = []
    for p in pages:
        if out and len(out[-1]) < size and out[-1][-1].kind == p.kind:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _retriever_for_inference(backbone: torch.nn.Module, config: TrainConfig) -> RetrieverModel:
    """The dense retriever over ``backbone`` (+ the multi-vector head when ``config`` has one)."""
    return RetrieverModel(
        backbone,
        hidden_size_of(backbone),
        dense=True,
        multivector=config.multivector,
        multivector_dim=config.multivector_dim,
        positions=config.positions,
    )


class VlmRetrieverEncoder:
    """A VLM retriever (dense and/or multi-vector) as an :class:`~tasks.encoders.Encoder`."""

    engine = "vlm-retriever"
    multimodal_queries = True  # encode_queries takes composed queries' images and a task instruction
    text_documents = True  # a PageView without an image is encoded from its text (the text view)

    def __init__(
        self,
        model: RetrieverModel,
        processor: Any,
        prompts: PromptSettings,
        *,
        model_id: str,
        dim: int | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.formatter = PromptFormatter(processor, prompts)
        self.dim = dim or model.hidden_size
        if self.dim > model.hidden_size:
            raise ValueError(f"dim {self.dim} > hidden size {model.hidden_size}")
        self.model_id = model_id if dim is None else f"{model_id}@{self.dim}"
        self._base_id = model_id
        self.batch_size = batch_size
        self.matryoshka_dims: list[int] = []  # trained truncation dims (from retriever.json), if known
        self.multivector = model.multi_head is not None
        self._fp_base = model_id  # set by the loaders to a content hash of weights + prompts

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path, *, dim: int | None = None, **kw: Any) -> VlmRetrieverEncoder:
        """From a training output (``final/``, a checkpoint) or an exported merged model directory."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / RETRIEVER_FILE).read_text())
        config = TrainConfig.model_validate(meta["train_config"])
        if meta.get("merged"):
            backbone = load_backbone(path)
            processor = load_processor(path)
        else:
            from peft import PeftModel

            base_dir = Path(meta["base_model"])
            if not base_dir.exists():
                from tasks.models import resolve_source

                base_dir = resolve_source(meta["base_model_source"])
            backbone = load_backbone(base_dir)
            if (path / ADAPTER_DIR).exists():
                backbone = PeftModel.from_pretrained(backbone, str(path / ADAPTER_DIR))
            processor = load_processor(path if (path / "processor_config.json").exists() else base_dir)
        model = _retriever_for_inference(backbone, config)
        if (path / HEADS_FILE).exists():
            model.load_head_state(load_file(str(path / HEADS_FILE)))
        enc = cls(model, processor, config.prompts, model_id=f"vlm-retriever:{path.name}", dim=dim, **kw)
        enc.matryoshka_dims = list(config.matryoshka_dims)
        enc._fp_base = f"vlm-retriever:{model_fingerprint(path, 20)}"
        return enc

    @classmethod
    def from_backbone(
        cls, model_dir: str | Path, config: TrainConfig, *, dim: int | None = None, **kw: Any
    ) -> VlmRetrieverEncoder:
        """The untrained baseline: the bare backbone with ``config``'s prompts (head seeded by seed)."""
        model_dir = Path(model_dir)
        backbone = load_backbone(model_dir)
        torch.manual_seed(config.seed)
        model = _retriever_for_inference(backbone, config)
        enc = cls(
            model,
            load_processor(model_dir),
            config.prompts,
            model_id=f"vlm-base:{model_dir.name}",
            dim=dim,
            **kw,
        )
        enc._fp_base = (
            "vlm-base:"
            + hashlib.sha256(
                (model_fingerprint(model_dir, 20) + config.model_dump_json()).encode()
            ).hexdigest()[:20]
        )
        return enc

    def truncated(self, dim: int) -> VlmRetrieverEncoder:
        """The same model answering with Matryoshka-truncated ``dim``-d vectors (no copy of weights)."""
        other = object.__new__(VlmRetrieverEncoder)
        other.__dict__.update(self.__dict__)
        if dim > self.model.hidden_size:
            raise ValueError(f"dim {dim} > hidden size {self.model.hidden_size}")
        other.dim = dim
        other.model_id = f"{self._base_id}@{dim}"
        return other

    @property
    def fingerprint(self) -> str:
        """What the vectors depend on (weights, heads, prompts, truncation), not where files live: the
        model key of cached corpus embeddings."""
        return self._fp_base if self.dim == self.model.hidden_size else f"{self._fp_base}@{self.dim}"

    # ------------------------------------------------------------------------------------ dense

    @torch.no_grad()
    def _embed(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.embed({k: v.to(self.device) for k, v in inputs.items()})

    def _dense(self, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
        if not batches:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [self._embed(b)["dense"][:, : self.dim].float().cpu().numpy() for b in batches]
        return l2_normalise(np.concatenate(out, axis=0))

    def _query_batches(
        self,
        texts: Sequence[str],
        *,
        dense: bool = True,
        multi: bool = False,
        images: Sequence[bytes | None] | None = None,
        task: str = "text-page",
    ) -> list[dict[str, torch.Tensor]]:
        """Query inputs per batch, augmented for the heads asked for (``PromptFormatter.query_batch``),
        with the task's instruction; ``images`` (one PNG per query, all or none) make composed queries."""
        if images is not None and (len(images) != len(texts) or not all(images)):
            raise ValueError("composed queries need one image per query")
        b = self.batch_size
        return [
            self.formatter.query_batch(
                list(texts[i : i + b]),
                dense=dense,
                multi=multi,
                images=None if images is None else list(images[i : i + b]),
                task=task,
            )
            for i in range(0, len(texts), b)
        ]

    def _page_batches(self, pages: Sequence[PageView]) -> list[dict[str, torch.Tensor]]:
        return [self.formatter.documents(run) for run in _kind_runs(pages, self.batch_size)]

    def encode_queries(
        self,
        texts: list[str],
        langs: list[str],
        *,
        images: Sequence[bytes | None] | None = None,
        task: str = "text-page",
    ) -> np.ndarray:
        """``[n, dim]`` float32 unit rows (the query prompt template is language independent)."""
        if len(texts) != len(langs):
            raise ValueError(f"{len(texts)} texts but {len(langs)} langs")
        return self._dense(self._query_batches(texts, images=images, task=task))

    def encode_pages(self, pages: list[PageView]) -> np.ndarray:
        """``[n, dim]`` float32 unit rows from the page image (+ region text if the prompts say so)."""
        return self._dense(self._page_batches(pages))

    # ------------------------------------------------------------------------------------ multi-vector

    def _multi(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        _, emb, mask = self._both(batches)
        return emb, mask

    def _both(self, batches: list[dict[str, torch.Tensor]]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Dense and multi-vector outputs of the same forward passes (half the cost of asking twice)."""
        if self.model.multi_head is None:
            raise ValueError("this retriever has no multi-vector head (trained with retriever='dense')")
        dense, embs, masks = [], [], []
        for b in batches:
            out = self._embed(b)
            dense.append(out["dense"][:, : self.dim].float().cpu().numpy())
            embs.append(out["multi"].float().cpu())
            masks.append(out["mask"].cpu())
        emb, mask = left_pad_cat(embs, masks)
        return l2_normalise(np.concatenate(dense, axis=0)), emb, mask

    def encode_queries_both(
        self, texts: list[str], *, images: Sequence[bytes | None] | None = None, task: str = "text-page"
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """``(dense [n, dim], multi [n, Lq, D], mask [n, Lq])`` from one pass over the queries."""
        return self._both(self._query_batches(texts, multi=True, images=images, task=task))

    def encode_pages_both(self, pages: list[PageView]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """``(dense [n, dim], multi [n, Ld, D], mask [n, Ld])`` from one pass over the pages."""
        return self._both(self._page_batches(pages))

    def encode_queries_multi(
        self, texts: list[str], *, images: Sequence[bytes | None] | None = None, task: str = "text-page"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[n, Lq, D]`` unit token vectors, ``[n, Lq]`` bool mask), left padded."""
        return self._multi(self._query_batches(texts, dense=False, multi=True, images=images, task=task))

    def encode_pages_multi(self, pages: list[PageView]) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[n, Ld, D]`` unit token vectors, ``[n, Ld]`` bool mask), left padded."""
        return self._multi(self._page_batches(pages))


def build_vlm_base(cfg: dict[str, Any]) -> Encoder:
    """Encoder engine ``vlm-base``: the untrained backbone (``model`` = a model source, ``config`` = a
    TrainConfig table for prompts, heads and seed): the baseline a trained retriever is compared to."""
    from training.trainer import resolve_model_dir

    config = TrainConfig.model_validate(cfg.get("config", {}))
    source = cfg.get("model", config.model)
    return VlmRetrieverEncoder.from_backbone(
        resolve_model_dir(source),
        config,
        dim=cfg.get("dim"),
        batch_size=int(cfg.get("batch_size", 16)),
        device=cfg.get("device"),
    )


def build_vlm_retriever(cfg: dict[str, Any]) -> Encoder:
    """Encoder engine factory: ``{"engine": "vlm-retriever", "path": ..., "dim": ..., "batch_size": ...}``."""
    return VlmRetrieverEncoder.load(
        cfg["path"], dim=cfg.get("dim"), batch_size=int(cfg.get("batch_size", 16)), device=cfg.get("device")
    )
