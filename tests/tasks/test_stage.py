"""The shard life cycle's parts: one engine per process under concurrent misses, shard names, and the
one classifier of failures."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from tasks.faults import BadInput, EndpointUnavailable, is_world_fault
from tasks.stage import EngineCache, group_id, shard_name


def test_two_threads_asking_for_one_engine_load_it_once() -> None:
    cache = EngineCache()
    started = threading.Barrier(4)
    calls: list[int] = []

    def load() -> object:
        calls.append(1)
        time.sleep(0.2)  # a slow model load: the other threads arrive while it runs
        return object()

    got: list[object] = []

    def ask() -> None:
        started.wait()
        got.append(cache.get(("translate", "cfg"), load))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.loads == 1
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert cache.get(("translate", "other"), object) is not got[0]  # another key: its own engine


def test_a_failed_load_is_not_cached() -> None:
    cache = EngineCache()

    def broken() -> object:
        raise RuntimeError("model.bin truncated")

    with pytest.raises(RuntimeError):
        cache.get("k", broken)
    assert cache.get("k", lambda: "loaded") == "loaded"


def test_shard_names_of_a_group() -> None:
    en = "pages-en-0123456789abcdef"
    assert group_id(en) == "0123456789abcdef"
    assert shard_name("pages", en, "hi") == "pages-hi-0123456789abcdef"
    assert shard_name("queries", en) == "queries-0123456789abcdef"
    assert shard_name("train", en) == "train-0123456789abcdef"
    with pytest.raises(ValueError, match="not an English pages shard"):
        shard_name("queries", "pages-hi-0123")


@pytest.mark.parametrize(
    ("exc", "world"),
    [
        (EndpointUnavailable("vllm at env:URL: ConnectError"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (MemoryError(), True),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (PermissionError(errno.EACCES, "Permission denied"), True),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), True),
        (BadInput("text_does_not_fit", "no size fits"), False),
        (ValueError("not a PDF"), False),
        (OSError("cannot identify image file"), False),  # PIL: a broken image, no errno
        (KeyError("regions"), False),
    ],
)
def test_one_classifier_decides_bad_input_or_a_broken_world(exc: BaseException, world: bool) -> None:
    assert is_world_fault(exc) is world


def test_a_fault_inside_a_parse_error_is_still_the_worlds() -> None:
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        except ConnectionResetError as inner:
            raise ValueError("could not read page 3") from inner
    except ValueError as exc:
        assert is_world_fault(exc)
