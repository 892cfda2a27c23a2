"""The per-split mining index: built once per split, extended segment by segment, searched by train shards.

Before, every train shard read every page of the output root and built its miner's index from scratch,
so mining cost O(groups × corpus). Now the index of a split (``train``, ``dev``) is built once, after
all pages and queries exist (:func:`build_split_index`, Prefect task ``mining-index``), and each train
shard only searches it (``tasks.negatives.search``): its cost is its queries × one search.

Layout under the output root, everything published through the :class:`~tasks.storage.Store` (safe on
an object store: each file is one PUT under its final name, then the segment's completion record)::

    index/<split>/<index config hash>/segment-<id>/meta.parquet     rows of the segment (INDEX_META_SCHEMA)
        bm25:  data/indices/indptr.csc.index.npy, vocab.index.json, params.index.json (bm25s),
               term_max.npy, term_langs.npy, impact_{ptr,rows,w}.npy, segment.json (tasks.negatives.bm25)
        dense: vectors.npy (float32, unit rows) [+ ivf.faiss when the segment is large]
    _records/index-<split>-<config hash>-<id>.json                   kind "index": covers, generation, files

**Segments; refresh extends, never rebuilds.** A segment covers a set of pages shards (name → sha256 of
the shard it indexed) and holds those shards' pages of the split. A build indexes only the pages shards
no segment of the same index config covers yet, as a new segment (``generation`` = 1 + the highest), and
never touches the bytes of older segments. Search runs over the live segments and merges candidates.
A pages shard is *owned* by the newest segment (generation, then name) covering its current sha256;
rows of a segment for shards it does not own, and rows of superseded sources, are dead (never
candidates), so a rebuilt shard, a removed one or a superseded source needs no rewrite of old segments.
Rule against fragmentation: a build that would leave more than ``[negatives.index] max_segments``
live segments re-indexes the whole split into one new segment instead (the old ones stop owning
anything and are no longer loaded; their files stay until someone deletes them).

**BM25 statistics per segment.** bm25s precomputes each (term, page) weight with the segment's own
N, document frequencies and average length. With several segments, a term's idf is that of the segment
holding the page, not the idf over the whole split: segments of a few hundred pages or more drawn from
the same distribution give idfs within a few percent of the global ones (idf is a log of a ratio),
but a rare term concentrated in one segment scores higher there than it would globally, and scores from
two segments are not strictly comparable. One segment (a first build, or after the ``max_segments``
rule) is exact. The positive's own score always comes from its own segment, and every comparison
the selection makes (``score < margin × positive``, ranking) uses these per-segment scores. Dense
vectors have no corpus statistics: segments are exact.

``in-batch`` mines nothing, so it has no index (a build returns a skipped result).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.encoders import EncoderTable, PageView
from tasks.negatives.base import ModalityMix
from tasks.negatives.bm25 import BM25_FORMAT, IMPACT_MIN_DF, TOKENIZER_VERSION, Bm25Segment, tokenize
from tasks.negatives.config import IndexOptions, normalise_negatives
from tasks.schema import INDEX_META_SCHEMA, INDEX_VERSION
from tasks.shards import (
    Manifest,
    ShardEntry,
    ShardResult,
    completed,
    config_hash,
    hash_id,
    write_table,
)
from tasks.splits import DEFAULT_FRACTIONS, assign_split
from tasks.storage import Store, atomic_write

INDEX_KIND = "index"
META_NAME = "meta.parquet"
VECTORS_NAME = "vectors.npy"
IVF_NAME = "ivf.faiss"
PAGE_COLUMNS = ["page_id", "source_page_id", "source_id", "lang", "text"]


# ------------------------------------------------------------------------------------------ config


def negatives_config(profile: Any) -> dict[str, Any]:
    """The ``[negatives]`` table of a profile (a Profile, a profile mapping, or the typed table itself),
    validated and normalised (unknown keys fail, named; every default filled in)."""
    if isinstance(profile, dict):
        profile = profile.get("negatives") or {}
    return normalise_negatives(profile)


def index_options(cfg: dict[str, Any]) -> IndexOptions:
    return IndexOptions.model_validate(normalise_negatives(cfg)["index"])


def first_pass(cfg: dict[str, Any]) -> int:
    """Candidates per query of a first search pass: ``candidates``, or max(4 × top_n, 64)."""
    opts = index_options(cfg)
    return opts.candidates or max(4 * int(normalise_negatives(cfg)["top_n"]), 64)


def index_config(cfg: dict[str, Any], split_fractions: dict[str, float] | None) -> dict[str, Any]:
    """What an index's contents depend on (selection options k/top_n/margin/seed/modality do not)."""
    cfg = normalise_negatives(cfg)
    miner = cfg["miner"]
    out: dict[str, Any] = {
        "version": INDEX_VERSION,
        "miner": miner,
        "fractions": dict(sorted((split_fractions or DEFAULT_FRACTIONS).items())),
    }
    if miner == "bm25":
        out["bm25"] = {
            "k1": float(cfg["bm25"]["k1"]),
            "b": float(cfg["bm25"]["b"]),
            "method": "lucene",
            "tokenizer": TOKENIZER_VERSION,
            "format": BM25_FORMAT,  # segment file layout: a new one gets a new config hash (a rebuild)
            "impact_min_df": IMPACT_MIN_DF,
        }
    elif miner == "dense":
        opts = index_options(cfg)
        out["encoder"] = cfg["encoder"]
        out["ivf"] = {"threshold": opts.ivf_threshold, "nlist": opts.ivf_nlist}
    return out


