"""One client for every OpenAI-compatible server (``vllm serve`` or any other), on the ``openai`` SDK.

Shared by the query engine (``tasks/queries/vllm.py``) and the reranker (``eval/rerank.py``): secrets
(URL, API key) from the config, an environment variable or a Prefect Secret block, never shown; the SDK's
retries with backoff, timeouts, and a pool sized to the concurrency; counters of every HTTP attempt; and
the contract of ``tasks.faults``: a server that cannot answer (unreachable, timing out, 5xx after the
retries, 401/403/404) raises ``EndpointUnavailable`` and stops the other requests in flight; a request
refused as invalid (400/413/422) raises ``RequestRejected``, a ``BadInput`` that becomes a rejects row.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
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
    return SecretValue(lambda: str(value), "config") if value else None


class EndpointConfig(StrictModel):
    """Keys every server engine's table shares (``[queries]`` with ``engine = "vllm"``, ``[rerank]``).
    ``base_url`` / ``api_key``: literal, an env var (``*_env``) or a Prefect Secret block (``*_secret``)."""

    base_url: str | None = None
    base_url_env: str | None = None
    base_url_secret: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    api_key_secret: str | None = None
    model: str = "auto"  # "auto": the first id the server lists under GET /models
    concurrency: int = Field(default=8, ge=1)  # requests in flight, and the connection pool's size
    timeout_s: float = Field(default=120.0, gt=0)  # read timeout of one attempt
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=6, ge=0)  # per request: connection errors, timeouts, 408/409/429/5xx
    backoff_s: float = Field(default=0.5, ge=0)  # first retry's delay, doubling per retry (jittered)
    max_backoff_s: float = Field(default=8.0, ge=0)


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
            self.stats.retries += int(request.headers.get("x-stainless-retry-count", "0") != "0")
            try:
                response = await super().handle_async_request(request)
            except httpx.TransportError as exc:
                self.stats.errors[type(exc).__name__] += 1
                raise
            if response.status_code >= 400:
                self.stats.errors[f"HTTP {response.status_code}"] += 1
            return response

    class AsyncOpenAI(openai.AsyncOpenAI):
        """``AsyncOpenAI`` with the endpoint's backoff (the SDK's own is fixed: 0.5 s doubling to 8 s)."""

        backoff: tuple[float, float] = (0.5, 8.0)  # (first delay, cap) in seconds

        def _calculate_retry_timeout(self, remaining: int, options: Any, headers: Any = None) -> float:
            if headers is not None and self._parse_retry_after_header(headers):  # the server's Retry-After
                return super()._calculate_retry_timeout(remaining, options, headers)
            retry = options.get_max_retries(self.max_retries) - remaining
            first, cap = self.backoff
            return min(cap, first * 2.0 ** min(retry, 60)) * (0.5 + random.random() / 2)  # jitter 50–100 %

    return AsyncOpenAI, CountingTransport


# ---------------------------------------------------------------------------- endpoint
@dataclass
class ChatEndpoint:
    """An OpenAI-compatible chat server and how to talk to it (URL and key as secrets, model,
    concurrency, timeouts, retries). ``broken``: why it failed for good in the current batch."""

    base_url: SecretValue
    api_key: SecretValue | None = None
    model: str = "auto"  # "auto": the first id the server lists (resolved by ``Session.resolve``)
    concurrency: int = 8
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    broken: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.base_url, str):  # a literal URL
            self.base_url = SecretValue(lambda url=self.base_url: url, "config")
        self.concurrency, self.max_retries = int(self.concurrency), int(self.max_retries)
        if self.concurrency < 1 or self.max_retries < 0:
            raise ValueError("concurrency must be >= 1 and max_retries >= 0")

    @classmethod
    def from_config(cls, cfg: EndpointConfig, section: str) -> ChatEndpoint:
        """From an engine's validated table."""
        base_url = secret_from_config(cfg, "base_url")
        if base_url is None:
            raise ValueError(f"[{section}] engine 'vllm' needs base_url, base_url_env or base_url_secret")
        options = cfg.model_dump(include={f.name for f in fields(cls) if f.init} - {"base_url", "api_key"})
        return cls(base_url, secret_from_config(cfg, "api_key"), **options)

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
        return urlsplit(str(self.base_url.get())).netloc.rpartition("@")[2] or "config"

    def __repr__(self) -> str:  # never the key, never a URL that could carry credentials
        return f"ChatEndpoint(model={self.model!r}, {self.sources})"

    @contextlib.asynccontextmanager
    async def session(self, stats: CallStats) -> AsyncIterator[Session]:
        """A connection pool for one batch of calls, counting into ``stats``. Opening one clears
        ``broken``: each batch (a retried shard) gives the server a fresh chance."""
        import httpx

        client_cls, transport_cls = _sdk()
        self.broken = None
        key = self.api_key.get() if self.api_key else None
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(float(self.timeout_s), connect=float(self.connect_timeout_s))
        client = client_cls(
            base_url=str(self.base_url.get()).rstrip("/"),
            api_key=key or "EMPTY",  # the SDK needs one; a server without --api-key ignores it
            max_retries=self.max_retries,
            timeout=timeout,
            http_client=httpx.AsyncClient(transport=transport_cls(self, stats, limits), timeout=timeout),
        )
        client.backoff = (float(self.backoff_s), float(self.max_backoff_s))
        async with client:
            yield Session(self, stats, client)


