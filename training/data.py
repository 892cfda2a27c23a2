"""Training data: train shards (queries → positive + mined negatives) over pages shards (images).

- :class:`PageStore` indexes ``page_id → (shard, row group, row)`` from the small columns only and
  reads a page's row group when a batch needs it (a small LRU of decoded row groups), so resident memory
  stays flat in corpus size. Shards are local paths or URLs (``s3://…``, read through fsspec); the store
  pickles without handles or decoded data and reopens its files in each DataLoader worker process.
  Page images stay PNG bytes until the processor decodes them (it does the one resize).
- :func:`batch_plan` orders one epoch: deterministic from ``(seed, epoch)`` only, so any micro-step can
  be rebuilt after a restart; length-bucketed (sorted inside windows of ``bucket_batches`` global
  batches, then the batches are shuffled) to cut padding. Every batch is of one modality (text or
  composed image + text queries; page-image or text-only documents), so one processor call builds it;
  a text phase mixes in ``replay`` of its batches from the multimodal pairs.
- :func:`text_pairs` / :func:`load_text_set`: MM-Embed's text → text pairs (a train row's query against
  its page's region text; a BEIR-format text set).
- :class:`Collator` turns one global batch into this rank's tensors: query inputs, document inputs
  (positives of the rank's queries, then their hard negatives) and, for the loss, the index of each
  query's positive in the *gathered* document list and a validity mask that removes pages of the
  query's own parallel group (translations of the same source page are relevant, never negatives).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any, ClassVar, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from tasks.encoders import PageView
from tasks.schema import image_bytes, task_of_kind
from tasks.shards import hash_id
from tasks.storage import is_url, storage_options_for
from training.config import PromptSettings

IMAGE_PLACEHOLDER = "{image}"
MULTI_PREFIX = "multi_"  # query inputs of the multi-vector head when they differ from the dense head's


@dataclass(frozen=True)
class TrainExample:
    """One train-shard row, reduced to what training needs."""

    query_id: str
    query: str
    query_lang: str
    positive_page_id: str
    source_page_id: str
    negative_page_ids: tuple[str, ...] = ()
    kind: str = ""
    query_image: bytes | None = None  # composed queries: the region crop (PNG)
    doc_kind: Literal["image", "text"] = "image"  # documents seen as page images or as their text

    @property
    def task(self) -> str:
        """``text-text`` for text documents, else ``text-page`` / ``composed-page`` by query kind."""
        return "text-text" if self.doc_kind == "text" else task_of_kind(self.kind)

    @property
    def modality(self) -> tuple[bool, str]:
        """(query has an image, document kind): batches never mix two modalities."""
        return (self.query_image is not None, self.doc_kind)


ShardSpec = str | PurePath


def shard_spec(shard: ShardSpec) -> str:
    """A shard as a string: a local path or a URL (``file://`` is a local path). Callers keep URLs as
    strings: ``Path("s3://b/k")`` would collapse the scheme's ``//``."""
    spec = os.fspath(shard)
    return spec[len("file://") :] if spec.startswith("file://") else spec


@contextlib.contextmanager
def open_parquet(spec: str, filesystems: dict[str, Any] | None = None) -> Iterator[pq.ParquetFile]:
    """A shard opened for row-group reads (local file, or an fsspec file for a URL: only the byte ranges
    of the columns read are fetched). ``filesystems`` caches the fsspec filesystem per protocol."""
    with _open_file(spec, filesystems) as fh, pq.ParquetFile(fh) as pf:
        yield pf


def _open_file(spec: str, filesystems: dict[str, Any] | None, **options: Any) -> Any:
    """A readable file of ``spec`` (the caller closes it): pyarrow's own for a local path, fsspec's for a
    URL (the storage options of :mod:`tasks.storage`; ``options`` go to ``fs.open``)."""
    if not is_url(spec):
        return pa.OSFile(spec, "rb")
    protocol = spec.split("://", 1)[0]
    fs = None if filesystems is None else filesystems.get(protocol)
    if fs is None:
        # fsspec's instance cache is per process: a forked worker gets its own client, never its parent's
        fs = fsspec.filesystem(protocol, **storage_options_for(spec))
        if filesystems is not None:
            filesystems[protocol] = fs
    return fs.open(fsspec.core.strip_protocol(spec), "rb", **options)


def iter_row_groups(spec: str, columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
    """``(row group index, table of ``columns``)`` of one shard, one row group at a time; columns the
    shard does not have are left out (shards written before a column was added)."""
    with open_parquet(spec) as pf:
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names]
        for g in range(pf.num_row_groups):
            yield g, pf.read_row_group(g, columns=cols)


def referenced_page_ids(examples: Iterable[TrainExample]) -> set[str]:
    """Every page the examples reference (positive or negative): the ``keep`` set of a
    :class:`PageStore` that indexes nothing training can never read."""
    return {p for ex in examples for p in (ex.positive_page_id, *ex.negative_page_ids)}


class PageStore:
    """``page_id → PageView`` over pages shards (PAGES_SCHEMA), local or on an object store.

    The index (``page_id → (shard, row group, row)``) and the per-page metadata (group, text length)
    are built from the small columns only, one row group at a time; a page is read with its row group
    (``read_row_group`` of the columns a :class:`PageView` needs), and the last ``cache_row_groups``
    decoded row groups are kept. Memory is that LRU plus the index, whatever the corpus size.

    Pickles without open files or decoded data, and reopens files per process (fork or spawn), so a
    DataLoader worker never shares a file handle or an S3 session with its parent.
    """

    _COLUMNS: ClassVar[list[str]] = ["page_id", "source_page_id", "lang", "text", "image"]
    _INDEX_COLUMNS: ClassVar[list[str]] = ["page_id", "source_page_id", "text"]

    def __init__(
        self,
        shards: Sequence[ShardSpec],
        *,
        keep: set[str] | None = None,
        cache_row_groups: int = 4,
        footers: int = 64,
    ) -> None:
        if cache_row_groups < 1 or footers < 1:
            raise ValueError("cache_row_groups and footers must be >= 1")
        self.shards = [shard_spec(s) for s in shards]
        self.cache_row_groups = cache_row_groups
        self.footers = footers
        self._pos: dict[str, int] = {}  # page_id → position in the arrays below
        self._groups: list[str] = []  # distinct source_page_ids
        shard_of, group_of, row_of, text_len, group_idx = [], [], [], [], []
        group_pos: dict[str, int] = {}
        for s, spec in enumerate(self.shards):
            for g, table in iter_row_groups(spec, self._INDEX_COLUMNS):
                ids = table["page_id"].to_pylist()
                groups = table["source_page_id"].to_pylist()
                lens = pc.utf8_length(table["text"]).to_pylist()
                for row, (pid, grp, n) in enumerate(zip(ids, groups, lens, strict=True)):
                    if pid in self._pos or (keep is not None and pid not in keep):
                        continue  # the first shard holding a page wins, as before
                    self._pos[pid] = len(shard_of)
                    shard_of.append(s)
                    group_of.append(g)
                    row_of.append(row)
                    text_len.append(int(n or 0))
                    group_idx.append(group_pos.setdefault(grp, len(group_pos)))
        self._groups = list(group_pos)
        self._loc = np.array([shard_of, group_of, row_of], dtype=np.int64).reshape(3, -1)
        self._lens = np.array(text_len, dtype=np.int64)
        self._group_idx = np.array(group_idx, dtype=np.int64)
        self.text_docs: dict[str, PageView] = {}
        self.row_group_reads = 0  # decoded row groups read by this process (cache misses)
        self._reset_process_state()

    # ---------------------------------------------------------------- per-process state
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._footers: OrderedDict[int, tuple[pq.FileMetaData, int]] = OrderedDict()
        self._filesystems: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_cache", "_footers", "_filesystems", "_pid"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def _check_process(self) -> None:
        """After a fork the parent's S3 client is not ours (nor its decoded row groups' accounting):
        start over with this process's own."""
        if self._pid != os.getpid():
            self._reset_process_state()

    def _footer(self, shard: int) -> tuple[pq.FileMetaData, int]:
        """A shard's Parquet footer and size (the last ``footers`` are kept: a read needs no footer
        request)."""
        if shard in self._footers:
            self._footers.move_to_end(shard)
            return self._footers[shard]
        with _open_file(self.shards[shard], self._filesystems) as fh:
            size = fh.size() if callable(fh.size) else int(fh.size)
            reader = pq.ParquetFile(fh)
            self._footers[shard] = (reader.metadata, size)
            reader.close(force=True)
        while len(self._footers) > self.footers:
            self._footers.popitem(last=False)
        return self._footers[shard]

    def _row_group(self, shard: int, group: int) -> pa.Table:
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        footer, size = self._footer(shard)
        # a file and reader per read, closed at once: fsspec fetches only the column chunks' byte ranges
        # (no read-ahead, size known: no HEAD), and a reader left open keeps its last column chunk
        # (a row group's images) alive until garbage collection
        with _open_file(self.shards[shard], self._filesystems, size=size, cache_type="none") as fh:
            reader = pq.ParquetFile(fh, metadata=footer)
            try:
                table = reader.read_row_group(group, columns=self._COLUMNS)
            finally:
                reader.close(force=True)
        self.row_group_reads += 1
        self._cache[key] = table
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return table

    def cached_row_groups(self) -> int:
        """Decoded row groups held now (at most ``cache_row_groups``)."""
        return len(self._cache) if self._pid == os.getpid() else 0

    # ---------------------------------------------------------------- the public interface
    def add_text_docs(self, docs: Iterable[PageView]) -> None:
        """Text-only documents (a BEIR text set's passages) beside the pages; each is its own group."""
        for d in docs:
            if d.page_id in self._pos:
                raise ValueError(f"text document id {d.page_id!r} collides with a page id")
            self.text_docs[d.page_id] = d

    def __contains__(self, page_id: str) -> bool:
        return page_id in self._pos or page_id in self.text_docs

    def __len__(self) -> int:
        return len(self._pos) + len(self.text_docs)

    def page_ids(self) -> list[str]:
        return [*self._pos, *self.text_docs]

    def location(self, page_id: str) -> tuple[str, int, int]:
        """(shard, row group, row in the group) of a page."""
        i = self._pos[page_id]
        s, g, r = (int(x) for x in self._loc[:, i])
        return self.shards[s], g, r

    def group(self, page_id: str) -> str:
        if page_id in self.text_docs:
            return self.text_docs[page_id].source_page_id
        return self._groups[int(self._group_idx[self._pos[page_id]])]

    def text_len(self, page_id: str) -> int:
        if page_id in self.text_docs:
            return len(self.text_docs[page_id].text)
        return int(self._lens[self._pos[page_id]])

    def get(self, page_id: str) -> PageView:
        if page_id in self.text_docs:
            return self.text_docs[page_id]
        self._check_process()
        s, g, r = (int(x) for x in self._loc[:, self._pos[page_id]])
        rec = self._row_group(s, g).slice(r, 1).to_pylist()[0]
        return PageView.from_row(rec)


def decode_image(png: bytes | None, target: int) -> Image.Image:
    """PNG bytes → RGB image at full size: the processor does the one resize, so the pixels a model sees
    are the ones colpali-engine's processors give it (an exported model embeds pages exactly as here).
    Text-only pages (no image) get a blank white page of ``target`` px."""
    if not png:
        return Image.new("RGB", (target, target), "white")
    return Image.open(io.BytesIO(png)).convert("RGB")


def load_examples(
    train_shards: Sequence[ShardSpec], store: PageStore | None = None, splits: Sequence[str] = ("train",)
) -> tuple[list[TrainExample], int]:
    """Rows of the train shards in ``splits`` (file order; dev rows stay out of training by default),
    restricted to ``store`` when given (:func:`in_store`). Shards are local paths or URLs, read one row
    group at a time.

    Returns (examples, dropped).
    """
    cols = [
        "query_id",
        "query",
        "query_lang",
        "positive_page_id",
        "source_page_id",
        "negative_page_ids",
        "split",
        "kind",
        "query_image",  # shards written before composed queries lack it
    ]
    out: list[TrainExample] = []
    for shard in train_shards:
        for _, table in iter_row_groups(shard_spec(shard), cols):
            out += [
                TrainExample(
                    r["query_id"],
                    r["query"],
                    r["query_lang"],
                    r["positive_page_id"],
                    r["source_page_id"],
                    tuple(r["negative_page_ids"] or ()),
                    kind=r.get("kind") or "",
                    query_image=image_bytes(r.get("query_image")),
                )
                for r in table.to_pylist()
                if r["split"] in splits
            ]
    return (out, 0) if store is None else in_store(out, store)


def in_store(examples: Sequence[TrainExample], store: PageStore) -> tuple[list[TrainExample], int]:
    """(examples whose positive is in ``store``, with negatives outside it removed; rows dropped)."""
    out = [
        replace(ex, negative_page_ids=tuple(n for n in ex.negative_page_ids if n in store))
        for ex in examples
        if ex.positive_page_id in store
    ]
    return out, len(examples) - len(out)


def text_pairs(examples: Sequence[TrainExample], store: PageStore) -> list[TrainExample]:
    """MM-Embed's text → text pairs from our own pages: each text query (composed ones excluded) against
    its positive page's region text, negatives read as text too; pages without text are skipped."""
    out = []
    for ex in examples:
        if ex.query_image is not None or ex.doc_kind == "text" or store.text_len(ex.positive_page_id) == 0:
            continue
        negs = tuple(n for n in ex.negative_page_ids if store.text_len(n) > 0)
        out.append(replace(ex, query_id=ex.query_id + ":text", negative_page_ids=negs, doc_kind="text"))
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_text_set(root: str | Path, split: str = "train") -> tuple[list[PageView], list[TrainExample]]:
    """A BEIR-format text set (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) as text
    documents and text → text examples (one per relevant qrel). Ids are prefixed with the set's directory
    name so they never collide with page ids. Only ``split``'s qrels are read: a test split never trains."""
    root = Path(root)
    qrels_path = root / "qrels" / f"{split}.tsv"
    for need in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path):
        if not need.exists():
            raise FileNotFoundError(f"text set {root}: {need.name} is missing (BEIR, qrels/{split}.tsv)")
    ns = root.name
    docs = [
        PageView(
            f"{ns}:{d['_id']}",
            f"{ns}:{d['_id']}",
            str(d.get("language") or ""),
            " ".join(x for x in (d.get("title"), d.get("text")) if x),
        )
        for d in _jsonl(root / "corpus.jsonl")
    ]
    queries = {str(q["_id"]): q for q in _jsonl(root / "queries.jsonl")}
    out = []
    with qrels_path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if i == 0 and parts[0] in ("query-id", "query_id"):
                continue
            if len(parts) < 3 or float(parts[2]) <= 0 or parts[0] not in queries:
                continue
            q, doc = queries[parts[0]], f"{ns}:{parts[1]}"
            lang = str(q.get("language") or "")
            out.append(
                TrainExample(f"{ns}:{parts[0]}:{parts[1]}", q["text"], lang, doc, doc, doc_kind="text")
            )
    return docs, out


