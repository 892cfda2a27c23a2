"""`m3dr export-dataset`: a synthesize run as a Hugging Face dataset repository, in the field's formats.

The folder is a dataset repository as it stands (``huggingface-cli upload <repo> <dir> --repo-type
dataset`` publishes it; ``datasets.load_dataset(<dir>, "<config>")`` opens it)::

    README.md                                the dataset card: YAML header the hub reads + statistics
    data/train/train-00000.parquet …         config ``train``: query → pos_target / neg_target corpus ids
    data/dev/dev-00000.parquet …             config ``dev`` (split ``dev``)
    data/corpus/train-00000.parquet …        config ``corpus``: every page of the train and dev documents
    benchmark/suite.json                     the held-out suite (an m3dr suite: `m3dr benchmark --bench`)
    benchmark/<set>/{corpus,queries,qrels}/test-*.parquet   configs ``<set>-corpus`` / ``-queries`` /
                                             ``-qrels``, the published Nayana-IR layout (split ``test``)
    assets/*.png                             the card's plots
    m3dr_export.json                         provenance: inputs fingerprint, options, files, counts

colpali-engine trains on ``train`` + ``corpus`` unmodified (``ColPaliEngineDataset(train,
Corpus(corpus, {corpus-id: row}, doc_column_name="image"), neg_target_column_name="neg_target")``);
``--format tevatron`` writes the same rows under Tevatron's column names (``tasks.schema.TEVATRON_COLUMNS``).

Scale: pages are read one row group at a time and written as they come, into files no larger than the
hub's recommended shard (``datasets.config.MAX_SHARD_SIZE``, 500 MB) in row groups of at most 100 rows;
memory holds a row group, the corpus ids (a sorted byte array: 32 MB per million pages, to check every
id a train row names) and counters. Every file goes out under its final name (one PUT on an object
store); ``m3dr_export.json`` and ``README.md`` go last, so a folder with a card is complete. The same
inputs and options again is a no-op; a changed export replaces the files and deletes the ones it no
longer writes.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import typing
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eval.beir import file_budget
from eval.build import SUITE_FILE, build_suite, recorded_fractions, row_groups
from tasks.languages import ALL_LANGS
from tasks.run.summary import count_rejects, render_qa_per_lang
from tasks.schema import (
    EXPORT_CORPUS_SCHEMA,
    EXPORT_TRAIN_SCHEMA,
    TEVATRON_COLUMNS,
    TRAIN_SCHEMA,
)
from tasks.shards import CODE_VERSION, Manifest, config_hash, read_rejects, recorded_runs
from tasks.splits import assign_split
from tasks.storage import Store, open_store

EXPORT_VERSION = 1
EXPORT_FILE = "m3dr_export.json"
CARD_FILE = "README.md"
# what `datasets.Dataset.push_to_hub` writes (datasets.config.MAX_SHARD_SIZE = "500MB"); the hub's
# viewer and `datasets` stream such files well, and none comes near the hub's per-file limit
HUB_SHARD_BYTES = 500 * 1000**2
ROW_GROUP_ROWS = 100  # image rows per Parquet row group (the hub viewer reads one group at a time)
ROW_GROUP_BYTES = 100 * 1000**2  # datasets.config.MAX_ROW_GROUP_SIZE
Format = Literal["colpali", "tevatron"]
Positives = Literal["exact", "parallel"]
FORMATS: tuple[Format, ...] = typing.get_args(Format)  # the first is the default
POSITIVES: tuple[Positives, ...] = typing.get_args(Positives)
DEFAULT_LICENSE = "unknown"  # the hub's id for "not stated": the sources' licences decide
TRAIN_SPLITS: tuple[str, ...] = ("train", "dev")  # configs of the train rows, each with one split
CORPUS_SPLIT = "train"
SUITE_DIR = "benchmark"
OWN_PREFIXES: tuple[str, ...] = (
    "data/",
    f"{SUITE_DIR}/",
    "assets/",
)  # what an export writes (+ the two files)
TASK_CATEGORIES = ["visual-document-retrieval"]

_PAGE_COLS = [
    "page_id",
    "source_id",
    "image",
    "lang",
    "text",
    "source_page_id",
    "page_index",
    "layout_model",
    "translation_model",
]
_TRAIN_COLS = [
    "query_id",
    "query",
    "query_image",
    "query_lang",
    "positive_lang",
    "kind",
    "positive_page_id",
    "parallel_page_ids",
    "negative_page_ids",
    "negative_scores",
    "source_page_id",
    "source_id",
    "miner",
    "generator",
    "split",
]


class ExportError(ValueError):
    """The export cannot be made from this root (nothing to export, or a destination in the way)."""


# ----------------------------------------------------------------------------------------------------
# writing


def renamed(schema: pa.Schema, names: dict[str, str]) -> pa.Schema:
    """``schema`` with its columns renamed (``--format``), metadata kept."""
    return pa.schema([f.with_name(names.get(f.name, f.name)) for f in schema], metadata=schema.metadata)


class ShardedWriter:
    """Rows of one config split → ``<prefix>/<split>-00000.parquet`` … of at most ``max_bytes`` each.

    A file is closed before a row group would take it past ``max_bytes`` (Arrow size: page images are
    PNG, which zstd cannot shrink, so the file is no larger); a row group alone over it is halved. Each
    file is published under its final name when it is closed (``Store.write_with``)."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        split: str,
        schema: pa.Schema,
        max_bytes: int,
        workdir: Path,
        tag: str,
    ) -> None:
        self.store, self.prefix, self.split, self.schema, self.tag = store, prefix, split, schema, tag
        self.max_bytes, self.workdir = max_bytes, workdir
        self.files: dict[str, dict[str, Any]] = {}  # rel → {rows, bytes, sha256}
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._part: Path | None = None
        self._file_rows = 0
        self._file_bytes = 0

    def add(self, row: dict[str, Any], nbytes: int) -> None:
        self._buffer.append(row)
        self._buffer_bytes += nbytes
        if len(self._buffer) >= ROW_GROUP_ROWS or self._buffer_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._write(pa.Table.from_pylist(self._buffer, schema=self.schema))
        self._buffer, self._buffer_bytes = [], 0

    def _write(self, table: pa.Table) -> None:
        budget = file_budget(self.max_bytes)
        if table.num_rows > 1 and table.nbytes > budget:
            half = table.num_rows // 2
            self._write(table.slice(0, half))
            self._write(table.slice(half))
            return
        if table.nbytes > budget:  # one row (a page image) larger than a file may be
            raise ExportError(
                f"{self.prefix}: a row of {table.nbytes} bytes cannot fit a file of at most {self.max_bytes} "
                "bytes: raise max_file_bytes / --max-file-mb"
            )
        if self._writer is not None and self._file_bytes + table.nbytes > budget:
            self._publish()
        if self._writer is None:
            self._part = self.workdir / f"{self.prefix.replace('/', '_')}-{len(self.files)}.parquet"
            self._writer = pq.ParquetWriter(
                self._part, self.schema, compression="zstd", write_statistics=False
            )
        self._writer.write_table(table)
        self._file_rows += table.num_rows
        self._file_bytes += table.nbytes
        self.rows += table.num_rows

    def _publish(self) -> None:
        assert self._writer is not None and self._part is not None
        self._writer.close()
        rel = f"{self.prefix}/{self.split}-{len(self.files):05d}-{self.tag}.parquet"
        part = self._part
        sha, size = self.store.write_with(rel, lambda tmp: shutil.move(part, tmp), suffix=".parquet")
        self.files[rel] = {"rows": self._file_rows, "bytes": size, "sha256": sha}
        self._writer, self._part, self._file_rows, self._file_bytes = None, None, 0, 0

    def close(self) -> dict[str, dict[str, Any]]:
        """Publish the last file (an empty config still gets one file, so its schema loads)."""
        self._flush()
        if self._writer is None and not self.files:
            self._write(self.schema.empty_table())
        if self._writer is not None:
            self._publish()
        return self.files