def index_config_hash(cfg: dict[str, Any], split_fractions: dict[str, float] | None) -> str:
    return config_hash(index_config(cfg, split_fractions))


def index_dir(split: str, icfg_hash: str) -> str:
    return f"index/{split}/{icfg_hash}"


def segment_name(split: str, icfg_hash: str, segment_id: str) -> str:
    return f"index-{split}-{icfg_hash}-{segment_id}"


# ------------------------------------------------------------------------------------------- state


@dataclass
class IndexState:
    """The segments of one split's index and what they cover, from the completion records only."""

    split: str
    config_hash: str
    pages: dict[str, ShardEntry]  # every pages shard of the root
    segments: list[ShardEntry]  # every complete segment of this config, oldest first
    owner: dict[str, str]  # pages shard name -> the segment that owns its current version
    superseded: list[str]

    @property
    def live(self) -> list[ShardEntry]:
        """Segments that own at least one pages shard (the ones a search loads), oldest first."""
        owners = set(self.owner.values())
        return [s for s in self.segments if s.name in owners]

    @property
    def uncovered(self) -> list[str]:
        """Pages shards no segment covers in their current version (what the next build indexes)."""
        return sorted(set(self.pages) - set(self.owner))

    @property
    def generation(self) -> int:
        return max((int(s.extra.get("generation", 0)) for s in self.segments), default=0)

    def key(self) -> tuple[Any, ...]:
        """Identifies the loaded index: segments, what each owns, superseded sources."""
        owned = hash_id(*sorted(f"{n}>{s}" for n, s in self.owner.items()))
        return (
            self.config_hash,
            self.split,
            tuple((s.name, s.sha256) for s in self.live),
            owned,
            hash_id(*self.superseded),
        )


def _generation_key(entry: ShardEntry) -> tuple[int, str]:
    return int(entry.extra.get("generation", 0)), entry.name


def _owners(segments: list[ShardEntry], pages: dict[str, ShardEntry] | None) -> dict[str, str]:
    """Pages shard → the newest segment covering it (in its current version when ``pages`` is known)."""
    owner: dict[str, str] = {}
    for seg in segments:  # oldest first: the newest covering segment wins
        for name, sha in (seg.extra.get("covers") or {}).items():
            if pages is None or (name in pages and pages[name].sha256 == sha):
                owner[name] = seg.name
    return owner


def _is_segment(e: ShardEntry, icfg_hash: str, split: str) -> bool:
    return e.kind == INDEX_KIND and e.config_hash == icfg_hash and e.extra.get("split") == split


def index_state(manifest: Manifest, icfg_hash: str, split: str) -> IndexState:
    """What a build needs: segments and coverage against every pages shard's current version (one
    listing of all records, no shard read)."""
    entries = manifest.entries()
    pages = {n: e for n, e in entries.items() if e.kind == "pages"}
    segments = sorted((e for e in entries.values() if _is_segment(e, icfg_hash, split)), key=_generation_key)
    return IndexState(
        split, icfg_hash, pages, segments, _owners(segments, pages), sorted(manifest.superseded())
    )


