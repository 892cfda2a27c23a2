"""One client for every OpenAI-compatible server (``vllm serve`` or any other), on the ``openai`` SDK.

Shared by the query engine (``tasks/queries/vllm.py``) and the reranker (``eval/rerank.py``): secrets
(URLs, API key) from the config, an environment variable or a Prefect Secret block, never shown; one or
several server URLs; counters of every HTTP attempt; and the contract of ``tasks.faults``: a server that
cannot answer (unreachable, timing out, 5xx after the retries, 401/403/404) raises
``EndpointUnavailable`` and stops the other requests in flight; a request refused as invalid
(400/413/422) raises ``RequestRejected``, a ``BadInput`` that becomes a rejects row.

Sized to the servers, not to a fixed number (``Server``):

- **Concurrency** per server is adaptive (AIMD), bounded by ``concurrency``: it starts at
  ``initial_concurrency``, grows by one per answered request (slow start) until the first overload
  signal, then by one per window; a timeout, 429 or 503 halves it (once per round of failures). When the
  server exposes vLLM's Prometheus ``/metrics`` (``vllm:num_requests_waiting`` /
  ``vllm:num_requests_running``, read every ``metrics_interval_s``), the limit stops growing while the
  server already queues requests: more in flight would only lengthen its queue.
- **Timeouts** are per attempt and scale with the work queued: ``timeout_s`` or three times the
  server's recent latency (EWMA), whichever is larger, times ``1 + waiting / running`` from
  ``/metrics``, capped at ``max_timeout_s``. A slow but working server is waited for, not re-asked.
- **Retries** go through the same limiter as first attempts (a retry never adds load beyond the
  limit), after a jittered exponential backoff (or the server's ``Retry-After``), on the least busy
  server, at most ``max_retries`` per request; and the batch allows at most ``max_retries +
  retry_budget × requests`` failure rounds on servers in service: past that (a flaky server failing
  every other request) the world is broken and the batch raises.
- **Circuit breaker**: failures are counted in rounds (requests in flight together that fail together
  are one round). After ``breaker_failures`` rounds in a row a server is taken out for a cooldown
  (the backoff, doubling), then gets one probe at a time until one succeeds. When every server has
  failed ``max_retries + 1`` rounds in a row, the batch raises ``EndpointUnavailable``.
- **Several servers** (``base_url`` a list, or several URLs separated by commas or spaces in the env
  var / secret): each request goes to the server with the fewest outstanding requests that has room
  under its limit and is not taken out (ties: the first listed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic import Field

from tasks.config import StrictModel
from tasks.faults import BadInput, EndpointUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# This one request is invalid (a prompt too long, a bad image): bad input. Any other failure (after the
# SDK's retries) says the endpoint cannot answer any request.
REJECTED_STATUS = frozenset({400, 413, 422})


# ---------------------------------------------------------------------------- secrets and config
class SecretValue:
    """A secret resolved lazily on first use; ``repr``/``str`` never show it."""

    def __init__(self, loader: Callable[[], str | None], source: str) -> None:
        self._loader, self._value, self._loaded = loader, None, False
        self.source = source  # where it comes from (env var / block name), safe to show

    def get(self) -> str | None:
        if not self._loaded:
            self._value, self._loaded = self._loader(), True
        return self._value

    def __repr__(self) -> str:
        return f"SecretValue(source={self.source!r}, value='**********')"

    __str__ = __repr__


def _prefect_secret(name: str) -> str:
    from prefect.blocks.system import Secret

    return str(Secret.load(name).get())


def secret_from_config(cfg: Mapping[str, Any] | StrictModel, key: str) -> SecretValue | None:
    """``<key>`` (literal), ``<key>_env`` (env var name) or ``<key>_secret`` (Prefect Secret block)."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda name: getattr(cfg, name, None)
    if env := get(f"{key}_env"):
        return SecretValue(lambda: os.environ.get(env) or None, f"env:{env}")
    if block := get(f"{key}_secret"):
        return SecretValue(lambda: _prefect_secret(block), f"prefect-secret:{block}")
    value = get(key)
    if isinstance(value, list | tuple):  # several server URLs
        return SecretValue(lambda: ",".join(map(str, value)), "config") if value else None
    return SecretValue(lambda: str(value), "config") if value else None


