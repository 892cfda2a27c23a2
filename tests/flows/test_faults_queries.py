"""A query server that is down, or dies mid-stage, fails the run; it never becomes a hole in the dataset.

The real vLLM server of the session sits behind a loopback TCP proxy (``tests/support/tcp_proxy.py``):
taking the proxy down is a server that stopped answering, while the server itself (and its greedy
decoding) stays the same for the rerun. Each faulted run must end Failed naming the endpoint, record
nothing for the queries and train shards (no records, no rejects rows), and the rerun after the fault
heals must make every shard, byte for byte, as a run that never saw the fault.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow

URL_ENV, KEY_ENV = "M3DR_FAULTS_VLLM_URL", "M3DR_FAULTS_VLLM_KEY"
PROFILE = f"""
name = "faults-vllm"
[translate]
engine = "ctranslate2"
model = "recipe:nllb-tiny"
[render]
min_font_px = 8
qa = false
[queries]
engine = "vllm"
base_url_env = "{URL_ENV}"
api_key_env = "{KEY_ENV}"
kinds = ["factual", "keyword"]
temperature = 0.0   # greedy: the reference run and the rerun get the same replies
concurrency = 1
max_retries = 1
backoff_s = 0.05
max_query_chars = 40
max_page_chars = 1500
timeout_s = 60
connect_timeout_s = 2
[negatives]
miner = "in-batch"
"""


def outputs(out: Path) -> dict[str, bytes]:
    """Every shard and rejects file of an output root (records hold timestamps: compared by content)."""
    files = [p for d in ("pages", "queries", "train", "rejects") for p in (out / d).rglob("*.parquet")]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(files)}


def records(out: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in (out / "_records").glob(f"{prefix}*.json"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, prefect_harness, vllm_server):
    from tests.support.tcp_proxy import TcpProxy

    tmp = tmp_path_factory.mktemp("faults-q")
    sources = tmp / "sources"
    sources.mkdir()
    for name in ("title_page.pdf", "list_page.pdf"):
        shutil.copy(SAMPLES / name, sources / name)
    profile = tmp / "faults.toml"
    profile.write_text(PROFILE)
    proxy = TcpProxy(int(vllm_server.base_url.rsplit(":", 1)[1].split("/")[0])).up()
    mp = pytest.MonkeyPatch()
    mp.setenv(URL_ENV, f"{proxy.endpoint}/v1")
    mp.setenv(KEY_ENV, vllm_server.api_key)
    args = {"sources": str(sources), "profile": str(profile), "langs": "hi", "pages_per_shard": 64}
    reference = tmp / "reference"
    run_flow(out=reference, **args)
    yield {"tmp": tmp, "proxy": proxy, "args": args, "reference": outputs(reference)}
    proxy.down()
    mp.undo()


def run_flow(**kw):
    from flows.synthesize import SynthesizeParams, synthesize

    kw = {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}
    return synthesize(SynthesizeParams(**{"shard_retries": 0, **kw}))


def test_reference_run_made_queries(setup):
    names = set(setup["reference"])
    assert any(n.startswith("queries/") for n in names) and any(n.startswith("train/") for n in names)


def test_server_down_fails_the_run_then_the_rerun_equals_an_unfaulted_run(setup):
    from typer.testing import CliRunner

    from flows.cli import app

    out, proxy, args = setup["tmp"] / "down", setup["proxy"], setup["args"]
    proxy.down()
    try:
        cli = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
        result = CliRunner().invoke(app, ["synthesize", *cli, f"--out={out}", "--shard-retries=0"])
    finally:
        proxy.up()
    assert result.exit_code == 1, result.output
    assert "shard task(s) failed" in result.output and "queries pages-en-" in result.output
    assert "EndpointUnavailable" in result.output and f"env:{URL_ENV}" in result.output
    assert records(out, "pages-en-") and records(out, "pages-hi-"), "the stages before queries completed"
    assert not records(out, "queries-") and not records(out, "train-")
    assert not list((out / "rejects").glob("rejects-queries-*")), "no rejects rows for a broken world"
    rerun = run_flow(out=out, **args)
    assert rerun["shards_worked"] >= 2  # the queries and train shards, now made
    assert outputs(out) == setup["reference"]


def test_server_dying_mid_stage_fails_the_run_then_the_rerun_equals_an_unfaulted_run(setup):
    from tasks.faults import ShardsFailed

    out, proxy, args = setup["tmp"] / "dies", setup["proxy"], setup["args"]
    run_flow(out=out, queries=False, **args)  # pages first: the fault then hits the queries stage
    proxy.down()
    proxy.up(down_after=3)  # the model list and two chat replies get through, then the server is gone
    try:
        with pytest.raises(ShardsFailed, match="EndpointUnavailable") as failed:
            run_flow(out=out, **args)
    finally:
        answered = proxy.replies
        proxy.down()
        proxy.up()
    assert answered >= 3, "the server answered some pages before it died"
    assert set(failed.value.failures) == {f"queries {e}" for e in [records(out, "pages-en-")[0][:-5]]}
    assert not records(out, "queries-") and not records(out, "train-")
    assert not list((out / "rejects").glob("rejects-queries-*"))
    run_flow(out=out, **args)
    assert outputs(out) == setup["reference"]


def test_a_server_back_within_the_retries_costs_a_retry_not_a_failure(setup):
    """Prefect retries a shard task that failed for a broken world: a server restarting (its first
    connections refused) costs one retry of the queries task, and the run completes unchanged."""
    out, proxy, args = setup["tmp"] / "retried", setup["proxy"], setup["args"]
    run_flow(out=out, queries=False, **args)
    proxy.refuse = 2  # the engine's own two attempts (max_retries = 1) fail: the task fails once
    result = run_flow(out=out, shard_retries=1, retry_delay_s=0.5, **args)
    assert proxy.refuse == 0
    assert {r["name"].split("-")[0] for r in result["shards"] if not r["skipped"]} == {"queries", "train"}
    assert outputs(out) == setup["reference"]
