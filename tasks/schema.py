"""Every Parquet schema of m3dr: the only module that names columns.

Images use the Hugging Face ``datasets`` Image layout (``struct<bytes: binary, path: string>``, PNG
bytes) so ``datasets.load_dataset("parquet", ...)`` shows PIL images with no conversion. Schema
metadata carries a ``huggingface`` feature description for the same reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1"

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# Our own layout label vocabulary; every layout backend maps its classes into it.
LABELS: tuple[str, ...] = (
    "title",
    "text",
    "list",
    "caption",
    "header",
    "footer",
    "reference",
    "figure",
    "table",
    "formula",
    "abandon",
)
# Text-like regions get translated and re-rendered; the rest stay as pixels.
TRANSLATABLE_LABELS: frozenset[str] = frozenset(
    {"title", "text", "list", "caption", "header", "footer", "reference"}
)

REGION_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("bbox", pa.list_(pa.float32(), 4)),  # x0, y0, x1, y1 in page-image pixels
        ("score", pa.float32()),
        ("text", pa.string()),  # English source text (en pages) or translated text (other langs)
        ("translatable", pa.bool_()),
        ("rendered", pa.bool_()),  # False when the region kept its original pixels
    ]
)

PAGES_SCHEMA = pa.schema(
    [
        ("page_id", pa.string()),  # content hash; translations: hash(en page_id, lang, render config)
        ("source_page_id", pa.string()),  # the English original's page_id (itself for en)
        ("source_id", pa.string()),  # hash of the source file bytes
        ("source_uri", pa.string()),  # where the source came from (relative path or URI)
        ("page_index", pa.int32()),  # 0-based page number inside the source
        ("lang", pa.string()),  # ISO 639-1 code from tasks.languages
        ("image", IMAGE_TYPE),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("regions", pa.list_(REGION_TYPE)),
        ("text", pa.string()),  # region texts in reading order, joined by blank lines
        ("text_source", pa.string()),  # pdf | ocr | translation
        ("layout_model", pa.string()),
        ("translation_model", pa.string()),  # empty for en
        ("config_hash", pa.string()),
        ("pdf", pa.binary()),  # optional one-page PDF with a shaped text layer (--formats pdf)
    ],
    metadata={
        "m3dr.schema": "pages",
        "m3dr.schema_version": SCHEMA_VERSION,
        "huggingface": json.dumps(
            {"info": {"features": {"image": {"_type": "Image"}}}}, separators=(",", ":")
        ),
    },
)

REJECTS_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),  # ingest | translate | render | config | queries | negatives
        ("input_ref", pa.string()),  # source path, page_id or language code the reject is about
        ("lang", pa.string()),
        ("reason", pa.string()),  # a stable reason code (see RejectReason)
        ("message", pa.string()),  # human readable detail
    ],
    metadata={"m3dr.schema": "rejects", "m3dr.schema_version": SCHEMA_VERSION},
)


QUERY_KINDS: tuple[str, ...] = ("factual", "keyword", "paraphrase", "phrase", "summary", "composed")
# A composed query (MM-Embed's text + image query) is an image crop of one page region kept as pixels
# (a figure, table or formula) with a question about it; its positive is the page (every language of
# the parallel group). Its crop rides in the queries / train shards' ``image`` / ``query_image`` column.
COMPOSED_KIND = "composed"
COMPOSED_LABELS: tuple[str, ...] = ("figure", "table", "formula")
# Retrieval tasks, each with its own query instruction (training.config.PromptSettings.instructions):
# a text query against page images, a composed (image + text) query against pages, a text query
# against page text (continual text fine-tuning and the benchmark's text view).
TASKS: tuple[str, ...] = ("text-page", "composed-page", "text-text")


def task_of_kind(kind: str) -> str:
    """The retrieval task a query of ``kind`` belongs to when its documents are pages."""
    return "composed-page" if kind == COMPOSED_KIND else "text-page"


# The kinds a queries stage asks for when its profile names none (the one default, used by every engine).
DEFAULT_QUERY_KINDS: tuple[str, ...] = ("factual", "keyword", "paraphrase")
SPLITS: tuple[str, ...] = ("train", "dev", "benchmark")

QUERIES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),  # hash(query text, query_lang, page_id, generator, prompt_version)
        ("query", pa.string()),
        ("query_lang", pa.string()),  # language the query is written in
        ("kind", pa.string()),  # one of QUERY_KINDS
        ("page_id", pa.string()),  # the positive page (in target_lang)
        ("target_lang", pa.string()),  # language of the positive page; != query_lang for cross-lingual
        ("cross_lingual", pa.bool_()),
        ("source_page_id", pa.string()),  # English original of the positive page (the parallel group)
        ("source_id", pa.string()),  # source document (splits are by source document)
        ("split", pa.string()),  # one of SPLITS
        ("generator", pa.string()),  # engine:model that wrote the query
        ("prompt_version", pa.string()),  # version of assets/prompts/* used ('' for extractive)
        ("image", IMAGE_TYPE),  # composed queries: the region crop (PNG); null for text queries
    ],
    metadata={
        "m3dr.schema": "queries",
        "m3dr.schema_version": SCHEMA_VERSION,
        "huggingface": json.dumps(
            {"info": {"features": {"image": {"_type": "Image"}}}}, separators=(",", ":")
        ),
    },
)

TRAIN_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("query_lang", pa.string()),
        ("kind", pa.string()),
        ("positive_page_id", pa.string()),
        ("positive_lang", pa.string()),
        ("source_page_id", pa.string()),
        ("source_id", pa.string()),
        ("parallel_page_ids", pa.list_(pa.string())),  # every page of the parallel group (never negatives)
        ("negative_page_ids", pa.list_(pa.string())),  # empty for the in-batch miner
        ("negative_scores", pa.list_(pa.float32())),
        ("positive_score", pa.float32()),  # miner's score of the positive (nan for in-batch)
        ("miner", pa.string()),  # in-batch | bm25 | dense:<model> (+ options)
        ("split", pa.string()),
        ("generator", pa.string()),
        ("prompt_version", pa.string()),
        ("query_image", IMAGE_TYPE),  # composed queries: the region crop (PNG); null for text queries
    ],
    metadata={
        "m3dr.schema": "train",
        "m3dr.schema_version": SCHEMA_VERSION,
        "huggingface": json.dumps(
            {"info": {"features": {"query_image": {"_type": "Image"}}}}, separators=(",", ":")
        ),
    },
)


# `m3dr export-dataset` (eval/dataset_export.py): a Hugging Face dataset repository in the columns the
# field trains on. ``train`` / ``dev`` rows name their documents by corpus id, colpali-engine style
# (``ColPaliEngineDataset`` + ``Corpus``): ``pos_target`` = the exact page first, then (``--positives
# parallel``) its parallel pages; ``neg_target`` = the mined negatives. ``corpus`` holds the pages of the
# train and dev documents. The benchmark sets keep the Nayana-IR layout of eval/beir.py.
EXPORT_TRAIN_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),  # m3dr's query id (queries / train shards)
        ("query", pa.string()),
        ("query_image", IMAGE_TYPE),  # composed queries: the region crop; null for text queries
        ("query_lang", pa.string()),
        ("target_lang", pa.string()),  # language of the exact positive page
        ("kind", pa.string()),
        ("pos_target", pa.list_(pa.string())),  # corpus ids; [0] is the exact page
        ("neg_target", pa.list_(pa.string())),  # corpus ids of the mined negatives, best-scoring first
        ("neg_scores", pa.list_(pa.float32())),  # the miner's scores of neg_target
        ("source_page_id", pa.string()),  # the parallel group (English original's page id)
        ("doc-id", pa.string()),  # source document (m3dr's source_id)
        ("miner", pa.string()),
        ("generator", pa.string()),
    ],
    metadata={
        "m3dr.schema": "export-train",
        "m3dr.schema_version": SCHEMA_VERSION,
        "huggingface": json.dumps(
            {"info": {"features": {"query_image": {"_type": "Image"}}}}, separators=(",", ":")
        ),
    },
)
EXPORT_CORPUS_SCHEMA = pa.schema(
    [
        ("corpus-id", pa.string()),  # m3dr's page_id
        ("doc-id", pa.string()),  # source document (m3dr's source_id)
        ("image", IMAGE_TYPE),
        ("lang", pa.string()),
        ("text", pa.string()),  # region texts in reading order
        ("source_page_id", pa.string()),  # the parallel group: never a negative for each other
        ("page_index", pa.int32()),
        ("split", pa.string()),  # train | dev
    ],
    metadata={
        "m3dr.schema": "export-corpus",
        "m3dr.schema_version": SCHEMA_VERSION,
        "huggingface": json.dumps(
            {"info": {"features": {"image": {"_type": "Image"}}}}, separators=(",", ":")
        ),
    },
)
# ``--format tevatron``: the same rows under Tevatron's multimodal column names (its train set:
# query_id, query_text, query_image, positive_document_ids, negative_document_ids; its corpus: docid,
# image, text). Columns not named here keep their name.
TEVATRON_COLUMNS: dict[str, dict[str, str]] = {
    "train": {
        "query": "query_text",
        "pos_target": "positive_document_ids",
        "neg_target": "negative_document_ids",
    },
    "corpus": {"corpus-id": "docid"},
}


# The negatives stage's mining index (tasks/negatives/index.py): one row per indexed page, aligned with
# the rows of the segment's BM25 matrix / vectors. Bump INDEX_VERSION when the index files change.
INDEX_VERSION = 1
INDEX_META_SCHEMA = pa.schema(
    [
        ("page_id", pa.string()),
        ("source_page_id", pa.string()),  # the parallel group: never a negative for its own queries
        ("source_id", pa.string()),  # for superseded sources
        ("lang", pa.string()),  # modality key input
        ("kind", pa.string()),  # modality key input: image | text (PageView.kind of the page as read)
        ("shard", pa.string()),  # the pages shard the row came from (ownership)
    ],
    metadata={"m3dr.schema": "mining-index-meta", "m3dr.index_version": str(INDEX_VERSION)},
)
# The translate stage's per-shard translation memory (tasks/translate/memory.py).
MEMORY_SCHEMA = pa.schema(
    [
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("src", pa.string(), nullable=False),
        pa.field("tgt", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("translation", pa.string(), nullable=False),
    ]
)


class RejectReason:
    """Stable reason codes for the rejects table (grouped on in artifacts)."""

    UNREADABLE = "unreadable_file"
    EMPTY_FILE = "empty_file"
    ENCRYPTED_PDF = "encrypted_pdf"
    IMAGE_TOO_LARGE = "image_too_large"
    UNSUPPORTED_TYPE = "unsupported_type"
    UNKNOWN_LANGUAGE = "unknown_language"
    NO_TEXT = "no_text"
    SOURCE_LANGUAGE = "source_language"  # a source page whose text is not English (tasks.ingest.language)
    GLYPH_COVERAGE = "glyph_coverage"
    TEXT_DOES_NOT_FIT = "text_does_not_fit"
    TRANSLATION_FAILED = "translation_failed"
    PDF_FAILED = "pdf_failed"
    RENDER_UNREADABLE = "render_unreadable"  # OCR cannot read the rendered text back (tasks.render.qa)
    QUERY_WRONG_LANGUAGE = "query_wrong_language"
    QUERY_LENGTH = "query_length"
    QUERY_DUPLICATE = "query_duplicate"
    QUERY_COPIED = "query_copied_from_page"
    QUERY_INJECTION = "query_injection"
    QUERY_GENERATION_FAILED = "query_generation_failed"
    POSITIVE_NOT_IN_CORPUS = "positive_not_in_corpus"
    BENCHMARK_INVALID = "benchmark_invalid"


@dataclass
class Region:
    label: str
    bbox: tuple[float, float, float, float]
    score: float
    text: str = ""
    translatable: bool = False
    rendered: bool = False

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Region:
        return cls(
            label=row["label"],
            bbox=tuple(float(v) for v in row["bbox"]),  # type: ignore[arg-type]
            score=float(row["score"]),
            text=row["text"] or "",
            translatable=bool(row["translatable"]),
            rendered=bool(row["rendered"]),
        )


@dataclass
class Reject:
    stage: str
    input_ref: str
    reason: str
    message: str
    lang: str = ""

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PageRecord:
    """One row of a pages shard."""

    page_id: str
    source_page_id: str
    source_id: str
    source_uri: str
    page_index: int
    lang: str
    image_png: bytes
    width: int
    height: int
    regions: list[Region] = field(default_factory=list)
    text_source: str = "pdf"
    layout_model: str = ""
    translation_model: str = ""
    config_hash: str = ""
    pdf: bytes | None = None

    @property
    def text(self) -> str:
        return "\n\n".join(r.text for r in self.regions if r.text and r.label != "abandon")

    def to_row(self) -> dict[str, Any]:
        return {
            "page_id": self.page_id,
            "source_page_id": self.source_page_id,
            "source_id": self.source_id,
            "source_uri": self.source_uri,
            "page_index": self.page_index,
            "lang": self.lang,
            "image": {"bytes": self.image_png, "path": f"{self.page_id}.png"},
            "width": self.width,
            "height": self.height,
            "regions": [asdict(r) | {"bbox": list(r.bbox)} for r in self.regions],
            "text": self.text,
            "text_source": self.text_source,
            "layout_model": self.layout_model,
            "translation_model": self.translation_model,
            "config_hash": self.config_hash,
            "pdf": self.pdf,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PageRecord:
        return cls(
            page_id=row["page_id"],
            source_page_id=row["source_page_id"],
            source_id=row["source_id"],
            source_uri=row["source_uri"],
            page_index=int(row["page_index"]),
            lang=row["lang"],
            image_png=row["image"]["bytes"],
            width=int(row["width"]),
            height=int(row["height"]),
            regions=[Region.from_row(r) for r in row["regions"]],
            text_source=row["text_source"],
            layout_model=row["layout_model"],
            translation_model=row["translation_model"],
            config_hash=row["config_hash"],
            pdf=row.get("pdf"),
        )


@dataclass(frozen=True)
class QueryRecord:
    """One row of a queries shard (``QUERIES_SCHEMA``, same fields in the same order)."""

    query_id: str
    query: str
    query_lang: str
    kind: str
    page_id: str
    target_lang: str
    cross_lingual: bool
    source_page_id: str
    source_id: str
    split: str
    generator: str
    prompt_version: str
    image: dict[str, Any] | None = None  # IMAGE_TYPE value ({"bytes": PNG, "path": name}) or None

    def __post_init__(self) -> None:
        if self.kind not in QUERY_KINDS:
            raise ValueError(f"query kind {self.kind!r} is not one of {QUERY_KINDS}")
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} is not one of {SPLITS}")
        if (self.kind == COMPOSED_KIND) != bool(self.image and self.image.get("bytes")):
            raise ValueError("a composed query carries an image, and only a composed query does")

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> QueryRecord:
        return cls(**{name: row.get(name) for name in QUERIES_SCHEMA.names})


@dataclass(frozen=True)
class TrainRecord:
    """One row of a train shard (``TRAIN_SCHEMA``): a query, its positive, its parallel group and
    its mined negatives."""

    query_id: str
    query: str
    query_lang: str
    kind: str
    positive_page_id: str
    positive_lang: str
    source_page_id: str
    source_id: str
    parallel_page_ids: list[str]
    negative_page_ids: list[str]
    negative_scores: list[float]
    positive_score: float
    miner: str
    split: str
    generator: str
    prompt_version: str
    query_image: dict[str, Any] | None = None  # composed queries' crop (IMAGE_TYPE value)

    def __post_init__(self) -> None:
        if len(self.negative_page_ids) != len(self.negative_scores):
            raise ValueError("one score per negative")
        if set(self.negative_page_ids) & set(self.parallel_page_ids):
            raise ValueError("a page of the positive's parallel group can never be a negative")

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TrainRecord:
        return cls(**{name: row.get(name) for name in TRAIN_SCHEMA.names})


# the typed rows and their schemas name the same columns in the same order
for _record, _schema in ((QueryRecord, QUERIES_SCHEMA), (TrainRecord, TRAIN_SCHEMA)):
    assert [f for f in _record.__dataclass_fields__] == _schema.names, _record


def queries_table(rows: Iterable[QueryRecord | dict[str, Any]]) -> pa.Table:
    """A queries shard's table; every row (record or dict) passes through :class:`QueryRecord`."""
    recs = [r if isinstance(r, QueryRecord) else QueryRecord.from_row(r) for r in rows]
    return pa.Table.from_pylist([r.to_row() for r in recs], schema=QUERIES_SCHEMA)


