"""tasks/llm/client.py against real servers on 127.0.0.1: a closed port, and a small stdlib HTTP server
that answers from a script of statuses (503 twice then 200, 400, 401 …), so every failure class of
``tasks.faults`` is produced by a real socket and a real HTTP exchange, not by a mocked client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.faults import BadInput, EndpointUnavailable, is_world_fault
from tasks.llm.client import (
    ChatEndpoint,
    RequestRejected,
    Session,
    gather_or_fail,
    run_sync,
    secret_from_config,
)

KEY = "sk-m3dr-client-test-7f3a"
REPLY = {
    "choices": [{"message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 5},
}


@dataclass
class Stats:
    """The counters ``ChatEndpoint.session`` fills (``CallStats``)."""

    http_calls: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ScriptedServer(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that answers each request with the next status of ``script`` (the
    last one repeats): 200 with ``reply``, anything else with an error body that echoes the request's
    Authorization header (as a careless server might, so tests can prove the key is blanked out).
    ``GET /v1/models`` lists ``model``. ``hits`` counts requests; ``delay_s`` slows every answer.
    Serves in a thread while used as ``with ScriptedServer([...]) as server``."""

    daemon_threads = True
    request_queue_size = 128  # many connections at once (the default backlog of 5 drops SYNs)

    def __init__(self, script: list[int], reply: dict | None = None, model: str = "served-model") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script, self.reply, self.model = list(script), reply or REPLY, model
        self.hits = 0
        self.delay_s = 0.0
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0  # requests being answered now / at most at once
        self.metrics_text: str | None = None  # Prometheus text at /metrics (None: 404, not vLLM)
        self.retry_after: str | None = None  # Retry-After header of error answers

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/v1"

    def __enter__(self) -> ScriptedServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def next_status(self) -> int:
        with self.lock:
            self.hits += 1
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/metrics":  # not part of the script; 404 unless it plays a vLLM server's gauges
            text = self.server.metrics_text
            self.send_response(404 if text is None else 200)
            self.send_header("content-length", str(len((text or "").encode())))
            self.end_headers()
            self.wfile.write((text or "").encode())
            return
        status = self.server.next_status()
        with self.server.lock:
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            time.sleep(self.server.delay_s)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1
        if status != 200:
            body = {"error": {"message": f"refused {self.headers.get('authorization')}", "code": status}}
        elif self.path.endswith("/models"):
            body = {"object": "list", "data": [{"id": self.server.model, "object": "model"}]}
        else:
            body = self.server.reply
        data = json.dumps(body).encode()
        self.send_response(status)
        if status != 200 and self.server.retry_after is not None:
            self.send_header("retry-after", self.server.retry_after)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up (its timeout): nothing to answer
            self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:  # quiet: pytest shows stderr of failing tests
        pass


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _endpoint(url: str, **kw) -> ChatEndpoint:
    kw = {
        "model": "m",
        "max_retries": 1,
        "backoff_s": 0.01,
        "max_backoff_s": 0.02,
        "connect_timeout_s": 1,
    } | kw
    return ChatEndpoint(url, **kw)


def _chat(endpoint: ChatEndpoint, stats: Stats, body: dict | None = None) -> dict:
    async def main() -> dict:
        async with endpoint.session(stats) as chat:
            await chat.resolve()
            return await chat.chat(body or {"model": endpoint.model, "messages": []})

    return run_sync(main)


# ---------------------------------------------------------------------------- a broken world raises
def test_closed_port_raises_endpoint_unavailable_quickly():
    port = closed_port()
    stats = Stats()
    t0 = time.perf_counter()
    with pytest.raises(EndpointUnavailable, match=f"endpoint 127.0.0.1:{port} unavailable: ConnectError"):
        _chat(_endpoint(f"http://127.0.0.1:{port}/v1", max_retries=2), stats)
    assert time.perf_counter() - t0 < 5
    assert (stats.http_calls, stats.retries, stats.errors) == (3, 2, Counter({"ConnectError": 3}))


def test_5xx_is_retried_until_it_succeeds_and_counted():
    stats = Stats()
    with ScriptedServer([503, 503, 200]) as server:
        data = _chat(_endpoint(server.base_url, max_retries=3), stats)
    assert data == REPLY and server.hits == 3
    assert (stats.http_calls, stats.retries, stats.errors) == (3, 2, Counter({"HTTP 503": 2}))
    assert (stats.prompt_tokens, stats.completion_tokens) == (11, 5)
    # retries used up: the endpoint is unavailable, naming the last error
    stats = Stats()
    with ScriptedServer([502]) as server, pytest.raises(EndpointUnavailable, match="HTTP 502"):
        _chat(_endpoint(server.base_url, max_retries=2), stats)
    assert (stats.http_calls, stats.retries, stats.errors) == (3, 2, Counter({"HTTP 502": 3}))


def test_model_auto_is_resolved_from_the_server_list():
    stats = Stats()
    with ScriptedServer([200], model="served-model") as server:
        endpoint = _endpoint(server.base_url, model="auto")
        _chat(endpoint, stats)
    assert endpoint.model == "served-model" and stats.http_calls == 2  # GET /models + the chat


