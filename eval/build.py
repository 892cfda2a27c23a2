"""Write a synthesize run's held-out documents as a Nayana-IR style benchmark suite.

Input: the output root of ``synthesize`` (its manifest lists pages and queries shards). Only documents
whose split (a pure function of ``source_id``, :mod:`tasks.splits`) is ``split`` are used, so no page,
translation or query of a training document can leak into the benchmark.

Output (``out/``), every set in the Hugging Face Parquet layout of :func:`eval.beir.write_parquet`:

* ``crossbench/`` — the cross-lingual set: one shared corpus (every held-out page in every language)
  and the monolingual queries of every language. Qrels are graded like Nayana-IR: **2** for the exact
  page the query was written from, **1** for each parallel page (the same source page in another
  language), so a query in Hindi is answered best by the Hindi page and still well by its Tamil or
  English translation.
* ``monobench-<lang>/`` — one monolingual set per language: that language's pages and the queries
  written in it (grade 2 for the exact page only).
* ``composedbench/`` — MM-Embed's composed queries (a region crop + a question, ``kind = composed``):
  the cross set's corpus and grading, queries carrying their crop in an HF Image ``image`` column. Composed
  queries are kept out of the two text-query sets above.
* ``suite.json`` — the list of sets (name, kind, language, sizes) that :func:`load_suite` and the
  ``benchmark-nayana`` flow read, plus the fingerprint of the inputs the suite was built from.

Queries are the *monolingual* rows of the queries shards (``cross_lingual == False``); the
cross-lingual rows pair the same query text with the parallel pages, which the graded qrels above
already express. ``max_queries_per_lang`` keeps a deterministic sample (lowest hash of the query id),
the same queries in the cross set and in the language's mono set.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from eval.beir import Benchmark, BenchmarkError, MemoryImages, atomic_dir, load_benchmark, write_parquet
from tasks.languages import ALL_LANGS
from tasks.schema import COMPOSED_KIND, QUERIES_SCHEMA
from tasks.shards import Manifest, config_hash
from tasks.splits import DEFAULT_FRACTIONS, assign_split
from tasks.storage import Store

SUITE_FILE = "suite.json"
CROSS_NAME = "crossbench"
EXACT, PARALLEL = 2, 1
HUB_CROSS = "Cognitive-Lab/NayanaIR-CrossBench"
HUB_MONO = "Cognitive-Lab/NayanaIR-MonoBench-{lang}"
HUB_SUITE = "nayana-ir"
HUB_ALIAS = "nayana-ir"  # what users write in a benchmark list for the published suite

_PAGE_COLS = ["page_id", "source_page_id", "source_id", "lang", "image", "text"]
_QUERY_COLS = [
    "query_id", "query", "query_lang", "kind", "page_id", "cross_lingual", "source_id", "split", "image"
]  # fmt: skip
COMPOSED_NAME = "composedbench"


def mono_name(lang: str) -> str:
    return f"monobench-{lang}"


@dataclass(frozen=True)
class SetInfo:
    """One benchmark of a suite: ``kind`` is ``cross`` or ``mono``; ``language`` is set for mono sets."""

    name: str
    kind: Literal["cross", "mono", "composed"]
    path: str  # relative to the suite directory, or a hub id
    language: str | None = None
    suite: str = ""  # sets of one suite are averaged together (mono mean); suites never mix
    queries: int = 0
    corpus: int = 0
    qrels: int = 0


@dataclass(frozen=True)
class Suite:
    """A built (or listed) benchmark suite: the sets in evaluation order (cross first)."""

    root: Path | None
    sets: tuple[SetInfo, ...]
    fingerprint: str = ""
    name: str = ""

    def location(self, info: SetInfo) -> str:
        """Where :func:`eval.beir.load_benchmark` opens a set: a directory or a hub id."""
        return str(self.root / info.path) if self.root is not None else info.path

    def load(self, info: SetInfo) -> Benchmark:
        bench = load_benchmark(self.location(info))
        bench.name = info.name
        return bench


# ----------------------------------------------------------------------------------------------------
# reading the synthesize output


def inputs_fingerprint(manifest: Manifest) -> str:
    """Hash of the pages + queries shards a suite is built from (a rebuild is needed when it changes)."""
    shas = sorted((e.name, e.sha256) for kind in ("pages", "queries") for e in manifest.shards(kind))
    return config_hash({"shards": shas, "superseded": sorted(manifest.superseded())})


def recorded_fractions(manifest: Manifest) -> dict[str, float]:
    """The split fractions the synthesize run recorded with its queries shards (default if none did)."""
    seen = {json.dumps(e.extra["split_fractions"], sort_keys=True) for e in manifest.shards("queries")
            if "split_fractions" in e.extra}  # fmt: skip
    if len(seen) > 1:
        raise BenchmarkError(
            f"{manifest.root}: queries shards were written with different split fractions {sorted(seen)}; "
            "pass split_fractions explicitly"
        )
    return json.loads(seen.pop()) if seen else dict(DEFAULT_FRACTIONS)


def heldout(
    root: Path | str | Store,
    *,
    split: str = "benchmark",
    split_fractions: Mapping[str, float] | None = None,
    langs: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pages and monolingual query rows of the documents in ``split`` (superseded sources excluded).

    Raises when the queries' recorded split disagrees with ``split_fractions`` (they must be the
    fractions the synthesize run used, or pages and queries would be split differently).
    """
    manifest = Manifest(root)  # a local path or a URL (s3://…), never Path-resolved
    if not manifest.shards("pages"):
        raise FileNotFoundError(f"no pages shards in {root}/manifest.json: run `m3dr synthesize` first")
    if not manifest.shards("queries"):
        raise FileNotFoundError(
            f"no queries shards in {root}/manifest.json: run `m3dr synthesize` with queries enabled"
        )
    fractions = dict(split_fractions or recorded_fractions(manifest))
    keep_lang = set(langs) if langs else None
    queries: list[dict[str, Any]] = []
    for row in manifest.live_rows("queries", _QUERY_COLS, schema=QUERIES_SCHEMA):  # old shards: no image
        expected = assign_split(row["source_id"], fractions)
        if row["split"] != expected:
            raise BenchmarkError(
                f"query {row['query_id']} of source {row['source_id']} is in split {row['split']!r} but "
                f"split_fractions {fractions} put that source in {expected!r}: pass the fractions the "
                "synthesize run used"
            )
        wanted = keep_lang is None or row["query_lang"] in keep_lang
        if row["split"] == split and not row["cross_lingual"] and wanted:
            queries.append(row)
    gone = set(manifest.superseded())

    def wanted_page(source_id: str, lang: str) -> bool:
        return (
            source_id not in gone
            and assign_split(source_id, fractions) == split
            and (keep_lang is None or lang in keep_lang)
        )

    pages = []
    for entry in sorted(manifest.shards("pages"), key=lambda e: e.name):
        pages += _shard_rows(manifest.store, entry.path, _PAGE_COLS, ("source_id", "lang"), wanted_page)
    return pages, queries


