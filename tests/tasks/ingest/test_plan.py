"""Shard planning: no shard over ``pages_per_shard`` pages, long sources split into page ranges,
resumed runs plan the same ranges, and ids do not depend on the range a page was read in."""

from __future__ import annotations

from pathlib import Path

from tasks.ingest.plan import plan_en_shards, plan_units
from tasks.ingest.sources import iter_source_pages, page_id, parse_unit, scan_sources
from tests.support.documents import write_pdfs


def _refs(tmp_path: Path):
    write_pdfs(tmp_path / "src", 1, pages_per_doc=10, seed=1)  # one long source
    write_pdfs(tmp_path / "src", 3, pages_per_doc=1, seed=2)  # three one-page ones
    return scan_sources(tmp_path / "src")


def test_no_shard_holds_more_than_pages_per_shard(tmp_path: Path) -> None:
    refs = _refs(tmp_path)
    plan = plan_en_shards(refs, 4, set())
    sizes = {
        name: sum((r.pages[1] - r.pages[0]) if r.pages else 1 for r in group) for name, group in plan.items()
    }
    assert max(sizes.values()) <= 4 and sum(sizes.values()) == 13
    long_id = next(r.source_id for r in refs if r.uri.startswith("doc-01"))
    ranges = sorted(r.pages for g in plan.values() for r in g if r.source_id == long_id)
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    assert plan == plan_en_shards(list(reversed(refs)), 4, set()), "the plan does not depend on input order"


def test_a_resumed_run_plans_the_ranges_the_interrupted_one_did(tmp_path: Path) -> None:
    refs = _refs(tmp_path)
    full = plan_en_shards(refs, 4, set())
    done_shard = next(n for n, g in full.items() if any(r.pages == (4, 8) for r in g))
    done = {r.unit for r in full[done_shard]}
    resumed = plan_en_shards(refs, 4, done)
    assert done_shard not in resumed
    assert set(resumed) == set(full) - {done_shard}
    # everything covered: nothing left
    everything = {r.unit for g in full.values() for r in g}
    assert plan_en_shards(refs, 4, everything) == {}
    # a source ingested whole by an older run stays covered
    assert not [u for u, _ in plan_units(refs, 4, {r.source_id for r in refs})]


def test_page_ranges_read_only_their_pages_with_the_same_ids(tmp_path: Path) -> None:
    refs = _refs(tmp_path)
    long_ref = next(r for r in refs if r.uri.startswith("doc-01"))
    pages = [p for p in iter_source_pages(long_ref.path, page_range=(4, 8))]
    assert [p.page_index for p in pages] == [4, 5, 6, 7]
    assert [p.page_id for p in pages] == [page_id(long_ref.source_id, i) for i in range(4, 8)]
    assert parse_unit(f"{long_ref.source_id}@4-8") == (long_ref.source_id, (4, 8))
