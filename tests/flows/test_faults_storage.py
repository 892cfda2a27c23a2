"""An object store that goes down mid-run and a translator that cannot load fail the run; the rerun after
the fault heals makes the bytes of a run that never saw it, and nothing already written is damaged.

The store is moto's real S3 server behind a loopback TCP proxy (``tests/support/tcp_proxy.py``): taking
the proxy down is a network outage that keeps the store's contents, as a real one does.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES

pytestmark = pytest.mark.slow


def run_flow(**kw):
    from flows.synthesize import SynthesizeParams, synthesize

    kw = {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}
    return synthesize(SynthesizeParams(shard_retries=0, queries=False, langs="hi", pages_per_shard=64, **kw))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("faults-s") / "sources"
    src.mkdir()
    for name in ("title_page.pdf", "list_page.pdf"):
        shutil.copy(SAMPLES / name, src / name)
    return src


def s3_outputs(fs, prefix: str) -> dict[str, bytes]:
    """Every shard and rejects object under an output root (read straight from moto, not the proxy)."""
    keys = [k for d in ("pages", "rejects") for k in fs.find(f"{prefix}/{d}") if k.endswith(".parquet")]
    return {k[len(prefix) :]: fs.cat_file(k) for k in sorted(keys)}


def test_object_store_down_mid_run_then_the_rerun_equals_an_unfaulted_run(
    sources, tiny_models, prefect_harness, s3_server, s3_bucket, monkeypatch
):
    import s3fs

    from tasks.faults import ShardsFailed
    from tasks.shards import verify_root
    from tests.support.tcp_proxy import TcpProxy

    proxy = TcpProxy(s3_server.port).up()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)  # the pipeline reaches S3 through it
    direct = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options())
    try:
        run_flow(sources=sources, out=f"{s3_bucket}/reference")
        faulted = f"{s3_bucket}/faulted"
        cut = threading.Event()

        def cut_after_ingest() -> None:  # the store goes away once the English shard is recorded
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not cut.is_set():
                if direct.glob(f"{faulted}/_records/pages-en-*.json"):
                    proxy.down()
                    cut.set()
                    return
                direct.invalidate_cache()
                time.sleep(0.02)

        watcher = threading.Thread(target=cut_after_ingest, daemon=True)
        watcher.start()
        with pytest.raises(ShardsFailed, match=r"translate pages-en-\w+ hi") as failed:
            run_flow(sources=sources, out=faulted)
        cut.set()
        watcher.join()
        proxy.up()
        direct.invalidate_cache()
        assert direct.glob(f"{faulted}/_records/pages-en-*.json"), "the shard written before the outage"
        assert not direct.glob(f"{faulted}/_records/pages-hi-*.json"), "nothing recorded during it"
        assert "rejects" not in str(failed.value)
        assert verify_root(faulted).damaged == {}, "nothing already written is lost or corrupted"
        rerun = run_flow(sources=sources, out=faulted)
        assert rerun["shards_worked"] == 1  # only the translation, the English shard is kept
        direct.invalidate_cache()
        assert s3_outputs(direct, faulted) == s3_outputs(direct, f"{s3_bucket}/reference")
    finally:
        proxy.down()


def test_a_translator_that_cannot_load_is_not_recorded(sources, tiny_models, prefect_harness, tmp_path):
    """A broken model directory is a broken world: the translate shard raises (no record, no rejects
    rows), the run fails naming the shard; once the model is restored the rerun equals a clean run."""
    from tasks.faults import ShardsFailed

    model = tmp_path / "nllb"
    shutil.copytree(tiny_models["nllb-tiny"] / "ct2", model)
    text = (REPO / "assets" / "profiles" / "tiny.toml").read_text()
    profile = tmp_path / "broken-model.toml"
    profile.write_text(text.replace('model = "recipe:nllb-tiny"', f'model = "{model}"'))
    run_flow(sources=sources, profile=profile, out=tmp_path / "reference")
    good = (model / "model.bin").read_bytes()
    (model / "model.bin").write_bytes(good[: len(good) // 3])  # a truncated download
    out = tmp_path / "broken"
    with pytest.raises(ShardsFailed, match=r"translate pages-en-\w+ hi: RuntimeError"):
        run_flow(sources=sources, profile=profile, out=out)
    assert list(out.glob("_records/pages-en-*.json")) and not list(out.glob("_records/pages-hi-*.json"))
    assert not list(out.glob("rejects/rejects-pages-hi-*"))
    (model / "model.bin").write_bytes(good)
    run_flow(sources=sources, profile=profile, out=out)

    def shards(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/*.parquet"))}

    assert shards(out) == shards(tmp_path / "reference") and shards(out)
