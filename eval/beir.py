"""Benchmark IO in the Nayana-IR / ViDoRe layout and the BEIR directory layout.

A benchmark has three configs (Hugging Face ``datasets`` names), all ids as strings once loaded:

* ``corpus``  ``{corpus-id, image: struct<bytes, path>[, doc-id, language, title, text]}``
* ``queries`` ``{query-id, query[, language]}``
* ``qrels``   ``{query-id, corpus-id, score}`` (graded ints: Nayana-IR uses 2 exact page, 1 parallel)

Layouts read and written here:

* **Parquet, flat**: ``corpus.parquet``, ``queries.parquet``, ``qrels.parquet`` in one directory.
* **Parquet, HF**: ``<config>/<split>-00000-of-0000N.parquet`` + a README.md whose YAML ``configs``
  block lets ``datasets.load_dataset(<dir>, "<config>", split=<split>)`` open it unchanged.
* **BEIR**: ``corpus.jsonl`` (``_id``, ``title``, ``text``, ``image`` = path relative to the
  directory), ``queries.jsonl`` (``_id``, ``text``[, ``language``]), ``qrels/<split>.tsv`` with header
  ``query-id\\tcorpus-id\\tscore``; images under ``images/``.
* **Hub**: ``load_benchmark("Cognitive-Lab/NayanaIR-CrossBench")`` calls ``datasets.load_dataset``
  per config (needs network or a filled HF cache with ``HF_HUB_OFFLINE=1``).

Images stay on disk until asked for (``Benchmark.image``/``iter_images``); writers are atomic per
directory (built beside the target, then renamed into place).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.schema import IMAGE_TYPE

CONFIGS: tuple[str, ...] = ("corpus", "queries", "qrels")
_HF_META = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
_ID_ALIASES = {"corpus": ("corpus-id", "corpus_id", "_id"), "queries": ("query-id", "query_id", "_id")}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class BenchmarkError(ValueError):
    """A benchmark that cannot be read, or is inconsistent (message says what and where)."""


# ----------------------------------------------------------------------------------------------------
# lazy image stores


class ImageStore(Protocol):
    """Corpus images by row index, read on demand."""

    def __len__(self) -> int: ...
    def get(self, i: int) -> bytes: ...
    def iter_batches(self, batch_size: int) -> Iterator[list[bytes]]: ...


def _image_bytes(value: Any, root: Path | None, where: str) -> bytes:
    """HF Image struct (``{bytes, path}``), raw bytes or a path → encoded image bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    path = None
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        path = value.get("path")
    elif isinstance(value, (str, os.PathLike)):
        path = value
    if not path:
        raise BenchmarkError(f"{where}: no image (neither bytes nor a path)")
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = root / p
    try:
        return p.read_bytes()
    except OSError as exc:
        raise BenchmarkError(f"{where}: cannot read image file {p} ({exc.strerror})") from exc


@dataclass
class MemoryImages:
    """Images held in memory (synthetic benchmarks, tests)."""

    items: list[bytes]

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> bytes:
        return self.items[i]

    def iter_batches(self, batch_size: int) -> Iterator[list[bytes]]:
        for a in range(0, len(self.items), batch_size):
            yield self.items[a : a + batch_size]


@dataclass
class FileImages:
    """One image file per corpus row (BEIR layout); ``None`` where the row has no image."""

    paths: list[Path | None]

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> bytes:
        return _image_bytes(self.paths[i] and str(self.paths[i]), None, f"corpus row {i}")

    def iter_batches(self, batch_size: int) -> Iterator[list[bytes]]:
        for a in range(0, len(self.paths), batch_size):
            yield [self.get(i) for i in range(a, min(a + batch_size, len(self.paths)))]


