"""`train-netra` flow: LoRA contrastive training of the dense and/or multi-vector retriever.

Orchestration only: the training subprocess, its log and the loss curve live in ``training/launch.py``
(a subprocess — ``python -m training.run`` or torchrun — so a GPU job is isolated from the Prefect
worker, can be killed and resumed from its last checkpoint, and scales to N processes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.params import TrainParams
from training.config import TrainConfig
from training.launch import loss_report, phase_plan, resolve_nproc, run_training


@task(name="train-retriever", task_run_name="train {label} ({nproc} proc)")
def train_task(data: str, out: str, config: TrainConfig, nproc: int, label: str) -> dict[str, Any]:
    """Training in a subprocess, its progress lines streamed into the Prefect log."""
    return run_training(data, out, config, nproc, log=get_run_logger().info)


@flow(name="train-netra", log_prints=True)
def train_netra(params: TrainParams | None = None) -> dict[str, Any]:
    """Train NetraEmbed (dense) / ColNetraEmbed (multi-vector) retrievers on synthesized train shards,
    in one run or in phases (``multimodal`` then ``text``: MM-Embed's continual text fine-tuning)."""
    params = params or TrainParams()
    nproc = resolve_nproc(params.gpus)
    done: list[tuple[str, dict[str, Any]]] = []
    for label, out, config in phase_plan(params.out, params.config, params.phases):
        result = train_task(params.data, str(out), config, nproc, label)
        md, table = loss_report(result, Path(out).resolve(), label)
        suffix = f"-{label}" if params.phases else ""
        create_markdown_artifact(md, key=f"train-netra-loss-curve{suffix}", description="loss curve")
        create_table_artifact(table, key=f"train-netra-loss-table{suffix}", description="loss per step")
        done.append((label, result))
    result = dict(done[-1][1])
    if params.phases:
        result["phases"] = [
            {"phase": label, "final_dir": r["final_dir"], "steps": r["steps"]} for label, r in done
        ]
    if params.benchmark:
        if params.phases:
            result["benchmark"] = benchmark_phases(params, done)
        else:
            result["benchmark"] = run_benchmark(params, Path(result["final_dir"]))
    return result


def benchmark_phases(params: TrainParams, done: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Benchmark every phase's retriever and compare them (first phase = baseline): the report shows the
    image and text views before and after the text phase."""
    from eval.benchmark_report import compare_markdown, write_report

    runs, last = [], {}
    for label, r in done:
        last = run_benchmark(params, Path(r["final_dir"]), Path(params.out) / "benchmark" / label)
        runs.append((label, json.loads(Path(last["results"]).read_text())))
    text = compare_markdown(runs)
    report = write_report(Path(params.out) / "benchmark" / "phases.md", text)
    create_markdown_artifact(text, key="train-netra-phases", description="benchmark per training phase")
    return {**last, "phases_report": str(report)}


def run_benchmark(params: TrainParams, final_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """`benchmark-nayana` as a subflow on the freshly trained retriever (results under <out>/benchmark)."""
    from flows.benchmark import benchmark_nayana
    from flows.params import BenchmarkParams

    where = out or Path(params.out) / "benchmark"
    options = {"data": params.data, "out": str(where), **params.benchmark_options}
    options["encoder"] = {"engine": "vlm-retriever", "path": str(final_dir)}
    report = benchmark_nayana(BenchmarkParams.model_validate(options))
    return {"results": report["results"], "report": report["report"]}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if train_netra() else 1)
