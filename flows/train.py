"""`train-netra` flow: LoRA contrastive training of the dense and/or multi-vector retriever.

Orchestration only. The training itself runs as a subprocess (`python -m training.run`, or torchrun
for several GPUs) so a GPU job is isolated from the Prefect worker, can be killed and resumed from its
last checkpoint, and scales to N processes without changing the flow.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from tasks.paths import REPO_ROOT
from tasks.shards import Manifest
from training.config import TrainConfig
from training.run import RunSpec, launch_command, write_spec


class TrainParams(BaseModel):
    """Parameters of `train-netra` (rendered as a form in the Prefect UI)."""

    data: str = Field("out/demo", description="Output root of a `synthesize` run (train + pages shards).")
    out: str = Field("out/train", description="Run directory: checkpoints, final adapter, logs.")
    gpus: int = Field(
        0,
        ge=0,
        description="Processes: 0 = every visible CUDA GPU (1 CPU process without one); >1 uses torchrun.",
    )
    config: TrainConfig = Field(
        default_factory=TrainConfig, description="Model, retriever and hyperparameters."
    )
    benchmark: bool = Field(
        False, description="Then run `benchmark-nayana` on the trained retriever (held-out split of `data`)."
    )
    benchmark_options: dict[str, Any] = Field(
        default_factory=dict,
        description="benchmark-nayana parameter overrides, e.g. {langs: 'hi,ta', max_queries_per_lang: 50}.",
    )


def resolve_nproc(gpus: int) -> int:
    if gpus > 0:
        return gpus
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def training_inputs(data: Path) -> tuple[list[Path], list[Path]]:
    """Train shards and pages shards listed in a synthesize run's manifest (superseded pages excluded
    by the trainer through the train rows, which never reference them)."""
    manifest = Manifest(data)
    train = sorted(data / e.path for e in manifest.shards("train"))
    pages = sorted(data / e.path for e in manifest.shards("pages"))
    if not train:
        raise FileNotFoundError(f"no train shards in {data}/manifest.json: run `m3dr synthesize` first")
    return train, pages


@task(name="train-retriever", task_run_name="train {params.config.retriever} ({nproc} proc)")
def train_task(params: TrainParams, nproc: int) -> dict[str, Any]:
    """Launch training in a subprocess and stream its log; raise with its tail when it fails."""
    logger = get_run_logger()
    data, out = Path(params.data).resolve(), Path(params.out).resolve()
    train_shards, pages_shards = training_inputs(data)
    spec = RunSpec(config=params.config, train_shards=train_shards, pages_shards=pages_shards, out_dir=out)
    spec_path = write_spec(spec, out / "spec.json")
    cmd = launch_command(spec_path, nproc)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    logger.info("launching: %s", " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-40:], line.rstrip()]
            if " step " in line or "loss" in line:
                logger.info(line.rstrip())
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"training exited with {rc}; last lines:\n" + "\n".join(tail))
    return json.loads((out / "train_result.json").read_text())


def loss_curve_png(log_path: Path, out_png: Path) -> list[dict[str, float]]:
    """Plot the per-step loss (and its running mean) to PNG; returns the log rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    ax.plot(steps, smooth, lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return rows


@flow(name="train-netra", log_prints=True)
def train_netra(params: TrainParams | None = None) -> dict[str, Any]:
    """Train NetraEmbed (dense) / ColNetraEmbed (multi-vector) retrievers on synthesized train shards."""
    params = params or TrainParams()
    nproc = resolve_nproc(params.gpus)
    result = train_task(params, nproc)
    out = Path(params.out).resolve()
    rows = loss_curve_png(out / "train_log.jsonl", out / "loss_curve.png")
    b64 = base64.b64encode((out / "loss_curve.png").read_bytes()).decode()
    create_markdown_artifact(
        f"# train-netra: {params.config.retriever}\n\n"
        f"{result['steps']} steps in {result['seconds']:.1f} s on {result['world_size']} process(es); "
        f"final loss {rows[-1]['loss']:.4f} (first {rows[0]['loss']:.4f}).\n\n"
        f"Adapter + heads: `{result['final_dir']}`\n\n![loss](data:image/png;base64,{b64})\n",
        key="train-netra-loss-curve",
        description="loss curve",
    )
    every = max(1, len(rows) // 50)
    create_table_artifact(
        [{"step": r["step"], "loss": round(r["loss"], 5), "lr": r.get("lr")} for r in rows[::every]],
        key="train-netra-loss-table",
        description="loss per step (sampled)",
    )
    if params.benchmark:
        result["benchmark"] = run_benchmark(params, Path(result["final_dir"]))
    return result


def run_benchmark(params: TrainParams, final_dir: Path) -> dict[str, Any]:
    """`benchmark-nayana` as a subflow on the freshly trained retriever (results under <out>/benchmark)."""
    from flows.benchmark import BenchmarkParams, benchmark_nayana

    options = {"data": params.data, "out": str(Path(params.out) / "benchmark"), **params.benchmark_options}
    options["encoder"] = {"engine": "vlm-retriever", "path": str(final_dir)}
    report = benchmark_nayana(BenchmarkParams.model_validate(options))
    return {"results": report["results"], "report": report["report"]}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if train_netra() else 1)
