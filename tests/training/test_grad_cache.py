"""GradCache computes the loss and the gradients of the whole batch (training.trainer.grad_cache_backward).

The reference is the plain path: one forward of the whole micro-batch with a graph, the loss, backward.
GradCache embeds in chunks without a graph, takes the loss's gradient w.r.t. the embeddings and
re-runs each chunk with a graph. With dropout off the two are the same function, so loss and every
parameter gradient must agree to float noise, for the dense loss (Matryoshka InfoNCE), the multi-vector
loss (ColBERT) and both, with chunks that do not divide the batch, and across 2 ranks whose documents
are all-gathered (the gradients then reach each rank through the gather and the manual all-reduce).
LoRA B matrices start at zero (so LoRA A would get no gradient); they are randomised here so every
parameter's gradient is exercised.

The comparisons run in float64: in fp32 the chunked backward sums each weight gradient in another order,
and with temperature 0.02 the gradients are differences of large terms, so the reorder alone moves the
worst LoRA tensor by 2e-4 of its largest entry (measured; the embeddings and the loss were bitwise equal).
In fp64 that noise is ~1e-13, so 1e-9 leaves no room for a wrong gradient. In fp32, one chunk per side
is the whole-batch computation and must be bitwise equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

TOL = 1e-9  # max |GradCache − full batch| / max |full batch|, per tensor, in float64


def setup_case(
    corpus_dir: Path,
    retriever: str,
    rank: int = 0,
    world: int = 1,
    dtype: torch.dtype = torch.float64,
    positions: str = "index",
):
    """(model, objective, this rank's batch of the global batch [0..7], DistInfo): deterministic."""
    from tests.support.toy_corpus import build_toy_corpus
    from training.config import TrainConfig
    from training.data import Collator, PageStore, PromptFormatter, load_examples
    from training.model import build_retriever, load_processor
    from training.trainer import DistInfo, RetrievalObjective, resolve_model_dir

    pages = corpus_dir / "pages" / "pages-en-00000.parquet"
    if not pages.exists():
        build_toy_corpus(corpus_dir, n_pages=12, train_spans=2, page_size=(200, 280))
    config = TrainConfig(
        retriever=retriever,
        lora={"dropout": 0.0},
        batch_size=8 // world,
        num_negatives=1,
        positions=positions,
    )
    model_dir = resolve_model_dir(config.model)
    torch.manual_seed(0)
    model = build_retriever(model_dir, config).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    store = PageStore([pages])
    examples, _ = load_examples(sorted((corpus_dir / "train").glob("*.parquet")), store)
    fmt = PromptFormatter(load_processor(model_dir), config.prompts)
    collator = Collator(
        fmt,
        store,
        examples,
        num_negatives=1,
        seed=0,
        rank=rank,
        world_size=world,
        dense=config.dense,
        multi=config.multivector,
    )
    batch = collator(list(range(8)), 0)
    model.to(dtype)
    for side in (batch.queries, batch.docs):
        for k, v in side.items():
            if v.is_floating_point():
                side[k] = v.to(dtype)
    return model, RetrievalObjective(config), batch, DistInfo(rank, world)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def full_batch(
    corpus_dir: Path, retriever: str, dtype: torch.dtype = torch.float64, positions: str = "index"
) -> tuple[float, dict[str, torch.Tensor]]:
    model, objective, batch, info = setup_case(corpus_dir, retriever, dtype=dtype, positions=positions)
    q, d = model(batch.queries, batch.docs)
    loss = objective(q, d, batch, info)
    loss.backward()
    return float(loss.detach()), grads_of(model)


def cached(
    corpus_dir: Path, retriever: str, chunk: int, dtype: torch.dtype = torch.float64
) -> tuple[float, dict[str, torch.Tensor]]:
    from training.trainer import grad_cache_backward

    model, objective, batch, info = setup_case(corpus_dir, retriever, dtype=dtype)
    loss = grad_cache_backward(model.embed, batch, objective, info, chunk, nullcontext)
    return float(loss), grads_of(model)


def worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest per-tensor error relative to the tensor's largest reference entry."""
    assert got.keys() == want.keys()
    return max(float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12)) for n in want)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> Path:
    return tmp_path_factory.mktemp("gradcache") / "corpus"