def search_state(manifest: Manifest, icfg_hash: str, split: str) -> IndexState:
    """What a search needs, at a cost independent of the corpus: the segments found by listing the
    index's own folder (a few objects per segment) and their records; ownership by generation (a build
    re-indexes changed pages shards into a newer segment). ``pages`` is empty: see :func:`stale`."""
    prefix = index_dir(split, icfg_hash)
    ids = sorted(
        {
            rel[len(prefix) + 1 :].split("/", 1)[0].removeprefix("segment-")
            for rel in manifest.store.list(prefix, f"/{META_NAME}")
        }
    )
    found = (manifest.get(segment_name(split, icfg_hash, i)) for i in ids)
    segments = sorted(
        (e for e in found if e is not None and _is_segment(e, icfg_hash, split)), key=_generation_key
    )
    return IndexState(split, icfg_hash, {}, segments, _owners(segments, None), sorted(manifest.superseded()))


def stale(manifest: Manifest, state: IndexState, shards: list[str]) -> list[str]:
    """Which of ``shards`` (pages shard names, e.g. one group's) the index lacks in their current version
    (one record read per shard)."""
    by_name = {s.name: s for s in state.segments}
    out = []
    for name in shards:
        entry = manifest.get(name)
        if entry is None or entry.kind != "pages":
            continue
        owner = by_name.get(state.owner.get(name, ""))
        if owner is None or (owner.extra.get("covers") or {}).get(name) != entry.sha256:
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------- build


def _split_pages(
    manifest: Manifest,
    shards: list[ShardEntry],
    split: str,
    split_fractions: dict[str, float] | None,
    superseded: list[str],
    columns: list[str],
) -> Iterator[tuple[str, pa.Table]]:
    """(shard name, live rows of ``split``) per pages shard, text columns only (no images)."""
    split_of: dict[str, str] = {}
    for entry in shards:
        table = manifest.live_table(
            entry, list(dict.fromkeys([*columns, "source_id"])), superseded=superseded
        )
        sids = table.column("source_id").to_pylist()
        keep = [split_of.setdefault(s, assign_split(s, split_fractions)) == split for s in sids]
        yield entry.name, table.filter(pa.array(keep, type=pa.bool_())).select(columns)


def _meta_table(table: pa.Table, shard: str) -> pa.Table:
    n = table.num_rows
    return pa.table(
        {
            "page_id": table.column("page_id"),
            "source_page_id": table.column("source_page_id"),
            "source_id": table.column("source_id"),
            "lang": table.column("lang"),
            "kind": pa.array(["text"] * n, pa.string()),  # text columns only: PageView.kind of such rows
            "shard": pa.array([shard] * n, pa.string()),
        },
        schema=INDEX_META_SCHEMA,
    )


def _views(table: pa.Table) -> list[PageView]:
    cols = {c: table.column(c).to_pylist() for c in ("page_id", "source_page_id", "lang", "text")}
    return [
        PageView(pid, spid, lang, text or "")
        for pid, spid, lang, text in zip(
            cols["page_id"], cols["source_page_id"], cols["lang"], cols["text"], strict=True
        )
    ]


def build_bm25_files(
    docs: list[list[str]], langs: list[str], cfg: dict[str, Any], directory: Path
) -> tuple[list[str], Bm25Segment]:
    """The bm25 files of a segment from pre-tokenised pages (the step a benchmark can call directly)."""
    opts = normalise_negatives(cfg)["bm25"]
    seg = Bm25Segment.build(docs, langs, k1=float(opts["k1"]), b=float(opts["b"]))
    return seg.save(directory), seg


def build_dense_files(vectors: np.ndarray, cfg: dict[str, Any], directory: Path) -> list[str]:
    """The dense files of a segment: ``vectors.npy`` is written by the caller; adds an IVF index when
    the segment has more than ``ivf_threshold`` rows (trained on a seeded sample)."""
    import faiss

    opts = index_options(cfg)
    n, dim = vectors.shape
    if n <= opts.ivf_threshold:
        return []
    nlist = opts.ivf_nlist or int(4 * math.sqrt(n))
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
    ivf.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    for start in range(0, n, 65536):
        ivf.add(np.ascontiguousarray(vectors[start : start + 65536], dtype=np.float32))
    faiss.write_index(ivf, str(directory / IVF_NAME))
    return [IVF_NAME]