@pytest.mark.parametrize("status", [400, 413, 422])
def test_an_invalid_request_is_bad_input_not_a_broken_endpoint(status):
    stats = Stats()
    with ScriptedServer([status]) as server, pytest.raises(RequestRejected, match=f"HTTP {status}") as caught:
        endpoint = _endpoint(server.base_url, max_retries=3)
        _chat(endpoint, stats)
    assert isinstance(caught.value, BadInput) and not is_world_fault(caught.value)
    assert stats.http_calls == 1 and stats.retries == 0 and endpoint.broken is None


@pytest.mark.parametrize("status", [401, 403, 404])
def test_refused_credentials_url_or_model_make_the_endpoint_unavailable(status):
    stats = Stats()
    with (
        ScriptedServer([status]) as server,
        pytest.raises(EndpointUnavailable, match=f"HTTP {status}") as caught,
    ):
        endpoint = _endpoint(server.base_url, max_retries=3)
        _chat(endpoint, stats)
    assert is_world_fault(caught.value) and stats.http_calls == 1 and stats.retries == 0
    assert endpoint.broken == str(caught.value)


def test_api_key_never_shown(monkeypatch, caplog):
    """The server echoes the Authorization header in its 401 body: the key is blanked in the message,
    and appears in no repr and no log record (httpx, httpcore and openai log at DEBUG)."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("M3DR_TEST_CLIENT_KEY", KEY)
    cfg = {"base_url_env": "M3DR_TEST_CLIENT_URL", "api_key_env": "M3DR_TEST_CLIENT_KEY"}
    endpoint = _endpoint(secret_from_config(cfg, "base_url"), api_key=secret_from_config(cfg, "api_key"))
    with ScriptedServer([401]) as server, pytest.raises(EndpointUnavailable) as caught:
        monkeypatch.setenv("M3DR_TEST_CLIENT_URL", server.base_url)
        _chat(endpoint, Stats())
    message = str(caught.value)
    assert message.startswith("endpoint env:M3DR_TEST_CLIENT_URL unavailable: HTTP 401")  # not the URL
    assert "Bearer **********" in message and server.base_url not in message
    for text in (message, repr(caught.value), repr(endpoint), str(endpoint.api_key), caplog.text):
        assert KEY not in text
    assert any("401" in r.getMessage() for r in caplog.records)  # the logs did see the exchange


def test_where_names_host_and_port_only():
    assert _endpoint("http://user:pass@10.1.2.3:8000/v1?token=t").where == "10.1.2.3:8000"
    assert _endpoint("https://llm.example.org/v1").where == "llm.example.org"
    secret = secret_from_config({"base_url_secret": "vllm-url"}, "base_url")
    assert _endpoint(secret).where == "prefect-secret:vllm-url"


# ---------------------------------------------------------------------------- one failure per endpoint
def test_first_unavailable_cancels_the_requests_in_flight():
    """A server that answers 503 slowly, 40 requests, 4 in flight (as the engines run them): the first
    request to use up its retries marks the endpoint broken and the others stop at once (cancelled, or
    refused before their next attempt) instead of each using up its own retries."""
    stats = Stats()

    async def main(endpoint: ChatEndpoint) -> list[dict]:
        sem = asyncio.Semaphore(endpoint.concurrency)

        async def one(chat: Session) -> dict:
            async with sem:
                return await chat.chat({"model": "m", "messages": []})

        async with endpoint.session(stats) as chat:
            return await gather_or_fail(one(chat) for _ in range(40))

    with ScriptedServer([503]) as server, pytest.raises(EndpointUnavailable, match="HTTP 503"):
        server.delay_s = 0.05
        run_sync(lambda: main(_endpoint(server.base_url, max_retries=2, concurrency=4)))
    assert server.hits <= 4 * 3 and stats.http_calls <= 4 * 3  # 40 × 3 without the stop


def test_gather_or_fail_raises_the_endpoint_failure_alone():
    async def fails(after: float, exc: Exception) -> None:
        await asyncio.sleep(after)
        raise exc

    async def main() -> list:
        return await gather_or_fail([asyncio.sleep(30), fails(0.01, EndpointUnavailable("down"))])

    t0 = time.perf_counter()
    with pytest.raises(EndpointUnavailable, match="down"):
        asyncio.run(main())
    assert time.perf_counter() - t0 < 5  # the 30 s sleeper was cancelled

    async def ok() -> list:
        return await gather_or_fail(asyncio.sleep(d, result=d) for d in (0.02, 0.01, 0))

    assert asyncio.run(ok()) == [0.02, 0.01, 0]  # in order


def test_run_sync_inside_a_running_loop():
    async def inner() -> int:
        await asyncio.sleep(0)
        return 7

    async def outer() -> int:
        return run_sync(inner)

    assert run_sync(inner) == 7 and asyncio.run(outer()) == 7
    with pytest.raises(EndpointUnavailable):
        asyncio.run(_raise_in_loop())


async def _raise_in_loop() -> None:
    async def boom() -> None:
        raise EndpointUnavailable("x")

    run_sync(boom)