class IdSet:
    """Sorted fixed-width byte strings: membership of a million 32-character page ids in 32 MB (a
    Python set of them: ~110 MB)."""

    def __init__(self, ids: np.ndarray) -> None:
        self._a = np.unique(ids)

    def __len__(self) -> int:
        return len(self._a)

    def __contains__(self, item: str) -> bool:
        key = np.bytes_(item.encode())
        i = int(np.searchsorted(self._a, key))
        return i < len(self._a) and self._a[i] == key


# ----------------------------------------------------------------------------------------------------
# statistics (everything the card says comes from here)


@dataclass
class ExportStats:
    pages: dict[str, dict[str, int]] = field(default_factory=dict)  # split → lang → pages
    documents: dict[str, int] = field(default_factory=dict)  # split → source documents
    queries: dict[str, dict[str, int]] = field(default_factory=dict)  # split → "lang/kind" → monolingual
    cross_lingual_queries: dict[str, int] = field(default_factory=dict)  # split → rows
    train_rows: dict[str, dict[str, int]] = field(default_factory=dict)  # config → query lang → rows
    train_kinds: dict[str, int] = field(default_factory=dict)
    train_cross_lingual: int = 0
    negatives: dict[str, int] = field(default_factory=dict)  # negatives per row → rows
    positives: dict[str, int] = field(default_factory=dict)  # pos_target length → rows
    dropped: dict[str, int] = field(default_factory=dict)  # reason → train rows / ids left out
    rejects: dict[str, int] = field(default_factory=dict)  # "stage/reason" → rows
    render_qa: dict[str, dict[str, float]] = field(default_factory=dict)  # lang → QA totals + cer
    models: dict[str, list[str]] = field(default_factory=dict)  # role → distinct values
    profiles: list[str] = field(default_factory=list)
    benchmark: list[dict[str, Any]] = field(default_factory=list)  # suite.json sets
    benchmark_tag: str = ""  # the suite's file-name tag (its fingerprint)
    languages: list[str] = field(default_factory=list)


