"""`train-netra` through Prefect: launches the training subprocess, writes adapter + loss-curve artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_train_netra_flow_trains_both_retrievers(tmp_path: Path, tiny_models, prefect_harness):
    from prefect.artifacts import Artifact

    from flows.train import TrainParams, train_netra
    from tests.support.toy_corpus import build_toy_corpus
    from training.config import TrainConfig

    build_toy_corpus(tmp_path / "data", n_pages=8, page_size=(200, 280))
    params = TrainParams(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "run"),
        config=TrainConfig(
            retriever="both", max_steps=4, batch_size=4, checkpoint_every=2, warmup_steps=1, num_threads=1
        ),
    )
    result = train_netra(params)
    assert result["steps"] == 4
    final = Path(result["final_dir"])
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert (final / "heads.safetensors").is_file()
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    md = Artifact.get("train-netra-loss-curve")
    assert md is not None and "data:image/png;base64," in md.data
    table = Artifact.get("train-netra-loss-table")
    assert table is not None and "loss" in str(table.data)


def test_train_netra_reports_missing_train_shards(tmp_path: Path, prefect_harness):
    from flows.train import TrainParams, train_netra

    with pytest.raises(FileNotFoundError, match="no train shards"):
        train_netra(TrainParams(data=str(tmp_path / "empty"), out=str(tmp_path / "run")))
