"""colpali-engine interop: export to the NetraEmbed format, and score any colpali-engine retriever.

**Export** (:func:`export_colpali`, ``m3dr export --format colpali <run> <dir>``): one directory that
``colpali_engine.models.BiGemma3`` + ``BiGemmaProcessor3`` (dense, last-token pooled, Matryoshka by
slicing) and ``ColGemma3`` + ``ColGemmaProcessor3`` (multi-vector, 128-d ``custom_text_proj``) load with
``from_pretrained`` — the classes of the published NetraEmbed / ColNetraEmbed. The LoRA is merged; the
weights are ``Gemma3Model``'s (keys ``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.*``) plus ``custom_text_proj.*`` when the run has a multi-vector head (``BiGemma3``
ignores that key), so a ``both`` run exports once for the two classes. The processor files carry the
chat template both processors apply. A run is exportable only if it was trained with the prompts those
processors hard-code (``prompts.style = "chat"``, the default); anything else fails naming the field.

**Scoring** (:class:`ColpaliEncoder`, encoder engine ``colpali``, ``m3dr benchmark --model
colpali:[<Class>:]<dir|hub id>``): any ``Bi*`` (dense) or ``Col*`` (multi-vector) model of
colpali-engine behind :class:`tasks.encoders.Encoder`, through the model's own processor
(``process_queries`` / ``process_images``), so the benchmark scores published checkpoints exactly as
their authors run them. The class comes from ``<Class>:`` or from the checkpoint's ``architectures``.

colpali-engine is a test/extra dependency, never a runtime one: 0.3.18 declares ``torch<2.14`` and
``peft<0.21`` while m3dr pins torch 2.14.1, so it is installed with ``pip install --no-deps
colpali-engine==0.3.18`` (its other requirements — transformers, pillow, scipy, requests — are ours
already). Under transformers 5.x, 0.3.18's ``BiGemma3.from_pretrained`` looks up an attribute that
transformers removed; passing ``key_mapping={}`` avoids it (done here; say so to users).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.encoders import PageView, l2_normalise
from training.config import PromptSettings, TrainConfig
from training.data import decode_image
from training.export import checkpoint_dtype, merged_backbone, replace_dir
from training.inference import left_pad_cat
from training.model import HEADS_FILE

M3DR_META_FILE = "m3dr_retriever.json"
COLPALI_MULTIVECTOR_DIM = 128  # ColGemma3 hard-codes its projection width
BIGEMMA3_DIMS = (768, 1536, 2560)  # BiGemma3.forward(embedding_dim=...) accepts only these
INSTALL_HINT = "pip install --no-deps colpali-engine==0.3.18  (see README: colpali-engine)"

# Processor class of each model class where the name is not ``<Model>Processor``.
_PROCESSORS = {
    "BiGemma3": "BiGemmaProcessor3",
    "ColGemma3": "ColGemmaProcessor3",
    "BiQwen2_5": "BiQwen2_5_Processor",
    "ColQwen2_5": "ColQwen2_5_Processor",
}
# Hub names whose checkpoint config does not name a colpali class (adapters, older uploads).
_NAME_HINTS = (
    ("colnetraembed", "ColGemma3"),
    ("netraembed", "BiGemma3"),
    ("colqwen2.5", "ColQwen2_5"),
    ("colqwen2", "ColQwen2"),
    ("colsmol", "ColIdefics3"),
    ("colpali", "ColPali"),
)


def _colpali_models() -> Any:
    try:
        import colpali_engine.models as models
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"colpali-engine is not installed: {INSTALL_HINT}") from exc
    return models


# ---------------------------------------------------------------------------------------------- export


def exportable(config: TrainConfig, hidden_model_type: str, hidden_size: int = 0) -> list[str]:
    """Why a run cannot be read by colpali-engine's Gemma-3 classes (empty: it can)."""
    p, want = config.prompts, PromptSettings()
    problems = []
    if hidden_model_type != "gemma3":
        problems.append(f"backbone is {hidden_model_type!r}; BiGemma3/ColGemma3 are Gemma-3 classes")
    if p.style != "chat":
        problems.append("prompts.style must be 'chat' (the processors apply the chat template)")
    if p.doc_text != "none":
        problems.append("prompts.doc_text must be 'none' (process_images passes no page text)")
    for name in ("query", "document", "append_eos"):
        if getattr(p, name) != getattr(want, name):
            problems.append(f"prompts.{name} must be {getattr(want, name)!r} (hard-coded in the processors)")
    if config.dense and p.query_augmentation_dense != want.query_augmentation_dense:
        problems.append(f"prompts.query_augmentation_dense must be {want.query_augmentation_dense}")
    if config.multivector and p.query_augmentation_multi != want.query_augmentation_multi:
        problems.append(f"prompts.query_augmentation_multi must be {want.query_augmentation_multi}")
    if p.instructions.get("text-page"):
        problems.append("prompts.instructions['text-page'] must be empty (process_queries adds none)")
    if config.multivector and config.multivector_dim != COLPALI_MULTIVECTOR_DIM:
        problems.append(f"multivector_dim must be {COLPALI_MULTIVECTOR_DIM} (ColGemma3's projection)")
    if config.dense and hidden_size:
        untrained = [d for d in bigemma3_dims(hidden_size) if d not in config.matryoshka_dims]
        if untrained:
            problems.append(
                f"BiGemma3 answers with embedding_dim {list(BIGEMMA3_DIMS)}, i.e. "
                f"{bigemma3_dims(hidden_size)} on this {hidden_size}-wide backbone, and {untrained} were "
                f"never trained (matryoshka_dims = {config.matryoshka_dims}); train with "
                "matryoshka_dims including them"
            )
    return problems