def _build_bm25(
    manifest: Manifest,
    state: IndexState,
    todo: list[ShardEntry],
    cfg: dict[str, Any],
    split_fractions: dict[str, float] | None,
    tmp: Path,
) -> tuple[pa.Table, list[str]]:
    metas: list[pa.Table] = []
    docs: list[list[str]] = []
    langs: list[str] = []
    for shard, table in _split_pages(
        manifest, todo, state.split, split_fractions, state.superseded, PAGE_COLUMNS
    ):
        metas.append(_meta_table(table, shard))
        docs += [tokenize(t or "") for t in table.column("text").to_pylist()]
        langs += table.column("lang").to_pylist()
    meta = pa.concat_tables(metas) if metas else INDEX_META_SCHEMA.empty_table()
    if meta.num_rows == 0:
        return meta, []
    files, _ = build_bm25_files(docs, langs, cfg, tmp)
    return meta, files


def _build_dense(
    manifest: Manifest,
    state: IndexState,
    todo: list[ShardEntry],
    cfg: dict[str, Any],
    split_fractions: dict[str, float] | None,
    tmp: Path,
    engines: EncoderTable | None = None,
) -> tuple[pa.Table, list[str]]:
    """Pages encoded one pages shard at a time into a memory-mapped ``vectors.npy`` (bounded memory)."""
    from tasks.negatives.miners import encoder_of

    counts = {
        shard: table.num_rows
        for shard, table in _split_pages(
            manifest, todo, state.split, split_fractions, state.superseded, ["page_id"]
        )
    }
    total = sum(counts.values())
    metas: list[pa.Table] = []
    if total == 0:
        return INDEX_META_SCHEMA.empty_table(), []
    encoder = encoder_of(cfg, engines)
    out: np.ndarray | None = None
    at = 0
    for shard, table in _split_pages(
        manifest, todo, state.split, split_fractions, state.superseded, PAGE_COLUMNS
    ):
        if table.num_rows == 0:
            continue
        vecs = np.asarray(encoder.encode_pages(_views(table)), dtype=np.float32)
        if out is None:
            out = np.lib.format.open_memmap(
                tmp / VECTORS_NAME, mode="w+", dtype=np.float32, shape=(total, vecs.shape[1])
            )
        out[at : at + len(vecs)] = vecs
        at += len(vecs)
        metas.append(_meta_table(table, shard))
    assert out is not None and at == total, (at, total)
    out.flush()
    files = [VECTORS_NAME, *build_dense_files(out, cfg, tmp)]
    del out
    return pa.concat_tables(metas), files


def publish_segment(
    store: Store, rel_dir: str, meta: pa.Table, directory: Path, files: list[str]
) -> tuple[dict[str, dict[str, Any]], str, int]:
    """Publish a segment's files, then its metadata table; ({file: sha256/bytes}, meta sha256, size)."""
    published: dict[str, dict[str, Any]] = {}
    for fname in sorted(files):
        src = directory / fname
        sha, size = store.write_with(
            f"{rel_dir}/{fname}", lambda tmp, src=src: shutil.copyfile(src, tmp), suffix=src.suffix
        )
        published[fname] = {"sha256": sha, "bytes": size}
    sha, size = write_table(store, f"{rel_dir}/{META_NAME}", meta)
    return published, sha, size


