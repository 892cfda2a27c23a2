"""The training page store: lazy row-group reads under a bounded LRU, the same pages as a direct read,
local and on S3 (moto), cheap pickling, and safe use from DataLoader workers (fork and spawn)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader, Dataset

from tasks.encoders import PageView
from tests.support.synthetic_pages import SyntheticRoot, build_synthetic_root, upload_root
from training.data import PageStore, load_examples, referenced_page_ids

N_PAGES = 200  # 2 shards of 100 pages: row groups of 64 + 36 in each
IMAGE_BYTES = 4_000


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> SyntheticRoot:
    return build_synthetic_root(
        tmp_path_factory.mktemp("pages"), N_PAGES, image_bytes=IMAGE_BYTES, pages_per_shard=100
    )


def direct_pages(shards: list[Path]) -> dict[str, PageView]:
    """Every page read straight from the shards (whole tables: the reference)."""
    out: dict[str, PageView] = {}
    for path in shards:
        for rec in pq.read_table(path).to_pylist():
            out.setdefault(rec["page_id"], PageView.from_row(rec))
    return out


def shard_urls(root: SyntheticRoot, url: str, shards: list[Path]) -> list[str]:
    return [f"{url}/{p.relative_to(root.root).as_posix()}" for p in shards]


def check_store(store: PageStore, expected: dict[str, PageView], cache: int) -> None:
    """Every page (random order) equals the direct read, and the store never holds more than ``cache``
    decoded row groups; group and text length come from the index."""
    assert len(store) == len(expected) and set(store.page_ids()) == set(expected)
    order = list(expected)
    random.Random(0).shuffle(order)
    for pid in order:
        assert store.get(pid) == expected[pid]
        assert store.cached_row_groups() <= cache
        assert store.group(pid) == expected[pid].source_page_id
        assert store.text_len(pid) == len(expected[pid].text)
    assert store.cached_row_groups() == cache
    # random order over 8 row groups with an LRU of ``cache``: far more reads than row groups
    assert store.row_group_reads > 8


def test_pages_are_read_by_row_group_under_a_bounded_cache(root: SyntheticRoot) -> None:
    expected = direct_pages(root.pages_shards)
    store = PageStore(root.pages_shards, cache_row_groups=2)
    assert store.row_group_reads == 0 and store.cached_row_groups() == 0  # the index reads no image
    shard, group, row = store.location(root.page_ids[130])
    assert (shard, group, row) == (str(root.pages_shards[1]), 0, 30)
    check_store(store, expected, cache=2)


def test_keep_indexes_only_the_pages_train_rows_reference(root: SyntheticRoot) -> None:
    keep = referenced_page_ids(load_examples(root.train_shards)[0])
    assert keep == set(root.page_ids)  # every synthetic page is someone's positive
    some = set(root.page_ids[:10])
    store = PageStore(root.pages_shards, keep=some)
    assert set(store.page_ids()) == some and root.page_ids[10] not in store
    examples, dropped = load_examples(root.train_shards, store)
    assert len(examples) == 10 and dropped == N_PAGES - 10
    assert all(n in some for e in examples for n in e.negative_page_ids)


def test_pages_and_train_rows_on_s3_equal_the_local_ones(root: SyntheticRoot, s3_bucket: str) -> None:
    url = upload_root(root.root, f"{s3_bucket}/run")
    store = PageStore(shard_urls(root, url, root.pages_shards), cache_row_groups=3)
    check_store(store, direct_pages(root.pages_shards), cache=3)
    local = load_examples(root.train_shards, PageStore(root.pages_shards))
    assert load_examples(shard_urls(root, url, root.train_shards), store) == local


class Pages(Dataset):
    """Pages by index, through a store (what a training DataLoader's dataset does)."""

    def __init__(self, store: PageStore, ids: list[str]) -> None:
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> PageView:
        return self.store.get(self.ids[i])


def test_store_pickles_without_its_cache_or_files(root: SyntheticRoot) -> None:
    store = PageStore(root.pages_shards, cache_row_groups=2)
    for pid in root.page_ids[:100]:
        store.get(pid)
    assert store.cached_row_groups() == 2
    blob = pickle.dumps(store)
    # two decoded row groups hold > 64 × 4 kB of images: none of it travels
    assert len(blob) < 64 * IMAGE_BYTES
    copy = pickle.loads(blob)
    assert copy.cached_row_groups() == 0
    assert copy.get(root.page_ids[150]) == store.get(root.page_ids[150])


@pytest.mark.parametrize("context", ["loader", "spawn"])
def test_dataloader_workers_read_s3_pages_after_the_parent_did(
    root: SyntheticRoot, s3_bucket: str, context: str
) -> None:
    """The parent's S3 client and open files are in use when the workers start (the trainer's workers come
    from a forkserver, ``loader_context``; spawn pickles the store too): each worker opens its own, and
    every page equals the direct read. Plain fork is not offered: forking a process whose S3 client runs
    an event-loop thread can copy a held lock (a CI run saw such a worker hang at exit)."""
    from training.data import loader_context

    mp_context = loader_context() if context == "loader" else context
    url = upload_root(root.root, f"{s3_bucket}/run")
    store = PageStore(shard_urls(root, url, root.pages_shards), cache_row_groups=2)
    ids = root.page_ids[::3]
    expected = direct_pages(root.pages_shards)
    assert store.get(ids[0]) == expected[ids[0]]  # the parent holds an open S3 file now
    loader = DataLoader(
        Pages(store, ids), batch_size=8, num_workers=2, multiprocessing_context=mp_context, collate_fn=list
    )
    got = [p for batch in loader for p in batch]
    assert got == [expected[i] for i in ids]
    assert store.get(ids[-1]) == expected[ids[-1]]  # and the parent's client still works


def test_truncation_counts_tokens_without_the_too_long_warning() -> None:
    """A text longer than the model's maximum is cut to the same text as tokenizing it whole, and the
    tokenizer's "Token indices sequence length is longer …" warning is never raised."""
    from training.config import PromptSettings
    from training.data import PromptFormatter
    from training.model import load_processor
    from training.trainer import resolve_model_dir

    key = "sequence-length-is-longer-than-the-specified-maximum"
    formatter = PromptFormatter(load_processor(resolve_model_dir("recipe:gemma3-tiny")), PromptSettings())
    tok = formatter.tokenizer
    rng = random.Random(0)
    text = " ".join(f"word{rng.randrange(100_000)} नमस्ते" for _ in range(tok.model_max_length))
    whole = tok(text, add_special_tokens=False)["input_ids"]  # what the formatter did before
    assert len(whole) > tok.model_max_length
    assert tok.deprecation_warnings.pop(key)  # that call warned (the test's reference, not the code's)
    for n in (1, 37, 256, len(whole) - 1, len(whole), len(whole) + 5):
        expected = text if len(whole) <= n else tok.decode(whole[:n])
        assert formatter._truncate(text, n) == expected
    short = "a short query"
    assert formatter._truncate(short, 64) == short
    assert key not in tok.deprecation_warnings