class ParquetImages:
    """The ``image`` column of one or more Parquet files, read a row group at a time."""

    def __init__(self, files: Sequence[Path], root: Path) -> None:
        self.files, self.root = list(files), root
        self._starts: list[int] = []  # global row index where each (file, row group) starts
        self._where: list[tuple[int, int]] = []
        n = 0
        for fi, f in enumerate(self.files):
            md = pq.ParquetFile(f).metadata
            for rg in range(md.num_row_groups):
                self._starts.append(n)
                self._where.append((fi, rg))
                n += md.row_group(rg).num_rows
        self._n = n
        self._cached: tuple[int, list[Any]] | None = None

    def __len__(self) -> int:
        return self._n

    def get(self, i: int) -> bytes:
        if not 0 <= i < self._n:
            raise IndexError(i)
        g = bisect.bisect_right(self._starts, i) - 1
        if self._cached is None or self._cached[0] != g:
            fi, rg = self._where[g]
            col = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=["image"]).column("image")
            self._cached = (g, col.to_pylist())
        return _image_bytes(self._cached[1][i - self._starts[g]], self.root, f"corpus row {i}")

    def iter_batches(self, batch_size: int) -> Iterator[list[bytes]]:
        i = 0
        for f in self.files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image"]):
                vals = batch.column(0).to_pylist()
                yield [_image_bytes(v, self.root, f"corpus row {i + k}") for k, v in enumerate(vals)]
                i += len(vals)


