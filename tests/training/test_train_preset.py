"""The production training preset: ``[train]`` of ``full.toml``, read by train-netra's ``profile``."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.params import TrainParams
from training.colpali import exportable


def test_full_profile_trains_the_production_retriever_and_fields_given_win() -> None:
    config = TrainParams(profile="full").config
    assert config.model == "hf:google/gemma-3-4b-it"
    assert config.matryoshka_dims == [768, 1536, 2560] and config.multivector_dim == 128
    # GradCache really bounds memory: a chunk is smaller than a GPU's queries and its documents
    assert config.grad_cache_chunk and config.grad_cache_chunk < config.batch_size
    assert config.gradient_checkpointing and config.precision == "auto"
    assert not config.max_steps and config.epochs == 1.0  # the whole ~1M pairs, not 100 steps
    assert exportable(config, "gemma3", 2560) == []  # BiGemma3 / ColGemma3 load what it trains
    mine = TrainParams(profile="full", config={"lr": 1e-4, "retriever": "dense"}).config
    assert (mine.lr, mine.retriever, mine.batch_size) == (1e-4, "dense", config.batch_size)
    assert TrainParams().config.model == "recipe:gemma3-tiny"  # no profile: the defaults, as before


def test_a_mistyped_train_key_fails_naming_the_profile_and_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "mine.toml"
    bad.write_text('[train]\nmodel = "recipe:gemma3-tiny"\nbatch_sise = 64\n')
    with pytest.raises(ValidationError, match=r"profile '.*mine.toml' \[train\]: batch_sise: Extra inputs"):
        TrainParams(profile=str(bad))
