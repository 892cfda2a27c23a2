"""Retuning how the translator runs (GPUs, batching, threads) re-makes no translated shard; changing
what decides a translation (decoding options) does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tasks.ingest.shard import ingest_shard
from tasks.ingest.sources import scan_sources
from tasks.models import load_profile
from tasks.translate.shard import SPEED_KEYS, TranslateStage, memory_rel, translate_shard
from tests.support.documents import write_pdfs

EN = "pages-en-hash"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("translate-hash")
    write_pdfs(tmp / "src", 2, seed=3)
    out = tmp / "out"
    ingest_shard(out, EN, scan_sources(tmp / "src"), load_profile("tiny"))
    return out


def _with(**translate) -> dict:
    profile = copy.deepcopy(load_profile("tiny"))
    profile["translate"].update(translate)
    return profile


def test_speed_keys_leave_the_shard_alone(root: Path) -> None:
    first = translate_shard(root, EN, "hi", _with())
    assert not first.skipped and first.rows > 0
    retuned = _with(
        max_batch_size=3,
        batch_type="examples",
        max_batch_tokens=64,
        max_in_flight=1,
        inter_threads=2,
        intra_threads=1,
    )
    assert set(retuned["translate"]) >= set(SPEED_KEYS) - {"device_index"}
    base, other = TranslateStage(root, EN, "hi", _with()), TranslateStage(root, EN, "hi", retuned)
    assert base.plan().cfg_hash == other.plan().cfg_hash
    assert memory_rel("hi", EN, base.translate, base.fps) == memory_rel("hi", EN, other.translate, other.fps)
    again = translate_shard(root, EN, "hi", retuned)
    assert again.skipped and again.path == first.path


def test_decoding_options_make_a_new_shard(root: Path) -> None:
    base = TranslateStage(root, EN, "hi", _with())
    for change in ({"beam_size": 2}, {"max_decoding_length": 64}, {"no_repeat_ngram_size": 5}):
        other = TranslateStage(root, EN, "hi", _with(**change))
        assert base.plan().cfg_hash != other.plan().cfg_hash, change
        assert memory_rel("hi", EN, base.translate, base.fps) != memory_rel(
            "hi", EN, other.translate, other.fps
        ), change