@dataclass
class Session:
    """One batch of calls to a ``ChatEndpoint`` over one ``AsyncOpenAI`` client."""

    endpoint: ChatEndpoint
    stats: CallStats
    client: Any  # the AsyncOpenAI subclass of ``_sdk``

    async def resolve(self) -> str:
        """Resolve ``model = "auto"`` (or empty) to the first id the server lists; returns the model id."""
        if self.endpoint.model in ("", "auto"):
            page = await self._call(self.client.models.list, rejectable=False)
            if not page.data:
                raise self._fail("the server lists no model")
            self.endpoint.model = str(page.data[0].id)
        return self.endpoint.model

    async def chat(self, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``/chat/completions`` as is (vLLM extensions included) and return the server's
        JSON, counting its ``usage``. ``ValueError`` for a reply that is not JSON."""
        try:
            data = await self._call(lambda: self.client.post("/chat/completions", body=body, cast_to=object))
        except json.JSONDecodeError as exc:
            raise ValueError(f"reply is not JSON ({exc.msg})") from None
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return data

    async def _call(self, send: Callable[[], Awaitable[T]], *, rejectable: bool = True) -> T:
        """``send()`` with the SDK's retries, its failures mapped onto the contract of ``tasks.faults``.
        Messages carry the status and the start of the server's reply, the API key blanked out."""
        import openai

        if self.endpoint.broken:
            raise EndpointUnavailable(self.endpoint.broken)
        try:
            return await send()
        except openai.APIStatusError as exc:
            status, error = exc.status_code, f"HTTP {exc.status_code}: {exc.message}"
        except openai.APIConnectionError as exc:  # timeouts included, after the retries
            cause = exc.__cause__ or exc
            status, error = 0, f"{type(cause).__name__}: {cause}"
        key = self.endpoint.api_key.get() if self.endpoint.api_key else None
        error = (error.replace(key, "**********") if key else error)[:300]
        if rejectable and status in REJECTED_STATUS:
            raise RequestRejected(error)
        raise self._fail(error)

    def _fail(self, error: str) -> EndpointUnavailable:
        """Mark the endpoint broken (the other requests in flight stop) and say why, without secrets."""
        message = f"endpoint {self.endpoint.where} unavailable: {error}"
        if not self.endpoint.broken:
            self.endpoint.broken = message
            log.warning("%s", message)
        return EndpointUnavailable(message)


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
