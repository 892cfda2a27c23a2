"""`train-netra` flow: LoRA contrastive training of the dense and/or multi-vector retriever.

Orchestration only: the training subprocess, its log and the loss curve live in ``training/launch.py``
(a subprocess — ``python -m training.run`` or torchrun — so a GPU job is isolated from the Prefect
worker, can be killed and resumed from its last checkpoint, and scales to N processes).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.params import TrainParams
from training.launch import loss_report, resolve_nproc, run_training


@task(name="train-retriever", task_run_name="train {params.config.retriever} ({nproc} proc)")
def train_task(params: TrainParams, nproc: int) -> dict[str, Any]:
    """Training in a subprocess, its progress lines streamed into the Prefect log."""
    return run_training(params.data, params.out, params.config, nproc, log=get_run_logger().info)


@flow(name="train-netra", log_prints=True)
def train_netra(params: TrainParams | None = None) -> dict[str, Any]:
    """Train NetraEmbed (dense) / ColNetraEmbed (multi-vector) retrievers on synthesized train shards."""
    params = params or TrainParams()
    nproc = resolve_nproc(params.gpus)
    result = train_task(params, nproc)
    md, table = loss_report(result, Path(params.out).resolve(), params.config.retriever)
    create_markdown_artifact(md, key="train-netra-loss-curve", description="loss curve")
    create_table_artifact(table, key="train-netra-loss-table", description="loss per step (sampled)")
    if params.benchmark:
        result["benchmark"] = run_benchmark(params, Path(result["final_dir"]))
    return result


def run_benchmark(params: TrainParams, final_dir: Path) -> dict[str, Any]:
    """`benchmark-nayana` as a subflow on the freshly trained retriever (results under <out>/benchmark)."""
    from flows.benchmark import benchmark_nayana
    from flows.params import BenchmarkParams

    options = {"data": params.data, "out": str(Path(params.out) / "benchmark"), **params.benchmark_options}
    options["encoder"] = {"engine": "vlm-retriever", "path": str(final_dir)}
    report = benchmark_nayana(BenchmarkParams.model_validate(options))
    return {"results": report["results"], "report": report["report"]}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if train_netra() else 1)
