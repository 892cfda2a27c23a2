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

Precision: on CUDA the backbone runs in bf16 with a training output's LoRA merged into it (peft
``merge_and_unload``), the heads in fp32; on CPU in fp32 with the adapter unmerged (the vectors of
earlier releases, bit for bit). Pages are decoded and run through the processor in a
``torch.utils.data.DataLoader`` (``num_workers`` processes ahead of the forward pass, pinned memory on
CUDA; ``0`` decodes in-process, batch by batch).

Listed as encoder engines ``vlm-retriever`` and ``vlm-base`` in ``training.encoders.ENCODERS`` (profile
table: ``{engine = "vlm-retriever", path = "...", dim = 768}``), so every flow can build them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.encoders import Encoder, PageView, l2_normalise
from tasks.models import fingerprint as model_fingerprint
from training.config import PromptSettings, TrainConfig
from training.data import PromptFormatter, loader_context
from training.model import (
    ADAPTER_DIR,
    HEADS_FILE,
    RETRIEVER_FILE,
    RetrieverModel,
    hidden_size_of,
    load_backbone,
    load_processor,
    peft_wrapping,
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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def inference_dtype(device: torch.device) -> torch.dtype:
    """The backbone's precision for benchmarking: bf16 on CUDA (as trained and as colpali-engine runs
    it), fp32 on CPU (where bf16 matmuls are slow and the vectors of earlier releases are fp32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_workers(device: torch.device) -> int:
    """Page-decoding processes: a few on CUDA, where decoding would otherwise stall the GPU; none on
    the CPU, where they would compete with the forward pass for the same cores."""
    return min(4, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0


class _DocumentBatches(torch.utils.data.Dataset):
    """Item ``i``: the processor's inputs for the ``i``-th run of pages (PNG decoding + processor),
    what DataLoader workers compute ahead of the forward pass."""

    def __init__(self, formatter: PromptFormatter, runs: list[list[PageView]]) -> None:
        self.formatter, self.runs = formatter, runs

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.formatter.documents(self.runs[i])


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


def _dtype_tag(dtype: torch.dtype) -> str:
    """Fingerprint suffix of a non-fp32 backbone: its vectors differ, so cached corpora must not mix
    (fp32 keeps the bare fingerprint of earlier releases and their caches)."""
    return "" if dtype == torch.float32 else f"@{str(dtype).removeprefix('torch.')}"


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
        num_workers: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.num_workers = default_workers(self.device) if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
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
        device = resolve_device(kw.pop("device", None))
        dtype = inference_dtype(device)
        if meta.get("merged"):
            backbone = load_backbone(path, dtype=dtype)
            processor = load_processor(path)
        else:
            from peft import PeftModel

            base_dir = Path(meta["base_model"])
            if not base_dir.exists():
                from tasks.models import resolve_source

                base_dir = resolve_source(meta["base_model_source"])
            backbone = load_backbone(base_dir, dtype=dtype)
            if (path / ADAPTER_DIR).exists():
                with peft_wrapping():
                    backbone = PeftModel.from_pretrained(backbone, str(path / ADAPTER_DIR))
                # Merged on CUDA: one bf16 matmul per projection instead of three. Unmerged on CPU, so
                # the fp32 vectors stay those of earlier releases bit for bit (merging moves them by
                # float rounding, ~1e-7).
                if dtype != torch.float32:
                    backbone = backbone.merge_and_unload()
            processor = load_processor(path if (path / "processor_config.json").exists() else base_dir)
        model = _retriever_for_inference(backbone, config)
        if (path / HEADS_FILE).exists():
            model.load_head_state(load_file(str(path / HEADS_FILE)))
        model_id = f"vlm-retriever:{path.name}"
        enc = cls(model, processor, config.prompts, model_id=model_id, dim=dim, device=device, **kw)
        enc.matryoshka_dims = list(config.matryoshka_dims)
        enc._fp_base = f"vlm-retriever:{model_fingerprint(path, 20)}{_dtype_tag(dtype)}"
        return enc

    @classmethod
    def from_backbone(
        cls, model_dir: str | Path, config: TrainConfig, *, dim: int | None = None, **kw: Any
    ) -> VlmRetrieverEncoder:
        """The untrained baseline: the bare backbone with ``config``'s prompts (head seeded by seed)."""
        model_dir = Path(model_dir)
        device = resolve_device(kw.pop("device", None))
        dtype = inference_dtype(device)
        backbone = load_backbone(model_dir, dtype=dtype)
        torch.manual_seed(config.seed)
        model = _retriever_for_inference(backbone, config)
        enc = cls(
            model,
            load_processor(model_dir),
            config.prompts,
            model_id=f"vlm-base:{model_dir.name}",
            dim=dim,
            device=device,
            **kw,
        )
        digest = hashlib.sha256((model_fingerprint(model_dir, 20) + config.model_dump_json()).encode())
        enc._fp_base = f"vlm-base:{digest.hexdigest()[:20]}{_dtype_tag(dtype)}"
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
        # non_blocking: the DataLoader pins the batch on CUDA, so the copy overlaps the last kernels
        return self.model.embed({k: v.to(self.device, non_blocking=True) for k, v in inputs.items()})

    def _dense(self, batches: Iterable[dict[str, torch.Tensor]]) -> np.ndarray:
        out = [self._embed(b)["dense"][:, : self.dim].float().cpu().numpy() for b in batches]
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
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

    def _page_batches(self, pages: Sequence[PageView]) -> Iterable[dict[str, torch.Tensor]]:
        """Processor inputs per batch of pages, in order, decoded by ``num_workers`` DataLoader
        processes ahead of the forward pass (never more than the batches after the first) or, with 0,
        in-process one batch at a time; pinned on CUDA for non-blocking copies."""
        runs = _kind_runs(pages, self.batch_size)
        workers = min(self.num_workers, max(0, len(runs) - 1))
        return torch.utils.data.DataLoader(
            _DocumentBatches(self.formatter, runs),
            batch_size=None,  # items are whole batches already
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            multiprocessing_context=loader_context() if workers else None,
            generator=torch.Generator().manual_seed(0),  # leave the global RNG alone
        )

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

    def _multi(self, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        _, emb, mask = self._both(batches)
        return emb, mask

    def _both(
        self, batches: Iterable[dict[str, torch.Tensor]]
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
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
        num_workers=cfg.get("num_workers"),
    )


def build_vlm_retriever(cfg: dict[str, Any]) -> Encoder:
    """Encoder engine factory: ``{"engine": "vlm-retriever", "path": ..., "dim": ..., "batch_size": ...,
    "device": ..., "num_workers": ...}`` (device and workers default by hardware)."""
    return VlmRetrieverEncoder.load(
        cfg["path"],
        dim=cfg.get("dim"),
        batch_size=int(cfg.get("batch_size", 16)),
        device=cfg.get("device"),
        num_workers=cfg.get("num_workers"),
    )
