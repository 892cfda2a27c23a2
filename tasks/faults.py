"""Two kinds of failure, decided in one place.

*Bad input* (a file that cannot be parsed, text that cannot fit, a model reply that fails validation
after its retries, a filtered query) is data about the input: the stage writes a rejects row and the
shard completes. *A broken world* (a server unreachable or answering 5xx after its retries, a timeout,
a storage error, out of memory, a missing model, a killed worker) says nothing about the input: the
shard task raises, nothing is recorded for the shard, Prefect retries it, and a rerun after the fault
heals makes exactly what an unfaulted run makes.

Stages never catch ``Exception`` to turn it into a rejects row: they catch, and hand to
:func:`reject_or_raise`, which re-raises anything :func:`is_world_fault` says is the world's.
"""

from __future__ import annotations

import errno

# errno values that say the machine, the network or the store is unwell, never the input's content.
_WORLD_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO", "ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOMEM", "EMFILE", "ENFILE", "EAGAIN",
        "EBUSY", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "EPIPE", "ENETDOWN",
        "ENETUNREACH", "EHOSTDOWN", "EHOSTUNREACH", "ESTALE", "ENOTCONN", "ESHUTDOWN",
    )
    if hasattr(errno, name)
)  # fmt: skip
# Libraries whose exceptions are all about transport or storage (never about a document's content).
_WORLD_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "aiohttp", "httpx", "httpcore", "urllib3",
                  "requests", "openai", "fsspec.exceptions", "distributed")  # fmt: skip
# Exception class names from libraries we do not import here (torch, CTranslate2 …).
_WORLD_NAMES = frozenset({"OutOfMemoryError", "CancelledError", "KilledWorker", "CommClosedError"})


class WorldFault(RuntimeError):
    """A broken world: the shard must raise (no record, no rejects); a retry or a rerun heals it."""


class EndpointUnavailable(WorldFault):
    """A model server that cannot answer: unreachable, timing out, 5xx after retries, or refusing us
    (401/403/404: a wrong URL, key or model name fails every request, so it is not one page's fault)."""


class BadInput(ValueError):
    """Input this stage cannot use: becomes a rejects row with ``reason``; the shard completes."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ShardsFailed(RuntimeError):
    """A run whose shard tasks failed after their retries: the run ends Failed, naming each failed
    shard and why. Nothing was recorded for them, so a rerun after the fault heals redoes exactly them."""

    def __init__(self, failures: dict[str, str], blocked: list[str] | None = None) -> None:
        self.failures = dict(failures)
        self.blocked = list(blocked or [])
        lines = [f"  {job}: {why}" for job, why in sorted(self.failures.items())]
        more = (
            f"\n{len(self.blocked)} more shard tasks not run (they need a failed one)" if self.blocked else ""
        )
        super().__init__(
            f"{len(self.failures)} shard task(s) failed; nothing was recorded for them, rerun to redo them "
            f"once the cause is fixed:\n" + "\n".join(lines) + more
        )


def is_world_fault(exc: BaseException) -> bool:
    """True when ``exc`` says the world is broken (raise, retry) rather than that the input is bad."""
    if isinstance(exc, BadInput):
        return False
    if isinstance(exc, WorldFault | MemoryError | TimeoutError | ConnectionError):
        return True
    for cls in type(exc).__mro__:
        module = cls.__module__ or ""
        if cls.__name__ in _WORLD_NAMES or any(
            module == m or module.startswith(m + ".") for m in _WORLD_MODULES
        ):
            return True
    if isinstance(exc, OSError) and exc.errno in _WORLD_ERRNOS:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_world_fault(cause)


def reject_or_raise(exc: BaseException) -> None:
    """Re-raise ``exc`` when it is the world's fault; return (the caller writes a rejects row) when the
    input is to blame. Call it inside the ``except`` block: ``raise`` keeps the traceback."""
    if is_world_fault(exc):
        raise exc


def describe(exc: BaseException) -> str:
    """One line for a failed shard: the exception's type and message (never a traceback)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


__all__ = [
    "BadInput",
    "EndpointUnavailable",
    "ShardsFailed",
    "WorldFault",
    "describe",
    "is_world_fault",
    "reject_or_raise",
]
