"""colpali-engine interop: a trained m3dr run exports to the NetraEmbed format, colpali-engine's own
``BiGemma3`` / ``ColGemma3`` + processors load it with ``from_pretrained``, and their embeddings equal
m3dr's on batches of pages and queries of mixed lengths (left padding exercised on both sides).

colpali-engine is installed by ``make`` with ``--no-deps`` (it declares torch<2.14; see README)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tasks.encoders import PageView
from tests.support.toy_corpus import ToyCorpus, build_toy_corpus
from training.config import PromptSettings, TrainConfig

colpali_engine = pytest.importorskip("colpali_engine", reason="make installs colpali-engine (--no-deps)")

QUERIES = [
    "x",
    "what is the revenue reported in table three of the annual report for the northern region",
    "प्रश्न हिंदी में",
    "短い質問",
    "a b c d e f g",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> ToyCorpus:
    return build_toy_corpus(tmp_path_factory.mktemp("toy"), n_pages=8, train_spans=2, eval_spans=1)


@pytest.fixture(scope="module")
def run(corpus: ToyCorpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real train-netra run (both heads, NetraEmbed prompts): the LoRA and the head move."""
    from training.trainer import train

    cfg = TrainConfig(
        retriever="both",
        batch_size=4,
        max_steps=3,
        warmup_steps=1,
        lr=5e-3,
        checkpoint_every=0,
        num_threads=2,
    )
    out = tmp_path_factory.mktemp("run")
    result = train(cfg, [corpus.train_shard], [corpus.pages_shard], out)
    assert result.steps == 3
    return out