def bigemma3_dims(hidden_size: int) -> list[int]:
    """The vector widths BiGemma3 can hand out on a backbone of ``hidden_size``: it slices the pooled
    state to ``embedding_dim`` ∈ {768, 1536, 2560}; a slice past the width is the whole vector."""
    return sorted({min(d, hidden_size) for d in BIGEMMA3_DIMS})


def _model_card(classes: list[str], meta: dict[str, Any]) -> str:
    names = ", ".join(classes + [_PROCESSORS[c] for c in classes])
    loads = "\n".join(
        f"model = {c}.from_pretrained(path{', key_mapping={}' if c == 'BiGemma3' else ''}).eval()\n"
        f"processor = {_PROCESSORS[c]}.from_pretrained(path)"
        for c in classes
    )
    return (
        "# m3dr retriever (NetraEmbed format)\n\n"
        f"Trained by m3dr train-netra from `{meta.get('base_model_source')}` "
        f"(retriever: {meta.get('retriever')}). Load with colpali-engine:\n\n"
        f"```python\nfrom colpali_engine.models import {names}\n"
        f"path = '.'\n{loads}\n```\n\n"
        "Queries: `processor.process_queries([...])`; pages: `processor.process_images([...])`.\n"
        f"Dense Matryoshka dims trained: {meta.get('matryoshka_dims')} (slice, then L2-normalise).\n"
    )


def export_colpali(src: str | Path, out: str | Path) -> Path:
    """Write ``out``, loadable by ``BiGemma3`` (dense runs) and/or ``ColGemma3`` (multi-vector runs).

    ``src`` is a train-netra run dir, its ``final/`` or a checkpoint dir. Raises ``ValueError`` naming
    each setting colpali-engine's processors cannot reproduce.
    """
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    out = Path(out)
    model, processor, meta, src, base_dir = merged_backbone(src)
    config = TrainConfig.model_validate(meta["train_config"])
    problems = exportable(
        config, str(getattr(model.config, "model_type", "")), int(meta.get("hidden_size") or 0)
    )
    if problems:
        raise ValueError(f"{src} cannot be exported for colpali-engine: " + "; ".join(problems))
    dtype = checkpoint_dtype(base_dir)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.model.state_dict().items()}
    classes = []
    if config.dense:
        classes.append("BiGemma3")
    if config.multivector:
        heads = load_file(str(src / HEADS_FILE))
        state["custom_text_proj.weight"] = heads["multi_head.weight"].to(dtype).contiguous()
        state["custom_text_proj.bias"] = heads["multi_head.bias"].to(dtype).contiguous()
        classes.append("ColGemma3")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config
    cfg.architectures = classes
    cfg.dtype = dtype
    cfg.save_pretrained(str(tmp))
    save_torch_state_dict(state, str(tmp), max_shard_size="5GB")
    processor.save_pretrained(str(tmp))
    meta = {**meta, "format": "colpali/netraembed", "colpali_classes": classes, "exported_from": str(src)}
    (tmp / M3DR_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(_model_card(classes, meta))
    return replace_dir(tmp, out)


# --------------------------------------------------------------------------------------------- scoring


def parse_spec(spec: str) -> tuple[str | None, str]:
    """``[<Class>:]<dir|hub id>`` → (class or None, source)."""
    head, sep, rest = spec.partition(":")
    if sep and head and head[0].isupper() and "/" not in head:
        return head, rest
    return None, spec


def _read_config(source: str) -> dict[str, Any]:
    path = Path(source).expanduser()
    if path.is_dir():
        f = path / "config.json"
        return json.loads(f.read_text()) if f.exists() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "config.json")).read_text())
    except Exception:  # adapter-only repos have no config.json; no hub here
        return {}