@pytest.mark.parametrize("retriever", ["dense", "multivector", "both"])
def test_chunked_loss_and_gradients_equal_the_whole_batch(corpus: Path, retriever: str) -> None:
    loss, want = full_batch(corpus, retriever)
    assert all(float(g.abs().max()) > 0 for g in want.values())  # every parameter really gets a gradient
    for chunk in (3, 16):  # 8 queries / 16 documents: a ragged last chunk, and one chunk per side
        got_loss, got = cached(corpus, retriever, chunk)
        assert got_loss == pytest.approx(loss, rel=TOL, abs=0)
        assert worst(got, want) < TOL, (chunk, worst(got, want))


def test_one_chunk_per_side_is_bitwise_the_whole_batch_in_fp32(corpus: Path) -> None:
    loss, want = full_batch(corpus, "dense", torch.float32)
    got_loss, got = cached(corpus, "dense", 16, torch.float32)
    assert got_loss == loss
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_dropout_masks_are_replayed(corpus: Path) -> None:
    """With dropout on, the second pass must see the first pass's masks: then GradCache's gradients are
    those of the embeddings it computed the loss from (checked: the same chunked forward with a graph,
    under the same RNG state, gives the same loss and gradients)."""
    from training.trainer import _spans, grad_cache_backward

    model, objective, batch, info = setup_case(corpus, "both")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    torch.manual_seed(5)
    loss = grad_cache_backward(model.embed, batch, objective, info, 3, nullcontext)
    got = grads_of(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    sides = []
    for inputs in (batch.queries, batch.docs):
        parts = [model.embed({k: v[a:b] for k, v in inputs.items()}) for a, b in _spans(inputs, 3)]
        sides.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    ref = objective(sides[0], sides[1], batch, info)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref.detach()), rel=TOL)
    assert worst(got, grads_of(model)) < TOL


@pytest.mark.slow
def test_two_ranks_with_gathered_documents_equal_one_process(corpus: Path, tmp_path: Path) -> None:
    """2 ranks × 4 queries with GradCache (chunks of 3) and all-gathered documents = 1 process × 8.

    Positions ``mask``: a row's inputs must not depend on how its rank pads the batch (training.model).
    Under ``mask`` the backbone's backward itself is a little less exact in fp64: one process, whole batch,
    one backward through the query and document graphs vs two backwards (GradCache with one chunk per
    side) differ by 8e-8 of a tensor's largest gradient (measured; 1e-13 with ``index`` positions), so
    this comparison allows 1e-6 (the issue asks for 1e-5)."""
    loss, want = full_batch(corpus, "both", positions="mask")
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, torch, torch.distributed as dist
            from contextlib import nullcontext
            from pathlib import Path
            from tests.training.test_grad_cache import grads_of, setup_case
            from training.trainer import average_gradients, grad_cache_backward
            dist.init_process_group("gloo")
            r, w = dist.get_rank(), dist.get_world_size()
            model, objective, batch, info = setup_case(Path({str(corpus)!r}), "both", r, w, positions="mask")
            loss = grad_cache_backward(model.embed, batch, objective, info, 3, nullcontext)
            average_gradients([p for p in model.parameters() if p.requires_grad], info)
            t = loss.reshape(1).clone()
            dist.all_reduce(t)
            torch.save({{"loss": float(t) / w, "grads": grads_of(model)}}, f"{{sys.argv[1]}}/rank{{r}}.pt")
            dist.destroy_process_group()
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*cmd, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert out["loss"] == pytest.approx(loss, rel=1e-9, abs=0)
        assert worst(out["grads"], want) < 1e-6, (r, worst(out["grads"], want))
