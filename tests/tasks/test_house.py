"""The structure holds: explicit tables (no registration on import), leaf contract modules, and every
engine reachable from a process that imported only a flow."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet) from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_build_recipe_works_in_a_fresh_interpreter(tiny_models) -> None:
    """Before: importing one recipe module first left the registry with that recipe alone."""
    cache = str(tiny_models["nllb-tiny"].parent)
    for first in ("", "import tasks.recipes.llm_tiny; "):
        code = "import tasks.models; from tasks.models import build_recipe; print(build_recipe('nllb-tiny'))"
        proc = _python(first + code, M3DR_MODELS=cache)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().endswith("nllb-tiny")


def test_tables_are_explicit_and_importing_changes_nothing() -> None:
    from tasks.encoders import ENCODERS
    from tasks.models import RECIPES, recipe_builder

    recipes, encoders = dict(RECIPES), dict(ENCODERS)
    for package in ("tasks", "training", "eval", "flows"):
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
            importlib.import_module(info.name)
    assert recipes == RECIPES and encoders == ENCODERS
    assert set(RECIPES) == {"nllb-tiny", "doclayout-yolo-tiny", "llm-tiny", "gemma3-tiny", "vlm-tiny"}
    assert all(callable(recipe_builder(name)) for name in RECIPES)


@pytest.mark.slow
def test_vlm_base_encoder_builds_in_the_synthesize_flow_process(tiny_models) -> None:
    """A process that imported only the synthesize flow builds the dense miner over our base model
    (``vlm-base``, an engine of training/) and mines with it: before, the engine was registered only
    when training/encoders.py happened to be imported, so this failed with "unknown encoder engine"."""
    code = """
import sys
import flows.synthesize  # what a Prefect worker running `synthesize` has imported
assert "training.inference" not in sys.modules
from tasks.encoders import PageView
from tasks.negatives.base import QueryView
from tasks.negatives.miners import build_miner
from flows.synthesize import ENCODERS  # the table the flow passes to its negatives tasks
encoder = {"engine": "vlm-base", "model": "recipe:gemma3-tiny", "config": {"retriever": "dense"}}
miner = build_miner({"miner": "dense", "k": 1, "top_n": 3, "margin": 1.0, "encoder": encoder}, ENCODERS)
pages = [PageView(f"p{i}", f"p{i}", "en", f"page {i} about topic {i}") for i in range(4)]
mined = miner.mine([QueryView("q0", "topic 0", "en", "p0", "p0")], pages)
assert "training.inference" in sys.modules
print(mined[0].miner, mined[0].positive_score)
"""
    proc = _python(code, M3DR_MODELS=str(tiny_models["gemma3-tiny"].parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    label, positive_score = proc.stdout.split()[-2:]
    assert label.startswith("dense:vlm-base:gemma3-tiny")
    assert -1.0 <= float(positive_score) <= 1.0  # a cosine of the VLM's own vectors (nan: nothing scored)


def test_every_repository_path_the_readme_names_exists() -> None:
    """The README's map (and every repo path it mentions in backticks) points at real files."""
    import re

    text = (REPO / "README.md").read_text()
    block = text.split("### Map of the house", 1)[1].split("```", 2)[1]
    mapped = [line.split()[0] for line in block.splitlines() if line.strip()]
    assert len(mapped) > 20
    roots = (
        "tasks/",
        "flows/",
        "eval/",
        "training/",
        "tests/",
        "assets/",
        "benchmarks/",
        "fonts/",
        "scripts/",
    )
    mentioned = [
        m.split()[0].rstrip(".,:;)")
        for m in re.findall(r"`([^`<>*]+)`", text)
        if m.startswith(roots) and " " not in m.split("/")[0]
    ]
    missing = [p for p in dict.fromkeys(mapped + mentioned) if not (REPO / p).exists()]
    assert not missing, missing
    for line in block.splitlines():  # the files a map line lists inside its folder exist too
        parts = line.split()
        if parts and parts[0].endswith("/"):
            for name in re.findall(r"([a-z_0-9]+\.py)", line):
                assert (REPO / parts[0] / name).is_file(), (parts[0], name)
