from collections import Counter

import pytest

from tasks.shards import hash_id
from tasks.splits import assign_split


def test_split_is_stable_and_follows_fractions():
    ids = [hash_id("doc", i) for i in range(5000)]
    splits = [assign_split(s) for s in ids]
    assert splits == [assign_split(s) for s in ids]
    counts = Counter(splits)
    assert abs(counts["train"] / 5000 - 0.8) < 0.03
    assert abs(counts["dev"] / 5000 - 0.1) < 0.02
    assert abs(counts["benchmark"] / 5000 - 0.1) < 0.02


def test_adding_documents_never_moves_existing_ones():
    old = {s: assign_split(s) for s in (hash_id("a", i) for i in range(200))}
    _ = [assign_split(hash_id("b", i)) for i in range(200)]
    assert all(assign_split(s) == split for s, split in old.items())


def test_bad_fractions_are_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        assign_split("x", {"train": 1.0, "test": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        assign_split("x", {"train": -1.0})
    assert assign_split("x", {"benchmark": 1.0}) == "benchmark"
