"""A ``--sources`` that names nothing (a missing path, a glob, list file or s3:// prefix matching no
file) stops `m3dr synthesize` before any work, naming the source, with a non-zero exit and no output
root; sources that exist but hold nothing new are a normal, successful no-op."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.ingest.sources import SourcesNotFound, scan_sources
from tests.conftest import REPO, SAMPLES


# ---------------------------------------------------------------------------- listing
def test_a_missing_path_is_sources_not_found(tmp_path: Path) -> None:
    with pytest.raises(SourcesNotFound, match="no such file or directory") as err:
        scan_sources(tmp_path / "nope")
    assert err.value.spec == str(tmp_path / "nope") and isinstance(err.value, ValueError)


def test_an_empty_glob_directory_or_list_is_sources_not_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("not a source\n")
    with pytest.raises(SourcesNotFound, match="glob matches no source file"):
        scan_sources(str(tmp_path / "docs" / "*.pdf"))
    with pytest.raises(SourcesNotFound, match="directory holds no source file"):
        scan_sources(tmp_path / "docs")
    listing = tmp_path / "list.txt"
    listing.write_text("\n  \n")
    with pytest.raises(SourcesNotFound, match="list file lists no source file"):
        scan_sources(listing)
    listing.write_text(f"{SAMPLES / 'title_page.pdf'}\nmissing.pdf\n")
    with pytest.raises(SourcesNotFound, match=r"missing files: .*missing\.pdf"):
        scan_sources(listing)


def test_an_empty_s3_prefix_or_glob_is_sources_not_found(s3_bucket: str) -> None:
    from tasks.storage import open_store

    with pytest.raises(SourcesNotFound, match="no object or prefix"):
        scan_sources(f"{s3_bucket}/nothing-here")
    with pytest.raises(SourcesNotFound, match="glob matches no source object"):
        scan_sources(f"{s3_bucket}/docs/*.pdf")
    with pytest.raises(SourcesNotFound, match="prefix holds no source object"):
        scan_sources(s3_bucket)
    open_store(f"{s3_bucket}/docs").put_bytes("title_page.pdf", (SAMPLES / "title_page.pdf").read_bytes())
    assert [r.uri for r in scan_sources(f"{s3_bucket}/docs")] == ["title_page.pdf"]


# ---------------------------------------------------------------------------- the command
def _synthesize(sources: str, out: Path, *extra: str, env: dict[str, str] | None = None):
    """`m3dr synthesize` in a subprocess, as a user runs it, against the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    cmd = [sys.executable, "-m", "flows.cli", "synthesize", "--sources", sources, "--out", str(out)]
    cmd += ["--langs", "hi", "--no-queries", "--workers", "1", *extra]
    full_env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("kind", ["missing dir", "empty glob"])
def test_synthesize_on_nothing_fails_before_any_work(tmp_path: Path, prefect_harness, kind: str) -> None:
    (tmp_path / "empty").mkdir()
    spec = (
        str(tmp_path / "nonexistent" / "dir") if kind == "missing dir" else str(tmp_path / "empty" / "*.pdf")
    )
    out = tmp_path / "out"
    models = tmp_path / "models"  # models are built (recipes) on a normal start: not on this one
    proc = _synthesize(spec, out, env={"M3DR_MODELS": str(models), "M3DR_RECIPE_CACHE": str(tmp_path / "rc")})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"error: sources {spec!r}" in proc.stderr
    assert not out.exists(), "no output root is created"
    assert not models.exists() and not (tmp_path / "rc").exists(), "no model was built"


def test_a_refresh_with_nothing_new_is_a_successful_no_op(
    tmp_path: Path, tiny_models, prefect_harness
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SAMPLES / "title_page.pdf", src / "title_page.pdf")
    out = tmp_path / "out"
    first = _synthesize(str(src), out, "--no-build")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert re.search(r"shard tasks +: 2 \(2 did work\)", first.stdout), first.stdout
    files = {p: p.read_bytes() for p in sorted(out.glob("pages/*/*.parquet"))}
    assert len(files) == 2
    again = _synthesize(str(src), out, "--no-build")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    # nothing is redone: the ingest shard is not even planned, the translate shard is skipped as complete
    assert re.search(r"shard tasks +: 1 \(0 did work\)", again.stdout), again.stdout
    assert 'pages per language : {"en": 1, "hi": 1}' in again.stdout
    assert {p: p.read_bytes() for p in sorted(out.glob("pages/*/*.parquet"))} == files
