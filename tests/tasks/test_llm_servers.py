"""tasks/llm/client.py sized to its servers: several URLs with least-outstanding spreading, a failing
server taken out and probed back, the adaptive limit, timeouts that cannot become a retry storm, the
retry budget, and vLLM's ``/metrics``.

Servers are real HTTP servers on 127.0.0.1 (``ScriptedServer`` of tests/tasks/test_llm_client.py: a
scripted status per request, a delay, a count of requests in flight at once, optional Prometheus text at
``/metrics`` in vLLM's format), or a closed port; the last test puts two loopback TCP proxies in front of
the real vLLM server of the session and takes one down mid-batch.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tasks.faults import EndpointUnavailable
from tasks.llm.client import (
    ChatEndpoint,
    EndpointConfig,
    Server,
    Session,
    _parse_metrics,
    gather_or_fail,
    run_sync,
    secret_from_config,
)
from tests.tasks.test_llm_client import REPLY, ScriptedServer, Stats, closed_port

# vLLM 0.x's Prometheus text (v1 engine): gauges labelled per engine and model.
VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} 0.25
"""


def _endpoint(urls: str | list[str], **kw) -> ChatEndpoint:
    kw = {
        "model": "m",
        "max_retries": 2,
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "connect_timeout_s": 1,
        "metrics_interval_s": 0.05,
    } | kw
    return ChatEndpoint(urls, **kw)


def _batch(endpoint: ChatEndpoint, n: int, stats: Stats | None = None, probe=None) -> list[dict]:
    """``n`` chat requests at once through one session (the engines' shape); ``probe(session)`` runs
    inside the session, after the batch."""
    stats = stats or Stats()

    async def main() -> list[dict]:
        async with endpoint.session(stats) as chat:
            sem = asyncio.Semaphore(chat.capacity)

            async def one() -> dict:
                async with sem:
                    return await chat.chat({"model": "m", "messages": []})

            out = await gather_or_fail(one() for _ in range(n))
            if probe:
                probe(chat)
            return out

    return run_sync(main)


# ---------------------------------------------------------------------------- config
def test_several_urls_from_a_list_or_one_string(monkeypatch):
    cfg = EndpointConfig(base_url=["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1/"])
    endpoint = ChatEndpoint.from_config(cfg, "queries")
    assert endpoint.urls() == ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"]
    assert endpoint.where == "10.0.0.1:8000,10.0.0.2:8000"
    monkeypatch.setenv("M3DR_TEST_URLS", "http://a:1/v1, http://b:2/v1\nhttp://c:3/v1")
    from_env = ChatEndpoint(secret_from_config({"base_url_env": "M3DR_TEST_URLS"}, "base_url"))
    assert [u.split("//")[1] for u in from_env.urls()] == ["a:1/v1", "b:2/v1", "c:3/v1"]
    assert from_env.server_where(1, "http://b:2/v1", 3) == "env:M3DR_TEST_URLS[1]"  # never the URL
    assert ChatEndpoint("http://x:1/v1").urls() == ["http://x:1/v1"]  # one string still works
    assert EndpointConfig().concurrency == 256 and EndpointConfig().initial_concurrency == 8


# ---------------------------------------------------------------------------- spreading
def test_requests_spread_over_servers_by_fewest_outstanding():
    """Two equal servers share a batch; a slow one beside a fast one gets fewer requests (it holds its
    requests longer, so it more often has more outstanding)."""
    with ScriptedServer([200]) as a, ScriptedServer([200]) as b:
        a.delay_s = b.delay_s = 0.02
        out = _batch(_endpoint([a.base_url, b.base_url], concurrency=4, initial_concurrency=4), 40)
        assert out == [REPLY] * 40 and a.hits + b.hits == 40 and min(a.hits, b.hits) >= 15
        assert max(a.max_in_flight, b.max_in_flight) <= 4
    with ScriptedServer([200]) as fast, ScriptedServer([200]) as slow:
        fast.delay_s, slow.delay_s = 0.01, 0.2
        _batch(_endpoint([slow.base_url, fast.base_url], concurrency=4, initial_concurrency=4), 60)
        assert fast.hits > 3 * slow.hits and slow.hits >= 1