def _pages(n: int) -> list[PageView]:
    """Pages of different sizes and aspect ratios (the processor resizes; the texts differ)."""
    out = []
    for i in range(n):
        im = Image.new("RGB", (180 + 70 * i, 320 - 25 * i), (255, 255 - 20 * i, 255))
        ImageDraw.Draw(im).text((8, 8 + 9 * i), f"Table {i}: revenue {1000 * i}", fill="black")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(PageView(f"p{i}", f"p{i}", "en", "", buf.getvalue()))
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_export_loads_in_colpali_engine_and_embeds_like_m3dr(run: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from training.colpali import M3DR_META_FILE, ColpaliEncoder, export_colpali
    from training.inference import VlmRetrieverEncoder
    from training.trainer import resolve_model_dir

    out = export_colpali(run, tmp_path / "netra")  # the run dir; final/ is found inside
    assert (out / M3DR_META_FILE).is_file() and (out / "README.md").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "custom_text_proj.weight" in keys and any(k.startswith("language_model.") for k in keys)
    assert not any(k.startswith("model.") or "lora" in k for k in keys)

    ours = VlmRetrieverEncoder.load(run / "final", batch_size=3)  # batches of 3: padding differs
    bi = ColpaliEncoder(str(out), model_class="BiGemma3", batch_size=2)
    col = ColpaliEncoder(str(out), model_class="ColGemma3", batch_size=5)
    # the processor colpali-engine loads is colpali-engine's class, not ours
    assert type(bi.model).__name__ == "BiGemma3" and type(bi.processor).__name__ == "BiGemmaProcessor3"
    assert type(col.model).__name__ == "ColGemma3" and type(col.processor).__name__ == "ColGemmaProcessor3"
    pages = _pages(5)
    langs = ["en"] * len(QUERIES)

    dq = _cos(ours.encode_queries(QUERIES, langs), bi.encode_queries(QUERIES, langs))
    dp = _cos(ours.encode_pages(pages), bi.encode_pages(pages))
    print(f"\ndense cos min: queries {dq.min():.6f}, pages {dp.min():.6f}")
    assert dq.min() >= 0.9999 and dp.min() >= 0.9999

    for name, (e1, m1), (e2, m2) in (
        ("queries", ours.encode_queries_multi(QUERIES), col.encode_queries_multi(QUERIES)),
        ("pages", ours.encode_pages_multi(pages), col.encode_pages_multi(pages)),
    ):
        assert m1.sum(1).tolist() == m2.sum(1).tolist()  # the same tokens, mixed lengths
        assert len(set(m1.sum(1).tolist())) > 1 or name == "pages"
        worst = min(float(_cos(e1[i][m1[i]].numpy(), e2[i][m2[i]].numpy()).min()) for i in range(len(m1)))
        print(f"multi-vector cos min ({name}): {worst:.6f}")
        assert worst >= 0.9999
    # m3dr's other position convention (counted from each row's first real token) is the same function
    ours.model.mask_positions = True
    masked = _cos(ours.encode_queries(QUERIES, langs), bi.encode_queries(QUERIES, langs))
    print(f"dense cos min, positions = mask: {masked.min():.6f}")
    assert masked.min() >= 0.9999
    # the merged LoRA is not the identity: the export differs from the untrained backbone
    untrained = VlmRetrieverEncoder.from_backbone(resolve_model_dir("recipe:gemma3-tiny"), TrainConfig())
    assert _cos(untrained.encode_queries(QUERIES, langs), bi.encode_queries(QUERIES, langs)).min() < 0.999


def test_runs_colpali_cannot_reproduce_are_refused_naming_the_setting(
    corpus: ToyCorpus, tmp_path: Path
) -> None:
    from training.colpali import export_colpali
    from training.model import build_retriever, load_processor, retriever_meta, save_weights
    from training.trainer import resolve_model_dir

    cfg = TrainConfig(
        retriever="multivector", multivector_dim=32, prompts=PromptSettings(doc_text="region_text")
    )
    model_dir = resolve_model_dir(cfg.model)
    model = build_retriever(model_dir, cfg)
    meta = retriever_meta(cfg, base_model=str(model_dir), merged=False, hidden_size=model.hidden_size)
    save_weights(model, tmp_path / "final", meta, load_processor(model_dir))
    with pytest.raises(ValueError) as err:
        export_colpali(tmp_path / "final", tmp_path / "out")
    assert "prompts.doc_text" in str(err.value) and "multivector_dim must be 128" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_dims_bigemma3_cannot_serve_are_refused() -> None:
    """BiGemma3 slices to 768/1536/2560 only: a run whose trained Matryoshka dims miss one of the widths
    it would hand out on this backbone is refused; the production dims, and the tiny model's full width
    (every BiGemma3 slice of a 64-wide vector is the whole vector), pass."""
    from training.colpali import bigemma3_dims, exportable

    assert bigemma3_dims(2560) == [768, 1536, 2560] and bigemma3_dims(64) == [64]
    production = TrainConfig(matryoshka_dims=[768, 1536, 2560])
    assert exportable(production, "gemma3", 2560) == []
    assert exportable(TrainConfig(matryoshka_dims=[16, 32, 64]), "gemma3", 64) == []
    (problem,) = exportable(TrainConfig(matryoshka_dims=[16, 32, 64]), "gemma3", 2560)
    assert "[768, 1536, 2560] were never trained" in problem
    (problem,) = exportable(TrainConfig(matryoshka_dims=[256, 768, 2560]), "gemma3", 2560)
    assert "[1536] were never trained" in problem
    assert exportable(TrainConfig(retriever="multivector", matryoshka_dims=[16]), "gemma3", 2560) == []


def test_plain_prompts_keep_one_eos_and_no_chat_turn(tiny_models) -> None:
    from training.data import PromptFormatter
    from training.model import load_processor
    from training.trainer import resolve_model_dir

    proc = load_processor(resolve_model_dir("recipe:gemma3-tiny"))
    chat = PromptFormatter(proc, PromptSettings())
    plain = PromptFormatter(proc, PromptSettings(style="plain"))
    assert chat.query_texts(["q"])[0].startswith("<bos><start_of_turn>user\nQuery: q<eos>")
    assert chat.query_texts(["q"], 0)[0] == "<bos><start_of_turn>user\nQuery: q<end_of_turn>\n"
    assert plain.query_texts(["q"]) == ["Query: q<eos>"]
    both = chat.query_batch(["q", "longer query"], dense=True, multi=True)
    assert both["input_ids"].shape[1] == both["multi_input_ids"].shape[1] + 10  # 10 <eos> for dense only
    multi_only = chat.query_batch(["q", "longer query"], dense=False, multi=True)
    assert set(multi_only) == {"input_ids", "attention_mask"}
    assert torch.equal(multi_only["input_ids"], both["multi_input_ids"])


def test_specs_classes_and_precision(tmp_path: Path) -> None:
    """``colpali:[<Class>:]<source>`` parsing, the class from ``architectures`` or the hub name, and the
    export precision read from the base checkpoint (bf16 for Gemma-3-4B-IT)."""
    from training.colpali import checkpoint_dtype, parse_spec, resolve_class

    assert parse_spec("ColQwen2_5:vidore/colqwen2.5-v0.2") == ("ColQwen2_5", "vidore/colqwen2.5-v0.2")
    assert parse_spec("Cognitive-Lab/NetraEmbed") == (None, "Cognitive-Lab/NetraEmbed")
    assert parse_spec("/data/exports/netra") == (None, "/data/exports/netra")
    (tmp_path / "config.json").write_text('{"architectures": ["ColGemma3"], "dtype": "bfloat16"}')
    assert resolve_class(str(tmp_path)) == "ColGemma3"
    (tmp_path / "both").mkdir()  # a `both` export lists both classes: the first (dense) is the default
    (tmp_path / "both" / "config.json").write_text('{"architectures": ["BiGemma3", "ColGemma3"]}')
    assert resolve_class(str(tmp_path / "both")) == "BiGemma3"
    assert checkpoint_dtype(tmp_path) == torch.bfloat16
    assert resolve_class("vidore/colqwen2.5-v0.2") == "ColQwen2_5"  # no hub here: the name decides
    with pytest.raises(ValueError, match="no model class"):
        resolve_class(str(tmp_path), "ColNothing")
    with pytest.raises(ValueError, match="name it"):
        resolve_class(str(tmp_path / "missing"))


def test_merged_export_is_saved_in_the_base_models_dtype(tmp_path: Path, tiny_models) -> None:
    """The LoRA merges in fp32 and the merged model is written in the base checkpoint's dtype: a bf16
    base (Gemma-3-4B-IT) exports bf16 weights (half the bytes), which load back as bf16."""
    from safetensors import safe_open

    from training.export import export_merged
    from training.model import build_retriever, load_backbone, load_processor, retriever_meta, save_weights
    from training.trainer import resolve_model_dir

    tiny = resolve_model_dir("recipe:gemma3-tiny")
    base = tmp_path / "base-bf16"
    load_backbone(tiny, dtype=torch.bfloat16).save_pretrained(str(base))
    load_processor(tiny).save_pretrained(str(base))
    cfg = TrainConfig(precision="fp32")
    model = build_retriever(base, cfg)
    meta = retriever_meta(cfg, base_model=str(base), merged=False, hidden_size=model.hidden_size)
    save_weights(model, tmp_path / "final", meta, load_processor(base))
    out = export_merged(tmp_path / "final", tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert load_backbone(out, dtype=torch.bfloat16).dtype == torch.bfloat16