def _count(d: dict[str, dict[str, int]], outer: str, inner: str, n: int = 1) -> None:
    d.setdefault(outer, {})
    d[outer][inner] = d[outer].get(inner, 0) + n


def _sorted_langs(langs: set[str] | Sequence[str]) -> list[str]:
    order = {code: i for i, code in enumerate(ALL_LANGS)}
    return sorted(set(langs), key=lambda c: (order.get(c, 99), c))


# ----------------------------------------------------------------------------------------------------
# the export


@dataclass
class ExportResult:
    dest: str
    fingerprint: str
    files: dict[str, dict[str, Any]]
    stats: ExportStats
    configs: list[dict[str, Any]]
    reused: bool = False


def _fingerprint(manifest: Manifest, options: dict[str, Any]) -> str:
    shas = sorted((e.name, e.sha256) for kind in ("pages", "queries", "train") for e in manifest.shards(kind))
    return config_hash(
        {
            "version": EXPORT_VERSION,
            "code": CODE_VERSION,
            "shards": shas,
            "superseded": sorted(manifest.superseded()),
            "options": options,
        }
    )


def export_dataset(
    root: str | Path | Store,
    dest: str | Path,
    *,
    fmt: Format = FORMATS[0],
    positives: Positives = POSITIVES[0],
    min_negatives: int = 0,
    max_file_bytes: int = HUB_SHARD_BYTES,
    license: str = DEFAULT_LICENSE,
    pretty_name: str | None = None,
    benchmark: bool = True,
    max_queries_per_lang: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Write the synthesize output ``root`` as a Hugging Face dataset repository at ``dest`` (a path
    or an fsspec URL). See the module docstring for the layout.

    ``positives="parallel"`` puts the exact page's translations after it in ``pos_target``;
    ``min_negatives`` leaves out rows with fewer mined negatives (colpali-engine stacks a batch's
    negatives into one tensor, so every row needs ``num_negatives`` of them)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {FORMATS}")
    if positives not in POSITIVES:
        raise ExportError(f"--positives {positives!r}: expected one of {POSITIVES}")
    if max_file_bytes < 1_000:
        raise ExportError(f"max_file_bytes {max_file_bytes} is too small for a Parquet file")
    manifest = Manifest(root)
    if not manifest.shards("pages"):
        raise ExportError(f"no pages shards in {manifest.root}/manifest.json: run `m3dr synthesize` first")
    if not manifest.shards("train"):
        raise ExportError(
            f"no train shards in {manifest.root}/manifest.json: run `m3dr synthesize` with queries enabled"
        )
    out = open_store(dest)
    fractions = recorded_fractions(manifest)
    options = {
        "format": fmt,
        "positives": positives,
        "min_negatives": min_negatives,
        "max_file_bytes": max_file_bytes,
        "license": license,
        "pretty_name": pretty_name,
        "benchmark": benchmark,
        "max_queries_per_lang": max_queries_per_lang,
        "fractions": fractions,
    }
    fp = _fingerprint(manifest, options)
    previous = out.read_json(EXPORT_FILE) if out.size(EXPORT_FILE) is not None else None
    if previous and previous.get("fingerprint") == fp and out.size(CARD_FILE) is not None:
        return ExportResult(
            out.url, fp, previous["files"], ExportStats(**previous["stats"]), previous["configs"], reused=True
        )
    before = set(out.list(""))
    # an export that stopped half-way (a storage fault, a killed job: files, no record) is redone as if
    # the folder were empty; a finished export with other inputs or options, or anything else, needs
    # overwrite
    foreign = sorted(
        r for r in before if not r.startswith(OWN_PREFIXES) and r not in (EXPORT_FILE, CARD_FILE)
    )
    if previous is None and CARD_FILE in before:
        foreign.append(CARD_FILE)
    if (foreign or previous is not None) and not overwrite:
        what = f"holds {foreign[:3]}" if foreign else "holds an export of other inputs or options"
        raise ExportError(
            f"{out.url} is not empty: it {what} (pass overwrite=True / --overwrite to replace it)"
        )

    names = TEVATRON_COLUMNS if fmt == "tevatron" else {"train": {}, "corpus": {}}
    train_schema = renamed(EXPORT_TRAIN_SCHEMA, names["train"])
    corpus_schema = renamed(EXPORT_CORPUS_SCHEMA, names["corpus"])
    stats = ExportStats()
    files: dict[str, dict[str, Any]] = {}
    gone = set(manifest.superseded())
    store = manifest.store
    work_parent = Path(out.path()).parent if out.local else None
    if work_parent is not None:
        work_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".m3dr-export-", dir=work_parent) as work:
        workdir = Path(work)
        bar = _progress(progress, sum(e.rows for e in manifest.shards("pages")), "corpus pages")
        # 1. the corpus: pages of the train and dev documents, streamed a row group at a time
        tag = fp[:12]  # in every file name and YAML pattern: see eval.beir.write_parquet's ``tag``
        corpus = ShardedWriter(out, "data/corpus", CORPUS_SPLIT, corpus_schema, max_file_bytes, workdir, tag)
        ids: list[np.ndarray] = []  # page ids a row group at a time, as fixed-width bytes
        models: dict[str, set[str]] = defaultdict(set)
        docs: dict[str, set[str]] = defaultdict(set)

        heldout: Counter[str] = Counter()  # held-out pages per language (the suite's), from the keys alone

        def wanted(source_id: str, lang: str) -> bool:
            bar.update(1)
            if source_id in gone:
                return False
            split = assign_split(source_id, fractions)
            if split == "benchmark":
                heldout[lang] += 1
                docs["benchmark"].add(source_id)
            return split in TRAIN_SPLITS

        for entry in sorted(manifest.shards("pages"), key=lambda e: e.name):
            for rows in row_groups(store, entry.path, _PAGE_COLS, ("source_id", "lang"), wanted):
                ids.append(np.array([r["page_id"].encode() for r in rows], dtype=np.bytes_))
                for r in rows:
                    split = assign_split(r["source_id"], fractions)
                    row = {
                        "corpus-id": r["page_id"],
                        "doc-id": r["source_id"],
                        "image": r["image"],
                        "lang": r["lang"],
                        "text": r["text"] or "",
                        "source_page_id": r["source_page_id"],
                        "page_index": r["page_index"],
                        "split": split,
                    }
                    corpus.add(_rename(row, names["corpus"]), len((r["image"] or {}).get("bytes") or b""))
                    _count(stats.pages, split, r["lang"])
                    docs[split].add(r["source_id"])
                    models["layout"].add(r.get("layout_model") or "")
                    models["translation"].add(r.get("translation_model") or "")
        bar.close()
        files.update(corpus.close())
        in_corpus = IdSet(np.concatenate(ids) if ids else np.array([], dtype="S1"))
        del ids

        # 2. train / dev rows: documents named by corpus id; every id checked against the corpus
        writers = {
            s: ShardedWriter(out, f"data/{s}", s, train_schema, max_file_bytes, workdir, tag)
            for s in TRAIN_SPLITS
        }
        dropped: Counter[str] = Counter()
        bar = _progress(progress, sum(e.rows for e in manifest.shards("train")), "train rows")
        for r in manifest.live_rows("train", _TRAIN_COLS, schema=TRAIN_SCHEMA):
            bar.update(1)
            split = r["split"]
            if split not in writers:
                dropped["row_not_in_train_or_dev"] += 1
                continue
            if r["positive_page_id"] not in in_corpus:
                dropped["positive_not_in_corpus"] += 1
                continue
            pos = [r["positive_page_id"]]
            if positives == "parallel":
                pos += [p for p in r["parallel_page_ids"] or [] if p != pos[0] and p in in_corpus]
            negs, scores = [], []
            for n, s in zip(r["negative_page_ids"] or [], r["negative_scores"] or [], strict=True):
                if n in in_corpus:
                    negs.append(n)
                    scores.append(s)
                else:
                    dropped["negative_not_in_corpus"] += 1
            if len(negs) < min_negatives:  # colpali-engine's collator needs as many negatives per row
                dropped[f"fewer_than_{min_negatives}_negatives"] += 1
                continue
            row = {
                "query_id": r["query_id"],
                "query": r["query"],
                "query_image": r["query_image"],
                "query_lang": r["query_lang"],
                "target_lang": r["positive_lang"],
                "kind": r["kind"],
                "pos_target": pos,
                "neg_target": negs,
                "neg_scores": scores,
                "source_page_id": r["source_page_id"],
                "doc-id": r["source_id"],
                "miner": r["miner"],
                "generator": r["generator"],
            }
            writers[split].add(
                _rename(row, names["train"]), len((r["query_image"] or {}).get("bytes") or b"")
            )
            _count(stats.train_rows, split, r["query_lang"])
            stats.train_kinds[r["kind"]] = stats.train_kinds.get(r["kind"], 0) + 1
            stats.train_cross_lingual += int(r["query_lang"] != r["positive_lang"])
            stats.negatives[str(len(negs))] = stats.negatives.get(str(len(negs)), 0) + 1
            stats.positives[str(len(pos))] = stats.positives.get(str(len(pos)), 0) + 1
            models["miner"].add(r["miner"] or "")
            models["query generator"].add(r["generator"] or "")
        bar.close()
        for w in writers.values():
            files.update(w.close())
        stats.dropped = dict(sorted(dropped.items()))

        # 3. the held-out suite in the Nayana-IR layout (an m3dr suite directory)
        suite_langs: set[str] = set()
        if benchmark:
            suite_files, stats.benchmark, stats.benchmark_tag = _export_suite(
                manifest, out, workdir, fractions, max_queries_per_lang, max_file_bytes
            )
            files.update(suite_files)
            for s in stats.benchmark:
                if s.get("language"):
                    suite_langs.add(s["language"])
            if stats.benchmark:
                for lang, n in heldout.items():
                    _count(stats.pages, "benchmark", lang, n)
        if not stats.benchmark:
            docs.pop("benchmark", None)

    # 4. counts that need no page bytes
    for r in manifest.live_rows("queries", ["query_lang", "kind", "cross_lingual", "split"]):
        if r["cross_lingual"]:
            stats.cross_lingual_queries[r["split"]] = stats.cross_lingual_queries.get(r["split"], 0) + 1
        else:
            _count(stats.queries, r["split"], f"{r['query_lang']}/{r['kind']}")
    stats.rejects = count_rejects(read_rejects(manifest.store), "stage", "reason")
    stats.render_qa = render_qa_per_lang(manifest.shards("pages"))
    stats.models = {k: sorted(v - {""}) for k, v in sorted(models.items()) if v - {""}}
    stats.profiles = sorted(
        {str(p.get("profile")) for p in recorded_runs(manifest.store) if p.get("profile")}
    )
    stats.documents = {k: len(v) for k, v in sorted(docs.items())}
    stats.languages = _sorted_langs({lang for per in stats.pages.values() for lang in per} | suite_langs)

    # 5. plots, provenance, card (last: a folder with a card is complete); files of an older export go
    for rel, png in _plots(stats).items():
        out.put_bytes(rel, png)
        files[rel] = {"bytes": len(png)}
    configs = _configs(stats, files, tag)
    for rel in sorted(before - set(files) - {EXPORT_FILE, CARD_FILE}):
        out.delete(rel)
    meta = {
        "fingerprint": fp,
        "m3dr": CODE_VERSION,
        "source": manifest.store.url,
        "options": options,
        "configs": configs,
        "files": files,
        "stats": asdict(stats),
    }
    out.put_json(EXPORT_FILE, meta)
    out.put_bytes(
        CARD_FILE, dataset_card(stats, configs, fmt=fmt, license=license, name=pretty_name).encode()
    )
    return ExportResult(out.url, fp, files, stats, configs)