def row_groups(
    store: Store, rel: str, columns: list[str], keys: tuple[str, ...], wanted: Callable[..., bool]
) -> Iterator[list[dict[str, Any]]]:
    """The rows of one shard for which ``wanted(*keys)`` holds, one row group at a time: the small
    ``keys`` columns first, the other columns (page images) only of row groups that hold a wanted row.
    Memory is one row group, never the shard or the corpus. Columns the shard lacks are left out."""
    with store.fs.open(store.path(rel), "rb") as fh, pq.ParquetFile(fh) as pf:
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names]
        for g in range(pf.num_row_groups):
            small = pf.read_row_group(g, columns=list(keys)).to_pydict()
            mask = [wanted(*vals) for vals in zip(*(small[k] for k in keys), strict=True)]
            if any(mask):
                rows = pf.read_row_group(g, columns=cols).to_pylist()
                yield [r for r, keep in zip(rows, mask, strict=True) if keep]


def _shard_rows(
    store: Store,
    rel: str,
    columns: list[str],
    keys: tuple[str, ...],
    wanted: Callable[..., bool],
) -> list[dict[str, Any]]:
    """Every row of one shard for which ``wanted(*keys)`` holds (see :func:`row_groups`)."""
    return [r for rows in row_groups(store, rel, columns, keys, wanted) for r in rows]


