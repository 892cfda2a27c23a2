"""The retriever: a vision-language backbone (LoRA via peft) with a dense and/or a multi-vector head.

- **dense** (NetraEmbed-style): the final hidden state of the *last* token (inputs are left-padded, so
  that is position -1 of every row), L2-normalised. Matryoshka: the leading ``d`` dims of it,
  re-normalised, for every ``d`` in ``matryoshka_dims`` — truncation at inference needs no retraining.
- **multi-vector** (ColNetraEmbed-style): a linear head ``hidden → multivector_dim`` (128) on every
  token, L2-normalised per token, with the attention mask as the token mask; scored by MaxSim.

Both read the same backbone pass (``retriever = "both"`` trains one LoRA for the two heads).
Positions (``TrainConfig.positions``): ``index`` (default) counts them the way transformers and
NetraEmbed do, from the first column, left padding included; ``mask`` counts from each row's first real
token. Gemma-3's rotary embeddings see only position *differences*, so the two are the same function
(the colpali round trip compares them at cosine ≥ 0.9999 on mixed-length batches); they differ in
float rounding only. ``mask`` makes a row's inputs bitwise independent of its batch's padding, which
is what keeps 2 ranks × 4 on the loss curve of 1 process × 8 for several steps (a MaxSim argmax can
flip on a 1e-7 difference); see the README.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.data import MULTI_PREFIX
from training.losses import at_least_fp32

HEADS_FILE = "heads.safetensors"
RETRIEVER_FILE = "retriever.json"
ADAPTER_DIR = "adapter"
FINAL_DIR = "final"  # train-netra's last adapter + heads, under the run directory
PHASES_DIR = "phases"  # a phased train-netra run: <out>/phases/<i>-<name>/ (training.launch.phase_plan)


def last_token_pool(hidden: torch.Tensor) -> torch.Tensor:
    """hidden ``[B, L, H]`` of left-padded rows → ``[B, H]`` (the last position of each row)."""
    return hidden[:, -1, :]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` mask (left padded) → ``[B, L]`` positions 0.. over the real tokens (padding gets 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def inner_backbone(model: nn.Module) -> nn.Module:
    """The transformers base model (``Gemma3Model``: vision tower + projector + language model) inside a
    ``*ForConditionalGeneration``, whether or not it is wrapped by peft (LoRA layers are injected in
    place, so calling the inner module runs them)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