def _rename(row: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(k, k): v for k, v in row.items()} if names else row


def _progress(on: bool, total: int, what: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="row", disable=not on, leave=False)


def _export_suite(
    manifest: Manifest,
    out: Store,
    workdir: Path,
    fractions: dict[str, float],
    max_queries_per_lang: int | None,
    max_file_bytes: int,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], str]:
    """Build the held-out suite locally (eval.build) and publish its files under ``benchmark/``."""
    from eval.beir import BenchmarkError

    local = workdir / SUITE_DIR
    if not manifest.shards("queries"):  # train rows without their queries shards: nothing to hold out
        return {}, [], ""
    try:
        build_suite(
            manifest.store,
            local,
            split="benchmark",
            split_fractions=fractions,
            max_queries_per_lang=max_queries_per_lang,
            max_file_bytes=max_file_bytes,
            name="heldout-benchmark",
        )
    except BenchmarkError as exc:  # no held-out documents (or none with queries): an export without a suite
        if "split 'benchmark'" in str(exc) or "no monolingual queries" in str(exc):
            return {}, [], ""
        raise
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f"{SUITE_DIR}/{path.relative_to(local).as_posix()}"
        sha, size = out.write_with(rel, lambda tmp, src=path: shutil.copyfile(src, tmp), suffix=path.suffix)
        files[rel] = {"bytes": size, "sha256": sha}
    meta = json.loads((local / SUITE_FILE).read_text(encoding="utf-8"))
    return files, meta["sets"], meta["fingerprint"][:12]