class EndpointConfig(StrictModel):
    """Keys every server engine's table shares (``[queries]`` with ``engine = "vllm"``, ``[rerank]``).
    ``base_url`` / ``api_key``: literal, an env var (``*_env``) or a Prefect Secret block (``*_secret``);
    ``base_url`` may list several servers (a list, or URLs separated by commas or spaces)."""

    base_url: str | list[str] | None = None
    base_url_env: str | None = None
    base_url_secret: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    api_key_secret: str | None = None
    model: str = "auto"  # "auto": the first id the server lists under GET /models
    # per server: the most requests in flight (the adaptive limit's cap, and the connection pool's size)
    concurrency: int = Field(default=256, ge=1)
    initial_concurrency: int = Field(default=8, ge=1)  # per server: where the adaptive limit starts
    timeout_s: float = Field(default=120.0, gt=0)  # one attempt's read timeout at an idle server
    max_timeout_s: float = Field(default=600.0, gt=0)  # cap of the timeout scaled to the server's queue
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=6, ge=0)  # per request: connection errors, timeouts, 408/409/429/5xx
    backoff_s: float = Field(default=0.5, ge=0)  # first retry's delay, doubling per retry (jittered)
    max_backoff_s: float = Field(default=8.0, ge=0)
    retry_budget: float = Field(default=0.2, ge=0)  # the batch's retries: max_retries + this × requests
    breaker_failures: int = Field(default=3, ge=1)  # failure rounds in a row that take a server out
    metrics_interval_s: float = Field(default=2.0, ge=0)  # read vLLM's /metrics this often; 0: never


# ---------------------------------------------------------------------------- errors and counters
class RequestRejected(BadInput):
    """The server refused this one request as invalid (400/413/422: a prompt too long, a bad image)."""

    def __init__(self, message: str) -> None:
        super().__init__("request_rejected", message)


class CallStats(Protocol):
    """The counters a session updates (engines keep more of their own)."""

    http_calls: int  # HTTP attempts: retries and the model lookup included
    retries: int
    errors: Counter[str]  # failed attempts by kind: "HTTP 503", "ConnectError" …
    prompt_tokens: int  # the servers' ``usage``, summed over replies
    completion_tokens: int


@functools.cache
def _sdk() -> tuple[type, type]:
    """(client class, transport class), made on first use: ``openai`` takes ~0.5 s to import, and most
    importers of this module (profile validation) need only its config model."""
    import httpx
    import openai

    class CountingTransport(httpx.AsyncHTTPTransport):
        """Counts every attempt and failed attempt; sends nothing once the endpoint is broken."""

        def __init__(self, endpoint: ChatEndpoint, stats: CallStats, limits: httpx.Limits) -> None:
            super().__init__(limits=limits)
            self.endpoint, self.stats = endpoint, stats

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if self.endpoint.broken:
                raise EndpointUnavailable(self.endpoint.broken)
            self.stats.http_calls += 1
            try:
                response = await super().handle_async_request(request)
            except httpx.TransportError as exc:
                self.stats.errors[type(exc).__name__] += 1
                raise
            if response.status_code >= 400:
                self.stats.errors[f"HTTP {response.status_code}"] += 1
            return response

    return openai.AsyncOpenAI, CountingTransport


def split_urls(value: str) -> list[str]:
    """Server URLs from one string of URLs separated by commas or spaces."""
    urls = [u.rstrip("/") for u in re.split(r"[,\s]+", value) if u.strip()]
    if not urls:
        raise ValueError("base_url names no server")
    return urls


def _host(url: str) -> str:
    """host[:port] of a URL: never a path, a query or credentials."""
    return urlsplit(url).netloc.rpartition("@")[2] or "config"


