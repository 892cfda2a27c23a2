"""Export a trained retriever as one standalone model directory (LoRA merged into the backbone).

The output loads with ``AutoModelForImageTextToText.from_pretrained`` (``Gemma3ForConditionalGeneration``
for Gemma-3) and ``AutoProcessor.from_pretrained`` with no peft and no base model around; the
multi-vector head (if any) sits beside it in ``heads.safetensors`` and ``retriever.json`` says how to
pool (``training.inference.VlmRetrieverEncoder.load`` reads all of it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from training.model import ADAPTER_DIR, HEADS_FILE, RETRIEVER_FILE, load_backbone, load_processor


def export_merged(src: str | Path, out: str | Path) -> Path:
    """Merge the LoRA adapter of ``src`` (``final/`` or a checkpoint dir) into its base model and write a
    standalone directory ``out`` (written to a temp dir, then renamed)."""
    from peft import PeftModel

    src, out = Path(src), Path(out)
    meta = json.loads((src / RETRIEVER_FILE).read_text())
    base_dir = Path(meta["base_model"])
    if not base_dir.exists():
        from tasks.models import resolve_source

        base_dir = resolve_source(meta["base_model_source"])
    model = load_backbone(base_dir)
    if (src / ADAPTER_DIR).exists():
        model = PeftModel.from_pretrained(model, str(src / ADAPTER_DIR)).merge_and_unload()
    processor = load_processor(src if (src / "processor_config.json").exists() else base_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    if (src / HEADS_FILE).exists():
        shutil.copy2(src / HEADS_FILE, tmp / HEADS_FILE)
    meta.update({"merged": True, "base_model": ".", "merged_from": str(src)})
    (tmp / RETRIEVER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