class DatasetImages:
    """The ``image`` column of a Hugging Face ``datasets.Dataset`` (cast to ``Image(decode=False)``)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, i: int) -> bytes:
        return _image_bytes(self.ds[i]["image"], None, f"corpus row {i}")

    def iter_batches(self, batch_size: int) -> Iterator[list[bytes]]:
        for a in range(0, len(self.ds), batch_size):
            rows = self.ds[a : a + batch_size]["image"]
            yield [_image_bytes(v, None, f"corpus row {a + k}") for k, v in enumerate(rows)]


# ----------------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Benchmark:
    """A retrieval benchmark: corpus ids (+ lazy images), queries, graded qrels, languages.

    Lists are kept as read (duplicates included) so ``validate`` can report them; the dict views
    (``queries``, ``qrels``) are what metrics and retrieval use.
    """

    corpus_ids: list[str]
    images: ImageStore
    query_ids: list[str]
    query_texts: list[str]
    qrels_rows: list[tuple[str, str, int | float]]
    query_languages: list[str | None] | None = None
    corpus_languages: list[str | None] | None = None
    corpus_doc_ids: list[str | None] | None = None
    corpus_titles: list[str] | None = None
    corpus_texts: list[str] | None = None
    # composed (image + text) queries: one encoded image per query (None for a text query)
    query_images: list[bytes | None] | None = None
    name: str = ""
    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_memory(
        cls,
        corpus: Mapping[str, bytes],
        queries: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        *,
        query_languages: Mapping[str, str] | None = None,
        corpus_languages: Mapping[str, str] | None = None,
        corpus_doc_ids: Mapping[str, str] | None = None,
        name: str = "",
    ) -> Benchmark:
        """Build from dicts: ``corpus {corpus-id: image bytes}``, ``queries {query-id: text}``, qrels."""
        cids, qids = list(corpus), list(queries)
        return cls(
            corpus_ids=cids,
            images=MemoryImages([corpus[c] for c in cids]),
            query_ids=qids,
            query_texts=[queries[q] for q in qids],
            qrels_rows=[(q, c, s) for q, docs in qrels.items() for c, s in docs.items()],
            query_languages=None if query_languages is None else [query_languages.get(q) for q in qids],
            corpus_languages=None if corpus_languages is None else [corpus_languages.get(c) for c in cids],
            corpus_doc_ids=None if corpus_doc_ids is None else [corpus_doc_ids.get(c) for c in cids],
            name=name,
        )

    # views ------------------------------------------------------------------------------------------
    @property
    def queries(self) -> dict[str, str]:
        return dict(zip(self.query_ids, self.query_texts, strict=True))

    @property
    def qrels(self) -> dict[str, dict[str, int]]:
        """``{query-id: {corpus-id: grade}}`` for eval.metrics."""
        out: dict[str, dict[str, int]] = {}
        for q, c, s in self.qrels_rows:
            out.setdefault(q, {})[c] = int(s)
        return out

    @property
    def languages(self) -> list[str]:
        """Sorted distinct query languages (empty when the benchmark has none)."""
        return sorted({x for x in (self.query_languages or []) if x})

    def queries_in(self, language: str) -> list[str]:
        """Query ids whose language is ``language``."""
        langs = self.query_languages or [None] * len(self.query_ids)
        return [q for q, lang in zip(self.query_ids, langs, strict=True) if lang == language]

    def select_queries(self, query_ids: Sequence[str], name: str | None = None) -> Benchmark:
        """The same corpus with only these queries and their qrels (e.g. one language's set)."""
        keep = set(query_ids)
        rows = [i for i, q in enumerate(self.query_ids) if q in keep]
        langs, images = self.query_languages, self.query_images
        return replace(
            self,
            query_ids=[self.query_ids[i] for i in rows],
            query_texts=[self.query_texts[i] for i in rows],
            query_languages=None if langs is None else [langs[i] for i in rows],
            query_images=None if images is None else [images[i] for i in rows],
            qrels_rows=[r for r in self.qrels_rows if r[0] in keep],
            name=self.name if name is None else name,
        )

    # images -----------------------------------------------------------------------------------------
    def image(self, corpus_id: str) -> bytes:
        """Encoded image bytes of one corpus page (read from disk now)."""
        if self._index is None:
            self._index = {c: i for i, c in enumerate(self.corpus_ids)}
        try:
            return self.images.get(self._index[corpus_id])
        except KeyError:
            raise BenchmarkError(f"unknown corpus-id {corpus_id!r}") from None

    def iter_images(self, batch_size: int = 64) -> Iterator[tuple[list[str], list[bytes]]]:
        """``(corpus ids, image bytes)`` batches in corpus order; memory holds one batch."""
        i = 0
        for imgs in self.images.iter_batches(batch_size):
            yield self.corpus_ids[i : i + len(imgs)], imgs
            i += len(imgs)

    def corpus_fingerprint(self) -> str:
        """Hash of corpus ids and image bytes: the dataset key of cached corpus embeddings."""
        h = hashlib.sha256()
        for ids, imgs in self.iter_images():
            for c, b in zip(ids, imgs, strict=True):
                h.update(_frame(c.encode()) + _frame(hashlib.sha256(b).digest()))
        return h.hexdigest()[:20]

    # validation -------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Raise BenchmarkError listing every inconsistency; return non-fatal warnings.

        Errors: empty configs, empty or duplicate ids, duplicate (query, corpus) qrel pairs, qrels
        naming unknown ids, non-integer grades, per-row columns of the wrong length, image count
        different from corpus size. Warnings: queries without any relevant (grade > 0) qrel, which
        score 0 on every metric (see eval.metrics).
        """
        errors: list[str] = []

        def report(what: str, items: Sequence[Any]) -> None:
            if items:
                errors.append(f"{len(items)} {what}, e.g. {list(items[:5])!r}")

        for cfg, n in (
            ("corpus", len(self.corpus_ids)),
            ("queries", len(self.query_ids)),
            ("qrels", len(self.qrels_rows)),
        ):
            if n == 0:
                errors.append(f"{cfg} is empty")
        report("empty corpus ids", [i for i, c in enumerate(self.corpus_ids) if not c])
        report("empty query ids", [i for i, q in enumerate(self.query_ids) if not q])
        report("duplicate corpus ids", _dupes(self.corpus_ids))
        report("duplicate query ids", _dupes(self.query_ids))
        report("duplicate qrels (query-id, corpus-id) pairs", _dupes([(q, c) for q, c, _ in self.qrels_rows]))
        cset, qset = set(self.corpus_ids), set(self.query_ids)
        report("qrels with an unknown query-id", [(q, c) for q, c, _ in self.qrels_rows if q not in qset])
        report("qrels with an unknown corpus-id", [(q, c) for q, c, _ in self.qrels_rows if c not in cset])
        report("qrels with a non-integer score", [r for r in self.qrels_rows if not _is_int(r[2])])
        report(
            "empty query texts", [q for q, t in zip(self.query_ids, self.query_texts, strict=False) if not t]
        )
        lengths = {
            "query_texts": (self.query_texts, len(self.query_ids)),
            "query_languages": (self.query_languages, len(self.query_ids)),
            "query_images": (self.query_images, len(self.query_ids)),
            "corpus_languages": (self.corpus_languages, len(self.corpus_ids)),
            "corpus_doc_ids": (self.corpus_doc_ids, len(self.corpus_ids)),
            "corpus_titles": (self.corpus_titles, len(self.corpus_ids)),
            "corpus_texts": (self.corpus_texts, len(self.corpus_ids)),
        }
        for col, (vals, n) in lengths.items():
            if vals is not None and len(vals) != n:
                errors.append(f"{col} has {len(vals)} rows, expected {n}")
        if len(self.images) != len(self.corpus_ids):
            errors.append(f"{len(self.images)} images for {len(self.corpus_ids)} corpus ids")
        if errors:
            label = f"benchmark {self.name!r}" if self.name else "benchmark"
            raise BenchmarkError(f"{label} is invalid:\n" + "\n".join(f"  - {e}" for e in errors))
        positive = {q for q, _, s in self.qrels_rows if s > 0}
        no_rel = [q for q in self.query_ids if q not in positive]
        return [f"{len(no_rel)} queries have no relevant document, e.g. {no_rel[:5]!r}"] if no_rel else []


def _frame(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b


def _dupes(items: Sequence[Any]) -> list[Any]:
    return [k for k, n in Counter(items).items() if n > 1]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _score(v: Any) -> int | float:
    """Grades become ints when integral (``2.0`` → 2); anything else is kept for validate to flag."""
    if isinstance(v, str):
        v = float(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _sid(v: Any) -> str:
    """Ids as strings (ViDoRe stores int64 ids; pytrec_eval needs str)."""
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------------
# reading


def _pick(cols: Sequence[str], names: Sequence[str], cfg: str, where: Path | str) -> str:
    for n in names:
        if n in cols:
            return n
    raise BenchmarkError(f"{where}: config {cfg!r} needs a column {names[0]!r} (found {list(cols)})")


def _parquet_files(root: Path, cfg: str, split: str) -> tuple[list[Path], Literal["flat", "hf"]] | None:
    flat = root / f"{cfg}.parquet"
    if flat.is_file():
        return [flat], "flat"
    d = root / cfg
    if d.is_dir():
        files = sorted(d.glob(f"{split}-*.parquet")) or sorted(d.glob("*.parquet"))
        if files:
            return files, "hf"
    return None


def _from_columns(
    corpus: Mapping[str, list],
    cid: str,
    images: Any,
    queries: Mapping[str, list],
    qid: str,
    qtext: str,
    qrels: Mapping[str, list],
    name: str,
) -> Benchmark:
    """A Benchmark from column dicts (Parquet and hub readers share this; ids become str, grades int)."""
    return Benchmark(
        corpus_ids=[_sid(v) for v in corpus[cid]],
        images=images,
        query_ids=[_sid(v) for v in queries[qid]],
        query_texts=["" if t is None else str(t) for t in queries[qtext]],
        qrels_rows=[
            (_sid(q), _sid(c), _score(s))
            for q, c, s in zip(qrels["query-id"], qrels["corpus-id"], qrels["score"], strict=True)
        ],
        query_languages=queries.get("language"),
        corpus_languages=corpus.get("language"),
        corpus_doc_ids=None
        if "doc-id" not in corpus
        else [None if v is None else str(v) for v in corpus["doc-id"]],
        corpus_titles=corpus.get("title"),
        corpus_texts=corpus.get("text"),
        query_images=None
        if "image" not in queries
        else [v.get("bytes") if isinstance(v, dict) else None for v in queries["image"]],
        name=name,
    )


def read_parquet_dir(root: Path | str, *, split: str = "test", name: str | None = None) -> Benchmark:
    """Read the flat (``corpus.parquet``…) or HF (``corpus/test-*.parquet``…) Parquet layout."""
    root = Path(root)
    found = {cfg: _parquet_files(root, cfg, split) for cfg in CONFIGS}
    missing = [c for c, f in found.items() if f is None]
    if missing:
        raise BenchmarkError(
            f"{root}: missing config(s) {missing}: expected <config>.parquet or <config>/{split}-*.parquet"
        )

    def table(cfg: str, columns: list[str] | None = None) -> pa.Table:
        files = found[cfg][0]  # type: ignore[index]
        try:
            return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
        except (pa.ArrowInvalid, OSError) as exc:
            raise BenchmarkError(f"{root}: cannot read {cfg} Parquet ({exc})") from exc

    corpus_files = found["corpus"][0]  # type: ignore[index]
    ccols = pq.ParquetFile(corpus_files[0]).schema_arrow.names
    cid = _pick(ccols, _ID_ALIASES["corpus"], "corpus", root)
    if "image" not in ccols:
        raise BenchmarkError(f"{root}: config 'corpus' has no 'image' column (found {ccols})")
    opt = [c for c in ("doc-id", "language", "title", "text") if c in ccols]
    corpus = table("corpus", [cid, *opt]).to_pydict()
    queries = table("queries").to_pydict()
    qid = _pick(list(queries), _ID_ALIASES["queries"], "queries", root)
    qtext = _pick(list(queries), ("query", "text"), "queries", root)
    qrels = table("qrels").to_pydict()
    for col in ("query-id", "corpus-id", "score"):
        if col not in qrels:
            raise BenchmarkError(f"{root}: config 'qrels' needs a column {col!r} (found {list(qrels)})")
    return _from_columns(
        corpus,
        cid,
        ParquetImages(corpus_files, root),
        queries,
        qid,
        qtext,
        qrels,
        root.name if name is None else name,
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
            if "_id" not in rows[-1]:
                raise BenchmarkError(f"{path}:{n}: record has no '_id'")
    return rows


def read_beir_dir(root: Path | str, *, split: str = "test", name: str | None = None) -> Benchmark:
    """Read a BEIR directory: corpus.jsonl (+ ``image`` paths), queries.jsonl, qrels/<split>.tsv."""
    root = Path(root)
    qrels_path = root / "qrels" / f"{split}.tsv"
    for p in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise BenchmarkError(f"{root}: BEIR layout needs {p.relative_to(root)}")
    corpus = _read_jsonl(root / "corpus.jsonl")
    queries = _read_jsonl(root / "queries.jsonl")
    rows: list[tuple[str, str, int | float]] = []
    with qrels_path.open(encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header[:3] != ["query-id", "corpus-id", "score"]:
            raise BenchmarkError(f"{qrels_path}: header must be 'query-id\\tcorpus-id\\tscore', got {header}")
        for n, line in enumerate(fh, 2):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            try:
                rows.append((parts[0], parts[1], _score(parts[2])))
            except (IndexError, ValueError) as exc:
                raise BenchmarkError(f"{qrels_path}:{n}: expected query-id, corpus-id, score") from exc

    def col(recs: list[dict[str, Any]], key: str) -> list[Any] | None:
        return [r.get(key) for r in recs] if any(key in r for r in recs) else None

    return Benchmark(
        corpus_ids=[_sid(r["_id"]) for r in corpus],
        images=FileImages([root / r["image"] if r.get("image") else None for r in corpus]),
        query_ids=[_sid(r["_id"]) for r in queries],
        query_texts=[str(r.get("text", "")) for r in queries],
        qrels_rows=rows,
        query_languages=col(queries, "language"),
        corpus_languages=col(corpus, "language"),
        corpus_doc_ids=col(corpus, "doc-id"),
        corpus_titles=[str(r.get("title", "")) for r in corpus],
        corpus_texts=[str(r.get("text", "")) for r in corpus],
        query_images=[(root / r["image"]).read_bytes() if r.get("image") else None for r in queries]
        if any(r.get("image") for r in queries)
        else None,
        name=root.name if name is None else name,
    )


def load_with_datasets(
    source: str, *, split: str = "test", revision: str | None = None, name: str | None = None
) -> Benchmark:
    """Load the three configs with ``datasets.load_dataset(source, config, split=split)``.

    ``source`` is a hub id (``Cognitive-Lab/NayanaIR-CrossBench``) or a local HF-layout directory
    with a README ``configs`` block. Images stay undecoded (``Image(decode=False)``) and lazy.
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise BenchmarkError("loading from the hub needs the 'datasets' package") from exc
    parts: dict[str, Any] = {}
    for cfg in CONFIGS:
        try:
            parts[cfg] = datasets.load_dataset(source, cfg, split=split, revision=revision)
        except Exception as exc:
            raise BenchmarkError(
                f"could not load config {cfg!r} of {source!r} with datasets.load_dataset "
                f"({type(exc).__name__}: {exc}). The Hugging Face hub is not reachable from an offline "
                "machine: download the dataset where it is (or fill the HF cache and set "
                "HF_HUB_OFFLINE=1), or pass a local directory in the Parquet or BEIR layout."
            ) from exc
    corpus, queries, qrels = parts["corpus"], parts["queries"], parts["qrels"]
    if "image" not in corpus.column_names:
        raise BenchmarkError(f"{source}: config 'corpus' has no 'image' column ({corpus.column_names})")
    cid = _pick(corpus.column_names, _ID_ALIASES["corpus"], "corpus", source)
    qid = _pick(queries.column_names, _ID_ALIASES["queries"], "queries", source)
    qtext = _pick(queries.column_names, ("query", "text"), "queries", source)
    opt = [c for c in ("doc-id", "language") if c in corpus.column_names]
    meta = corpus.select_columns([cid, *opt]).to_dict()
    q = queries.to_dict()
    r = qrels.select_columns(["query-id", "corpus-id", "score"]).to_dict()
    images = corpus.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    return _from_columns(
        meta,
        cid,
        DatasetImages(images),
        q,
        qid,
        qtext,
        r,
        source.rstrip("/").split("/")[-1] if name is None else name,
    )


def load_benchmark(
    source: str | os.PathLike[str], *, split: str = "test", revision: str | None = None
) -> Benchmark:
    """Open a benchmark from a local directory (Parquet flat/HF or BEIR layout) or a hub id."""
    path = Path(source)
    if path.is_dir():
        if (path / "corpus.parquet").is_file() or (path / "corpus").is_dir():
            return read_parquet_dir(path, split=split)
        if (path / "corpus.jsonl").is_file():
            return read_beir_dir(path, split=split)
        raise BenchmarkError(
            f"{path}: not a benchmark directory (expected corpus.parquet, corpus/{split}-*.parquet "
            "or corpus.jsonl)"
        )
    if path.exists():
        raise BenchmarkError(f"{path}: is a file, expected a benchmark directory or a hub id")
    text = str(source)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        raise BenchmarkError(f"{text!r}: no such local directory, and not a hub id of the form owner/name")
    return load_with_datasets(text, split=split, revision=revision)


# ----------------------------------------------------------------------------------------------------
# writing


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp directory beside ``out``; on success fsync it and rename it to ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        for dirpath, _, files in os.walk(tmp):
            for f in files:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        with contextlib.suppress(OSError):
            fd = os.open(out.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data[:4] in (b"RIFF",) and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def _file_stem(corpus_id: str) -> str:
    """A filesystem-safe name for an id (the id itself when safe, else a hash of it)."""
    if _SAFE_NAME.match(corpus_id) and not corpus_id.startswith("h-"):
        return corpus_id
    return "h-" + hashlib.sha256(corpus_id.encode()).hexdigest()[:32]


def _corpus_extras(b: Benchmark) -> dict[str, list[Any] | None]:
    """Optional per-page corpus columns written beside id and image (text lets text-aware encoders and
    rerankers see a page's region text)."""
    return {
        "doc-id": b.corpus_doc_ids,
        "language": b.corpus_languages,
        "title": b.corpus_titles,
        "text": b.corpus_texts,
    }


def _corpus_schema(b: Benchmark) -> pa.Schema:
    fields = [pa.field("corpus-id", pa.string()), pa.field("image", IMAGE_TYPE)]
    for col, vals in _corpus_extras(b).items():
        if vals is not None:
            fields.append(pa.field(col, pa.string()))
    return pa.schema(fields, metadata=_HF_META)


def _queries_table(b: Benchmark) -> pa.Table:
    cols: dict[str, Any] = {"query-id": b.query_ids, "query": b.query_texts}
    if b.query_languages is not None:
        cols["language"] = b.query_languages
    table = pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})
    if b.query_images is None:
        return table
    cells = [
        None if img is None else {"bytes": img, "path": _file_stem(q) + _ext(img)}
        for q, img in zip(b.query_ids, b.query_images, strict=True)
    ]
    table = table.append_column(pa.field("image", IMAGE_TYPE), pa.array(cells, IMAGE_TYPE))
    return table.replace_schema_metadata(_HF_META)