# ---------------------------------------------------------------------------- endpoint
@dataclass
class ChatEndpoint:
    """OpenAI-compatible chat servers (one or several URLs, serving the same model) and how to talk to
    them (URL and key as secrets, model, concurrency, timeouts, retries, breaker). ``broken``: why the
    current batch failed for good."""

    base_url: SecretValue
    api_key: SecretValue | None = None
    model: str = "auto"  # "auto": the first id the server lists (resolved by ``Session.resolve``)
    concurrency: int = 256
    initial_concurrency: int = 8
    timeout_s: float = 120.0
    max_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    retry_budget: float = 0.2
    breaker_failures: int = 3
    metrics_interval_s: float = 2.0
    broken: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.base_url, str | list | tuple):  # literal URL(s)
            urls = self.base_url if isinstance(self.base_url, str) else ",".join(self.base_url)
            self.base_url = SecretValue(lambda: urls, "config")
        self.concurrency, self.max_retries = int(self.concurrency), int(self.max_retries)
        self.initial_concurrency = min(int(self.initial_concurrency), self.concurrency)
        if self.concurrency < 1 or self.max_retries < 0 or self.initial_concurrency < 1:
            raise ValueError("concurrency and initial_concurrency must be >= 1 and max_retries >= 0")

    @classmethod
    def from_config(cls, cfg: EndpointConfig, section: str) -> ChatEndpoint:
        """From an engine's validated table."""
        base_url = secret_from_config(cfg, "base_url")
        if base_url is None:
            raise ValueError(f"[{section}] engine 'vllm' needs base_url, base_url_env or base_url_secret")
        options = cfg.model_dump(include={f.name for f in fields(cls) if f.init} - {"base_url", "api_key"})
        return cls(base_url, secret_from_config(cfg, "api_key"), **options)

    def urls(self) -> list[str]:
        """The server URLs (resolved from the secret; never log them)."""
        return split_urls(str(self.base_url.get() or ""))

    @property
    def sources(self) -> str:
        """Where URL and key come from, never their values (a URL may carry credentials)."""
        key_from = self.api_key.source if self.api_key else None
        return f"url_from={self.base_url.source!r}, api_key_from={key_from!r}"

    @property
    def where(self) -> str:
        """The endpoint in error messages: host[:port] of a literal URL, else the URL's source
        (``env:VLLM_URL``); never a path, a query or credentials that a URL could carry."""
        if self.base_url.source != "config":
            return self.base_url.source
        return ",".join(_host(u) for u in self.urls())

    def server_where(self, index: int, url: str, n: int) -> str:
        """One server in error messages: its host[:port] for a literal URL, else ``source`` (``[i]``
        when the source names several)."""
        if self.base_url.source == "config":
            return _host(url)
        return self.base_url.source + (f"[{index}]" if n > 1 else "")

    def __repr__(self) -> str:  # never the key, never a URL that could carry credentials
        return f"ChatEndpoint(model={self.model!r}, {self.sources})"

    @contextlib.asynccontextmanager
    async def session(self, stats: CallStats) -> AsyncIterator[Session]:
        """A connection pool per server for one batch of calls, counting into ``stats``. Opening one
        clears ``broken``: each batch (a retried shard) gives the servers a fresh chance."""
        import httpx

        client_cls, transport_cls = _sdk()
        self.broken = None
        key = self.api_key.get() if self.api_key else None
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(float(self.timeout_s), connect=float(self.connect_timeout_s))
        urls = self.urls()
        async with contextlib.AsyncExitStack() as stack:
            servers = []
            for i, url in enumerate(urls):
                client = client_cls(
                    base_url=url,
                    api_key=key or "EMPTY",  # the SDK needs one; a server without --api-key ignores it
                    max_retries=0,  # retries are ours: through the limiter, onto the least busy server
                    timeout=timeout,
                    http_client=httpx.AsyncClient(
                        transport=transport_cls(self, stats, limits), timeout=timeout
                    ),
                )
                await stack.enter_async_context(client)
                servers.append(Server(i, self.server_where(i, url, len(urls)), url, client, self))
            session = Session(self, stats, servers)
            if self.metrics_interval_s > 0:
                await stack.enter_async_context(session.metrics_reader(key))
            yield session


