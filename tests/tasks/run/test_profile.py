"""Profile validation: a mistyped key stops a run before any work, naming the key and the allowed ones."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from tasks.config import ProfileError, plain
from tasks.models import load_profile
from tasks.run.profile import Profile, validate_profile


@pytest.mark.parametrize("name", ["tiny", "full"])
def test_bundled_profiles_are_valid(name: str) -> None:
    profile = validate_profile(load_profile(name))
    assert isinstance(profile, Profile) and profile.name == name


def test_a_default_spelled_out_changes_no_hash() -> None:
    """Every default lives in the config models: writing one into a profile changes no stage's config
    hash (so no shard is redone and no id changes)."""
    from tasks.ingest.plan import ingest_base_hash
    from tasks.negatives.index import index_config, negatives_config
    from tasks.shards import config_hash

    tiny = load_profile("tiny")
    spelled = copy.deepcopy(tiny)
    spelled["negatives"].setdefault("bm25", {})["k1"] = 1.2  # today's defaults, written out
    spelled["negatives"]["bm25"]["b"] = 0.75
    spelled.setdefault("ingest", {})["dpi"] = 144
    spelled["render"]["grow_x"] = 1.5
    spelled["queries"]["n"] = 1
    a, b = validate_profile(tiny), validate_profile(spelled)
    assert a == b
    assert ingest_base_hash(a, "fp") == ingest_base_hash(b, "fp")
    assert config_hash(plain(a.translate_stage())) == config_hash(plain(b.translate_stage()))
    assert config_hash(plain(a.queries)) == config_hash(plain(b.queries))
    for miner in ("bm25", "in-batch"):
        na = negatives_config({**tiny, "negatives": {**tiny["negatives"], "miner": miner}})
        nb = negatives_config({**spelled, "negatives": {**spelled["negatives"], "miner": miner}})
        assert index_config(na, None) == index_config(nb, None) and na == nb


@pytest.mark.parametrize(
    ("table", "key", "value", "expected"),
    [
        (
            "translate",
            "beem_size",
            4,
            r"\[translate\]: unknown key\(s\) 'beem_size'; allowed: (\w+, )*beam_size, ",
        ),
        (
            "layout",
            "confidence",
            0.3,
            r"\[layout\]: unknown key\(s\) 'confidence'; allowed: (\w+, )*conf, engine",
        ),
        ("ingest", "dip", 96, r"\[ingest\]: unknown key\(s\) 'dip'; allowed: dpi, .*max_pixels"),
        ("render", "min_font", 6, r"\[render\]: unknown key\(s\) 'min_font'; allowed: .*min_font_px"),
        (
            "queries",
            "kind",
            ["keyword"],
            r"\[queries\]: unknown key\(s\) 'kind'; allowed: composed, engine, .*kinds",
        ),
        ("negatives", "top_k", 10, r"\[negatives\]: unknown key\(s\) 'top_k'; allowed: .*top_n"),
    ],
)
def test_a_misspelled_key_is_named_with_the_allowed_ones(table, key, value, expected) -> None:
    profile = load_profile("tiny")
    profile[table][key] = value
    with pytest.raises(ProfileError, match=rf"profile 'tiny': {expected}"):
        validate_profile(profile)


def test_nested_tables_and_engines_are_checked() -> None:
    tiny = load_profile("tiny")
    cases = [
        (("queries", "filter", "min_script_shar"), r"\[queries.filter\]: unknown key\(s\) 'min_script_shar'"),
        (
            ("negatives", "modality", "wrong_ration"),
            r"\[negatives.modality\]: unknown key\(s\) 'wrong_ration'",
        ),
        (("negatives", "encoder", "max_char"), r"\[negatives.encoder\]: unknown key\(s\) 'max_char'"),
    ]
    for (table, sub, key), expected in cases:
        profile = copy.deepcopy(tiny)
        profile[table][sub][key] = 1
        with pytest.raises(ProfileError, match=expected):
            validate_profile(profile)
    profile = copy.deepcopy(tiny)
    profile["translate"]["engine"] = "marian"
    with pytest.raises(ProfileError, match=r"\[translate\]: unknown engine 'marian'; known: ctranslate2"):
        validate_profile(profile)
    profile = copy.deepcopy(tiny)
    profile["translte"] = {"beam_size": 2}
    with pytest.raises(ProfileError, match=r"unknown table\(s\) \['translte'\]"):
        validate_profile(profile)
    profile = copy.deepcopy(tiny)
    profile["translate"]["beam_size"] = "four"
    with pytest.raises(ProfileError, match=r"\[translate\]: beam_size: Input should be a valid integer"):
        validate_profile(profile)


def test_engine_builders_check_their_table_too(tmp_path: Path) -> None:
    """Direct library use fails the same way as a run (no engine silently ignores a key)."""
    from tasks.ingest.ocr import build_ocr
    from tasks.negatives.miners import build_miner
    from tasks.queries.engines import build_query_generator

    with pytest.raises(ProfileError, match=r"\[extract\]: unknown key\(s\) 'text_scor'"):
        build_ocr({"engine": "rapidocr", "text_scor": 0.4})
    with pytest.raises(ProfileError, match=r"\[queries\]: unknown key\(s\) 'phrase_unit'"):
        build_query_generator({"engine": "extractive", "phrase_unit": [2, 3]})
    with pytest.raises(ProfileError, match=r"\[negatives\]: unknown key\(s\) 'margn'"):
        build_miner({"miner": "bm25", "margn": 0.9})


def test_a_run_with_a_typo_stops_before_any_work(tmp_path: Path, prefect_harness) -> None:
    from flows.synthesize import SynthesizeParams, synthesize
    from tasks.paths import PROFILES_DIR

    raw = (PROFILES_DIR / "tiny.toml").read_text().replace("beam_size = 1", "beem_size = 1")
    assert "beem_size" in tomllib.loads(raw)["translate"]
    bad = tmp_path / "typo.toml"
    bad.write_text(raw)
    out = tmp_path / "out"
    with pytest.raises(ProfileError, match=r"profile 'typo': \[translate\]: unknown key\(s\) 'beem_size'"):
        synthesize(SynthesizeParams(profile=str(bad), out=str(out), langs="hi", build_models=False))
    assert not out.exists() or not any(out.iterdir())  # no manifest, no shard, no rejects