def build_split_index(
    root: Store | str | Path,
    profile: Any,
    split_fractions: dict[str, float] | None,
    split: str,
    engines: EncoderTable | None = None,
) -> ShardResult:
    """Index the pages of ``split`` that no segment of this index config covers yet, as one new segment.

    Reads the live pages (text columns) of the uncovered pages shards only, so a refresh costs what it
    adds; a rerun with nothing new is a records listing. Returns a skipped result when there is
    nothing to index (or the miner is ``in-batch``). ``engines``: the dense encoder's engine table, from
    the flow (``training.encoders.ENCODERS``) when tasks/ lacks the engine.
    """
    import time

    t0 = time.perf_counter()
    cfg = negatives_config(profile)
    miner = cfg["miner"]
    manifest = Manifest(root)
    if miner == "in-batch":
        return ShardResult(f"index-{split}", INDEX_KIND, "", "", 0, 0, True, {"miner": miner, "segments": 0})
    icfg = index_config_hash(cfg, split_fractions)
    state = index_state(manifest, icfg, split)
    live = state.live
    compact = bool(state.uncovered) and len(live) + 1 > index_options(cfg).max_segments
    todo_names = sorted(state.pages) if compact else state.uncovered
    if not todo_names:
        rows = sum(s.rows for s in live)
        stats = {"miner": miner, "segments": len(live)}
        return ShardResult(f"index-{split}", INDEX_KIND, "", index_dir(split, icfg), rows, 0, True, stats)
    covers = {n: state.pages[n].sha256 for n in todo_names}
    seg_id = hash_id(icfg, split, *[f"{n}:{sha}" for n, sha in sorted(covers.items())], n=16)
    meta_rel = f"{index_dir(split, icfg)}/segment-{seg_id}/{META_NAME}"
    if done := completed(manifest, segment_name(split, icfg, seg_id), icfg, INDEX_KIND, "", meta_rel):
        return done  # published by a concurrent or interrupted build of the same pages
    todo = [state.pages[n] for n in todo_names]
    with tempfile.TemporaryDirectory(prefix="m3dr-index-") as tmp:
        if miner == "bm25":
            meta, files = _build_bm25(manifest, state, todo, cfg, split_fractions, Path(tmp))
        else:
            meta, files = _build_dense(manifest, state, todo, cfg, split_fractions, Path(tmp), engines)
        entry = commit_segment(
            manifest,
            split=split,
            icfg_hash=icfg,
            miner=miner,
            covers=covers,
            meta=meta,
            directory=Path(tmp),
            files=files,
            generation=state.generation + 1,
            replaces=[s.name for s in live] if compact else [],
        )
    stats = {
        "miner": miner,
        "split": split,
        "segments": (1 if compact else len(live) + 1),
        "pages_shards": len(todo_names),
        "compacted": compact,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return ShardResult(entry.name, INDEX_KIND, "", entry.path, entry.rows, 0, False, stats)


def commit_segment(
    manifest: Manifest,
    *,
    split: str,
    icfg_hash: str,
    miner: str,
    covers: dict[str, str],
    meta: pa.Table,
    directory: Path,
    files: list[str],
    generation: int,
    replaces: list[str] | None = None,
) -> ShardEntry:
    """Publish a segment built in ``directory`` (its files, then ``meta.parquet``), then its record."""
    seg_id = hash_id(icfg_hash, split, *[f"{n}:{sha}" for n, sha in sorted(covers.items())], n=16)
    rel_dir = f"{index_dir(split, icfg_hash)}/segment-{seg_id}"
    published, sha, size = publish_segment(manifest.store, rel_dir, meta, directory, files)
    entry = ShardEntry(
        name=segment_name(split, icfg_hash, seg_id),
        kind=INDEX_KIND,
        lang="",
        path=f"{rel_dir}/{META_NAME}",
        rows=meta.num_rows,
        sha256=sha,
        config_hash=icfg_hash,
        inputs=sorted(covers),
        extra={
            "split": split,
            "miner": miner,
            "segment": seg_id,
            "dir": rel_dir,
            "generation": generation,
            "covers": dict(sorted(covers.items())),
            "files": published,
            "replaces": list(replaces or []),
        },
        bytes=size,
    )
    manifest.record(entry)
    return entry


# -------------------------------------------------------------------------------------------- load


@dataclass
class LoadedSegment:
    """One segment in memory: its metadata rows and its search structure (memory-mapped files)."""

    name: str
    meta: pa.Table
    bm25: Bm25Segment | None = None
    vectors: np.ndarray | None = None  # [n, d] float32 (memory-mapped)
    faiss: Any = None  # a FAISS index over ``vectors`` (flat, or IVF when saved)
    exact_faiss: bool = True  # False for IVF: its hits are approximate

    @property
    def n(self) -> int:
        return self.meta.num_rows


_LOCK = threading.RLock()
_SEGMENTS: OrderedDict[tuple[str, str, str], LoadedSegment] = OrderedDict()
_SPLITS: OrderedDict[tuple[Any, ...], SplitIndex] = OrderedDict()
_MAX_SPLITS = 4


def _local_dir(store: Store, entry: ShardEntry) -> Path:
    """The segment's files on local disk: the store itself when local, else a per-process cache copy."""
    rel_dir = entry.extra["dir"]
    if store.local:
        return store.local_path(rel_dir)
    cache = Path(tempfile.gettempdir()) / "m3dr-index-cache" / hash_id(store.url, n=12) / rel_dir
    files = {META_NAME: {"bytes": entry.bytes}, **(entry.extra.get("files") or {})}
    for fname, info in files.items():
        target = cache / fname
        if target.exists() and target.stat().st_size == int(info.get("bytes", -1)):
            continue
        atomic_write(
            target, lambda tmp, fname=fname: store.fs.get_file(store.path(f"{rel_dir}/{fname}"), tmp)
        )
    return cache


def load_segment(store: Store, entry: ShardEntry, nprobe: int = 16) -> LoadedSegment:
    """A segment from the store (cached per process by name and sha256; files memory-mapped)."""
    key = (store.url, entry.name, entry.sha256)
    with _LOCK:
        if key in _SEGMENTS:
            _SEGMENTS.move_to_end(key)
            return _SEGMENTS[key]
    directory = _local_dir(store, entry)
    import pyarrow.parquet as pq

    meta = pq.read_table(directory / META_NAME, schema=INDEX_META_SCHEMA)
    seg = LoadedSegment(entry.name, meta)
    files = set((entry.extra.get("files") or {}).keys())
    if entry.extra.get("miner") == "bm25" and "segment.json" in files:
        seg.bm25 = Bm25Segment.load(directory, mmap=True)
    elif entry.extra.get("miner") == "dense" and VECTORS_NAME in files:
        import faiss

        seg.vectors = np.load(directory / VECTORS_NAME, mmap_mode="r")
        if IVF_NAME in files:
            seg.faiss = faiss.read_index(str(directory / IVF_NAME))
            seg.faiss.nprobe = int(nprobe)
            seg.exact_faiss = False
        else:
            seg.faiss = faiss.IndexFlatIP(seg.vectors.shape[1])
            for start in range(0, seg.n, 65536):
                seg.faiss.add(np.ascontiguousarray(seg.vectors[start : start + 65536], dtype=np.float32))
    with _LOCK:
        _SEGMENTS[key] = seg
    return seg


@dataclass
class SplitIndex:
    """The live segments of one split's index, concatenated: global row = segment offset + row.

    ``alive`` is False for rows of pages shards a segment does not own and of superseded sources;
    dead rows are never positives, candidates or parallel pages.
    """

    miner: str
    segments: list[LoadedSegment]
    offsets: np.ndarray  # [segments + 1]
    page_ids: np.ndarray  # object array
    groups: np.ndarray  # int64 parallel-group code per row
    langs: np.ndarray  # object array
    kinds: np.ndarray  # object array
    alive: np.ndarray  # bool
    row_of: dict[str, int] = field(repr=False)  # alive rows only
    _group_code: dict[str, int] = field(repr=False)
    _group_order: np.ndarray = field(repr=False)  # alive rows sorted by group code, then row
    _group_starts: np.ndarray = field(repr=False)
    _mix_cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    all_alive: bool = True  # no dead row at all (searches skip the mask)

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_segments(
        cls, miner: str, segments: list[LoadedSegment], owned: list[set[str]], superseded: list[str]
    ) -> SplitIndex:
        """``owned[i]``: the pages shards segment i owns (its other rows are dead)."""
        sizes = [s.n for s in segments]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        meta = pa.concat_tables([s.meta for s in segments]) if segments else INDEX_META_SCHEMA.empty_table()
        alive = np.zeros(meta.num_rows, dtype=bool)
        for seg, own, lo in zip(segments, owned, offsets[:-1], strict=True):
            if seg.n:
                mask = pc.is_in(seg.meta.column("shard"), value_set=pa.array(sorted(own), pa.string()))
                alive[lo : lo + seg.n] = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
        if superseded and meta.num_rows:
            gone = pc.is_in(meta.column("source_id"), value_set=pa.array(superseded, pa.string()))
            alive &= ~np.asarray(gone.to_numpy(zero_copy_only=False), dtype=bool)
        page_ids = np.asarray(meta.column("page_id").to_numpy(zero_copy_only=False), dtype=object)
        enc = pc.dictionary_encode(meta.column("source_page_id")).combine_chunks()
        groups = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        group_code = {g: i for i, g in enumerate(enc.dictionary.to_pylist())}
        alive_rows = np.flatnonzero(alive)
        order = alive_rows[np.argsort(groups[alive_rows], kind="stable")]
        starts = np.searchsorted(groups[order], np.arange(len(group_code) + 1))
        row_of = dict(zip(page_ids[alive_rows].tolist(), alive_rows.tolist(), strict=True))
        return cls(
            miner=miner,
            segments=segments,
            offsets=offsets,
            page_ids=page_ids,
            groups=groups,
            langs=np.asarray(meta.column("lang").to_numpy(zero_copy_only=False), dtype=object),
            kinds=np.asarray(meta.column("kind").to_numpy(zero_copy_only=False), dtype=object),
            alive=alive,
            row_of=row_of,
            _group_code=group_code,
            _group_order=order,
            _group_starts=starts,
            all_alive=bool(alive.all()),
        )

    def segment_of(self, row: int) -> int:
        return int(np.searchsorted(self.offsets, row, side="right") - 1)

    def parallel(self, source_page_id: str) -> list[str]:
        """Sorted page_ids of the live pages of a parallel group (every language present in the index)."""
        g = self._group_code.get(source_page_id)
        if g is None:
            return []
        rows = self._group_order[self._group_starts[g] : self._group_starts[g + 1]]
        return sorted(self.page_ids[rows].tolist())

    def modalities(self, mix: ModalityMix | None) -> Modalities:
        """Modality codes of every row under ``mix`` (one code for all when None), cached per mix."""
        key = mix
        with _LOCK:
            if key in self._mix_cache:
                return self._mix_cache[key]
        keys: dict[str, int] = {}
        combos: dict[tuple[str, str], int] = {}
        for lang, kind in sorted(set(zip(self.langs.tolist(), self.kinds.tolist(), strict=True))):
            image = b"x" if kind == "image" else None
            label = "" if mix is None else mix.key(PageView("", "", lang, "", image))
            combos[(lang, kind)] = keys.setdefault(label, len(keys))
        code_langs: list[set[str]] = [set() for _ in keys]
        for (lang, _), code in combos.items():
            code_langs[code].add(lang)
        codes = np.fromiter(
            (combos[c] for c in zip(self.langs.tolist(), self.kinds.tolist(), strict=True)),
            dtype=np.int64,
            count=self.n,
        )
        alive_rows = np.flatnonzero(self.alive)
        rows_by_code = [alive_rows[codes[alive_rows] == c] for c in range(len(keys))]
        mod = Modalities(codes, code_langs, rows_by_code)
        with _LOCK:
            self._mix_cache[key] = mod
        return mod


@dataclass(frozen=True)
class Modalities:
    """Modality codes per row, the languages of each code, and the alive rows of each code (ascending)."""

    codes: np.ndarray
    code_langs: list[set[str]]
    rows_by_code: list[np.ndarray]


def load_split_index(store: Store, state: IndexState, cfg: dict[str, Any]) -> SplitIndex:
    """The split's live segments, loaded once per process (cached by segments, ownership, superseded)."""
    key = (store.url, *state.key())
    with _LOCK:
        if key in _SPLITS:
            _SPLITS.move_to_end(key)
            return _SPLITS[key]
    nprobe = index_options(cfg).nprobe
    live = state.live
    segments = [load_segment(store, e, nprobe) for e in live]
    owned = [{n for n, s in state.owner.items() if s == e.name} for e in live]
    index = SplitIndex.from_segments(cfg["miner"], segments, owned, state.superseded)
    with _LOCK:
        _SPLITS[key] = index
        while len(_SPLITS) > _MAX_SPLITS:
            _SPLITS.popitem(last=False)
        used = {(store.url, s.name) for idx in _SPLITS.values() for s in idx.segments}
        for k in [k for k in _SEGMENTS if (k[0], k[1]) not in used]:
            del _SEGMENTS[k]
    return index


def split_index(
    root: Store | str | Path,
    profile: Any,
    split_fractions: dict[str, float] | None,
    split: str,
    *,
    shards: list[str] | None = None,
    engines: EncoderTable | None = None,
) -> SplitIndex:
    """The loaded index of ``split`` (segments found without listing the corpus's records).

    ``shards``: pages shards the caller needs indexed (a train shard's own group); when the index lacks
    one of them (or has no segment at all), :func:`build_split_index` runs first (normally the
    ``mining-index`` task did that already, and this costs one record read per shard).
    """
    manifest = Manifest(root)
    cfg = negatives_config(profile)
    icfg = index_config_hash(cfg, split_fractions)
    state = search_state(manifest, icfg, split)
    if not state.segments or (shards and stale(manifest, state, shards)):
        build_split_index(manifest.store, profile, split_fractions, split, engines)
        state = search_state(manifest, icfg, split)
    return load_split_index(manifest.store, state, cfg)


def clear_cache() -> None:
    """Forget every loaded index of this process (tests; memory)."""
    with _LOCK:
        _SPLITS.clear()
        _SEGMENTS.clear()
