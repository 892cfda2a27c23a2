"""Score an encoder on benchmark sets: dense (Matryoshka sweep), multi-vector MaxSim, optional rerank.

For one :class:`~eval.beir.Benchmark` and one :class:`~tasks.encoders.Encoder`:

* the corpus is encoded once at full width (streamed in batches; cached on disk keyed by the encoder's
  fingerprint and the corpus fingerprint, and in memory per page, so a mono set whose pages are part
  of the cross set costs nothing more); Matryoshka dims are prefixes of those vectors, re-normalised;
* **dense** retrievers ``dense@<dim>`` search exactly (:func:`eval.retrieval.dense_topk`, fp32 or fp16)
  or through FAISS; the **multi-vector** retriever ``multivector`` (encoders with
  ``encode_pages_multi``) searches with exact MaxSim (:func:`eval.retrieval.maxsim_topk`); both keep a
  running top-``depth`` per query, never the ``[queries × pages]`` score matrix;
* an optional reranker (:mod:`eval.rerank`) re-scores the top candidates of the widest dense (or the
  multi-vector) run as ``<retriever>+rerank``;
* metrics (:mod:`eval.metrics`, equal to trec_eval) per set, and per query language inside a set;
  latency (query encoding and search, ms per query; corpus encoding, ms per page) and storage per
  document (bytes at fp32 and fp16) per retriever; TREC run files for external tools.

:func:`summarise` turns the per-set results into the paper's view: the cross-lingual set alone and
the macro mean over the monolingual sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from eval.beir import Benchmark
from eval.build import SetInfo
from eval.metrics import evaluate_per_query, mean_metrics, mean_over
from eval.retrieval import (
    EmbeddingCache,
    FaissIndex,
    dense_topk,
    maxsim_topk,
    pack_multivectors,
    topk_to_run,
    unpack_multivectors,
)
from tasks.encoders import Encoder, PageView, build_encoder, l2_normalise
from tasks.stage import ENGINES
from tasks.storage import atomic_write
from training.encoders import ENCODERS

log = logging.getLogger(__name__)

MULTI = "multivector"
TEXT_VIEW_PREFIX = "text:"  # runs of the text view: text query → page text (``text:dense@64``)
RERANK_SUFFIX = "+rerank"
Run = dict[str, dict[str, float]]


@dataclass
class EvalSettings:
    """How sets are scored (the flow's parameters map onto this)."""

    ks: tuple[int, ...] = (1, 5, 10)
    depth: int = 100  # docs per query kept in runs and TREC files
    dims: tuple[int, ...] | None = None  # Matryoshka dims; None: the encoder's trained dims (or full)
    dtype: Literal["float32", "float16"] = "float32"
    search: Literal["exact", "faiss-flat", "faiss-hnsw"] = "exact"
    multivector: bool | None = None  # None: when the encoder has a multi-vector head
    dense: bool = True
    text_view: bool | None = None  # None: when the encoder reads text-only documents (VLM retrievers)
    # pages per encoder call while streaming the corpus; None: 32 on CPU, 512 on CUDA, where each call's
    # DataLoader workers (training.inference) need enough batches to decode ahead of the GPU
    batch_size: int | None = None
    device: str = "auto"  # where search runs: auto = cuda when available, else cpu
    maxsim_doc_chunk: int = 64
    maxsim_query_chunk: int = 16

    def __post_init__(self) -> None:
        if self.depth < max(self.ks):
            raise ValueError(f"depth {self.depth} must be >= the largest k {max(self.ks)}")
        if self.dims is not None and (not self.dims or min(self.dims) < 1):
            raise ValueError(f"dims must be positive, got {self.dims}")


@dataclass
class RetrieverResult:
    """One retriever on one set."""

    metrics: dict[str, float]
    per_language: dict[str, dict[str, float]]  # query language → metrics (cross sets)
    query_ms: float  # query encoding, per query
    search_ms: float  # search (+ rerank), per query
    bytes_per_doc: dict[str, float]  # {"fp32": …, "fp16": …}
    run_file: str = ""
    rerank: dict[str, float] = field(default_factory=dict)  # reranker counters (requests, failures, …)


@dataclass
class SetResult:
    """Every retriever on one set (or the error that kept the set from being scored)."""

    name: str
    kind: str  # cross | mono
    language: str | None
    suite: str = ""
    queries: int = 0
    corpus: int = 0
    corpus_ms_per_page: float = 0.0  # 0 when the corpus came from the embedding cache
    cached: bool = False
    retrievers: dict[str, RetrieverResult] = field(default_factory=dict)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SetResult:
        d = dict(data)
        d["retrievers"] = {k: RetrieverResult(**v) for k, v in d.get("retrievers", {}).items()}
        return cls(**d)


# ----------------------------------------------------------------------------------------------------
# helpers


def encoder_fingerprint(encoder: Any) -> str:
    """The cache key of an encoder's vectors: its ``fingerprint`` (content hash) or its ``model_id``."""
    return str(getattr(encoder, "fingerprint", None) or encoder.model_id)


def has_multivector(encoder: Any) -> bool:
    return bool(getattr(encoder, "multivector", False)) and hasattr(encoder, "encode_pages_multi")


def classify(info: SetInfo, bench: Benchmark) -> SetInfo:
    """A set given as a bare directory/hub id is ``mono`` when every query and page shares one language."""
    if info.kind in ("mono", "composed") or info.language is not None:
        return info
    if bench.query_images is not None and any(bench.query_images):
        return replace(info, kind="composed")
    qlangs = set(bench.query_languages or [None])
    clangs = set(bench.corpus_languages or [None]) - {None}
    if len(qlangs) == 1 and None not in qlangs and clangs <= qlangs:
        return replace(info, kind="mono", language=next(iter(qlangs)))
    return info


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka prefix of unit vectors, re-normalised (what a truncated encoder answers)."""
    if dim > vectors.shape[1]:
        raise ValueError(f"dim {dim} > encoder width {vectors.shape[1]}")
    return l2_normalise(vectors[:, :dim])


def write_trec(run: Mapping[str, Mapping[str, float]], path: Path, tag: str) -> Path:
    """A TREC run file (``qid Q0 docid rank score tag``), rows in trec_eval's order, written atomically."""
    from eval.metrics import rank_docs

    lines = []
    for qid in sorted(run):
        for rank, doc in enumerate(rank_docs(run[qid]), start=1):
            lines.append(f"{qid} Q0 {doc} {rank} {run[qid][doc]:.6f} {tag}\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"))
    return path