class RetrieverModel(nn.Module):
    """Backbone + heads. ``forward(inputs)`` → dict with ``dense`` ``[B, H]`` (unit rows) and/or
    ``multi`` ``[B, L, D]`` (unit rows) + ``mask`` ``[B, L]``."""

    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int,
        *,
        dense: bool,
        multivector: bool,
        multivector_dim: int,
        positions: str = "index",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_positions = positions == "mask"
        self.dense = dense
        self.multivector = multivector
        self.hidden_size = hidden_size
        self.multi_head = nn.Linear(hidden_size, multivector_dim) if multivector else None

    def hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states ``[B, L, H]`` for processor outputs (input_ids, attention_mask,
        optional pixel_values + token_type_ids)."""
        mask = inputs["attention_mask"]
        kwargs: dict[str, Any] = {
            "input_ids": inputs["input_ids"],
            "attention_mask": mask,
            "use_cache": False,
        }
        if self.mask_positions:
            kwargs["position_ids"] = position_ids_from_mask(mask)
        if inputs.get("pixel_values") is not None:
            kwargs["pixel_values"] = inputs["pixel_values"]
        if inputs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = inputs["token_type_ids"]
        return inner_backbone(self.backbone)(**kwargs).last_hidden_state

    def embed(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Head outputs for one batch. Query batches may carry the multi-vector head's own inputs under
        ``multi_*`` keys (different query augmentation, ``PromptFormatter.query_batch``): then that
        head reads a second backbone pass over them."""
        own = {k[len(MULTI_PREFIX) :]: v for k, v in inputs.items() if k.startswith(MULTI_PREFIX)}
        base = {k: v for k, v in inputs.items() if not k.startswith(MULTI_PREFIX)}
        hidden = self.hidden(base)
        out: dict[str, torch.Tensor] = {}
        if self.dense:
            out["dense"] = F.normalize(at_least_fp32(last_token_pool(hidden)), dim=-1)
        if self.multivector:
            assert self.multi_head is not None
            multi_inputs = own or base
            h = self.hidden(own) if own else hidden
            multi = self.multi_head(h.to(self.multi_head.weight.dtype))
            out["multi"] = F.normalize(at_least_fp32(multi), dim=-1)
            out["mask"] = multi_inputs["attention_mask"].bool()
        return out

    def forward(
        self, queries: dict[str, torch.Tensor], docs: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One call for both sides (DDP hooks see a single forward)."""
        return self.embed(queries), self.embed(docs)

    def head_state(self) -> dict[str, torch.Tensor]:
        """Trainable head weights (saved beside the adapter)."""
        if self.multi_head is None:
            return {}
        return {
            f"multi_head.{k}": v.detach().cpu().contiguous() for k, v in self.multi_head.state_dict().items()
        }

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.multi_head is not None:
            self.multi_head.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("multi_head.")}
            )


def load_processor(model_dir: Path) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    processor.tokenizer.padding_side = "left"  # last-token pooling reads position -1
    return processor


def load_backbone(
    model_dir: Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> nn.Module:
    """The image-text-to-text model (``Gemma3ForConditionalGeneration`` for Gemma-3) in eval mode, its
    weights in ``dtype`` and its attention implementation named (not left to transformers' choice)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation=attn_implementation
    )
    model.eval()
    return model


def hidden_size_of(backbone: nn.Module) -> int:
    cfg = backbone.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.hidden_size)


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft wrapping a model (``get_peft_model``, ``PeftModel.from_pretrained``): peft 0.21 reads
    ``is_gradient_checkpointing``, which transformers 5 deprecates, so every load printed a FutureWarning
    no m3dr user can act on. Only that message is silenced; every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def apply_lora(backbone: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap the backbone with peft LoRA per ``config.lora`` (all base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        bias="none",
    )
    with peft_wrapping():
        return get_peft_model(backbone, lcfg)


def build_retriever(
    model_dir: Path, config: TrainConfig, *, for_training: bool = True, device_type: str = "cpu"
) -> RetrieverModel:
    """Load the backbone from ``model_dir``, add LoRA (if enabled) and the heads for ``config``.

    On ``device_type`` where ``config.bf16`` holds the frozen weights load in bf16 (half the memory of
    fp32, and no bf16 copies kept by autocast for backward); peft keeps the LoRA adapters in fp32
    (``autocast_adapter_dtype``) and the heads are built in fp32, so optimizer state and updates stay fp32.
    """
    dtype = torch.bfloat16 if config.bf16(device_type) else torch.float32
    backbone = load_backbone(model_dir, dtype=dtype, attn_implementation=config.attn_implementation)
    hidden = hidden_size_of(backbone)
    if config.dense and max(config.matryoshka_dims) > hidden:
        raise ValueError(f"matryoshka dim {max(config.matryoshka_dims)} > hidden size {hidden}")
    if for_training:
        if config.lora.enabled:
            backbone = apply_lora(backbone, config)
        else:
            for p in backbone.parameters():
                p.requires_grad_(True)
        if config.checkpointing(device_type):
            base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = RetrieverModel(
        backbone,
        hidden,
        dense=config.dense,
        multivector=config.multivector,
        multivector_dim=config.multivector_dim,
        positions=config.positions,
    )
    return model


def retriever_meta(config: TrainConfig, *, base_model: str, merged: bool, hidden_size: int) -> dict[str, Any]:
    """What a loader needs besides weights (written as ``retriever.json``): the base model's local path
    and its source string (``recipe:…``/``hf:…``, re-resolved when the path does not exist here)."""
    return {
        "format": "m3dr-retriever/1",
        "base_model": base_model,
        "base_model_source": config.model,
        "merged": merged,
        "retriever": config.retriever,
        "hidden_size": hidden_size,
        "matryoshka_dims": config.matryoshka_dims,
        "multivector_dim": config.multivector_dim if config.multivector else None,
        "prompts": config.prompts.model_dump(mode="json"),
        "train_config": config.model_dump(mode="json"),
    }


def save_weights(
    model: RetrieverModel, out: Path, meta: dict[str, Any], processor: Any | None = None
) -> Path:
    """Adapter (peft ``save_pretrained``: adapter_config.json + adapter_model.safetensors) + heads
    (safetensors) + ``retriever.json`` (+ processor files) into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model.backbone, "peft_config"):
        model.backbone.save_pretrained(str(out / ADAPTER_DIR))
    heads = model.head_state()
    if heads:
        save_file(heads, str(out / HEADS_FILE))
    (out / RETRIEVER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if processor is not None:
        processor.save_pretrained(str(out))
    return out