@dataclass
class Server:
    """One server of an endpoint: its SDK client, adaptive limit, latency, queue and breaker state."""

    index: int
    where: str  # for messages: host:port or the URL's source, never the URL
    url: str
    client: Any  # openai.AsyncOpenAI
    endpoint: ChatEndpoint
    limit: float = 0.0  # requests in flight allowed now (AIMD, in [1, concurrency])
    ssthresh: float = 0.0  # slow start (+1 per answer) below it, +1/limit above
    outstanding: int = 0
    answered: int = 0
    failures: int = 0  # failure rounds in a row (an answer resets it)
    last_failure: float = -1.0  # monotonic time of the last counted failure round
    open_until: float = 0.0  # taken out until then (monotonic); then one probe at a time
    probing: bool = False
    latency: float = 0.0  # EWMA of answered attempts' seconds
    waiting: int = 0  # vLLM's num_requests_waiting at the last /metrics read
    running: int = 0
    metrics: bool | None = None  # None: not read yet; False: the server has no usable /metrics

    def __post_init__(self) -> None:
        self.limit = float(self.endpoint.initial_concurrency)
        self.ssthresh = float(self.endpoint.concurrency)

    @property
    def out(self) -> bool:
        """Taken out by the breaker (until a probe succeeds)."""
        return self.failures >= self.endpoint.breaker_failures

    def room(self, now: float) -> bool:
        """Whether a request may start here now: up to the limit while healthy; one at a time (a probe)
        after a failure round until an answer, and not before the cooldown once taken out."""
        if self.failures:
            return now >= self.open_until and not self.probing and self.outstanding == 0
        return self.outstanding < max(1, int(self.limit))

    def attempt_timeout(self) -> float:
        """Read timeout of the next attempt: scaled to the latency seen and to the server's queue."""
        ep = self.endpoint
        base = max(float(ep.timeout_s), 3.0 * self.latency)
        queued = self.waiting / max(1, self.running) if self.metrics else 0.0
        return min(float(ep.max_timeout_s), base * (1.0 + queued))

    def answered_in(self, seconds: float) -> None:
        """An answer (any status but a failure's): grow the limit, close the breaker."""
        self.answered += 1
        self.failures, self.open_until = 0, 0.0
        self.latency = seconds if self.latency == 0 else 0.8 * self.latency + 0.2 * seconds
        if self.metrics and self.waiting > 0:
            return  # the server already queues: more in flight would only lengthen its queue
        step = 1.0 if self.limit < self.ssthresh else 1.0 / self.limit
        self.limit = min(float(self.endpoint.concurrency), self.limit + step)

    def failed(self, started: float, overload: bool) -> bool:
        """A failed attempt that started at ``started``. Attempts in flight together that fail together
        count as one round: one halving, one step towards the breaker. True when this began a round."""
        now = time.monotonic()
        if started < self.last_failure:
            return False
        self.last_failure = now
        self.failures += 1
        if overload or self.out:
            self.limit = max(1.0, self.limit / 2)
            self.ssthresh = self.limit
        if self.out:
            ep = self.endpoint
            times = self.failures - ep.breaker_failures
            self.open_until = now + _jitter(min(ep.max_backoff_s, ep.backoff_s * 2.0 ** min(times, 60)))
        return True


def _jitter(seconds: float) -> float:
    return seconds * (0.5 + random.random() / 2)  # 50–100 %: requests failed together spread out