def _per_language(
    per_query: Mapping[str, Mapping[str, float]], lang_of: Mapping[str, str | None]
) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, Mapping[str, float]]] = {}
    for q, m in per_query.items():
        lang = lang_of.get(q)
        if lang:
            groups.setdefault(lang, {})[q] = m
    return {lang: mean_metrics(g) for lang, g in sorted(groups.items())}


# ----------------------------------------------------------------------------------------------------
# the runner


class BenchmarkRunner:
    """Scores one encoder (and optional reranker) on any number of sets, reusing corpus vectors."""

    def __init__(
        self,
        encoder: Encoder,
        settings: EvalSettings | None = None,
        *,
        cache: EmbeddingCache | None = None,
        reranker: Any | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.settings = settings or EvalSettings()
        self.cache = cache
        self.reranker = reranker
        self.model_fp = encoder_fingerprint(encoder)
        self.multivector = (
            has_multivector(encoder) if self.settings.multivector is None else self.settings.multivector
        )
        if self.multivector and not has_multivector(encoder):
            raise ValueError(f"{encoder.model_id} has no multi-vector head (multivector=True was asked for)")
        # an encoder may be multi-vector only (colpali-engine's Col* models say ``dense = False``)
        self.dense = self.settings.dense and bool(getattr(encoder, "dense", True))
        if not self.dense and not self.multivector:
            raise ValueError("nothing to evaluate: dense is off and the encoder has no multi-vector head")
        self._dense_memo: dict[str, np.ndarray] = {}
        self._multi_memo: dict[str, torch.Tensor] = {}
        self._progress = progress or (lambda msg: log.info(msg))
        self._page_index: tuple[Benchmark | None, dict[str, int]] = (None, {})
        # multi-vector pages dominate memory (tokens × dim each): keep them at the index precision
        self._store_dtype = torch.float16 if self.settings.dtype == "float16" else torch.float32
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if self.settings.device == "auto" else self.settings.device)
        self.pages_per_call = self.settings.batch_size or (512 if self.device.type == "cuda" else 32)

    # -- corpus -------------------------------------------------------------------------------------
    def _page_keys(self, bench: Benchmark, as_text: bool = False) -> list[str]:
        texts = bench.corpus_texts or [""] * len(bench.corpus_ids)
        keys = []
        mark = b"\0text-view" if as_text else b""
        for ids, imgs in bench.iter_images(self.pages_per_call):
            for c, b in zip(ids, imgs, strict=True):
                i = len(keys)
                text = (texts[i] or "").encode()  # hub corpora may carry null texts
                h = hashlib.sha256(c.encode() + b"\0" + hashlib.sha256(b).digest() + text + mark)
                keys.append(h.hexdigest()[:32])
        return keys

    def _views(
        self, bench: Benchmark, ids: list[str], imgs: list[bytes], start: int, as_text: bool = False
    ) -> list[PageView]:
        langs = bench.corpus_languages or [None] * len(bench.corpus_ids)
        texts = bench.corpus_texts or [""] * len(bench.corpus_ids)
        return [
            PageView(c, c, langs[start + i] or "", texts[start + i] or "", None if as_text else b)
            for i, (c, b) in enumerate(zip(ids, imgs, strict=True))
        ]

    def encode_corpus(
        self, bench: Benchmark, progress: Callable[[str], None] | None = None, *, as_text: bool = False
    ) -> tuple[np.ndarray | None, list[torch.Tensor] | None, float, bool]:
        """``(dense [n, D] | None, multi [l_i, d] list | None, ms per encoded page, from disk cache)``;
        ``as_text``: every page as its text only (the text view; cached under its own keys)."""
        keys = self._page_keys(bench, as_text)
        dataset_fp = hashlib.sha256("".join(keys).encode()).hexdigest()[:20]
        want_dense, want_multi = self.dense, self.multivector
        dense = multi = None
        if self.cache is not None:
            if want_dense and (hit := self.cache.get(self.model_fp, dataset_fp, "dense")) is not None:
                dense = hit["vectors"].numpy()
            if want_multi and (hit := self.cache.get(self.model_fp, dataset_fp, MULTI)) is not None:
                multi = unpack_multivectors(hit)
        if (dense is not None or not want_dense) and (multi is not None or not want_multi):
            for i, k in enumerate(keys):
                if dense is not None:
                    self._dense_memo.setdefault(k, dense[i])
                if multi is not None:
                    self._multi_memo.setdefault(k, multi[i])
            return dense, multi, 0.0, True
        need_dense = want_dense and dense is None
        need_multi = want_multi and multi is None
        encoded, seconds, start = 0, 0.0, 0
        for ids, imgs in bench.iter_images(self.pages_per_call):
            batch_keys = keys[start : start + len(ids)]
            todo = [
                i
                for i, k in enumerate(batch_keys)
                if (need_dense and k not in self._dense_memo) or (need_multi and k not in self._multi_memo)
            ]
            if todo:
                views = self._views(bench, ids, imgs, start, as_text)
                sel = [views[i] for i in todo]
                t0 = time.perf_counter()
                vecs, emb, mask = self._encode_pages(sel, need_dense, need_multi)
                for j, i in enumerate(todo):
                    if vecs is not None:
                        self._dense_memo[batch_keys[i]] = vecs[j]
                    if emb is not None and mask is not None:  # kept at the index precision
                        self._multi_memo[batch_keys[i]] = emb[j][mask[j]].to(self._store_dtype).clone()
                seconds += time.perf_counter() - t0
                encoded += len(todo)
            start += len(ids)
            (progress or self._progress)(f"{bench.name}: corpus {start}/{len(keys)} pages encoded")
        if need_dense:
            dense = np.stack([self._dense_memo[k] for k in keys]).astype(np.float32)
            if self.cache is not None:
                self.cache.put(self.model_fp, dataset_fp, "dense", {"vectors": torch.from_numpy(dense)})
        if need_multi:
            multi = [self._multi_memo[k] for k in keys]
            if self.cache is not None:
                self.cache.put(self.model_fp, dataset_fp, MULTI, pack_multivectors(multi))
        return dense, multi, 1000.0 * seconds / max(1, encoded), encoded == 0

    def _encode_pages(
        self, pages: list[PageView], dense: bool, multi: bool
    ) -> tuple[np.ndarray | None, torch.Tensor | None, torch.Tensor | None]:
        enc: Any = self.encoder
        if dense and multi and hasattr(enc, "encode_pages_both"):
            return enc.encode_pages_both(pages)
        vecs = enc.encode_pages(pages) if dense else None
        emb, mask = enc.encode_pages_multi(pages) if multi else (None, None)
        return vecs, emb, mask

    def _encode_queries(
        self,
        texts: list[str],
        langs: list[str],
        dense: bool,
        multi: bool,
        *,
        task: str = "text-page",
        images: list[bytes | None] | None = None,
    ) -> tuple[np.ndarray | None, torch.Tensor | None, torch.Tensor | None]:
        """Query vectors; encoders that take them (``multimodal_queries``) get the task (its instruction)
        and composed queries' images, others encode the query text alone."""
        enc: Any = self.encoder
        kw: dict[str, Any] = {}
        if getattr(enc, "multimodal_queries", False):
            kw = {"task": task, "images": images}
        elif images is not None:
            log.warning("%s encodes text only: composed queries are scored by their text", enc.model_id)
        if dense and multi and hasattr(enc, "encode_queries_both"):
            return enc.encode_queries_both(texts, **kw)
        vecs = enc.encode_queries(texts, langs, **kw) if dense else None
        emb, mask = enc.encode_queries_multi(texts, **kw) if multi else (None, None)
        return vecs, emb, mask

    # -- one set ------------------------------------------------------------------------------------
    def dims_for(self, width: int) -> list[int]:
        dims = self.settings.dims or tuple(getattr(self.encoder, "matryoshka_dims", None) or ())
        out = sorted({d for d in dims if d <= width} | {width})
        skipped = sorted(d for d in dims if d > width)
        if skipped:
            log.warning("Matryoshka dims %s exceed the encoder width %d and are skipped", skipped, width)
        return out

    def _dense_search(self, q: np.ndarray, d: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        if s.search == "exact":
            dtype = torch.float16 if s.dtype == "float16" else torch.float32
            return dense_topk(q, d, k, dtype=dtype, device=self.device)
        index = FaissIndex(d.shape[1], "flat" if s.search == "faiss-flat" else "hnsw")
        index.add(d)
        return index.search(q, k)

    def _multi_search(
        self, qe: torch.Tensor, qm: torch.Tensor | None, multi: list[torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact MaxSim top-``k`` (a running top-k per query: never the ``[queries × pages]`` matrix)."""
        s = self.settings
        return maxsim_topk(
            qe,
            qm,
            multi,
            None,
            k,
            doc_chunk=s.maxsim_doc_chunk,
            query_chunk=s.maxsim_query_chunk,
            # fp16-stored chunks are upcast on CPU, where fp16 GEMMs are ~3× slower than fp32
            dtype=self._store_dtype if self.device.type == "cuda" else torch.float32,
            device=self.device,
        )

    def _text_view(self, info: SetInfo, bench: Benchmark) -> bool:
        """Whether to score the text view: asked for (or, by default, an encoder that reads text-only
        documents, e.g. the VLM retriever), on a text-query set whose corpus has page text."""
        want = self.settings.text_view
        able = bool(getattr(self.encoder, "text_documents", False))
        if want is None:
            want = able
        if want and not able:
            raise ValueError(f"{self.encoder.model_id} cannot encode text-only documents (text_view=True)")
        return bool(want) and info.kind != "composed" and any(bench.corpus_texts or [])

    def _score_view(
        self,
        bench: Benchmark,
        dense: np.ndarray | None,
        multi: list[torch.Tensor] | None,
        qlangs: list[str],
        depth: int,
        runs: dict[str, Run],
        timing: dict[str, tuple[float, float, dict[str, float]]],
        *,
        task: str,
        images: list[bytes | None] | None = None,
    ) -> None:
        """Encode the queries (with ``task``'s instruction, composed queries with their images) and add
        the dense (Matryoshka sweep) and multi-vector runs over one corpus encoding to ``runs``; runs of
        the text view are named ``text:<retriever>``."""
        qids = bench.query_ids
        n = max(1, len(qids))
        prefix = TEXT_VIEW_PREFIX if task == "text-text" else ""
        t0 = time.perf_counter()
        q_full, qe, qm = self._encode_queries(
            list(bench.query_texts), qlangs, dense is not None, multi is not None, task=task, images=images
        )
        q_ms = 1000.0 * (time.perf_counter() - t0) / n  # one pass serves both retrievers
        if dense is not None and q_full is not None:
            for dim in self.dims_for(dense.shape[1]):
                docs, qs = truncate(dense, dim), truncate(q_full, dim)
                t0 = time.perf_counter()
                scores, idx = self._dense_search(qs, docs, depth)
                search_ms = 1000.0 * (time.perf_counter() - t0) / n
                name = f"{prefix}dense@{dim}"
                runs[name] = topk_to_run(qids, bench.corpus_ids, scores, idx)
                timing[name] = (q_ms, search_ms, {"fp32": 4.0 * dim, "fp16": 2.0 * dim})
        if multi is not None and qe is not None:
            t0 = time.perf_counter()
            scores, idx = self._multi_search(qe, qm, multi, depth)
            search_ms = 1000.0 * (time.perf_counter() - t0) / n
            runs[prefix + MULTI] = topk_to_run(qids, bench.corpus_ids, scores, idx)
            tokens = float(np.mean([t.shape[0] for t in multi])) if multi else 0.0
            width = multi[0].shape[1] if multi else 0
            timing[prefix + MULTI] = (
                q_ms, search_ms, {"fp32": 4.0 * tokens * width, "fp16": 2.0 * tokens * width}
            )  # fmt: skip

    def evaluate_set(
        self,
        info: SetInfo,
        bench: Benchmark,
        out_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> SetResult:
        """All retrievers on one set; run files under ``out_dir/runs/<suite>/<set>/`` when ``out_dir`` is
        given; ``progress`` receives one line per encoded corpus batch (default: this module's log)."""
        s = self.settings
        bench.validate()
        info = classify(info, bench)
        result = SetResult(
            info.name, info.kind, info.language, info.suite, len(bench.query_ids), len(bench.corpus_ids)
        )
        dense, multi, ms_page, cached = self.encode_corpus(bench, progress)
        result.corpus_ms_per_page, result.cached = ms_page, cached
        qids = bench.query_ids
        qlangs = [x or "" for x in (bench.query_languages or [None] * len(qids))]
        lang_of = dict(zip(qids, qlangs, strict=True))
        qrels = bench.qrels
        depth = min(s.depth, len(bench.corpus_ids))
        runs: dict[str, Run] = {}
        timing: dict[str, tuple[float, float, dict[str, float]]] = {}
        task = "composed-page" if info.kind == "composed" else "text-page"
        images = bench.query_images if info.kind == "composed" else None
        self._score_view(bench, dense, multi, qlangs, depth, runs, timing, task=task, images=images)
        if self._text_view(info, bench):  # text query → page text, beside the page-image view
            tdense, tmulti, _, _ = self.encode_corpus(bench, progress, as_text=True)
            self._score_view(bench, tdense, tmulti, qlangs, depth, runs, timing, task="text-text")
        n = max(1, len(qids))

        stats: dict[str, float] = {}
        if self.reranker is not None and runs:
            base = max(
                (r for r in runs if r.startswith("dense@")), key=lambda r: int(r.split("@")[1]), default=MULTI
            )
            t0 = time.perf_counter()
            reranked = self.reranker.rerank(bench.queries, runs[base], lambda cid: self._page(bench, cid))
            q_ms, search_ms, storage = timing[base]
            runs[base + RERANK_SUFFIX] = reranked.run
            stats = {k: v for k, v in asdict(reranked.stats).items() if isinstance(v, int | float)}
            rerank_ms = 1000.0 * (time.perf_counter() - t0) / n
            timing[base + RERANK_SUFFIX] = (q_ms, search_ms + rerank_ms, storage)

        for name, run in runs.items():
            per_query = evaluate_per_query(qrels, run, s.ks)
            q_ms, search_ms, storage = timing[name]
            run_file = ""
            if out_dir is not None:
                file = name.replace(":", "-")  # text:dense@64 → text-dense@64.trec
                where = Path(out_dir) / "runs" / (info.suite or "_") / info.name / f"{file}.trec"
                path = write_trec(run, where, f"m3dr-{name}")
                run_file = str(path.relative_to(out_dir))
            result.retrievers[name] = RetrieverResult(
                metrics=mean_metrics(per_query) if per_query else {},
                per_language=_per_language(per_query, lang_of) if info.kind != "mono" else {},
                query_ms=q_ms,
                search_ms=search_ms,
                bytes_per_doc=storage,
                run_file=run_file,
                rerank=stats if name.endswith(RERANK_SUFFIX) else {},
            )
        return result

    def _page(self, bench: Benchmark, corpus_id: str) -> PageView:
        """One corpus page for the reranker (image read from disk now)."""
        if self._page_index[0] is not bench:
            self._page_index = (bench, {c: i for i, c in enumerate(bench.corpus_ids)})
        i = self._page_index[1][corpus_id]
        lang = bench.corpus_languages[i] if bench.corpus_languages else None
        text = bench.corpus_texts[i] if bench.corpus_texts else None
        return PageView(corpus_id, corpus_id, lang or "", text or "", bench.image(corpus_id))


# ----------------------------------------------------------------------------------------------------
# aggregation


def summarise(results: Iterable[SetResult]) -> dict[str, dict[str, Any]]:
    """``{suite: {retriever: entry}}`` (see :func:`summarise_suite`); suites in order of appearance.
    Suites are never averaged together: our held-out sets and the published Nayana-IR sets differ."""
    groups: dict[str, list[SetResult]] = {}
    for r in results:
        if not r.error:
            groups.setdefault(r.suite, []).append(r)
    return {suite: summarise_suite(rs) for suite, rs in groups.items()}


def summarise_suite(results: Sequence[SetResult]) -> dict[str, Any]:
    """The paper's view per retriever: the cross-lingual set alone, the macro mean over the monolingual
    sets, each mono set's value (per-language bars) and the cross set per query language."""
    results = [r for r in results if not r.error]
    names = sorted({n for r in results for n in r.retrievers}, key=_retriever_order)
    out: dict[str, Any] = {}
    for name in names:
        cross = [r for r in results if r.kind == "cross" and name in r.retrievers]
        mono = {
            r.language or r.name: r.retrievers[name].metrics
            for r in results
            if r.kind == "mono" and name in r.retrievers
        }
        mono = {k: v for k, v in mono.items() if v}
        composed = [r for r in results if r.kind == "composed" and name in r.retrievers]
        entry: dict[str, Any] = {
            "cross": cross[0].retrievers[name].metrics if cross else None,
            "composed": composed[0].retrievers[name].metrics if composed else None,
            "cross_per_language": cross[0].retrievers[name].per_language if cross else {},
            "mono_mean": mean_over(mono, strict=False) if mono else None,
            "mono": mono,
            "mono_sets": len(mono),
        }
        any_r = next(r.retrievers[name] for r in results if name in r.retrievers)
        entry["bytes_per_doc"] = any_r.bytes_per_doc
        timed = [r.retrievers[name] for r in results if name in r.retrievers]
        weights = [r.queries for r in results if name in r.retrievers]
        total = max(1, sum(weights))
        entry["query_ms"] = math.fsum(t.query_ms * w for t, w in zip(timed, weights, strict=True)) / total
        entry["search_ms"] = math.fsum(t.search_ms * w for t, w in zip(timed, weights, strict=True)) / total
        out[name] = entry
    return out


def _retriever_order(name: str) -> tuple[int, int, str]:
    """Image view before text view; dense by width, then the multi-vector run."""
    view = 2 if name.startswith(TEXT_VIEW_PREFIX) else 0
    bare = name.removeprefix(TEXT_VIEW_PREFIX)
    if bare.startswith("dense@"):
        base = bare.split("@", 1)[1].split("+", 1)[0]
        return (view, int(base), name)
    return (view + 1, 0, name)


def save_results(path: Path, payload: Mapping[str, Any]) -> Path:
    """JSON results, written atomically."""
    data = json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(data, encoding="utf-8"))
    return Path(path)


REPORT_METRICS: tuple[str, ...] = ("ndcg@5", "recall@10", "map@10", "mrr@10")


def result_rows(
    summaries: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = REPORT_METRICS
) -> list[dict[str, Any]]:
    """Flat table rows (one per suite and retriever) for a Prefect table artifact and the report."""
    rows = []
    for suite, summary in summaries.items():
        for name, e in summary.items():
            rows.append({"suite": suite, **_row(name, e, metrics)})
    return rows


def _row(name: str, e: Mapping[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"retriever": name}
    for m in metrics:
        row[f"cross {m}"] = None if e["cross"] is None else round(e["cross"].get(m, float("nan")), 4)
        row[f"mono-mean {m}"] = (
            None if e["mono_mean"] is None else round(e["mono_mean"].get(m, float("nan")), 4)
        )
        composed = e.get("composed")
        row[f"composed {m}"] = None if composed is None else round(composed.get(m, float("nan")), 4)
    row["mono sets"] = e["mono_sets"]
    row["bytes/doc fp16"] = round(e["bytes_per_doc"].get("fp16", 0.0), 1)
    row["bytes/doc fp32"] = round(e["bytes_per_doc"].get("fp32", 0.0), 1)
    row["query ms"] = round(e["query_ms"], 2)
    row["search ms"] = round(e["search_ms"], 3)
    return row


def _cached_runner(key: str) -> BenchmarkRunner:
    """One runner per process and spec; the set tasks of a run (threads) asking at once load it once."""
    return ENGINES.get(("benchmark-runner", key), lambda: _new_runner(key))


def _new_runner(key: str) -> BenchmarkRunner:
    spec = json.loads(key)
    from eval.rerank import build_reranker

    return BenchmarkRunner(
        build_encoder(spec["encoder"], ENCODERS),
        EvalSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["settings"].items()}),
        cache=EmbeddingCache(Path(spec["out"]).resolve() / "cache"),
        reranker=build_reranker(spec["rerank"]) if spec["rerank"] is not None else None,
    )


def runner_for(
    encoder: Mapping[str, Any], settings: EvalSettings, out: str | Path, rerank: Mapping[str, Any] | None
) -> BenchmarkRunner:
    """One loaded encoder (+ reranker) per process and parameters, shared by the set tasks of a run;
    corpus vectors are cached on disk under ``out/cache``."""
    spec = {"encoder": dict(encoder), "settings": asdict(settings), "out": str(out), "rerank": rerank}
    return _cached_runner(json.dumps(spec, sort_keys=True, default=list))


def evaluate_location(
    runner: BenchmarkRunner,
    info: SetInfo,
    location: str,
    out: Path,
    *,
    progress: Callable[[str], None] | None = None,
) -> SetResult:
    """Load one set and score it; a set that cannot be read becomes an error result (never raises)."""
    from eval.beir import BenchmarkError, load_benchmark
    from tasks.faults import reject_or_raise

    try:
        bench = load_benchmark(location)
        bench.name = info.name
        bench.validate()
    except (BenchmarkError, OSError, ValueError) as exc:  # a broken set, not a broken store or network
        reject_or_raise(exc)
        if progress is not None:
            progress(f"set {info.name} ({location}) is rejected: {exc}")
        return SetResult(info.name, info.kind, info.language, info.suite, error=str(exc))
    return runner.evaluate_set(info, bench, Path(out), progress=progress)
