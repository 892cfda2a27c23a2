"""Launching a training run from a flow: inputs from a synthesize manifest, the subprocess, the loss curve.

Training runs as a subprocess (``python -m training.run``, or torchrun for several GPUs) so a GPU job is
isolated from the Prefect worker, can be killed and resumed from its last checkpoint, and scales to N
processes without changing the flow. The flow (``flows/train.py``) only calls these functions.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.paths import REPO_ROOT
from tasks.shards import Manifest
from tasks.storage import is_url
from training.config import PhaseSettings, TrainConfig
from training.model import FINAL_DIR, PHASES_DIR
from training.run import RunSpec, launch_command, write_spec

# Lines of the training log worth forwarding to the flow's log (the rest stays in the tail on failure).
PROGRESS_MARKERS = (" step ", "loss")


def resolve_nproc(gpus: int) -> int:
    """Processes to launch: ``gpus`` when > 0, else every visible CUDA GPU (1 without one)."""
    if gpus > 0:
        return gpus
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def phase_plan(
    out: str | Path, config: TrainConfig, phases: list[PhaseSettings]
) -> list[tuple[str, Path, TrainConfig]]:
    """``(label, run dir, config)`` per training run: the one run in ``out`` without phases, else phase
    ``i`` in ``out/phases/<i>-<name>/`` starting from phase ``i-1``'s ``final/`` (resume stays per phase:
    a killed run redoes no finished phase)."""
    out = Path(out)
    if not phases:
        return [(config.retriever, out, config)]
    plan = []
    init = config.init_from
    for i, phase in enumerate(phases):
        run_dir = out / PHASES_DIR / f"{i}-{phase.name}"
        plan.append((f"{i}-{phase.name}", run_dir, phase.config_for(config, init)))
        init = str((run_dir / FINAL_DIR).resolve())
    return plan


def data_root(data: str | Path) -> str:
    """A synthesize output root as the trainer reads it: a URL as given (never ``Path``-resolved), a local
    path made absolute (the training subprocess may run elsewhere)."""
    return str(data).rstrip("/") if is_url(data) else str(Path(data).expanduser().resolve())


def training_inputs(data: str | Path) -> tuple[list[str], list[str]]:
    """Train shards and pages shards listed in a synthesize run's manifest, as local paths or URLs under
    ``data`` (superseded pages excluded by the trainer through the train rows, which never reference
    them)."""
    manifest = Manifest(data_root(data))
    train = sorted(manifest.store.url_of(e.path) for e in manifest.shards("train"))
    pages = sorted(manifest.store.url_of(e.path) for e in manifest.shards("pages"))
    if not train:
        raise FileNotFoundError(f"no train shards in {manifest.path}: run `m3dr synthesize` first")
    return train, pages


def run_training(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    nproc: int,
    *,
    log: Callable[[str], None] = print,
    tail_lines: int = 40,
) -> dict[str, Any]:
    """Write ``spec.json``, run training in a subprocess, forward its progress lines to ``log``;
    returns ``train_result.json``. A failed run raises with the last ``tail_lines`` lines of its log."""
    out = Path(out).resolve()  # checkpoints and the adapter stay on local disk
    train_shards, pages_shards = training_inputs(data)
    spec = RunSpec(config=config, train_shards=train_shards, pages_shards=pages_shards, out_dir=out)
    cmd = launch_command(write_spec(spec, out / "spec.json"), nproc)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    log("launching: " + " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-tail_lines:], line.rstrip()]
            if any(m in line for m in PROGRESS_MARKERS):
                log(line.rstrip())
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


def loss_report(result: dict[str, Any], out: Path, retriever: str) -> tuple[str, list[dict[str, Any]]]:
    """The loss-curve artifact of a finished run: markdown with the embedded PNG, and sampled table rows."""
    import base64

    rows = loss_curve_png(out / "train_log.jsonl", out / "loss_curve.png")
    b64 = base64.b64encode((out / "loss_curve.png").read_bytes()).decode()
    md = (
        f"# train-netra: {retriever}\n\n"
        f"{result['steps']} steps in {result['seconds']:.1f} s on {result['world_size']} process(es); "
        f"final loss {rows[-1]['loss']:.4f} (first {rows[0]['loss']:.4f}).\n\n"
        f"Adapter + heads: `{result['final_dir']}`\n\n![loss](data:image/png;base64,{b64})\n"
    )
    every = max(1, len(rows) // 50)
    table = [
        {
            "step": r["step"],
            "loss": round(r["loss"], 5),
            # runs logged before grad_norm was recorded have none
            "grad_norm": round(r["grad_norm"], 4) if "grad_norm" in r else None,
            "lr": r.get("lr"),
        }
        for r in rows[::every]
    ]
    return md, table