def _qrels_table(b: Benchmark) -> pa.Table:
    return pa.table(
        {
            "query-id": pa.array([r[0] for r in b.qrels_rows], pa.string()),
            "corpus-id": pa.array([r[1] for r in b.qrels_rows], pa.string()),
            "score": pa.array([int(r[2]) for r in b.qrels_rows], pa.int64()),
        }
    )


def _readme(split: str, name: str, tag: str = "") -> str:
    lines = ["---", "configs:"]
    for cfg in CONFIGS:
        lines += [
            f"- config_name: {cfg}",
            "  data_files:",
            f"  - split: {split}",
            f"    path: {cfg}/{split}-*{'-' + tag + '.parquet' if tag else ''}",
        ]
    lines += [
        "---",
        "",
        f"# {name or 'benchmark'}",
        "",
        "Written by m3dr (eval/beir.py): Nayana-IR/ViDoRe layout.",
        "",
    ]
    return "\n".join(lines)


def file_budget(max_file_bytes: int) -> int:
    """Arrow bytes a Parquet file of at most ``max_file_bytes`` may take: the limit less room for the
    page headers, row-group metadata and footer Parquet adds (measured 1–3.5 kB per file of page images;
    64 kB kept back, at most a tenth of a small limit)."""
    return max_file_bytes - min(64 * 1024, max_file_bytes // 10)


def write_parquet(
    bench: Benchmark,
    out: Path | str,
    *,
    layout: Literal["flat", "hf"] = "flat",
    split: str = "test",
    rows_per_file: int | None = None,
    max_file_bytes: int | None = None,
    row_group_size: int = 64,
    overwrite: bool = False,
    tag: str = "",
) -> Path:
    """Write the benchmark as Parquet (flat or HF layout), images streamed in row groups. Returns ``out``.

    ``rows_per_file`` and/or ``max_file_bytes`` shard the corpus (HF layout only), as the hub does for
    large corpora: a file is closed before a row group would take its Arrow size past ``max_file_bytes``
    (page images are PNG, which Parquet's compression cannot shrink, so the file stays under it too).
    ``tag`` (HF layout) ends every file name and README pattern, e.g. a content fingerprint: ``datasets``
    caches a local folder under its name and README alone, so two folders of one name (a rebuilt suite)
    would otherwise read each other's cache.
    """
    bench.validate()
    if layout not in ("flat", "hf"):
        raise ValueError(f"layout must be 'flat' or 'hf', got {layout!r}")
    if (rows_per_file is not None or max_file_bytes is not None or tag) and layout != "hf":
        raise ValueError("rows_per_file, max_file_bytes and tag need layout='hf'")
    end = f"-{tag}.parquet" if tag else ".parquet"
    out = Path(out)
    n = len(bench.corpus_ids)
    per_file = max(n, 1) if rows_per_file is None else max(1, rows_per_file)
    schema = _corpus_schema(bench)
    opts: dict[str, Any] = {"compression": "zstd", "write_statistics": False}

    def dest(tmp: Path, cfg: str, i: int = 0) -> Path:
        if layout == "flat":
            return tmp / f"{cfg}.parquet"
        (tmp / cfg).mkdir(exist_ok=True)
        if cfg == "corpus":  # named -of-N once N is known (below)
            return tmp / cfg / f".{split}-{i:05d}.parquet"
        return tmp / cfg / f"{split}-00000-of-00001{end}"

    def piece(ids: list[str], imgs: list[bytes], start: int) -> pa.Table:
        cols: dict[str, Any] = {
            "corpus-id": ids,
            "image": [{"bytes": b, "path": _file_stem(c) + _ext(b)} for c, b in zip(ids, imgs, strict=True)],
        }
        for col, vals in _corpus_extras(bench).items():
            if vals is not None:
                cols[col] = vals[start : start + len(ids)]
        return pa.Table.from_pydict(cols, schema=schema)

    with atomic_dir(out, overwrite) as tmp:
        writer: pq.ParquetWriter | None = None
        file_i, rows_in_file, bytes_in_file, row = -1, 0, 0, 0

        def roll() -> pq.ParquetWriter:
            nonlocal writer, file_i, rows_in_file, bytes_in_file
            if writer is not None:
                writer.close()
            file_i += 1
            rows_in_file, bytes_in_file = 0, 0
            writer = pq.ParquetWriter(dest(tmp, "corpus", file_i), schema, **opts)
            return writer

        def over(part: pa.Table) -> bool:
            return max_file_bytes is not None and bytes_in_file + part.nbytes > file_budget(max_file_bytes)

        try:
            for ids, imgs in bench.iter_images(row_group_size):
                a = 0
                while a < len(ids):  # a batch may straddle a file boundary
                    if writer is None or rows_in_file >= per_file:
                        roll()
                        continue
                    take = min(per_file - rows_in_file, len(ids) - a)
                    part = piece(ids[a : a + take], imgs[a : a + take], row + a)
                    while take > 1 and over(part):  # fill the file up to its size, no further
                        take //= 2
                        part = piece(ids[a : a + take], imgs[a : a + take], row + a)
                    if rows_in_file > 0 and over(part):
                        roll()
                        continue
                    writer.write_table(part, row_group_size)
                    rows_in_file += take
                    bytes_in_file += part.nbytes
                    a += take
                row += len(ids)
            if writer is None:  # an empty corpus still has its (empty) file
                roll()
        finally:
            if writer is not None:
                writer.close()
        if layout == "hf":
            for i in range(file_i + 1):
                os.replace(
                    dest(tmp, "corpus", i), tmp / "corpus" / f"{split}-{i:05d}-of-{file_i + 1:05d}{end}"
                )
        pq.write_table(_queries_table(bench), dest(tmp, "queries"), **opts)
        pq.write_table(_qrels_table(bench), dest(tmp, "qrels"), **opts)
        if layout == "hf":
            (tmp / "README.md").write_text(_readme(split, bench.name, tag), encoding="utf-8")
    return out


def write_beir(bench: Benchmark, out: Path | str, *, split: str = "test", overwrite: bool = False) -> Path:
    """Write the BEIR layout (corpus.jsonl + ``image`` paths, images/, queries.jsonl, qrels); returns out."""
    bench.validate()
    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "qrels").mkdir()
        with (tmp / "corpus.jsonl").open("w", encoding="utf-8") as fh:
            row = 0
            for ids, imgs in bench.iter_images(64):
                for c, b in zip(ids, imgs, strict=True):
                    rel = f"images/{_file_stem(c)}{_ext(b)}"
                    (tmp / rel).write_bytes(b)
                    rec: dict[str, Any] = {
                        "_id": c,
                        "title": bench.corpus_titles[row] if bench.corpus_titles else "",
                        "text": bench.corpus_texts[row] if bench.corpus_texts else "",
                        "image": rel,
                    }
                    if bench.corpus_doc_ids is not None:
                        rec["doc-id"] = bench.corpus_doc_ids[row]
                    if bench.corpus_languages is not None:
                        rec["language"] = bench.corpus_languages[row]
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    row += 1
        with (tmp / "queries.jsonl").open("w", encoding="utf-8") as fh:
            langs, qimages = bench.query_languages, bench.query_images
            for i, (q, t) in enumerate(zip(bench.query_ids, bench.query_texts, strict=True)):
                rec = {"_id": q, "text": t}
                if langs is not None:
                    rec["language"] = langs[i]
                if qimages is not None and qimages[i]:  # composed queries: the crop beside the text
                    rel = f"query-images/{_file_stem(q)}{_ext(qimages[i])}"
                    (tmp / "query-images").mkdir(exist_ok=True)
                    (tmp / rel).write_bytes(qimages[i])
                    rec["image"] = rel
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        with (tmp / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for q, c, s in bench.qrels_rows:
                fh.write(f"{q}\t{c}\t{int(s)}\n")
    return out