def test_a_failing_server_is_taken_out_then_probed_back():
    """Server A answers 503 to its first six requests, then recovers; B is healthy. Every request
    succeeds (retried on B); A is taken out after ``breaker_failures`` failure rounds, sees only single
    probes while out, and serves again once a probe succeeds."""
    with ScriptedServer([503] * 6 + [200]) as a, ScriptedServer([200]) as b:
        a.delay_s = b.delay_s = 0.02
        stats = Stats()
        seen: dict = {}
        endpoint = _endpoint(
            [a.base_url, b.base_url], concurrency=2, initial_concurrency=2, breaker_failures=2, max_retries=3
        )
        out = _batch(endpoint, 80, stats, probe=lambda chat: seen.update(a=chat.servers[0]))
        assert out == [REPLY] * 80
        assert stats.errors == {"HTTP 503": 6} and stats.retries == 6
        assert a.hits > 6 and b.hits > a.hits  # A came back after its failures
        assert seen["a"].failures == 0 and not seen["a"].out


def test_a_dead_server_beside_a_live_one_costs_a_few_attempts():
    """A closed port among the URLs: the batch completes on the live server; the dead one gets its first
    round (the initial limit) and then one probe per cooldown (doubling), not a share of every request."""
    with ScriptedServer([200]) as live:
        live.delay_s = 0.01
        stats = Stats()
        endpoint = _endpoint(
            [f"http://127.0.0.1:{closed_port()}/v1", live.base_url],
            concurrency=4,
            initial_concurrency=4,
            max_backoff_s=0.5,
        )
        assert _batch(endpoint, 60, stats) == [REPLY] * 60
    assert live.hits == 60 and 1 <= stats.errors["ConnectError"] <= 20 and stats.http_calls <= 80


# ---------------------------------------------------------------------------- no retry storm
def test_timeouts_do_not_multiply_load_and_a_broken_server_raises():
    """A server slower than the timeout: every attempt times out. Without the breaker each of the 50
    requests would make 1 + max_retries attempts (200); here the first round times out together, the
    server is taken out and only single probes follow until the batch raises."""
    with ScriptedServer([200]) as slow:
        slow.delay_s = 1.0
        stats = Stats()
        endpoint = _endpoint(
            slow.base_url,
            concurrency=8,
            initial_concurrency=8,
            timeout_s=0.2,
            max_retries=3,
            breaker_failures=1,
        )
        t0 = time.monotonic()
        with pytest.raises(EndpointUnavailable, match="ReadTimeout: no answer within"):
            _batch(endpoint, 50, stats)
        assert time.monotonic() - t0 < 10
        time.sleep(1.1)  # let the server finish the requests the client gave up on
    assert slow.hits <= 8 + 3  # (the server still works on the ones the client gave up on)
    assert stats.http_calls == slow.hits and stats.errors["ReadTimeout"] == stats.http_calls


def test_the_retry_budget_bounds_retries_of_a_flaky_server():
    """Every other request fails: the breaker never opens (answers in between), but retries may not
    exceed max_retries + retry_budget × requests; past that the batch raises."""
    with ScriptedServer([503, 200] * 200) as flaky:
        endpoint = _endpoint(flaky.base_url, concurrency=1, initial_concurrency=1, retry_budget=0.1)
        stats = Stats()
        with pytest.raises(EndpointUnavailable, match="retry budget spent"):
            _batch(endpoint, 100, stats)
    assert stats.retries <= 2 + 0.1 * 100 + 1 and flaky.hits < 60
    with ScriptedServer([503, 200] * 200) as flaky:  # a generous budget rides it out
        stats = Stats()
        out = _batch(
            _endpoint(flaky.base_url, concurrency=1, initial_concurrency=1, retry_budget=1.0), 20, stats
        )
    assert out == [REPLY] * 20 and stats.retries == 20


def test_retry_after_is_honoured():
    with ScriptedServer([429, 200]) as server:
        server.retry_after = "0.3"
        t0 = time.monotonic()
        assert _batch(_endpoint(server.base_url, backoff_s=0, max_backoff_s=0), 1) == [REPLY]
    assert time.monotonic() - t0 >= 0.3 and server.hits == 2