# ----------------------------------------------------------------------------------------------------
# the card


def _configs(stats: ExportStats, files: dict[str, dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The YAML ``configs`` list: one entry per config, with its split and data-file pattern."""
    out: list[dict[str, Any]] = []

    def rows(prefix: str) -> int:
        return sum(int(v.get("rows", 0)) for k, v in files.items() if k.startswith(prefix + "/"))

    for split in TRAIN_SPLITS:
        out.append(
            {
                "config_name": split,
                "split": split,
                "path": f"data/{split}/{split}-*-{tag}.parquet",
                "rows": rows(f"data/{split}"),
            }
        )
    out.append(
        {
            "config_name": "corpus",
            "split": CORPUS_SPLIT,
            "path": f"data/corpus/{CORPUS_SPLIT}-*-{tag}.parquet",
            "rows": rows("data/corpus"),
        }
    )
    for s in stats.benchmark:
        for cfg in ("corpus", "queries", "qrels"):
            out.append(
                {
                    "config_name": f"{s['name']}-{cfg}",
                    "split": "test",
                    "path": f"{SUITE_DIR}/{s['path']}/{cfg}/test-*-{stats.benchmark_tag}.parquet",
                    "rows": int(s[cfg]),
                }
            )
    return out


def _size_category(n: int) -> str:
    bounds = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ]
    return next((label for bound, label in bounds if n < bound), "n>1T")


def card_data(stats: ExportStats, configs: list[dict[str, Any]], *, license: str, name: str | None) -> Any:
    """The YAML header as ``huggingface_hub.DatasetCardData`` (what the hub validates and reads)."""
    from huggingface_hub import DatasetCardData

    examples = sum(sum(per.values()) for per in stats.train_rows.values())
    return DatasetCardData(
        pretty_name=name or "m3dr multilingual document retrieval",
        language=stats.languages,
        multilinguality="multilingual" if len(stats.languages) > 1 else "monolingual",
        license=license,
        task_categories=TASK_CATEGORIES,
        size_categories=_size_category(examples),
        tags=["m3dr", "document-retrieval", "multilingual", "synthetic", "colpali", "nayana-ir"],
        configs=[
            {"config_name": c["config_name"], "data_files": [{"split": c["split"], "path": c["path"]}]}
            for c in configs
        ],
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join(sep) + " |"] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows
    ]


def dataset_card(
    stats: ExportStats,
    configs: list[dict[str, Any]],
    *,
    fmt: str = FORMATS[0],
    license: str = DEFAULT_LICENSE,
    name: str | None = None,
) -> str:
    """The dataset card: YAML header + what a user needs to trust the data, every number from ``stats``."""
    data = card_data(stats, configs, license=license, name=name)
    q, pos, neg = (
        ("query_text", "positive_document_ids", "negative_document_ids")
        if fmt == "tevatron"
        else ("query", "pos_target", "neg_target")
    )
    cid = "docid" if fmt == "tevatron" else "corpus-id"
    splits = [s for s in ("train", "dev", "benchmark") if s in stats.pages]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {data.pretty_name}",
        "",
        "Multilingual visual document retrieval data synthesized by m3dr from English "
        "document pages: layout detection, region text, NLLB-200 translation, re-rendering into the original "
        "boxes, query synthesis and hard-negative mining (M3DR / NetraEmbed recipe, MM-Embed negatives). "
        f"{sum(stats.documents.values())} source documents, "
        f"{sum(sum(v.values()) for v in stats.pages.values())} pages in {len(stats.languages)} languages.",
        "",
        "## Configs",
        "",
    ]
    lines += _table(
        ["config", "split", "rows", "files"],
        [[f"`{c['config_name']}`", c["split"], c["rows"], f"`{c['path']}`"] for c in configs],
        "llrl",
    )
    lines += [
        "",
        f"- `train` / `dev`: `{q}` (text; `query_image` holds the crop of a composed query), `{pos}` (corpus "
        f"ids, the exact page first), `{neg}` (mined hard negatives, corpus ids, never a page of the "
        "positive's parallel group), `query_lang`, `target_lang`, `kind`, and m3dr's ids (`query_id`, "
        "`source_page_id`, `doc-id`).",
        f"- `corpus`: `{cid}`, `doc-id` (source document), `image`, `lang`, `text` (region text in reading "
        "order), `source_page_id` (pages sharing it are translations of one page), `split`.",
        "- `<set>-corpus` / `-queries` / `-qrels`: the held-out benchmark in the Nayana-IR layout (split "
        "`test`; qrels 2 = the exact page, 1 = the same page in another language). Documents of the "
        "benchmark are in no train or dev row.",
        "",
        "## Loading",
        "",
        "```python",
        "import datasets",
        "",
        'train = datasets.load_dataset("<repo or folder>", "train", split="train")',
        'corpus = datasets.load_dataset("<repo or folder>", "corpus", split="train")',
    ]
    if fmt == "colpali":
        lines += [
            "",
            "from colpali_engine.data.dataset import ColPaliEngineDataset, Corpus",
            "",
            'rows = {cid: i for i, cid in enumerate(corpus["corpus-id"])}',
            'docs = Corpus(corpus, docid_to_idx_mapping=rows, doc_column_name="image")',
            "# the collator stacks a batch's negatives: every row needs num_negatives of them",
            'train = train.filter(lambda negs: len(negs) >= 1, input_columns="neg_target")',
            'dataset = ColPaliEngineDataset(train, corpus=docs, neg_target_column_name="neg_target",',
            "                               num_negatives=1)",
        ]
    lines += ["```", "", "## Statistics", "", "### Pages per language", ""]
    langs = stats.languages
    page_rows = [[lang, *(stats.pages.get(s, {}).get(lang, 0) for s in splits)] for lang in langs]
    page_rows.append(["**all**", *(sum(stats.pages.get(s, {}).values()) for s in splits)])
    lines += _table(["language", *splits], page_rows)
    lines += [
        "",
        "Source documents per split: " + ", ".join(f"{k} {v}" for k, v in stats.documents.items()),
        "",
    ]
    lines += ["![pages per language](assets/pages_per_language.png)", "", "### Queries", ""]
    kinds = sorted({k.split("/", 1)[1] for per in stats.queries.values() for k in per})
    qsplits = [s for s in ("train", "dev", "benchmark") if s in stats.queries]
    qrows = []
    for lang in langs:
        row = [lang]
        for kind in kinds:
            row.append(sum(stats.queries.get(s, {}).get(f"{lang}/{kind}", 0) for s in qsplits))
        if any(row[1:]):
            qrows.append(row)
    lines += ["Monolingual queries per language and kind (all splits):", ""]
    lines += _table(["language", *kinds], qrows)
    lines += [
        "",
        "Cross-lingual pairings (a query with the same page in another language): "
        + (", ".join(f"{k} {v}" for k, v in sorted(stats.cross_lingual_queries.items())) or "none"),
        "",
    ]
    lines += ["![queries per kind](assets/queries_per_kind.png)", "", "### Train and dev rows", ""]
    lines += _table(
        ["query language", *TRAIN_SPLITS],
        [
            [lang, *(stats.train_rows.get(s, {}).get(lang, 0) for s in TRAIN_SPLITS)]
            for lang in langs
            if any(stats.train_rows.get(s, {}).get(lang, 0) for s in TRAIN_SPLITS)
        ],
    )
    total = sum(sum(v.values()) for v in stats.train_rows.values())
    lines += [
        "",
        f"Rows by kind: {', '.join(f'{k} {v}' for k, v in sorted(stats.train_kinds.items()))}; cross-lingual "
        f"rows (query language ≠ page language): {stats.train_cross_lingual} of {total}.",
        "",
        "Negatives per row: "
        + ", ".join(f"{k}: {v} rows" for k, v in sorted(stats.negatives.items(), key=lambda kv: int(kv[0]))),
        "",
        "Positives per row: "
        + ", ".join(f"{k}: {v} rows" for k, v in sorted(stats.positives.items(), key=lambda kv: int(kv[0]))),
        "",
    ]
    if stats.dropped:
        lines += ["Left out of the export: " + ", ".join(f"{k} {v}" for k, v in stats.dropped.items()), ""]
    if stats.benchmark:
        lines += ["### Benchmark sets", ""]
        lines += _table(
            ["set", "kind", "language", "queries", "pages", "qrels"],
            [
                [s["name"], s["kind"], s.get("language") or "all", s["queries"], s["corpus"], s["qrels"]]
                for s in stats.benchmark
            ],
            "lllrrr",
        )
        lines.append("")
    lines += [
        "### Quality",
        "",
        "Render QA: the translated text drawn on each page read back with tesseract "
        "(character error rate, whitespace ignored; a page over its script's threshold is rejected).",
        "",
    ]
    if stats.render_qa:
        lines += _table(
            ["language", "pages checked", "render CER", "pages rejected"],
            [
                [lang, int(q["pages"]), f"{q['cer']:.1%}", int(q["pages_rejected"])]
                for lang, q in stats.render_qa.items()
            ],
        )
    else:
        lines.append("No render QA was recorded for this data.")
    lines += ["", "Rejects (bad input, by stage and reason; the run went on without them):", ""]
    if stats.rejects:
        lines += _table(["stage/reason", "rows"], [[k, v] for k, v in stats.rejects.items()])
    else:
        lines.append("None.")
    lines += ["", "## How it was made", ""]
    lines.append(f"Profile: {', '.join(f'`{p}`' for p in stats.profiles) or 'not recorded'}.")
    lines.append("")
    for role, values in stats.models.items():
        lines.append(f"- {role}: {', '.join(f'`{v}`' for v in values)}")
    lines += [
        "",
        "Splits are by source document (a hash of its content), so no document is in two splits. Ids are "
        "content hashes: the same input and configuration give the same ids. `m3dr_export.json` lists every "
        "file with its sha256 and the fingerprint of the shards it was made from.",
        "",
        "## Licence",
        "",
        f"Licence field: `{license}`. The page images and texts derive from the source documents: their "
        "licences apply to this data.",
        "",
    ]
    return "\n".join(lines)


def _plots(stats: ExportStats) -> dict[str, bytes]:
    """Two PNG plots for the card: pages per language by split, monolingual queries per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    langs = stats.languages
    splits = [s for s in ("train", "dev", "benchmark") if s in stats.pages]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(langs) + 2), 3.2))
    bottom = np.zeros(len(langs))
    for s in splits:
        vals = np.array([stats.pages[s].get(lang, 0) for lang in langs], dtype=float)
        ax.bar(langs, vals, bottom=bottom, label=s)
        bottom += vals
    ax.set_ylabel("pages")
    ax.set_title("Pages per language")
    ax.legend(fontsize=8)
    out["assets/pages_per_language.png"] = _png(fig)
    kinds: Counter[str] = Counter()
    for per in stats.queries.values():
        for key, n in per.items():
            kinds[key.split("/", 1)[1]] += n
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    names = sorted(kinds)
    ax.bar(names, [kinds[k] for k in names])
    ax.set_ylabel("monolingual queries")
    ax.set_title("Queries per kind")
    out["assets/queries_per_kind.png"] = _png(fig)
    plt.close("all")
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def card_body(dest: str | Path | Store) -> str:
    """An export's card without its YAML header, plots inlined as data URLs: what a Prefect markdown
    artifact can show (the UI has no folder to resolve ``assets/*.png`` against)."""
    import base64
    import re

    store = open_store(dest)
    card = (store.read_bytes(CARD_FILE) or b"").decode()
    body = card.split("\n---\n", 1)[1] if card.startswith("---\n") else card
    for rel in re.findall(r"\]\((assets/[\w.-]+\.png)\)", body):
        png = base64.b64encode(store.read_bytes(rel) or b"").decode()
        body = body.replace(f"]({rel})", f"](data:image/png;base64,{png})")
    return body


# ----------------------------------------------------------------------------------------------------
# reading it back (object stores: `datasets.load_dataset` opens a repository folder only on local disk)


def data_files(dest: str | Path | Store, config: str) -> dict[str, str]:
    """``{split: URL glob}`` of one config of an export, from its ``m3dr_export.json``, for
    ``datasets.load_dataset("parquet", data_files=…, storage_options=…)`` on an object store."""
    store = open_store(dest)
    meta = store.read_json(EXPORT_FILE)
    if meta is None:
        raise ExportError(f"{store.url} holds no m3dr export ({EXPORT_FILE} is missing)")
    for c in meta["configs"]:
        if c["config_name"] == config:
            return {c["split"]: store.url_of(c["path"])}
    raise ExportError(
        f"{store.url}: no config {config!r}; it has {[c['config_name'] for c in meta['configs']]}"
    )
