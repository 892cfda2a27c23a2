"""The training input pipeline and the run's identity.

- DataLoader workers decode and collate ahead of the step: a micro-batch depends only on its micro-step,
  so 0 and 2 workers must give bitwise the same batches, losses, gradient norms and adapter.
- A checkpoint carries the number of processes that wrote it: resuming it on another count (which would
  change the global batch, the data order and the schedule mid-run) is refused, naming both counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.toy_corpus import ToyCorpus, build_toy_corpus
from training.config import PromptSettings, TrainConfig

pytestmark = pytest.mark.slow  # real CPU training runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> ToyCorpus:
    return build_toy_corpus(tmp_path_factory.mktemp("pipeline"), n_pages=12, train_spans=3)


def _config(workers: int, **kw) -> TrainConfig:
    settings = {
        "retriever": "both",
        "batch_size": 4,
        "num_negatives": 1,
        "max_steps": 3,
        "warmup_steps": 0,
        "lr": 2e-3,
        "checkpoint_every": 0,
        "num_threads": 1,
        "num_workers": workers,
        "prompts": PromptSettings(doc_text="region_text", max_doc_text_tokens=32),
    }
    return TrainConfig(**{**settings, **kw})


def test_worker_processes_give_the_batches_of_in_process_collation(corpus: ToyCorpus) -> None:
    from training.data import Collator, PromptFormatter
    from training.model import load_processor
    from training.trainer import _iter_batches, _MicroBatches, load_train_data, resolve_model_dir

    config = _config(0)
    data = load_train_data(config, [corpus.train_shard], [corpus.pages_shard], 1)
    formatter = PromptFormatter(load_processor(resolve_model_dir(config.model)), config.prompts)
    collator = Collator(formatter, data.store, data.examples, num_negatives=1, seed=0, dense=True, multi=True)
    ds = _MicroBatches(data.plan_for, collator, 2, 2 + 2 * data.per_epoch)  # crosses an epoch boundary
    inline = list(_iter_batches(ds, 0))
    workers = list(_iter_batches(ds, 2, prefetch_factor=3))
    assert len(inline) == len(workers) == len(ds)
    for a, b in zip(inline, workers, strict=True):
        assert a.query_ids == b.query_ids and a.doc_ids == b.doc_ids
        for side_a, side_b in ((a.queries, b.queries), (a.docs, b.docs)):
            assert side_a.keys() == side_b.keys()
            assert all(torch.equal(side_a[k], side_b[k]) for k in side_a)
        assert torch.equal(a.pos, b.pos) and torch.equal(a.valid, b.valid)


def test_training_with_workers_equals_training_without(corpus: ToyCorpus, tmp_path: Path) -> None:
    from training.trainer import train

    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(_config(workers), [corpus.train_shard], [corpus.pages_shard], out)
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        runs[workers] = (log, load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")))
    (log0, w0), (log2, w2) = runs[0], runs[2]
    assert log0 == log2  # loss, gradient norm and lr of every step, bitwise
    assert w0.keys() == w2.keys() and all(torch.equal(w0[k], w2[k]) for k in w0)


def test_resuming_on_another_process_count_is_refused(corpus: ToyCorpus, tmp_path: Path) -> None:
    from training.model import build_retriever
    from training.trainer import (
        DistInfo,
        build_optimizer,
        latest_checkpoint,
        resolve_model_dir,
        resume_from,
        train,
    )

    config = _config(0, max_steps=1)
    out = tmp_path / "run"
    train(config, [corpus.train_shard], [corpus.pages_shard], out)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    assert len(torch.load(ckpt / "rng.pt", weights_only=True)["ranks"]) == 1  # one RNG state per rank
    model = build_retriever(resolve_model_dir(config.model), config)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    from tasks.shards import config_hash

    cfg_hash = config_hash(config.hash_fields())
    with pytest.raises(RuntimeError, match=r"on 1 process\(es\), this one has 2.*Resume with 1 process"):
        resume_from(ckpt, model, optimizer, scheduler, cfg_hash, DistInfo(rank=0, world_size=2))
    state = resume_from(ckpt, model, optimizer, scheduler, cfg_hash, DistInfo())  # same count: resumes
    assert state["step"] == 1 and state["world_size"] == 1
