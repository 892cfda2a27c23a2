"""Training and benchmarking read a synthesize root on an object store (a real S3 API: moto) exactly as
they read its local copy: ``--data s3://…`` is never turned into a local path, the training subprocess
reads its shards from the store, and losses, adapter weights and benchmark metrics are identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks.schema import queries_table
from tasks.shards import commit_shard, hash_id
from tasks.splits import assign_split
from tests.support.synthetic_pages import upload_root
from tests.support.toy_corpus import build_toy_corpus

pytestmark = pytest.mark.slow

FRACTIONS = {"benchmark": 1.0}  # the toy corpus is one source: its pages are the held-out set too


def toy_root(root: Path) -> Path:
    """A toy synthesize root: pages + mined train rows, and a queries shard of held-out queries
    recording the split fractions (what `benchmark` reads back)."""
    corpus = build_toy_corpus(root, n_pages=8, page_size=(200, 280))
    page = {p.page_id: p for p in corpus.pages}
    source_id = json.loads((root / "_records" / "pages-en-00000.json").read_text())["sources"][0]
    split = assign_split(source_id, FRACTIONS)
    rows = []
    for qid, text in sorted(corpus.eval_queries.items()):
        (pid,) = corpus.qrels[qid]
        rows.append(
            {
                "query_id": qid, "query": text, "query_lang": "en", "kind": "phrase", "page_id": pid,
                "target_lang": "en", "cross_lingual": False, "source_page_id": page[pid].source_page_id,
                "source_id": source_id, "split": split, "generator": "extractive", "prompt_version": "",
            }
        )  # fmt: skip
    commit_shard(root, queries_table(rows), name="queries-en-00000", kind="queries", lang="en",
                 rel_path="queries/queries-en-00000.parquet", cfg_hash=hash_id("toy-queries"),
                 extra={"split_fractions": FRACTIONS})  # fmt: skip
    return root


def test_train_and_benchmark_from_s3_equal_the_local_copy(
    tmp_path: Path, s3_bucket: str, tiny_models
) -> None:
    from eval.build import build_suite, resolve_sets
    from eval.evaluate import evaluate_location, runner_for
    from flows.params import BenchmarkParams
    from training.config import TrainConfig
    from training.launch import run_training, training_inputs

    local = toy_root(tmp_path / "data")
    url = upload_root(local, f"{s3_bucket}/synth/run")
    train_shards, pages_shards = training_inputs(url)
    assert train_shards and all(s.startswith(f"{s3_bucket}/synth/run/") for s in train_shards + pages_shards)

    config = TrainConfig(retriever="both", max_steps=3, batch_size=4, warmup_steps=1, num_threads=1)
    runs = {}
    for name, data in (("s3", url), ("local", str(local))):
        run_dir = tmp_path / f"train-{name}"
        result = run_training(data, run_dir, config, 1, log=lambda _: None)
        log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
        final = Path(result["final_dir"])
        weights = load_file(final / "adapter" / "adapter_model.safetensors")
        weights.update({"head." + k: v for k, v in load_file(final / "heads.safetensors").items()})
        runs[name] = {
            "losses": [r["loss"] for r in log],
            "weights": weights,
            "spec": json.loads((run_dir / "spec.json").read_text()),
            "final": final,
        }
    assert runs["s3"]["spec"]["pages_shards"] == pages_shards  # the subprocess was given the URLs
    assert len(runs["s3"]["losses"]) == 3 and runs["s3"]["losses"] == runs["local"]["losses"]
    s3w, lw = runs["s3"]["weights"], runs["local"]["weights"]
    assert s3w.keys() == lw.keys() and all(bool((s3w[k] == lw[k]).all()) for k in lw)

    metrics = {}
    for name, data in (("s3", url), ("local", str(local))):
        out = tmp_path / f"bench-{name}"
        suite = build_suite(data, out / "datasets")
        assert json.loads((out / "datasets" / "suite.json").read_text())["source"] == (
            url if name == "s3" else str(local.resolve())
        )
        encoder = {"engine": "vlm-retriever", "path": str(runs["local"]["final"])}
        params = BenchmarkParams(data=data, out=str(out), encoder=encoder, dims=[16, 32, 64])
        runner = runner_for(params.encoder, params.settings(), params.out, params.rerank)
        results = [evaluate_location(runner, i, loc, out) for i, loc in resolve_sets([str(suite.root)])]
        assert results and not any(r.error for r in results)
        metrics[name] = {(r.name, k): v.metrics for r in results for k, v in r.retrievers.items()}
    assert metrics["s3"] == metrics["local"]
    assert any(m.get("ndcg@5", 0) > 0 for m in metrics["local"].values())
