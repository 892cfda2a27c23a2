"""Input-pipeline cost of retriever training: step time with batches read from real shards vs the same
step on pre-loaded tensors.

Builds a toy corpus of full-size rendered pages (PNG in a pages shard, BM25-mined train shard), then
times ``--steps`` optimizer steps twice on the same model and data: (a) each batch collated from the
shards (Parquet row lookup, PNG decode, prompt formatting, tokenisation, image processing), (b) the
batches collated once up front and reused. Prints both step times, their ratio and the input share
``(a - b) / a`` (goal: < 5 %). ``--workers N`` moves (a)'s collation into N DataLoader workers that
prefetch while the step runs (what training does with ``num_workers``).

    python benchmarks/train_input.py --steps 20 --page-size 1240x1754 --workers 0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="recipe:gemma3-tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pages", type=int, default=48)
    ap.add_argument("--page-size", default="1240x1754")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--retriever", default="both", choices=["dense", "multivector", "both"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from tests.support.toy_corpus import build_toy_corpus
    from training.config import PromptSettings, TrainConfig
    from training.data import Collator, PageStore, PromptFormatter, example_length, load_examples
    from training.model import build_retriever, load_processor
    from training.trainer import (
        DistInfo,
        EpochPlan,
        RetrievalObjective,
        _iter_batches,
        _MicroBatches,
        autocast_context,
        build_optimizer,
        resolve_model_dir,
    )

    w, h = (int(v) for v in a.page_size.split("x"))
    cfg = TrainConfig(
        model=a.model,
        retriever=a.retriever,
        batch_size=a.batch_size,
        num_negatives=1,
        max_steps=a.steps,
        prompts=PromptSettings(doc_text="region_text"),
    )
    info = DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_toy_corpus(Path(tmp), n_pages=a.pages, train_spans=6, page_size=(w, h))
        model_dir = resolve_model_dir(cfg.model)
        store = PageStore([corpus.pages_shard])
        examples, _ = load_examples([corpus.train_shard], store)
        plan_for = EpochPlan(cfg, examples, cfg.batch_size, example_length(store, cfg.prompts))
        collator = Collator(
            PromptFormatter(load_processor(model_dir), cfg.prompts), store, examples, num_negatives=1, seed=0
        )
        model = build_retriever(model_dir, cfg).to(info.device).train()
        opt = build_optimizer(model, cfg)
        objective = RetrievalObjective(cfg)

        def step(batch) -> None:
            batch = batch.to(info.device)
            with autocast_context(cfg, info.device):
                q, d = model(batch.queries, batch.docs)
            objective(q, d, batch, info).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if info.device.type == "cuda":
                torch.cuda.synchronize()

        step(collator(plan_for(0), 0))  # warm-up (allocations, lazy init)
        t = time.perf_counter()
        for batch in _iter_batches(_MicroBatches(plan_for, collator, 1, 1 + a.steps), a.workers):
            step(batch)
        real = (time.perf_counter() - t) / a.steps
        preloaded = [collator(plan_for(g), g) for g in range(1, 1 + a.steps)]
        t = time.perf_counter()
        for batch in preloaded:
            step(batch)
        pre = (time.perf_counter() - t) / a.steps
    png_kb = sum(len(p.image_png or b"") for p in corpus.pages) / len(corpus.pages) / 1024
    print(
        f"pages {w}x{h} (~{png_kb:.0f} KiB PNG), batch {a.batch_size} (+1 negative each), {a.retriever}, "
        f"device {info.device}, workers {a.workers}"
    )
    print(f"step time, batches from shards : {real * 1000:8.1f} ms")
    print(f"step time, pre-loaded tensors  : {pre * 1000:8.1f} ms")
    print(f"ratio shards / pre-loaded      : {real / pre:8.2f}x")
    print(f"input pipeline share of a step : {max(0.0, real - pre) / real * 100:8.1f} %  (goal < 5 %)")


if __name__ == "__main__":
    main()
