"""The recipe cache: a build is published once per key and copied into every models directory after
that; a corrupted entry is detected and rebuilt; the key follows the builder's code and config."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tasks.models import RECIPES, build_recipe, fingerprint, recipe_cache_key
from tasks.recipe_cache import ENTRY_RECORD, RecipeCache, source_closure

FAKE = "cache-test"
BUILDS: list[Path] = []


def fake_builder(out_dir: Path) -> Path:
    """A recipe builder for these tests: two files (one in a subfolder), counted per call."""
    BUILDS.append(out_dir)
    (out_dir / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (out_dir / "tok").mkdir()
    (out_dir / "tok" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    return out_dir


@pytest.fixture
def fake_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private models dir and recipe cache with the counting recipe registered; returns the cache."""
    monkeypatch.setenv("M3DR_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("M3DR_RECIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(RECIPES, FAKE, f"{__name__}:fake_builder")
    BUILDS.clear()
    return tmp_path / "cache"


def _made(out: Path) -> str:
    return json.loads((out / ".complete").read_text())["from"]


def test_a_build_is_published_once_and_copied_after(fake_recipe: Path, tmp_path: Path, monkeypatch) -> None:
    out = build_recipe(FAKE)
    assert len(BUILDS) == 1 and _made(out) == "build"
    key, _ = recipe_cache_key(FAKE)
    entry = RecipeCache().entry(FAKE, key)
    assert entry.parent == fake_recipe and (entry / ENTRY_RECORD).is_file()
    assert not list((fake_recipe / ".tmp").iterdir())  # nothing half-written left behind
    first = fingerprint(out)

    assert build_recipe(FAKE) == out and len(BUILDS) == 1  # present with its key: a no-op
    # another clone (another models dir) on the same machine: copied, not built
    monkeypatch.setenv("M3DR_MODELS", str(tmp_path / "clone-models"))
    clone = build_recipe(FAKE)
    assert len(BUILDS) == 1 and _made(clone).startswith("cache ") and fingerprint(clone) == first
    # a models-dir build made for another key (older builder code) is replaced from the cache
    (clone / ".complete").write_text(json.dumps({"key": "0" * 24, "from": "build"}))
    assert _made(build_recipe(FAKE)).startswith("cache ") and len(BUILDS) == 1
    # --no-cache: a real build, whatever the cache holds
    assert _made(build_recipe(FAKE, force=True, use_cache=False)) == "build" and len(BUILDS) == 2


def slow_builder(out_dir: Path) -> Path:
    """``fake_builder``, slow enough that a second caller misses the cache while it runs."""
    time.sleep(0.5)
    return fake_builder(out_dir)


def test_builds_that_miss_at_once_build_once(fake_recipe: Path, monkeypatch) -> None:
    """Two workers asking for the same key at once (xdist, two clones set up together): one builds, the
    other waits on the key's lock and copies the published entry."""
    monkeypatch.setitem(RECIPES, FAKE, f"{__name__}:slow_builder")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build_recipe(FAKE))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and len(BUILDS) == 1
    assert (results[0] / "weights.bin").stat().st_size == 256 * 64


def test_a_flipped_byte_in_an_entry_is_detected_and_rebuilt(fake_recipe: Path, tmp_path: Path, monkeypatch):
    good = fingerprint(build_recipe(FAKE))
    key, _ = recipe_cache_key(FAKE)
    weights = RecipeCache().entry(FAKE, key) / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))

    monkeypatch.setenv("M3DR_MODELS", str(tmp_path / "clone-models"))
    out = build_recipe(FAKE)
    assert len(BUILDS) == 2 and _made(out) == "build"  # the bad entry was not used: built again
    assert fingerprint(out) == good
    # … and the rebuilt entry is whole again: the next clone copies it
    monkeypatch.setenv("M3DR_MODELS", str(tmp_path / "third-models"))
    assert _made(build_recipe(FAKE)).startswith("cache ") and len(BUILDS) == 2


def test_missing_or_extra_files_and_unrecorded_folders_are_not_used(fake_recipe: Path, tmp_path, monkeypatch):
    build_recipe(FAKE)
    key, _ = recipe_cache_key(FAKE)
    cache = RecipeCache()
    (cache.entry(FAKE, key) / "tok" / "vocab.json").unlink()
    assert not cache.copy_out(FAKE, key, tmp_path / "copy") and not cache.entry(FAKE, key).exists()
    assert not (tmp_path / "copy").exists()

    # a folder with the entry's name but no record (never written by publish): a miss, then replaced
    cache.entry(FAKE, key).mkdir(parents=True)
    (cache.entry(FAKE, key) / "weights.bin").write_bytes(b"half")
    monkeypatch.setenv("M3DR_MODELS", str(tmp_path / "clone-models"))
    out = build_recipe(FAKE)
    assert len(BUILDS) == 2 and (out / "weights.bin").stat().st_size == 256 * 64
    assert (cache.entry(FAKE, key) / ENTRY_RECORD).is_file()


def test_the_key_follows_the_builder_source_and_config(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "recipe_key_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    builder = pkg / "builder.py"
    code = """
        from tasks.languages import LANGUAGES

        SCALE = {scale}

        def build(out_dir):
            from tasks.recipes.cldr import glossary_pairs  # a lazy import counts too
            return out_dir
    """
    builder.write_text(textwrap.dedent(code.format(scale=1)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(RECIPES, "probe", "recipe_key_probe.builder:build")

    closure = source_closure("recipe_key_probe.builder")
    assert {"tasks.languages", "tasks.recipes.cldr", "tasks.recipes", "tasks"} <= set(closure)
    before, inputs = recipe_cache_key("probe")
    assert inputs["libraries"]["torch"] and inputs["python"]
    assert recipe_cache_key("probe")[0] == before  # stable
    builder.write_text(textwrap.dedent(code.format(scale=2)))  # one constant of the builder changed
    assert recipe_cache_key("probe")[0] != before


def test_nllb_key_follows_its_build_config(monkeypatch) -> None:
    monkeypatch.delenv("M3DR_NLLB_TINY_STEPS", raising=False)
    monkeypatch.delenv("M3DR_NLLB_TINY_SECONDS", raising=False)
    default, inputs = recipe_cache_key("nllb-tiny")
    assert default and inputs["config"]["steps"] == 600
    # the CTranslate2 conversion the build calls is part of what the key covers
    assert {"tasks.translate.engine", "tasks.recipes.cldr"} <= set(inputs["sources"])
    monkeypatch.setenv("M3DR_NLLB_TINY_STEPS", "20")
    assert recipe_cache_key("nllb-tiny")[0] not in (None, default)
    # a time-budgeted build depends on the machine's speed: never cached
    from tasks.recipes import nllb_tiny

    monkeypatch.setattr(nllb_tiny, "nllb_tiny_config_from_env", lambda: nllb_tiny.NllbTinyConfig(steps=None))
    assert recipe_cache_key("nllb-tiny")[0] is None
