"""Export a trained retriever as one standalone model directory (LoRA merged into the backbone).

``--format merged`` (:func:`export_merged`): the output loads with
``AutoModelForImageTextToText.from_pretrained`` (``Gemma3ForConditionalGeneration`` for Gemma-3) and
``AutoProcessor.from_pretrained`` with no peft and no base model around; the multi-vector head (if any)
sits beside it in ``heads.safetensors`` and ``retriever.json`` says how to pool
(``training.inference.VlmRetrieverEncoder.load`` reads all of it).

``--format colpali``: see :func:`training.colpali.export_colpali` (NetraEmbed-format, for
colpali-engine's ``BiGemma3`` / ``ColGemma3``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from training.model import (
    ADAPTER_DIR,
    FINAL_DIR,
    HEADS_FILE,
    PHASES_DIR,
    RETRIEVER_FILE,
    load_backbone,
    load_processor,
    peft_wrapping,
)


def trained_dir(src: str | Path) -> Path:
    """A train-netra output dir → its ``final/`` (a phased run: its last phase's); a ``final/`` or
    checkpoint dir as given."""
    src = Path(src)
    if not (src / RETRIEVER_FILE).exists() and (src / FINAL_DIR / RETRIEVER_FILE).exists():
        return src / FINAL_DIR
    phases = sorted(
        (p for p in (src / PHASES_DIR).glob("*-*") if (p / FINAL_DIR / RETRIEVER_FILE).exists()),
        key=lambda p: int(p.name.split("-", 1)[0]) if p.name.split("-", 1)[0].isdigit() else -1,
    )
    if not (src / RETRIEVER_FILE).exists() and phases:
        return phases[-1] / FINAL_DIR
    if not (src / RETRIEVER_FILE).exists():
        raise FileNotFoundError(f"{src} is not a train-netra output (no {RETRIEVER_FILE} in it or in final/)")
    return src


class Merged(NamedTuple):
    model: nn.Module  # the backbone with the LoRA merged in (float32: callers cast where they save)
    processor: Any
    meta: dict[str, Any]  # retriever.json
    src: Path  # the resolved final/ or checkpoint dir
    base_dir: Path  # the base model it was trained from


def merged_backbone(src: str | Path) -> Merged:
    """The backbone of a trained run with its LoRA merged in, and what was read to build it."""
    from peft import PeftModel

    src = trained_dir(src)
    meta = json.loads((src / RETRIEVER_FILE).read_text())
    base_dir = Path(meta["base_model"])
    if meta.get("merged"):
        base_dir = src
    elif not base_dir.exists():
        from tasks.models import resolve_source

        base_dir = resolve_source(meta["base_model_source"])
    model = load_backbone(base_dir)
    if (src / ADAPTER_DIR).exists():
        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(src / ADAPTER_DIR)).merge_and_unload()
    processor = load_processor(src if (src / "processor_config.json").exists() else base_dir)
    return Merged(model, processor, meta, src, base_dir)


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (bf16 for Gemma-3-4B-IT), read from its ``config.json``: the
    merge runs in float32, exports go back to the base model's precision (a 4B model: 8.6 GB, not 17)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    value = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    return value if isinstance(value, torch.dtype) else torch.float32


def replace_dir(tmp: Path, out: Path) -> Path:
    """Move a finished export into place (the old export, if any, is removed only now)."""
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export_merged(src: str | Path, out: str | Path) -> Path:
    """Merge the LoRA adapter of ``src`` (a run dir, ``final/`` or a checkpoint dir) into its base model
    (in fp32) and write a standalone directory ``out`` in the base model's dtype (bf16 for Gemma-3; the
    multi-vector head stays fp32), written to a temp dir, then renamed."""
    out = Path(out)
    model, processor, meta, src, base_dir = merged_backbone(src)
    model.to(checkpoint_dtype(base_dir))  # merged in fp32, saved in the base model's precision
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    if (src / HEADS_FILE).exists():
        shutil.copy2(src / HEADS_FILE, tmp / HEADS_FILE)
    meta.update({"merged": True, "base_model": ".", "merged_from": str(src)})
    (tmp / RETRIEVER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return replace_dir(tmp, out)
