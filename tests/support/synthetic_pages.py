"""Cheap synthetic pages + train shards in the pipeline's real schemas, for page-store tests and the
training-data scale benchmark (``benchmarks/train_scale.py``).

Pages are PAGES_SCHEMA rows whose image is a PNG signature followed by random bytes of a chosen size
(incompressible, like real PNGs, so a shard's size and decode cost are realistic; no decoder needs to
read them). Shards are written with the project's writer (:func:`tasks.shards.commit_shard`), so their
row groups are the production ones. Train rows reference the pages (positive + two negatives).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tasks.schema import PageRecord, Region, TrainRecord, pages_table, train_table
from tasks.shards import commit_shard, hash_id

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class SyntheticRoot:
    root: Path
    pages_shards: list[Path]
    train_shards: list[Path]
    page_ids: list[str]


def synthetic_page(i: int, seed: int, image_bytes: int, rng: random.Random) -> PageRecord:
    """One page: ``i``-th of source ``seed``, an image of ``image_bytes`` bytes, a text region."""
    source_id = hash_id("synthetic-source", seed, i // 16)  # 16 pages per source document
    pid = hash_id("synthetic-page", seed, i)
    words = " ".join(f"w{rng.randrange(10_000)}" for _ in range(rng.randrange(4, 40)))
    return PageRecord(
        page_id=pid,
        source_page_id=pid,
        source_id=source_id,
        source_uri=f"synthetic://{seed}/{i}",
        page_index=i % 16,
        lang="en",
        image_png=PNG_SIGNATURE + rng.randbytes(max(0, image_bytes - len(PNG_SIGNATURE))),
        width=1240,
        height=1754,
        regions=[Region("text", (10.0, 10.0, 500.0, 200.0), 0.99, words, translatable=True)],
        text_source="pdf",
        layout_model="synthetic",
    )


def train_rows(page_ids: list[str], rng: random.Random, negatives: int = 2) -> list[TrainRecord]:
    """One train row per page: a query, the page as positive, ``negatives`` other pages."""
    rows = []
    for n, pid in enumerate(page_ids):
        others = rng.sample([p for p in page_ids[max(0, n - 50) : n + 50] if p != pid], negatives)
        rows.append(
            TrainRecord(
                query_id=hash_id("synthetic-query", pid),
                query=f"query about page {n}",
                query_lang="en",
                kind="phrase",
                positive_page_id=pid,
                positive_lang="en",
                source_page_id=pid,
                source_id="synthetic",
                parallel_page_ids=[],
                negative_page_ids=others,
                negative_scores=[0.5] * len(others),
                positive_score=1.0,
                miner="synthetic",
                split="train",
                generator="synthetic",
                prompt_version="",
            )
        )
    return rows


def build_synthetic_root(
    out: Path, n_pages: int, *, image_bytes: int = 200_000, pages_per_shard: int = 256, seed: int = 0
) -> SyntheticRoot:
    """Write ``n_pages`` pages (shards of ``pages_per_shard``) and one train shard under ``out``, page by
    page shard so memory stays one shard of pages."""
    rng = random.Random(seed)
    pages_shards, page_ids = [], []
    for k, start in enumerate(range(0, n_pages, pages_per_shard)):
        records = [
            synthetic_page(i, seed, image_bytes, rng)
            for i in range(start, min(n_pages, start + pages_per_shard))
        ]
        rel = f"pages/pages-en-{k:05d}.parquet"
        commit_shard(out, pages_table(records), name=f"pages-en-{k:05d}", kind="pages", lang="en",
                     rel_path=rel, cfg_hash="synthetic")  # fmt: skip
        pages_shards.append(out / rel)
        page_ids += [r.page_id for r in records]
    rel = "train/train-00000.parquet"
    rows = train_rows(page_ids, rng)
    commit_shard(out, train_table(rows), name="train-00000", kind="train", lang="en", rel_path=rel,
                 cfg_hash="synthetic")  # fmt: skip
    return SyntheticRoot(out, pages_shards, [out / rel], page_ids)


def upload_root(local: Path, url: str) -> str:
    """Copy an output root (every file under ``local``) to ``url`` on an object store; returns ``url``."""
    from tasks.storage import open_store

    store = open_store(url)
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        store.fs.put_file(str(path), store.path(path.relative_to(local).as_posix()))
    return url
