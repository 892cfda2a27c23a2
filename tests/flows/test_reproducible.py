"""Ids and shards depend on inputs, config and what the models compute — never on where m3dr was built.

Two checkouts in different directories, each building its own tiny models (``nllb-tiny`` with a short,
fixed step count), run ``m3dr synthesize`` on the same sources with the same profile: the model
fingerprints agree and every pages, queries and train shard is byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = ("title_page.pdf", "list_page.pdf")  # born-digital: no OCR, so the run stays short
STEPS = "20"  # optimiser steps of the nllb-tiny build: every stage of the build runs, in seconds


def _checkout(dst: Path) -> Path:
    """A copy of the working tree (tracked + untracked, not ignored files), like a fresh clone."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, names):
        src = REPO / name.decode()
        if src.is_file():
            (dst / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name.decode())
    return dst


def _synthesize(checkout: Path, home: Path, api_url: str) -> Path:
    listing = checkout / "sources.txt"
    listing.write_text("".join(f"assets/samples/{n}\n" for n in SOURCES))
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "M3DR_MODELS": str(checkout / "models"),
        "M3DR_RECIPE_CACHE": str(checkout / "recipe-cache"),  # each checkout builds: no shared cache entry
        "M3DR_NLLB_TINY_STEPS": STEPS,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api_url,  # the session's test server: no temporary server per run
    }
    out = checkout / "out"
    cmd = [sys.executable, "-m", "flows.cli", "synthesize", "--sources", str(listing), "--langs", "hi"]
    cmd += ["--out", str(out), "--profile", "tiny", "--workers", "1"]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _shards(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for kind in ("pages", "queries", "train")
        for p in sorted((out / kind).rglob("*.parquet"))
    }


@pytest.mark.slow
def test_two_checkouts_with_their_own_models_write_identical_shards(tmp_path: Path, prefect_harness) -> None:
    from prefect.settings import PREFECT_API_URL

    from tasks.models import fingerprint

    a = _checkout(tmp_path / "a")
    b = _checkout(tmp_path / "elsewhere" / "second-checkout")
    out_a = _synthesize(a, tmp_path / "home-a", PREFECT_API_URL.value())
    out_b = _synthesize(b, tmp_path / "home-b", PREFECT_API_URL.value())

    # each checkout built its own model, recording its own absolute build path …
    assert str(a) in (a / "models" / "nllb-tiny" / "ct2" / "m3dr_conversion.json").read_text()
    assert str(b) in (b / "models" / "nllb-tiny" / "ct2" / "m3dr_conversion.json").read_text()
    # … yet what the model computes is the same, and so is its fingerprint
    assert fingerprint(a / "models" / "nllb-tiny") == fingerprint(b / "models" / "nllb-tiny")

    shards_a, shards_b = _shards(out_a), _shards(out_b)
    kinds = {name.split("/")[0] for name in shards_a}
    assert kinds == {"pages", "queries", "train"}, shards_a
    assert any(name.startswith("pages/hi/") for name in shards_a)
    assert shards_a == shards_b
