"""Plumbing shared by every client of an OpenAI-compatible server (``vllm serve`` or any other).

One place for what the query engine (``tasks/queries/vllm.py``) and the reranker (``eval/rerank.py``) both
need, so neither carries its own copy:

- ``SecretValue`` / ``secret_from_config``: URLs and API keys from the config, an environment variable
  or a Prefect Secret block, resolved lazily and never shown in ``repr`` or logs;
- ``open_client``: an ``httpx.AsyncClient`` with the base URL, the bearer key, timeouts and a
  connection pool sized to the concurrency limit;
- ``request_json``: one HTTP call with retries and jittered exponential backoff on transient failures
  (timeouts, transport errors, ``RETRY_STATUS``), counting calls, retries and errors into a stats object;
- ``resolve_model``: model ``"auto"`` (or empty) → the first id the server lists under ``GET /models``;
- ``run_sync``: run a coroutine to completion from sync code, also when called inside a running loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import httpx

from tasks.config import StrictModel

log = logging.getLogger(__name__)

T = TypeVar("T")

# Transient HTTP statuses: retried with backoff. Anything else >= 400 fails at once (401, 404, 400 …).
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


# ---------------------------------------------------------------------------- secrets
class SecretValue:
    """A secret resolved lazily on first use; ``repr``/``str`` never show it."""

    def __init__(self, loader: Callable[[], str | None], source: str) -> None:
        self._loader = loader
        self._value: str | None = None
        self._loaded = False
        self.source = source  # where it comes from (env var / block name), safe to show

    def get(self) -> str | None:
        if not self._loaded:
            self._value = self._loader()
            self._loaded = True
        return self._value

    def __repr__(self) -> str:
        return f"SecretValue(source={self.source!r}, value='**********')"

    __str__ = __repr__


def _prefect_secret(name: str) -> str:
    from prefect.blocks.system import Secret

    return str(Secret.load(name).get())


def secret_from_config(cfg: dict[str, Any], key: str) -> SecretValue | None:
    """``<key>`` (literal), ``<key>_env`` (env var name) or ``<key>_secret`` (Prefect Secret block)."""
    if cfg.get(f"{key}_env"):
        env = cfg[f"{key}_env"]
        return SecretValue(lambda: os.environ.get(env) or None, f"env:{env}")
    if cfg.get(f"{key}_secret"):
        block = cfg[f"{key}_secret"]
        return SecretValue(lambda: _prefect_secret(block), f"prefect-secret:{block}")
    if cfg.get(key):
        value = str(cfg[key])
        return SecretValue(lambda: value, "config")
    return None


def as_secret(value: str | SecretValue) -> SecretValue:
    """A literal string wrapped as a ``SecretValue`` (source ``config``); a ``SecretValue`` as is."""
    return value if isinstance(value, SecretValue) else SecretValue(lambda: value, "config")


# ---------------------------------------------------------------------------- engine config
# Connection options every server engine takes from its profile table (besides model and secrets).
ENDPOINT_OPTIONS: tuple[str, ...] = (
    "concurrency", "timeout_s", "connect_timeout_s", "max_retries", "backoff_s", "max_backoff_s",
)  # fmt: skip


class EndpointConfig(StrictModel):
    """Keys every server engine's table shares (``[queries]`` with ``engine = "vllm"``, ``[rerank]``).

    ``base_url`` / ``api_key`` come literally, from an environment variable (``*_env``) or a Prefect
    Secret block (``*_secret``); never logged.
    """

    base_url: str | None = None
    base_url_env: str | None = None
    base_url_secret: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    api_key_secret: str | None = None
    model: str = "auto"  # "auto": the first id the server lists under GET /models
    concurrency: int = 8
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0


def endpoint_from_config(cfg: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Constructor keywords of a server engine from its ``[section]`` table: ``base_url`` and ``api_key``
    as :class:`SecretValue` (literal, ``*_env`` or ``*_secret``), ``model`` (default ``auto``) and the
    :data:`ENDPOINT_OPTIONS` present."""
    base_url = secret_from_config(dict(cfg), "base_url")
    if base_url is None:
        raise ValueError(f"[{section}] engine 'vllm' needs base_url, base_url_env or base_url_secret")
    return {
        "base_url": base_url,
        "api_key": secret_from_config(dict(cfg), "api_key"),
        "model": cfg.get("model", "auto"),
        **{k: cfg[k] for k in ENDPOINT_OPTIONS if k in cfg},
    }


def endpoint_repr(base_url: SecretValue, api_key: SecretValue | None) -> str:
    """Where URL and key come from, never their values (a URL may carry credentials)."""
    return f"url_from={base_url.source!r}, api_key_from={api_key.source if api_key else None!r}"