def resolve_class(source: str, explicit: str | None = None) -> str:
    """The colpali-engine model class for ``source``: explicit, from ``architectures``, or the name."""
    models = _colpali_models()
    if explicit:
        if not hasattr(models, explicit):
            raise ValueError(f"colpali-engine has no model class {explicit!r}")
        return explicit
    for arch in _read_config(source).get("architectures") or []:
        if hasattr(models, arch) and arch.startswith(("Bi", "Col")):
            return arch
    low = source.lower()
    for hint, cls in _NAME_HINTS:
        if hint in low:
            return cls
    raise ValueError(
        f"cannot tell which colpali-engine class loads {source!r}: name it, e.g. colpali:ColQwen2_5:{source}"
    )


class ColpaliEncoder:
    """A colpali-engine retriever as an :class:`~tasks.encoders.Encoder` (``Bi*``: dense; ``Col*``:
    multi-vector, ``encode_*_multi`` returning ``(emb [n, L, D], mask [n, L])`` left padded)."""

    engine = "colpali"

    def __init__(
        self,
        source: str,
        *,
        model_class: str | None = None,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        models = _colpali_models()
        self.source = source
        self.model_class = resolve_class(source, model_class)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = (
            getattr(torch, dtype)
            if dtype
            else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        )
        cls = getattr(models, self.model_class)
        proc_name = _PROCESSORS.get(self.model_class, f"{self.model_class}Processor")
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if self.model_class == "BiGemma3":  # see the module docstring (transformers 5.x)
            kwargs["key_mapping"] = {}
        self.model = cls.from_pretrained(source, **kwargs).to(self.device).eval()
        self.processor = getattr(models, proc_name).from_pretrained(source)
        self.batch_size = int(batch_size)
        self.multivector = self.model_class.startswith("Col")
        self.dense = not self.multivector
        self.model_id = f"colpali:{self.model_class}:{Path(source).name or source}"
        self.fingerprint = self._fingerprint()
        self.matryoshka_dims = self._matryoshka_dims() if self.dense else []

    def _matryoshka_dims(self) -> list[int]:
        """Dims the benchmark sweeps (slice + re-normalise, as ``BiGemma3.forward(embedding_dim=…)``):
        an m3dr export's trained dims, NetraEmbed's 768/1536/2560 for other ``BiGemma3`` checkpoints."""
        meta = Path(self.source).expanduser() / M3DR_META_FILE
        if meta.is_file():
            return list(json.loads(meta.read_text()).get("matryoshka_dims") or [])
        return list(BIGEMMA3_DIMS) if self.model_class == "BiGemma3" else []

    def _fingerprint(self) -> str:
        from tasks.models import fingerprint

        path = Path(self.source).expanduser()
        if path.is_dir():
            return f"colpali:{self.model_class}:{fingerprint(path, 20)}"
        return f"colpali:{self.model_class}:{self.source}"  # hub id: the revision cache keys on the name

    @torch.no_grad()
    def _run(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(model output, attention mask) of one processor batch: ``[n, d]`` (Bi*), ``[n, L, d]`` (Col*)."""
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.model(**batch), batch["attention_mask"]

    def _batches(self, items: Sequence[Any], process: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i in range(0, len(items), self.batch_size):
            emb, mask = self._run(process(list(items[i : i + self.batch_size])))
            out.append((emb.float().cpu(), mask.bool().cpu()))
        return out

    def _dense(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int = 0) -> np.ndarray:
        if not self.dense:
            raise ValueError(f"{self.model_id} is a multi-vector model: it has no single-vector embedding")
        if not parts:
            return np.zeros((0, width), dtype=np.float32)
        return l2_normalise(torch.cat([e for e, _ in parts]).numpy())

    def _multi(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.multivector:
            raise ValueError(f"{self.model_id} is a dense model: it has no multi-vector embedding")
        return left_pad_cat([e for e, _ in parts], [m for _, m in parts])

    def encode_queries(self, texts: list[str], langs: list[str]) -> np.ndarray:
        if len(texts) != len(langs):
            raise ValueError(f"{len(texts)} texts but {len(langs)} langs")
        return self._dense(self._batches(texts, self.processor.process_queries))

    def encode_pages(self, pages: list[PageView]) -> np.ndarray:
        images = [decode_image(p.image_png, 448) for p in pages]
        return self._dense(self._batches(images, self.processor.process_images))

    def encode_queries_multi(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._multi(self._batches(texts, self.processor.process_queries))

    def encode_pages_multi(self, pages: list[PageView]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [decode_image(p.image_png, 448) for p in pages]
        return self._multi(self._batches(images, self.processor.process_images))


def build_colpali_encoder(cfg: dict[str, Any]) -> ColpaliEncoder:
    """Encoder engine ``colpali``: ``{engine = "colpali", model = "[<Class>:]<dir|hub id>", ...}``."""
    explicit, source = parse_spec(cfg["model"])
    return ColpaliEncoder(
        source,
        model_class=cfg.get("model_class") or explicit,
        batch_size=int(cfg.get("batch_size", 8)),
        device=cfg.get("device"),
        dtype=cfg.get("dtype"),
    )