def _parse_metrics(text: str) -> tuple[int, int] | None:
    """(running, waiting) from vLLM's Prometheus text, summed over label sets (engines, models); None
    when the text has no ``vllm:num_requests_waiting`` (not a vLLM server, or stats disabled)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            try:
                value = float(rest.rsplit("}", 1)[-1].split()[0])
            except (IndexError, ValueError):
                continue
            found[name] = found.get(name, 0.0) + value
    if "vllm:num_requests_waiting" not in found:
        return None
    return int(found.get("vllm:num_requests_running", 0)), int(found["vllm:num_requests_waiting"])


@dataclass
class Session:
    """One batch of calls to a ``ChatEndpoint``: its servers, their limiter, the shared retry budget."""

    endpoint: ChatEndpoint
    stats: CallStats
    servers: list[Server]
    requests: int = 0  # requests started (each counted once, whatever its attempts)
    rounds: int = 0  # failure rounds of servers in service (probes of a server taken out not counted)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def client(self) -> Any:
        """The first server's SDK client."""
        return self.servers[0].client

    @property
    def capacity(self) -> int:
        """The most requests this session ever has in flight (each server's cap, summed)."""
        return self.endpoint.concurrency * len(self.servers)

    async def resolve(self) -> str:
        """Resolve ``model = "auto"`` (or empty) to the first id the server lists; returns the model id."""
        if self.endpoint.model in ("", "auto"):
            page = await self._call(lambda c, t: c.models.list(timeout=t), rejectable=False)
            if not page.data:
                raise self._fail("the server lists no model", self.servers[0])
            self.endpoint.model = str(page.data[0].id)
        return self.endpoint.model

    async def chat(self, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``/chat/completions`` as is (vLLM extensions included) and return the server's
        JSON, counting its ``usage``. ``ValueError`` for a reply that is not JSON."""
        try:
            data = await self._call(
                lambda c, t: c.post("/chat/completions", body=body, cast_to=object, options={"timeout": t})
            )
        except json.JSONDecodeError as exc:
            raise ValueError(f"reply is not JSON ({exc.msg})") from None
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return data

    # -- the limiter ---------------------------------------------------------------------------------
    async def _acquire(self, avoid: Server | None = None) -> Server:
        """A server with room (fewest outstanding first, then the first listed), waiting for one. A
        retry avoids the server it failed on while another one is in service."""
        while True:
            if self.endpoint.broken:
                raise EndpointUnavailable(self.endpoint.broken)
            now = time.monotonic()
            if avoid is not None and not any(s is not avoid and not s.out for s in self.servers):
                avoid = None
            ready = [s for s in self.servers if s.room(now) and s is not avoid]
            if ready:
                server = min(ready, key=lambda s: (s.failures, s.outstanding, s.index))
                server.probing = server.failures > 0
                server.outstanding += 1
                return server
            self._changed.clear()
            wake = [s.open_until - now for s in self.servers if s.failures and not s.outstanding]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, min(wake)) if wake else None)

    def _release(self, server: Server) -> None:
        server.outstanding -= 1
        server.probing = False
        self._changed.set()

    async def _call(self, send: Callable[[Any, Any], Awaitable[T]], *, rejectable: bool = True) -> T:
        """``send(client, timeout)`` on the least busy server, retried (another server if one has room)
        and mapped onto the contract of ``tasks.faults``. Messages carry the status and the start of the
        server's reply, the API key blanked out."""
        import httpx
        import openai

        ep = self.endpoint
        self.requests += 1
        attempt, failed_on = 0, None
        while True:
            server = await self._acquire(failed_on)
            probe, started = server.probing, time.monotonic()
            timeout = server.attempt_timeout()
            retry_after: float | None = None
            try:
                limits = httpx.Timeout(timeout, connect=float(ep.connect_timeout_s))
                result = await send(server.client, limits)
            except openai.APIStatusError as exc:
                status, error = exc.status_code, f"HTTP {exc.status_code}: {exc.message}"
                retry_after = _retry_after(exc.response.headers)
            except openai.APIConnectionError as exc:  # timeouts included
                cause = exc.__cause__ or exc
                status, error = 0, f"{type(cause).__name__}: {cause}"
                if isinstance(cause, httpx.TimeoutException):
                    error = f"{type(cause).__name__}: no answer within {timeout:.0f} s"
            else:
                server.answered_in(time.monotonic() - started)
                return result
            finally:
                self._release(server)
            if ep.broken:
                raise EndpointUnavailable(ep.broken)
            key = ep.api_key.get() if ep.api_key else None
            error = (error.replace(key, "**********") if key else error)[:300]
            # the server answered (not a failure of it), but no retry can help
            if status and not (status in RETRY_STATUS or status >= 500):
                server.answered_in(time.monotonic() - started)
                if rejectable and status in REJECTED_STATUS:
                    raise RequestRejected(error)
                raise self._fail(error, server)  # 401/403/404 …: every request would get it
            overload = status in OVERLOAD_STATUS or error.startswith(_TIMEOUTS)
            self.rounds += int(server.failed(started, overload) and not probe)
            attempt, failed_on = attempt + 1, server
            if attempt > ep.max_retries:
                raise self._fail(error, server)
            if all(s.failures > ep.max_retries for s in self.servers):
                raise self._fail(error, server)
            if self.rounds > ep.max_retries + ep.retry_budget * self.requests:
                raise self._fail(f"{error} (retry budget spent: {self.rounds} failure rounds for "
                                 f"{self.requests} requests)", server)  # fmt: skip
            self.stats.retries += 1
            first, cap = float(ep.backoff_s), float(ep.max_backoff_s)
            delay = _jitter(min(cap, first * 2.0 ** min(attempt - 1, 60)))
            await asyncio.sleep(min(retry_after, 60.0) if retry_after is not None else delay)

    def _fail(self, error: str, server: Server) -> EndpointUnavailable:
        """Mark the endpoint broken (the other requests in flight stop) and say why, without secrets."""
        message = f"endpoint {server.where} unavailable: {error}"
        if not self.endpoint.broken:
            self.endpoint.broken = message
            log.warning("%s", message)
        self._changed.set()
        return EndpointUnavailable(message)

    # -- vLLM's /metrics -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def metrics_reader(self, key: str | None) -> AsyncIterator[None]:
        """Read each server's ``/metrics`` every ``metrics_interval_s`` while the session is open (not
        counted as calls; a server without vLLM's gauges is not asked again)."""
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(timeout=2.0, headers=headers) as http:

            async def read(server: Server) -> None:
                root = re.sub(r"/v1$", "", server.url)
                while server.metrics is not False:
                    try:
                        reply = await http.get(f"{root}/metrics")
                        parsed = _parse_metrics(reply.text) if reply.status_code == 200 else None
                    except httpx.HTTPError:
                        parsed = ()  # unreachable now: keep what we had, try again later
                    if parsed is None:
                        server.metrics = False
                        break
                    if parsed:
                        server.metrics = True
                        server.running, server.waiting = parsed
                    await asyncio.sleep(self.endpoint.metrics_interval_s)

            tasks = [asyncio.create_task(read(s)) for s in self.servers]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


# With any 5xx: the server could not take this request now; retried (then the endpoint is unavailable).
RETRY_STATUS = frozenset({408, 409, 425, 429})
OVERLOAD_STATUS = frozenset({429, 503})  # the server says it is too busy: fewer requests in flight
_TIMEOUTS = ("ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException")


def _retry_after(headers: Any) -> float | None:
    """Seconds of a ``Retry-After: <seconds>`` header (dates are ignored)."""
    try:
        value = float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


# ---------------------------------------------------------------------------- running
async def gather_or_fail(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Await the coroutines concurrently; their results in order. The first exception (an
    ``EndpointUnavailable`` by preference) cancels the rest and is raised alone, not as a group:
    one failure per dead endpoint, not one per request."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as failed:
        first: BaseException = (failed.subgroup(EndpointUnavailable) or failed).exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]


def run_sync(coro_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``coro_factory()`` to completion and return its result (or raise its error):
    ``asyncio.run`` from sync code; from inside a running loop (a Prefect task, a notebook) the same on
    a fresh loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_factory())).result()