# ---------------------------------------------------------------------------- retries
@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently ``request_json`` retries a transient failure."""

    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry ``attempt`` (1-based): exponential, capped, jittered to 50–100 %."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + rng.random() / 2)


class CallStats(Protocol):
    """The counters ``request_json`` updates (engines keep more fields of their own)."""

    http_calls: int
    retries: int
    errors: Counter[str]


class RequestFailed(RuntimeError):
    """A call that failed for good: a non-retryable status, or retries used up. The message never
    carries the API key (only the status and the start of the server's reply)."""


async def request_json(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    *,
    what: str,
    policy: RetryPolicy,
    stats: CallStats,
) -> dict[str, Any]:
    """One HTTP call with retries and jittered exponential backoff on transient failures.

    ``what`` names the call in debug logs. Raises ``RequestFailed`` on a non-retryable status (e.g.
    ``HTTP 401: …``) or when ``policy.max_retries`` retries were not enough.
    """
    import httpx

    rng = random.Random()  # jitter only: spreads retries of many requests apart
    last = ""
    for attempt in range(policy.max_retries + 1):
        if attempt:
            stats.retries += 1
            await asyncio.sleep(policy.delay(attempt, rng))
        try:
            stats.http_calls += 1
            resp = await client.request(method, path, json=body)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            last = type(exc).__name__
            stats.errors[last] += 1
            log.debug("%s: %s (attempt %d)", what, last, attempt + 1)
            continue
        if resp.status_code in RETRY_STATUS:
            last = f"HTTP {resp.status_code}"
            stats.errors[last] += 1
            log.debug("%s: %s (attempt %d)", what, last, attempt + 1)
            continue
        if resp.status_code >= 400:
            raise RequestFailed(f"HTTP {resp.status_code}: {resp.text[:200]}")
        return resp.json()
    raise RequestFailed(f"gave up after {policy.max_retries + 1} attempts ({last})")


# ---------------------------------------------------------------------------- client
def open_client(
    base_url: str | SecretValue,
    api_key: SecretValue | None,
    timeout: tuple[float, float],
    concurrency: int,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for the server (use it as ``async with``): JSON headers, the bearer key
    when there is one, ``timeout`` = (read, connect) seconds, at most ``concurrency`` connections."""
    import httpx

    headers = {"Content-Type": "application/json"}
    key = api_key.get() if api_key else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    base = str(as_secret(base_url).get()).rstrip("/")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(
        base_url=base, headers=headers, timeout=httpx.Timeout(timeout[0], connect=timeout[1]), limits=limits
    )


@dataclass
class ChatEndpoint:
    """An OpenAI-compatible chat server and how to talk to it: the one set of connection settings the
    vLLM query engine and the reranker share (URL and key as secrets, model, concurrency, timeouts,
    retries)."""

    base_url: SecretValue
    api_key: SecretValue | None = None
    model: str = "auto"  # "auto": the first id the server lists (resolved on the first call)
    concurrency: int = 8
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        self.base_url = as_secret(self.base_url)
        if int(self.concurrency) < 1 or int(self.max_retries) < 0:
            raise ValueError("concurrency must be >= 1 and max_retries >= 0")
        self.concurrency = int(self.concurrency)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], section: str) -> ChatEndpoint:
        """From an engine's table: ``base_url``/``api_key`` literal, ``*_env`` or ``*_secret``, + options."""
        return cls(**endpoint_from_config(cfg, section))

    @property
    def retry(self) -> RetryPolicy:
        """The retry settings (built on each use, so changing ``max_retries`` & co. later still counts)."""
        return RetryPolicy(int(self.max_retries), float(self.backoff_s), float(self.max_backoff_s))

    @property
    def timeout(self) -> tuple[float, float]:
        return (float(self.timeout_s), float(self.connect_timeout_s))

    def client(self) -> httpx.AsyncClient:
        """A connection pool for one batch of calls (use as ``async with``)."""
        return open_client(self.base_url, self.api_key, self.timeout, self.concurrency)

    async def resolve(self, client: httpx.AsyncClient, stats: CallStats) -> str:
        """Resolve ``model = "auto"`` once against the server; returns the model id."""
        self.model = await resolve_model(client, self.model, policy=self.retry, stats=stats)
        return self.model

    def __repr__(self) -> str:  # never the key, never a URL that could carry credentials
        return f"ChatEndpoint(model={self.model!r}, {endpoint_repr(self.base_url, self.api_key)})"


async def resolve_model(
    client: httpx.AsyncClient, model: str, *, policy: RetryPolicy, stats: CallStats
) -> str:
    """``model`` itself, or for ``"auto"``/empty the first model id the server lists (``GET /models``)."""
    if model not in ("", "auto"):
        return model
    models = await request_json(client, "GET", "/models", None, what="model list", policy=policy, stats=stats)
    return str(models["data"][0]["id"])


def run_sync(coro_factory: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine ``coro_factory()`` to completion and return its result.

    From sync code this is ``asyncio.run``; from inside a running loop (a Prefect task, a notebook) the
    coroutine runs on a fresh loop in a helper thread, and its exception, if any, is re-raised here.
    """

    async def main() -> T:
        return await coro_factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(main()))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


__all__ = [
    "RETRY_STATUS",
    "CallStats",
    "RequestFailed",
    "RetryPolicy",
    "SecretValue",
    "as_secret",
    "open_client",
    "request_json",
    "resolve_model",
    "run_sync",
    "secret_from_config",
]
