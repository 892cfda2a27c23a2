"""Command-line entry for training, launchable directly or by torchrun.

``python -m training.run --config spec.json`` where ``spec.json`` is a :class:`RunSpec`
(``{"config": {...TrainConfig...}, "train_shards": [...], "pages_shards": [...], "out_dir": "..."}``);
``--out-dir``/``--train-shards``/``--pages-shards`` override the file. Under
``torchrun --nproc_per_node N -m training.run --config spec.json`` every rank runs it; only rank 0
writes checkpoints and the final adapter. ``python -m training.run export SRC OUT`` merges LoRA into a
standalone model directory. The flow uses :func:`launch_command` to build either command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel, Field, field_validator

from training.config import TrainConfig, TrainResult


class RunSpec(BaseModel):
    """Everything one training launch needs (what the flow writes to ``spec.json``)."""

    config: TrainConfig = Field(default_factory=TrainConfig)
    # local paths or URLs (``s3://…``): strings, so a URL is never mangled by ``Path``
    train_shards: list[str] = Field(default_factory=list)
    pages_shards: list[str] = Field(default_factory=list)
    out_dir: Path = Path("runs/train")

    @field_validator("train_shards", "pages_shards", mode="before")
    @classmethod
    def _as_strings(cls, value: Any) -> Any:
        """Local paths may be given as ``Path``s; they are kept as strings like URLs."""
        if isinstance(value, list | tuple):
            return [os.fspath(v) if isinstance(v, PurePath) else v for v in value]
        return value


def write_spec(spec: RunSpec, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.model_dump_json(indent=1) + "\n")
    return path


def launch_command(spec_path: Path, nproc: int = 1, python: str = sys.executable) -> list[str]:
    """argv that runs a spec: one process (CPU / one GPU) or ``torchrun`` with ``nproc`` processes."""
    if nproc <= 1:
        return [python, "-m", "training.run", "--config", str(spec_path)]
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "training.run",
        "--config",
        str(spec_path),
    ]


def run_spec(spec: RunSpec) -> TrainResult:
    """Train, then leave the process group (torchrun ranks): a rank that exits with gloo's threads
    still up can abort with SIGABRT ("terminate called without an active exception"), seen here."""
    import torch.distributed as dist

    from training.trainer import train

    try:
        return train(spec.config, spec.train_shards, spec.pages_shards, spec.out_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if argv and argv[0] == "export":
        p = argparse.ArgumentParser(prog="python -m training.run export")
        p.add_argument("src", type=Path)
        p.add_argument("out", type=Path)
        a = p.parse_args(argv[1:])
        from training.export import export_merged

        print(export_merged(a.src, a.out))
        return 0
    p = argparse.ArgumentParser(prog="python -m training.run")
    p.add_argument("--config", type=Path, required=True, help="RunSpec JSON (or a bare TrainConfig JSON)")
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--train-shards", nargs="+", help="local paths or URLs")
    p.add_argument("--pages-shards", nargs="+", help="local paths or URLs")
    a = p.parse_args(argv)
    raw = json.loads(a.config.read_text())
    spec = RunSpec.model_validate(raw) if "config" in raw else RunSpec(config=TrainConfig.model_validate(raw))
    if a.out_dir:
        spec.out_dir = a.out_dir
    if a.train_shards:
        spec.train_shards = a.train_shards
    if a.pages_shards:
        spec.pages_shards = a.pages_shards
    result = run_spec(spec)
    print(json.dumps({"final_dir": str(result.final_dir), "steps": result.steps, "loss": result.losses[-1:]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
