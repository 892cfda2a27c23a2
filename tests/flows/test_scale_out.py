"""`synthesize` on object storage and a cluster, killed and resumed: the same dataset every way.

One multi-shard input (born-digital PDFs, one longer than a shard, so it is split into page ranges) is
synthesized (pages in hi + ar, queries, train shards) several ways, and every way must end with the
same shard bytes as an uninterrupted run:

- into ``s3://`` on moto's standalone S3 server (credentials and endpoint from the AWS environment),
  then rerun (no stage work), then read back with ``datasets.load_dataset(..., storage_options=…)``;
- SIGKILLed mid-translation (the whole CLI process group), then rerun: every shard complete before the
  kill is untouched (same bytes, same inode: never rewritten), nothing is missing or duplicated;
- on a 2-process Dask LocalCluster writing to S3, with one Dask worker SIGKILLed mid-translation;
- two runs started at once into the same S3 root.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tasks.shards import Manifest
from tasks.storage import open_store
from tests.conftest import REPO
from tests.support.documents import write_pdfs

pytestmark = pytest.mark.slow

LANGS = "hi,ar"
PAGES_PER_SHARD = 3


def _shard_hashes(root: str) -> dict[str, str]:
    """sha256 of every pages / queries / train shard object under an output root (local or S3)."""
    store = open_store(root)
    out = {}
    for prefix in ("pages", "queries", "train"):
        for rel in store.list(prefix, ".parquet"):
            out[rel] = hashlib.sha256(store.read_bytes(rel)).hexdigest()
    return out


def _params(sources: Path, out: str, **kw):
    from flows.params import SynthesizeParams

    return SynthesizeParams(
        sources=str(sources), langs=LANGS, out=out, pages_per_shard=PAGES_PER_SHARD, workers=2, **kw
    )


def _check_dataset(root: str) -> None:
    """No page, query or train row twice; every English page translated (or rejected) once per language."""
    m = Manifest(root)
    pages = list(m.live_rows("pages", ["page_id", "source_page_id", "lang"]))
    ids = Counter(r["page_id"] for r in pages)
    assert max(ids.values()) == 1, "a page is in two shards"
    en = {r["page_id"] for r in pages if r["lang"] == "en"}
    for lang in LANGS.split(","):
        per_source = Counter(r["source_page_id"] for r in pages if r["lang"] == lang)
        assert set(per_source) <= en and max(per_source.values()) == 1
    for kind in ("queries", "train"):
        qids = Counter(r["query_id"] for r in m.live_rows(kind, ["query_id"]))
        assert qids and max(qids.values()) == 1, f"a {kind} row is in two shards"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scale") / "sources"
    write_pdfs(d, 4, pages_per_doc=1, seed=3)
    write_pdfs(d, 1, pages_per_doc=4, seed=4)  # longer than a shard: split into page ranges
    return d


@pytest.fixture(scope="module")
def reference(sources, s3_server, tiny_models, prefect_harness) -> dict:
    """The uninterrupted run, into S3; then the same run again (a resume with nothing to do)."""
    from flows.synthesize import synthesize

    bucket = s3_server.make_bucket("m3dr-reference")
    root = f"{bucket}/run"
    first = synthesize(_params(sources, root))
    hashes = _shard_hashes(root)
    second = synthesize(_params(sources, root))
    return {"root": root, "first": first, "second": second, "hashes": hashes}


def test_a_run_writes_to_s3_and_a_rerun_resumes_from_it(reference, s3_server) -> None:
    first, second, root = reference["first"], reference["second"], reference["root"]
    assert first["out"] == root and first["shards_worked"] == len(first["shards"])
    assert set(first["pages_per_lang"]) == {"en", "hi", "ar"} and first["pages_per_lang"]["en"] == 8
    # the long source became page ranges: no English shard holds more than pages_per_shard pages
    m = Manifest(root)
    en = m.shards("pages", "en")
    assert len(en) >= 3 and max(e.rows for e in en) <= PAGES_PER_SHARD
    assert any("@" in u for e in en for u in e.sources)
    assert second["shards_worked"] == 0, "the rerun found every shard complete on S3"
    assert _shard_hashes(root) == reference["hashes"], "the rerun rewrote nothing"
    assert open_store(root).read_json("manifest.json")["shards"].keys() == m.entries().keys()
    _check_dataset(root)
    # the throughput of each stage was measured as it went
    assert first["throughput"]["translate"]["rows"] > 0 and first["throughput"]["ingest"]["rows_per_s"] > 0


def test_s3_output_loads_with_datasets(reference, s3_server, tmp_path: Path, monkeypatch) -> None:
    import datasets
    from PIL import Image

    # the suite runs with the hub offline; this URL is the S3 server on 127.0.0.1, not the hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    ds = datasets.load_dataset(
        "parquet",
        data_files=f"{reference['root']}/pages/hi/*.parquet",
        storage_options=s3_server.storage_options(),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.num_rows == reference["first"]["pages_per_lang"]["hi"]
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["lang"] == "hi"


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"gave up waiting for {what}")


def _translated_records(root: str) -> list[str]:
    return [r for r in open_store(root).list("_records", ".json") if "/pages-hi-" in r or "/pages-ar-" in r]


def test_sigkill_mid_translation_then_resume(reference, sources, tmp_path: Path, prefect_harness) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.synthesize import synthesize

    out = tmp_path / "killed"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.cli", "synthesize", "--sources", str(sources), "--langs", LANGS]
    cmd += ["--out", str(out), "--pages-per-shard", str(PAGES_PER_SHARD), "--workers", "2"]
    log = (tmp_path / "killed.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: _translated_records(str(out)) or proc.poll() is not None, 600, "a translation")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    before = {rel: (out / rel).stat() for rel in open_store(out).list("pages", ".parquet")}
    complete = {e.path for e in Manifest(out).entries().values()}
    total = len(reference["hashes"])
    assert 0 < len([p for p in complete if p.startswith("pages/")]) < total, "killed mid-run"

    result = synthesize(_params(sources, str(out)))
    assert result["shards_worked"] > 0
    for rel, st in before.items():
        if rel in complete:  # complete before the kill: never rewritten
            now = (out / rel).stat()
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), rel
    assert _shard_hashes(str(out)) == reference["hashes"], "resumed run = uninterrupted run, byte for byte"
    _check_dataset(str(out))

    # damage one shard without changing its size: only `m3dr verify` sees it, and --repair recomputes it
    from typer.testing import CliRunner

    from flows.cli import app

    victim = next(e for e in Manifest(out).shards("pages", "hi"))
    data = bytearray((out / victim.path).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (out / victim.path).write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 1 and f"DAMAGED {victim.name}" in res.output
    res = CliRunner().invoke(app, ["verify", str(out), "--repair"])
    assert res.exit_code == 0, res.output
    assert "after repair: 0 damaged" in res.output
    assert _shard_hashes(str(out)) == reference["hashes"], "repaired = the original bytes"


def _dask_worker_pids() -> list[int]:
    import psutil

    me = psutil.Process()
    return [
        p.pid
        for p in me.children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline()) or "forkserver" in " ".join(p.cmdline())
    ]


def test_dask_cluster_on_s3_survives_a_killed_worker(reference, sources, s3_server, prefect_harness) -> None:
    from flows.synthesize import synthesize

    bucket = s3_server.make_bucket("m3dr-dask")
    root = f"{bucket}/run"
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = synthesize(_params(sources, root, dask_workers=2))
        except BaseException as exc:  # reported below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = []
    try:
        _wait_for(lambda: _translated_records(root) or not thread.is_alive(), 600, "a translation on Dask")
        pids = _dask_worker_pids()
        if pids and thread.is_alive():
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
    finally:
        thread.join(timeout=900)
    assert "error" not in box, box.get("error")
    assert killed, "a worker was killed mid-run"
    assert _shard_hashes(root) == reference["hashes"]
    _check_dataset(root)


def test_two_runs_at_once_into_one_s3_root(reference, sources, s3_server, tmp_path: Path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    bucket = s3_server.make_bucket("m3dr-concurrent")
    root = f"{bucket}/run"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.cli", "synthesize", "--sources", str(sources), "--langs", LANGS]
    cmd += ["--out", root, "--pages-per-shard", str(PAGES_PER_SHARD), "--workers", "1"]
    logs = [(tmp_path / f"run{i}.log").open("wb") for i in range(2)]
    procs = [subprocess.Popen(cmd, env=env, stdout=lg, stderr=subprocess.STDOUT) for lg in logs]
    for i, p in enumerate(procs):
        assert p.wait(timeout=900) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
    assert _shard_hashes(root) == reference["hashes"]
    _check_dataset(root)
    text = "".join((tmp_path / f"run{i}.log").read_text() for i in range(2))
    assert s3_server.storage_options()["secret"] not in text, "credentials never logged"