def batch_plan(
    examples: Sequence[TrainExample],
    global_batch: int,
    *,
    seed: int,
    epoch: int,
    bucket_batches: int,
    length: Any = None,
    replay: float = 0.0,
) -> list[list[int]]:
    """Example indices of every full global batch of ``epoch`` (each modality's incomplete tail is
    dropped).

    Deterministic in (seed, epoch): per modality (:attr:`TrainExample.modality`), shuffle, sort by
    ``length(example)`` inside windows of ``bucket_batches`` batches, cut into batches; then shuffle all
    batches. With ``replay`` > 0 and text-document batches present (a text phase), the page-image batches
    are a replay share: ``replay`` of the epoch's batches, drawn from them (cycled when too few).
    """
    rng = random.Random(int(hash_id("plan", seed, epoch, n=12), 16))
    groups: dict[tuple[bool, str], list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.modality, []).append(i)
    by_kind: dict[str, list[list[int]]] = {"text": [], "image": []}
    for key in sorted(groups):
        order = groups[key]
        rng.shuffle(order)
        if bucket_batches > 1 and length is not None:
            window = global_batch * bucket_batches
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda j: length(examples[j]))
            ]
        by_kind[key[1]] += [
            order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)
        ]
    batches = by_kind["text"]
    images = by_kind["image"]
    if replay > 0 and batches and images:
        rng.shuffle(images)
        n = round(len(batches) * replay / (1.0 - replay))
        batches = batches + [images[i % len(images)] for i in range(n)]
    else:
        batches = images + batches
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    """One rank's micro-batch. ``pos``: ``[B]`` index of each query's positive in the gathered document
    list; ``valid``: ``[B, N_global]`` (see :mod:`training.losses`); ``doc_counts``: documents per rank
    before padding (every rank pads its documents to ``max(doc_counts)`` for the gather)."""

    queries: dict[str, torch.Tensor]
    docs: dict[str, torch.Tensor]
    pos: torch.Tensor
    valid: torch.Tensor
    doc_counts: list[int]
    query_ids: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)

    def _map(self, fn: Any) -> Batch:
        def side(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in d.items()}

        return Batch(
            side(self.queries),
            side(self.docs),
            fn(self.pos),
            fn(self.valid),
            self.doc_counts,
            self.query_ids,
            self.doc_ids,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """The batch on ``device`` (``non_blocking`` overlaps the copy with compute from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copies: the DataLoader's pin thread calls this (``pin_memory=True``), so the
        copy to the GPU can run asynchronously."""
        return self._map(lambda t: t.pin_memory())


class PromptFormatter:
    """Prompt templates + the processor: texts/pages → model inputs (left padded).

    ``style = "chat"`` renders each input as one user turn of the tokenizer's chat template and calls
    the processor the way colpali-engine's Gemma-3 processors do, so the token ids equal theirs.
    """

    def __init__(self, processor: Any, prompts: PromptSettings) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompts = prompts
        self.chat = prompts.style == "chat"
        if self.chat and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "prompts.style = 'chat' needs a tokenizer with a chat template (this backbone has none); "
                "set prompts.style = 'plain'"
            )
        ip = processor.image_processor
        size = getattr(ip, "size", None) or {}
        self.image_side = int(size.get("height") or size.get("shortest_edge") or 224)

    def _eos(self) -> str:
        return self.tokenizer.eos_token if self.prompts.append_eos and self.tokenizer.eos_token else ""

    def _truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut to its first ``max_tokens`` tokens. Tokenized with ``max_length = max_tokens + 1``
        (truncation cuts after tokenizing, so the kept ids are the full tokenization's prefix): whether
        the text is longer is known without the tokenizer's "sequence length is longer than the
        specified maximum" warning, which a text we are about to cut does not deserve."""
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_tokens + 1)[
            "input_ids"
        ]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])

    def _turn(self, content: list[dict[str, Any]]) -> str:
        message = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=False)

    def query_texts(
        self,
        queries: Sequence[str],
        augmentation: int | None = None,
        *,
        task: str = "text-page",
        with_image: bool = False,
    ) -> list[str]:
        """Prompt strings: the task's instruction, the query template, ``augmentation`` ``<eos>`` tokens
        after the query text (default: the dense head's count); ``with_image`` puts the image first."""
        n = self.prompts.query_augmentation_dense if augmentation is None else augmentation
        suffix = (self.tokenizer.eos_token or "") * int(n or 0)
        mx = self.prompts.max_query_tokens
        prefix = self.prompts.instruction(task)
        texts = [prefix + self.prompts.query.format(query=self._truncate(q, mx) + suffix) for q in queries]
        if self.chat:
            image = [{"type": "image"}] if with_image else []
            texts = [self._turn([*image, {"type": "text", "text": t}]) for t in texts]
        elif with_image:
            texts = [self._image_token() + t for t in texts]
        return [t + self._eos() for t in texts]

    def _image_token(self) -> str:
        return self.processor.boi_token if hasattr(self.processor, "boi_token") else "<image>"

    def _images(self, pngs: Sequence[bytes | None]) -> list[list[Image.Image]]:
        return [[decode_image(png, self.image_side)] for png in pngs]

    def _text_only(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.chat:  # the processor's text path, as colpali-engine's process_queries calls it
            enc = self.processor(text=texts, padding="longest", return_tensors="pt")
        else:
            enc = self.tokenizer(texts, padding="longest", add_special_tokens=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _with_images(self, texts: list[str], pngs: Sequence[bytes | None]) -> dict[str, torch.Tensor]:
        enc = self.processor(text=texts, images=self._images(pngs), padding="longest", return_tensors="pt")
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def doc_texts(self, pages: Sequence[PageView]) -> list[str]:
        image_token = self._image_token()
        template = self.prompts.document or IMAGE_PLACEHOLDER
        out = []
        for p in pages:
            text = ""
            if self.prompts.doc_text == "region_text" and p.text:
                text = self._truncate(p.text, self.prompts.max_doc_text_tokens)
            filled = template.replace("{text}", text)
            if self.chat:
                before, after = filled.split(IMAGE_PLACEHOLDER, 1)
                content = [{"type": "text", "text": before}] if before.strip() else []
                content.append({"type": "image"})
                if after.strip():
                    content.append({"type": "text", "text": after})
                prompt = self._turn(content)
            else:
                prompt = filled.replace(IMAGE_PLACEHOLDER, image_token)
            out.append(prompt + self._eos())
        return out

    def text_doc_texts(self, pages: Sequence[PageView]) -> list[str]:
        """Prompts of text-only documents (``prompts.text_document`` over the page / passage text)."""
        out = []
        for p in pages:
            text = self._truncate(p.text or "", self.prompts.max_doc_text_tokens)
            filled = self.prompts.text_document.replace("{text}", text)
            prompt = self._turn([{"type": "text", "text": filled}]) if self.chat else filled
            out.append(prompt + self._eos())
        return out

    def queries(
        self,
        queries: Sequence[str],
        augmentation: int | None = None,
        *,
        images: Sequence[bytes | None] | None = None,
        task: str = "text-page",
    ) -> dict[str, torch.Tensor]:
        """Query inputs with ``augmentation`` tokens (default: dense); ``images`` (one PNG per query)
        make them composed queries, the image going through the same processor as pages."""
        texts = self.query_texts(queries, augmentation, task=task, with_image=images is not None)
        return self._text_only(texts) if images is None else self._with_images(texts, images)

    def query_batch(
        self,
        queries: Sequence[str],
        *,
        dense: bool,
        multi: bool,
        images: Sequence[bytes | None] | None = None,
        task: str = "text-page",
    ) -> dict[str, torch.Tensor]:
        """Inputs for the heads asked for: where the two heads augment queries differently, the
        multi-vector head's inputs ride along under ``multi_*`` keys (see ``RetrieverModel.embed``)."""
        p = self.prompts
        kw: dict[str, Any] = {"images": images, "task": task}
        if not dense:
            return self.queries(queries, p.query_augmentation_multi, **kw)
        out = self.queries(queries, p.query_augmentation_dense, **kw)
        if multi and p.query_augmentation_multi != p.query_augmentation_dense:
            extra = self.queries(queries, p.query_augmentation_multi, **kw)
            out.update({MULTI_PREFIX + k: v for k, v in extra.items()})
        return out

    def documents(self, pages: Sequence[PageView]) -> dict[str, torch.Tensor]:
        """Document inputs: page images (+ region text per ``doc_text``), or, when every page is
        text-only (no image), ``text_document`` prompts with no image. A batch never mixes the two."""
        kinds = {p.kind for p in pages}
        if kinds == {"text"}:
            return self._text_only(self.text_doc_texts(pages))
        if len(kinds) > 1:
            raise ValueError("a document batch mixes page images and text-only documents")
        return self._with_images(self.doc_texts(pages), [p.image_png for p in pages])


def as_text(page: PageView) -> PageView:
    """The page seen as its text only (continual text fine-tuning, the benchmark's text view)."""
    return replace(page, image_png=None)


class Collator:
    """Global batch (example indices) → this rank's :class:`Batch`, deterministic in (seed, micro-step)."""

    def __init__(
        self,
        formatter: PromptFormatter,
        store: PageStore,
        examples: Sequence[TrainExample],
        *,
        num_negatives: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        dense: bool = True,
        multi: bool = False,
    ) -> None:
        self.formatter = formatter
        self.heads = {"dense": dense, "multi": multi}
        self.store = store
        self.examples = examples
        self.num_negatives = num_negatives
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def negatives(self, ex: TrainExample, micro_step: int) -> list[str]:
        if self.num_negatives <= 0 or not ex.negative_page_ids:
            return []
        rng = random.Random(int(hash_id("neg", self.seed, micro_step, ex.query_id, n=12), 16))
        pool = list(ex.negative_page_ids)
        return pool if len(pool) <= self.num_negatives else rng.sample(pool, self.num_negatives)

    def layout(self, global_batch: Sequence[int], micro_step: int) -> list[tuple[list[int], list[str]]]:
        """Per rank: (example indices, document page ids = positives then negatives)."""
        per = len(global_batch) // self.world_size
        out = []
        for r in range(self.world_size):
            idx = list(global_batch[r * per : (r + 1) * per])
            exs = [self.examples[i] for i in idx]
            docs = [e.positive_page_id for e in exs]
            for e in exs:
                docs += self.negatives(e, micro_step)
            out.append((idx, docs))
        return out

    def __call__(self, global_batch: Sequence[int], micro_step: int) -> Batch:
        layout = self.layout(global_batch, micro_step)
        counts = [len(d) for _, d in layout]
        width = max(counts)
        # global document list: rank r's docs occupy [r * width, r * width + counts[r])
        doc_groups: list[str | None] = []
        for _, docs in layout:
            doc_groups += [self.store.group(p) for p in docs] + [None] * (width - len(docs))
        idx, docs = layout[self.rank]
        exs = [self.examples[i] for i in idx]
        offset = self.rank * width
        pos = torch.arange(len(exs), dtype=torch.long) + offset
        valid = torch.tensor(
            [[g is not None and g != e.source_page_id for g in doc_groups] for e in exs], dtype=torch.bool
        )
        pages = [self.store.get(p) for p in docs]
        modality = {e.modality for e in exs}
        if len(modality) != 1:
            raise ValueError(f"a batch mixes query/document modalities {sorted(modality)}")
        has_image, doc_kind = modality.pop()
        if doc_kind == "text":
            pages = [as_text(p) for p in pages]
        return Batch(
            queries=self.formatter.query_batch(
                [e.query for e in exs],
                images=[e.query_image for e in exs] if has_image else None,
                task=exs[0].task,
                **self.heads,
            ),
            docs=self.formatter.documents(pages),
            pos=pos,
            valid=valid,
            doc_counts=counts,
            query_ids=[e.query_id for e in exs],
            doc_ids=docs,
        )


class ExampleLength:
    """Bucketing key: query characters + (page text characters when the text is in the prompt).
    A class, not a closure: the epoch plan that holds it goes to DataLoader workers by pickle."""

    def __init__(self, store: PageStore, prompts: PromptSettings) -> None:
        self.store = store
        self.with_text = prompts.doc_text == "region_text"
        self.cap = 4 * prompts.max_doc_text_tokens

    def __call__(self, ex: TrainExample) -> int:
        n = len(ex.query)
        if self.with_text or ex.doc_kind == "text":
            n += min(self.store.text_len(ex.positive_page_id), self.cap)
        return n


def example_length(store: PageStore, prompts: PromptSettings) -> ExampleLength:
    return ExampleLength(store, prompts)


# DataLoader workers start from a forkserver (a clean process that preloads these), never by forking the
# caller: a caller with threads (a Prefect task runner, an S3 client's event loop, a test runner) can be
# forked while another thread holds a lock, and the child then waits on it forever. Seen here: under a
# loaded test run, forked workers hung at exit until the loader terminated them.
WORKER_PRELOAD = ["torch", "transformers", "training.data"]


def loader_context() -> Any:
    """The multiprocessing context of every DataLoader with workers (see ``WORKER_PRELOAD``)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx
