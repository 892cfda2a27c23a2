"""The benchmark encoder's page pipeline: pages decoded by DataLoader workers give bitwise the same
embeddings as in-process decoding, which is the same computation as before the loader existed; on the
CPU the backbone stays fp32 and the cache fingerprint of earlier releases."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tasks.encoders import PageView, l2_normalise
from training.config import TrainConfig
from training.inference import VlmRetrieverEncoder, _dtype_tag, _kind_runs, inference_dtype


def _pages() -> list[PageView]:
    """Seven pages of different sizes, a text-only one in the middle (a batch of its own kind)."""
    out = []
    for i in range(7):
        if i == 3:
            out.append(PageView("t3", "t3", "en", "a page known only by its text: revenue 2024", None))
            continue
        im = Image.new("RGB", (160 + 50 * i, 300 - 20 * i), (255, 250 - 25 * i, 240))
        ImageDraw.Draw(im).text((6, 6 + 10 * i), f"Table {i}: tonnage {700 * i}", fill="black")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(PageView(f"p{i}", f"p{i}", "en", f"region text {i}", buf.getvalue()))
    return out


@pytest.fixture(scope="module")
def encoder(tiny_models) -> VlmRetrieverEncoder:
    from training.trainer import resolve_model_dir

    return VlmRetrieverEncoder.from_backbone(
        resolve_model_dir("recipe:gemma3-tiny"),
        TrainConfig(retriever="both"),
        batch_size=2,
        device="cpu",
        num_workers=0,
    )


def test_two_workers_give_bitwise_the_embeddings_of_in_process_decoding(encoder) -> None:
    pages = _pages()
    runs = _kind_runs(pages, encoder.batch_size)
    assert [len(r) for r in runs] == [2, 1, 1, 2, 1]  # the text-only page splits the image runs

    encoder.num_workers = 0
    assert encoder._page_batches(pages).num_workers == 0
    dense0, emb0, mask0 = encoder.encode_pages_both(pages)
    encoder.num_workers = 2
    try:
        assert encoder._page_batches(pages).num_workers == 2  # really decoded in two other processes
        dense2, emb2, mask2 = encoder.encode_pages_both(pages)
        multi2 = encoder.encode_pages_multi(pages)
        only_dense2 = encoder.encode_pages(pages)
    finally:
        encoder.num_workers = 0
    assert np.array_equal(dense0, dense2)
    assert torch.equal(emb0, emb2) and torch.equal(mask0, mask2)
    assert torch.equal(multi2[0], emb0) and torch.equal(multi2[1], mask0)
    assert np.array_equal(only_dense2, dense0)
    assert len({m.sum().item() for m in mask0}) > 1  # mixed lengths: left padding exercised

    # the loader's in-process path is what the encoder computed before it had one
    with torch.no_grad():
        direct = [encoder.model.embed(encoder.formatter.documents(r))["dense"].numpy() for r in runs]
    assert np.array_equal(l2_normalise(np.concatenate(direct)), dense0)


def test_cpu_keeps_fp32_and_the_old_fingerprint(encoder) -> None:
    assert inference_dtype(torch.device("cpu")) == torch.float32
    assert inference_dtype(torch.device("cuda")) == torch.bfloat16
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32}
    assert _dtype_tag(torch.float32) == "" and _dtype_tag(torch.bfloat16) == "@bfloat16"
    assert "@" not in encoder.fingerprint  # cached fp32 corpora of earlier releases still hit
    with pytest.raises(ValueError, match="num_workers"):
        VlmRetrieverEncoder(
            encoder.model, encoder.processor, encoder.formatter.prompts, model_id="x", num_workers=-1
        )