def train_table(rows: Iterable[TrainRecord | dict[str, Any]]) -> pa.Table:
    """A train shard's table; every row (record or dict) passes through :class:`TrainRecord`."""
    recs = [r if isinstance(r, TrainRecord) else TrainRecord.from_row(r) for r in rows]
    return pa.Table.from_pylist([r.to_row() for r in recs], schema=TRAIN_SCHEMA)


def pages_table(records: list[PageRecord]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=PAGES_SCHEMA)


def rejects_table(rejects: list[Reject]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in rejects], schema=REJECTS_SCHEMA)


def image_value(png: bytes | None, name: str) -> dict[str, Any] | None:
    """An ``IMAGE_TYPE`` cell (HF ``datasets`` Image layout) for PNG bytes, None for no image."""
    return {"bytes": png, "path": f"{name}.png"} if png else None


def image_bytes(cell: Any) -> bytes | None:
    """The PNG bytes of an ``IMAGE_TYPE`` cell (None for a null cell)."""
    return cell.get("bytes") if isinstance(cell, dict) else None


PNG_COMPRESS_LEVEL = 3  # see encode_png


def encode_png(image: Any) -> bytes:
    """A PIL image as the PNG bytes of the ``image`` column (fixed options: same pixels ⇒ same bytes).

    zlib level 3, chosen by ``benchmarks/png_level.py`` on rasterised document pages: 0.89× the bytes of
    Pillow's default level 6 in 0.42× its time (level 1: 0.92×, 0.40×; level 9: 0.98×, 2.7×)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()
