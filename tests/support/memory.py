"""Peak resident memory of one call (Linux): what the search memory tests and benchmarks measure."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as fh:
        return int(re.search(key + r":\s+(\d+)", fh.read()).group(1)) * 1024


def peak_extra(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak RSS above the current RSS while ``fn`` runs, its result): the kernel's high-water mark is
    reset to the current RSS first (``/proc/self/clear_refs``, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = status_bytes("VmRSS")
    out = fn()
    return status_bytes("VmHWM") - base, out