def _sample(rows: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """Deterministic per-language sample: the ``n`` query ids with the lowest sha256 in each language."""
    by_lang: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_lang[r["query_lang"]].append(r)
    out = []
    for lang in sorted(by_lang):
        rs = sorted(by_lang[lang], key=lambda r: hashlib.sha256(r["query_id"].encode()).hexdigest())
        out.extend(rs if n is None else rs[:n])
    return sorted(out, key=lambda r: r["query_id"])


def _benchmark(
    name: str, pages: list[dict[str, Any]], queries: list[dict[str, Any]], *, parallel_grade: bool
) -> Benchmark:
    pages = sorted(pages, key=lambda p: (p["lang"], p["source_page_id"], p["page_id"]))
    by_group: dict[str, list[str]] = defaultdict(list)
    for p in pages:
        by_group[p["source_page_id"]].append(p["page_id"])
    group_of = {p["page_id"]: p["source_page_id"] for p in pages}
    qrels: dict[str, dict[str, int]] = {}
    kept = []
    for q in queries:
        if q["page_id"] not in group_of:  # its page is not in this corpus (another language's set)
            continue
        judged = {q["page_id"]: EXACT}
        if parallel_grade:
            for pid in by_group[group_of[q["page_id"]]]:
                judged.setdefault(pid, PARALLEL)
        qrels[q["query_id"]] = judged
        kept.append(q)
    return Benchmark(
        corpus_ids=[p["page_id"] for p in pages],
        images=MemoryImages([p["image"]["bytes"] for p in pages]),
        query_ids=[q["query_id"] for q in kept],
        query_texts=[q["query"] for q in kept],
        qrels_rows=[(q, c, s) for q, docs in qrels.items() for c, s in docs.items()],
        query_languages=[q["query_lang"] for q in kept],
        query_images=[(q.get("image") or {}).get("bytes") for q in kept]
        if any(q.get("image") for q in kept)
        else None,
        corpus_languages=[p["lang"] for p in pages],
        corpus_doc_ids=[p["source_id"] for p in pages],
        corpus_texts=[p["text"] or "" for p in pages],
        name=name,
    )


def suite_benchmarks(
    pages: list[dict[str, Any]],
    queries: list[dict[str, Any]],
    *,
    max_queries_per_lang: int | None = None,
    suite: str = "",
) -> list[tuple[SetInfo, Benchmark]]:
    """The cross set (all languages, graded 2/1), one mono set per language that has queries, then the
    composed-query set (cross corpus and grading) when there are composed queries."""
    queries = _sample(queries, max_queries_per_lang)
    composed = [q for q in queries if q.get("kind") == COMPOSED_KIND]
    queries = [q for q in queries if q.get("kind") != COMPOSED_KIND]
    out: list[tuple[SetInfo, Benchmark]] = []
    if not pages or not (queries or composed):
        return out
    if queries:
        cross = _benchmark(CROSS_NAME, pages, queries, parallel_grade=True)
        out.append((SetInfo(CROSS_NAME, "cross", CROSS_NAME, suite=suite), cross))
    order = {code: i for i, code in enumerate(ALL_LANGS)}
    for lang in sorted({q["query_lang"] for q in queries}, key=lambda c: (order.get(c, 99), c)):
        lp = [p for p in pages if p["lang"] == lang]
        lq = [q for q in queries if q["query_lang"] == lang]
        bench = _benchmark(mono_name(lang), lp, lq, parallel_grade=False)
        if bench.query_ids:
            out.append((SetInfo(mono_name(lang), "mono", mono_name(lang), language=lang, suite=suite), bench))
    if composed:
        bench = _benchmark(COMPOSED_NAME, pages, composed, parallel_grade=True)
        out.append((SetInfo(COMPOSED_NAME, "composed", COMPOSED_NAME, suite=suite), bench))
    return out


# ----------------------------------------------------------------------------------------------------
# writing / reading a suite


def build_suite(
    root: Path | str | Store,
    out: Path | str,
    *,
    split: str = "benchmark",
    split_fractions: Mapping[str, float] | None = None,
    langs: Sequence[str] | None = None,
    max_queries_per_lang: int | None = None,
    overwrite: bool = False,
    name: str | None = None,
    max_file_bytes: int | None = None,
) -> Suite:
    """Write the held-out split of a synthesize output as a suite directory (atomically) and return it.

    An existing suite built from the same inputs and options is returned as is (nothing rewritten);
    a different one needs ``overwrite=True``. ``max_file_bytes`` caps each corpus Parquet file (the hub's
    recommended shard size, for a suite that is published).
    """
    out = Path(out)  # the suite is written locally; ``root`` may be a URL
    name = name or f"heldout-{split}"
    manifest = Manifest(root)
    fractions = dict(split_fractions or recorded_fractions(manifest))  # read once, used for every step
    options = {
        "name": name,
        "split": split,
        "fractions": fractions,
        "langs": sorted(langs) if langs else None,
        "max_queries_per_lang": max_queries_per_lang,
    }
    if max_file_bytes is not None:  # (absent otherwise, so suites built before keep their fingerprint)
        options["max_file_bytes"] = max_file_bytes
    fp = config_hash({"inputs": inputs_fingerprint(manifest), "options": options})
    if (out / SUITE_FILE).is_file():
        existing = read_suite(out)
        if existing.fingerprint == fp:
            return existing
        if not overwrite:
            raise FileExistsError(f"{out} holds a suite built from other inputs (pass overwrite=True)")
    pages, queries = heldout(root, split=split, split_fractions=fractions, langs=langs)
    if not pages:
        raise BenchmarkError(
            f"no page of {root} is in split {split!r} (fractions {options['fractions']}): "
            "add documents or raise that split's fraction"
        )
    sets = suite_benchmarks(pages, queries, max_queries_per_lang=max_queries_per_lang, suite=name)
    if not sets:
        raise BenchmarkError(f"the {split!r} documents of {root} have no monolingual queries")
    infos = []
    with atomic_dir(out, overwrite=True) as tmp:
        for info, bench in sets:
            write_parquet(bench, tmp / info.path, layout="hf", max_file_bytes=max_file_bytes, tag=fp[:12])
            infos.append(
                SetInfo(
                    info.name,
                    info.kind,
                    info.path,
                    info.language,
                    queries=len(bench.query_ids),
                    corpus=len(bench.corpus_ids),
                    qrels=len(bench.qrels_rows),
                    suite=name,
                )
            )
        meta = {
            "name": name,
            "fingerprint": fp,
            "source": manifest.root,
            "options": options,
            "sets": [asdict(i) for i in infos],
        }
        (tmp / SUITE_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Suite(out, tuple(infos), fp, name)


def read_suite(path: Path | str) -> Suite:
    """A suite directory written by :func:`build_suite` (``suite.json`` lists its sets)."""
    path = Path(path)
    try:
        meta = json.loads((path / SUITE_FILE).read_text(encoding="utf-8"))
        name = meta.get("name") or path.name
        sets = tuple(SetInfo(**{**s, "suite": s.get("suite") or name}) for s in meta["sets"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchmarkError(f"{path}/{SUITE_FILE} is missing or unreadable ({exc})") from exc
    return Suite(path, sets, meta.get("fingerprint", ""), name)


def hub_suite(langs: Iterable[str]) -> Suite:
    """The published Nayana-IR sets (needs the hub or a filled HF cache): cross + one mono per language."""
    sets = [SetInfo(CROSS_NAME, "cross", HUB_CROSS, suite=HUB_SUITE)]
    sets += [
        SetInfo(mono_name(lang), "mono", HUB_MONO.format(lang=lang), language=lang, suite=HUB_SUITE)
        for lang in langs
    ]
    return Suite(None, tuple(sets), name=HUB_SUITE)


def resolve_sets(sources: Sequence[str], langs: Sequence[str] | None = None) -> list[tuple[SetInfo, str]]:
    """Benchmark sources → ``(info, location)``: a suite dir expands to its sets, ``nayana-ir`` to the
    published sets (``langs``' mono sets, default all 22); a benchmark dir or hub id is one set (``mono``
    with its language when all its queries share one, else ``cross``). A set named twice counts once."""
    out: list[tuple[SetInfo, str]] = []
    for src in sources:
        if src == HUB_ALIAS:
            hub = hub_suite(langs or ALL_LANGS)
            out.extend((i, hub.location(i)) for i in hub.sets)
            continue
        p = Path(src)
        if (p / SUITE_FILE).is_file():
            suite = read_suite(p)
            out.extend((i, suite.location(i)) for i in suite.sets)
            continue
        name = p.name if p.exists() else src.rsplit("/", 1)[-1]
        out.append((SetInfo(name, "cross", src, suite=name), src))
    seen: set[tuple[str, str]] = set()
    unique = []
    for info, loc in out:  # the same set named twice is scored once
        if (info.suite, info.name) not in seen:
            seen.add((info.suite, info.name))
            unique.append((info, loc))
    return unique
