"""Fast checks of the retriever-training pieces: losses, collator, pooling, the gemma3-tiny recipe."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from training.losses import InfoNCELoss, MatryoshkaLoss, colbert_loss, info_nce, maxsim

REPO = Path(__file__).resolve().parents[2]


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_info_nce_matches_cross_entropy_and_masks_invalid() -> None:
    q, d = _unit(4, 8), _unit(6, 8, seed=1)
    pos = torch.tensor([0, 1, 2, 3])
    ref = torch.nn.functional.cross_entropy(q @ d.T / 0.05, pos)
    assert torch.allclose(info_nce(q, d, pos, temperature=0.05), ref)
    # masking a candidate = removing it from the softmax; the positive is never masked
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[:, 5] = False
    valid[0, 0] = False  # would be the positive: ignored
    ref2 = torch.nn.functional.cross_entropy(q @ d[:5].T / 0.05, pos)
    assert torch.allclose(info_nce(q, d, pos, valid, temperature=0.05), ref2, atol=1e-6)


def test_matryoshka_is_weighted_sum_over_renormalised_prefixes() -> None:
    q, d = _unit(4, 16), _unit(4, 16, seed=2)
    pos = torch.arange(4)
    base = InfoNCELoss(0.1)
    loss = MatryoshkaLoss(base, [4, 8, 16], [1.0, 0.5, 2.0])(q, d, pos)
    expect = sum(
        w
        * torch.nn.functional.cross_entropy(
            torch.nn.functional.normalize(q[:, :k], dim=-1)
            @ torch.nn.functional.normalize(d[:, :k], dim=-1).T
            / 0.1,
            pos,
        )
        for k, w in [(4, 1.0), (8, 0.5), (16, 2.0)]
    )
    assert torch.allclose(loss, expect, atol=1e-6)
    with pytest.raises(ValueError):
        MatryoshkaLoss(base, [32])(q, d, pos)


def test_maxsim_and_colbert_loss_normalised_by_query_length() -> None:
    q, d = _unit(3, 5, 8), _unit(4, 7, 8, seed=3)
    qm = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    dm = torch.ones(4, 7, dtype=torch.bool)
    dm[1, :3] = False
    s = maxsim(q, qm, d, dm)
    for i in range(3):
        for j in range(4):
            brute = sum(
                max(float(q[i, a] @ d[j, b]) for b in range(7) if dm[j, b]) for a in range(5) if qm[i, a]
            )
            assert math.isclose(float(s[i, j]), brute, rel_tol=1e-5, abs_tol=1e-6)
    pos = torch.tensor([0, 1, 2])
    lengths = qm.sum(1, keepdim=True).float()
    expect = torch.nn.functional.cross_entropy(s / lengths / 0.02, pos)
    assert torch.allclose(colbert_loss(q, qm, d, dm, pos, temperature=0.02), expect, atol=1e-5)
    # a query's scores are bounded by its length: normalised scores stay in [-1, 1]
    assert bool(((s / lengths).abs() <= 1 + 1e-5).all())


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    from training.trainer import resolve_model_dir

    return resolve_model_dir("recipe:gemma3-tiny")


def test_recipe_uses_production_classes_and_live_projector(tiny_dir: Path) -> None:
    from PIL import Image
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

    from training.model import load_backbone, load_processor

    model = load_backbone(tiny_dir)
    proc = load_processor(tiny_dir)
    assert isinstance(model, Gemma3ForConditionalGeneration)
    assert isinstance(proc, Gemma3Processor)
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert float(model.model.multi_modal_projector.mm_input_projection_weight.detach().abs().sum()) > 0
    ims = [[Image.new("RGB", (80, 100), "white")], [Image.new("RGB", (80, 100), "black")]]
    px = proc.image_processor(ims, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(px).pooler_output
    assert not torch.allclose(feats[0], feats[1]), "different images must give different image tokens"
    # byte fallback: any script tokenises without <unk>
    ids = proc.tokenizer("नमस्ते 你好 مرحبا", add_special_tokens=False)["input_ids"]
    assert proc.tokenizer.unk_token_id not in ids


def test_left_padding_does_not_change_embeddings(tiny_dir: Path) -> None:
    from training.config import PromptSettings, TrainConfig
    from training.data import PromptFormatter
    from training.model import build_retriever, load_processor

    cfg = TrainConfig(retriever="both", lora={"enabled": True})
    model = build_retriever(tiny_dir, cfg, for_training=False).eval()
    fmt = PromptFormatter(load_processor(tiny_dir), PromptSettings())
    with torch.no_grad():
        alone = model.embed(fmt.queries(["kenya"]))
        batch = model.embed(fmt.queries(["kenya", "a much longer query about many different places"]))
    assert torch.allclose(alone["dense"][0], batch["dense"][0], atol=1e-5)
    n = int(alone["mask"][0].sum())
    assert torch.allclose(alone["multi"][0, -n:], batch["multi"][0, -n:], atol=1e-5)
    assert torch.allclose(alone["dense"].norm(dim=-1), torch.ones(1))


def test_collator_negatives_parallel_group_mask_and_deterministic_plan(
    tmp_path: Path, tiny_dir: Path
) -> None:
    from tests.support.toy_corpus import build_toy_corpus
    from training.config import PromptSettings
    from training.data import Collator, PageStore, PromptFormatter, TrainExample, batch_plan
    from training.model import load_processor

    corpus = build_toy_corpus(tmp_path / "c", n_pages=6, train_spans=2, eval_spans=1)
    store = PageStore([corpus.pages_shard])
    ids = store.page_ids()
    group = store.group(ids[0])
    # two queries with the same positive + one whose negative is another query's positive
    exs = [
        TrainExample("q0", "a b", "en", ids[0], group, (ids[1],)),
        TrainExample("q1", "c d", "en", ids[0], group, ()),
        TrainExample("q2", "e f", "en", ids[1], store.group(ids[1]), (ids[2], ids[3])),
        TrainExample("q3", "g h", "en", ids[2], store.group(ids[2]), ()),
    ]
    fmt = PromptFormatter(load_processor(tiny_dir), PromptSettings(doc_text="region_text"))
    batch = Collator(fmt, store, exs, num_negatives=1, seed=0)([0, 1, 2, 3], micro_step=7)
    assert batch.doc_ids[:4] == [ids[0], ids[0], ids[1], ids[2]]
    assert batch.doc_ids[4] == ids[1] and batch.doc_ids[5] in (ids[2], ids[3])  # negatives follow
    assert batch.pos.tolist() == [0, 1, 2, 3]
    # q0 and q1 share a parallel group: neither may use the other's positive (the same page) as negative
    assert not batch.valid[0, 1] and not batch.valid[1, 0]
    assert not batch.valid[2, 4]  # q0's negative is q2's positive page
    assert batch.valid[0, 2] and batch.valid[0, 4] is not None
    assert batch.docs["pixel_values"].shape[0] == len(batch.doc_ids)
    # rank split: rank 1 of 2 sees the second half and positive indices offset by the padded width
    b1 = Collator(fmt, store, exs, num_negatives=1, seed=0, rank=1, world_size=2)([0, 1, 2, 3], micro_step=7)
    width = max(b1.doc_counts)
    assert b1.pos.tolist() == [width, width + 1] and b1.valid.shape == (2, 2 * width)
    p1 = batch_plan(exs * 5, 4, seed=3, epoch=1, bucket_batches=2, length=lambda e: len(e.query))
    assert p1 == batch_plan(exs * 5, 4, seed=3, epoch=1, bucket_batches=2, length=lambda e: len(e.query))
    assert p1 != batch_plan(exs * 5, 4, seed=3, epoch=2, bucket_batches=2, length=lambda e: len(e.query))


def test_torch_load_only_with_weights_only() -> None:
    for path in (REPO / "training").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path.name}: {call}"


def test_composed_queries_carry_their_image_and_instruction(tmp_path: Path, tiny_dir: Path) -> None:
    """A composed query (crop + question) goes through the processor's image path like a page: its
    inputs hold one image's tokens and pixel values; the task's instruction leads the text; a batch of
    composed queries is embedded by the same model as text queries and the image changes the vector."""
    import io

    from PIL import Image

    from tasks.schema import encode_png
    from training.config import PromptSettings, TrainConfig
    from training.data import Collator, PageStore, PromptFormatter, TrainExample
    from training.model import build_retriever, load_processor

    proc = load_processor(tiny_dir)
    prompts = PromptSettings()
    fmt = PromptFormatter(proc, prompts)
    red, blue = (encode_png(Image.new("RGB", (90, 60), c)) for c in ("red", "blue"))
    assert Image.open(io.BytesIO(red)).size == (90, 60)
    text = fmt.queries(["what does the chart show"], task="text-page")
    comp = fmt.queries(["what does the chart show"] * 2, images=[red, blue], task="composed-page")
    assert "pixel_values" in comp and comp["pixel_values"].shape[0] == 2 and "pixel_values" not in text
    n_image = proc.tokenizer.convert_tokens_to_ids("<image_soft_token>")  # Gemma-3's per-patch token
    per_image = int(proc.image_seq_length)
    assert [int((row == n_image).sum()) for row in comp["input_ids"]] == [per_image, per_image]
    prompt = fmt.query_texts(["q"], task="composed-page", with_image=True)[0]
    assert prompts.instructions["composed-page"] in prompt and prompt.index("Instruct:") < prompt.index(
        "Query:"
    )
    assert "Instruct:" not in fmt.query_texts(["q"])[0]  # text → page stays NetraEmbed's exact prompt

    model = build_retriever(tiny_dir, TrainConfig(retriever="both"), for_training=False).eval()
    with torch.no_grad():
        out = model.embed(comp)
    assert out["dense"].shape[0] == 2 and not torch.allclose(out["dense"][0], out["dense"][1])

    from tests.support.toy_corpus import build_toy_corpus

    corpus = build_toy_corpus(tmp_path / "c", n_pages=4, train_spans=1, eval_spans=1)
    store = PageStore([corpus.pages_shard])
    ids = store.page_ids()
    exs = [
        TrainExample("c0", "chart", "en", ids[0], store.group(ids[0]), kind="composed", query_image=red),
        TrainExample("c1", "table", "en", ids[1], store.group(ids[1]), kind="composed", query_image=blue),
        TrainExample("t0", "words", "en", ids[2], store.group(ids[2]), kind="phrase"),
    ]
    collate = Collator(fmt, store, exs, num_negatives=0, seed=0, dense=True, multi=True)
    batch = collate([0, 1], 0)
    assert batch.queries["pixel_values"].shape[0] == 2 and "pixel_values" in batch.docs
    with pytest.raises(ValueError, match="mixes"):
        collate([0, 2], 0)