# ---------------------------------------------------------------------------- adaptive limit
def test_the_limit_grows_with_answers_and_halves_on_overload():
    endpoint = _endpoint("http://127.0.0.1:9/v1", concurrency=64, initial_concurrency=4, breaker_failures=3)
    s = Server(0, "x", "http://127.0.0.1:9/v1", None, endpoint)
    assert s.limit == 4 and s.room(time.monotonic())
    for _ in range(12):  # slow start: one more per answer
        s.answered_in(0.1)
    assert s.limit == 16
    t0 = time.monotonic()
    s.failed(t0, overload=True)
    s.failed(t0 - 1, overload=True)  # in flight with the first: the same round, no second halving
    assert (s.limit, s.failures, s.ssthresh) == (8, 1, 8)
    s.answered_in(0.1)
    assert s.failures == 0 and s.limit == pytest.approx(8 + 1 / 8)  # additive above ssthresh
    for _ in range(200):
        s.answered_in(0.1)
    assert s.limit <= 64
    for _ in range(3):
        s.failed(time.monotonic(), overload=False)
        time.sleep(0.001)
    assert s.out and s.limit >= 1 and s.open_until > time.monotonic() - 1
    assert s.attempt_timeout() == endpoint.timeout_s  # latency 0.1 s: the configured timeout


def test_vllm_metrics_hold_growth_and_scale_the_timeout():
    """A server whose ``/metrics`` shows a queue (vLLM's gauges): the limit does not grow while it
    queues, and the attempt timeout scales with waiting / running."""
    text = _parse_metrics(VLLM_METRICS.format(running=4, waiting=8))
    assert text == (4, 8) and _parse_metrics("# nothing here\nfoo 1\n") is None
    with ScriptedServer([200]) as server:
        server.metrics_text = VLLM_METRICS.format(running=4, waiting=8)
        seen: dict = {}

        def probe(chat: Session) -> None:
            s = chat.servers[0]
            seen.update(metrics=s.metrics, limit=s.limit, timeout=s.attempt_timeout(), waiting=s.waiting)

        async def wait_for_metrics(chat: Session) -> None:
            while chat.servers[0].metrics is None:
                await asyncio.sleep(0.01)

        endpoint = _endpoint(server.base_url, initial_concurrency=4, timeout_s=10)

        async def main() -> None:
            async with endpoint.session(Stats()) as chat:
                await wait_for_metrics(chat)
                await gather_or_fail(chat.chat({"model": "m", "messages": []}) for _ in range(20))
                probe(chat)

        run_sync(main)
    assert seen == {"metrics": True, "limit": 4, "timeout": 10 * (1 + 8 / 4), "waiting": 8}
    with ScriptedServer([200]) as plain:  # no vLLM gauges: not read again, the limit grows
        stats = Stats()
        _batch(
            _endpoint(plain.base_url, initial_concurrency=4),
            20,
            stats,
            probe=lambda c: seen.update(s=c.servers[0]),
        )
    assert seen["s"].metrics is False and seen["s"].limit > 4 and stats.http_calls == 20


# ---------------------------------------------------------------------------- a real vLLM server
def test_real_vllm_two_routes_one_dies_mid_batch(vllm_server, monkeypatch):
    """Two loopback proxies in front of the session's real vLLM server are two servers: the batch
    spreads over both; one proxy goes down after a few replies and the pages still all complete on the
    other. The server's own /metrics is read through the proxies."""
    from tasks.queries.base import QueryRequest
    from tasks.queries.engines import build_query_generator
    from tests.support.tcp_proxy import TcpProxy

    port = int(vllm_server.base_url.rsplit(":", 1)[1].split("/")[0])
    a, b = TcpProxy(port).up(), TcpProxy(port).up(down_after=10_000)
    try:
        cfg = {
            "engine": "vllm", "base_url": [f"{a.endpoint}/v1", f"{b.endpoint}/v1"],
            "api_key": vllm_server.api_key, "model": "llm-tiny", "concurrency": 3, "initial_concurrency": 2,
            "max_query_chars": 30, "max_page_chars": 400, "timeout_s": 60, "backoff_s": 0.1,
            "max_backoff_s": 0.5, "kinds": ["factual"],
        }  # fmt: skip
        gen = build_query_generator(cfg)
        reqs = [
            QueryRequest(f"p{i}", "en", f"Page {i}: the railway carried {i} passengers.", kinds=("factual",))
            for i in range(16)
        ]
        result: list = []
        worker = threading.Thread(target=lambda: result.append(gen.generate_with_rejects(reqs)))
        worker.start()
        deadline = time.monotonic() + 120
        while b.replies < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        b.down()
        worker.join(timeout=300)
        out, rejects = result[0]
        assert rejects == [] and sorted(q.page_id for q in out) == sorted(r.page_id for r in reqs)
        assert b.replies >= 3 and gen.stats.http_calls >= 16
    finally:
        a.down()
        b.down()
