"""Train / dev / benchmark splits by source document.

A document's split is a pure function of its ``source_id`` (a content hash) and the split fractions,
so it never changes when other documents are added in a refresh, and no page, translation or query
of one document can land in two splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from tasks.schema import SPLITS

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "dev": 0.1, "benchmark": 0.1}


def _unit(source_id: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{source_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(
    source_id: str, fractions: Mapping[str, float] | None = None, *, salt: str = "m3dr-split-v1"
) -> str:
    """The split of a source document: ``train``, ``dev`` or ``benchmark``."""
    fr = dict(fractions or DEFAULT_FRACTIONS)
    unknown = set(fr) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected a subset of {SPLITS}")
    total = sum(fr.values())
    if total <= 0 or any(v < 0 for v in fr.values()):
        raise ValueError(f"split fractions must be >= 0 and sum to > 0, got {fr}")
    u = _unit(source_id, salt) * total
    acc = 0.0
    for name in SPLITS:
        acc += fr.get(name, 0.0)
        if u < acc:
            return name
    return next(name for name in reversed(SPLITS) if fr.get(name, 0.0) > 0)
