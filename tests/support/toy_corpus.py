"""A small, deterministic retrieval corpus in the pipeline's own shard formats (tests, benchmarks, demo).

Pages are rendered with Pillow from distinct word sequences (English CLDR names shipped with ``babel``),
each with text regions like the layout+extract stages produce; queries are *extractive* (word spans of
the page text, the pipeline's deterministic baseline generator) split into train spans and held-out
spans that share no position with them; hard negatives are mined by the pipeline's BM25 miner
(``tasks.negatives``) and written as a TRAIN_SCHEMA shard; pages as a PAGES_SCHEMA shard via
``tasks.shards.commit_shard``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tasks.encoders import PageView
from tasks.negatives.base import MiningParams, QueryView
from tasks.negatives.miners import BM25Miner
from tasks.negatives.selection import mine_negatives, mined_to_train_rows
from tasks.schema import PageRecord, Region, pages_table, train_table
from tasks.shards import commit_shard, hash_id


@dataclass
class ToyCorpus:
    pages_shard: Path
    train_shard: Path
    pages: list[PageView]
    eval_queries: dict[str, str]  # query_id → text (held-out spans)
    qrels: dict[str, dict[str, int]]  # query_id → {page_id: 1}
    train_rows: int = 0
    words: list[str] = field(default_factory=list)


def vocabulary(min_len: int = 4) -> list[str]:
    """Distinct alphabetic English words from CLDR names (deterministic order)."""
    from babel import Locale

    en = Locale.parse("en")
    seen: dict[str, None] = {}
    for table in ("territories", "languages"):
        names = getattr(en, table)
        for key in sorted(names):
            for w in names[key].replace("-", " ").split():
                if w.isalpha() and w.isascii() and len(w) >= min_len:
                    seen.setdefault(w.lower(), None)
    return list(seen)


def render_page(regions: list[Region], size: tuple[int, int], font_px: int) -> bytes:
    """White page with each region's text drawn (wrapped) inside its box; PNG bytes."""
    import io

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_px)
    for r in regions:
        x0, y0, x1, _ = r.bbox
        line, y = "", y0
        for w in r.text.split():
            trial = f"{line} {w}".strip()
            if draw.textlength(trial, font=font) > x1 - x0 and line:
                draw.text((x0, y), line, fill="black", font=font)
                y += font_px * 1.3
                line = w
            else:
                line = trial
        if line:
            draw.text((x0, y), line, fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def build_toy_corpus(
    out_dir: Path,
    *,
    n_pages: int = 32,
    regions_per_page: int = 3,
    words_per_region: int = 8,
    span: int = 3,
    train_spans: int = 5,
    eval_spans: int = 2,
    heldout: str = "keywords",
    k_negatives: int = 2,
    page_size: tuple[int, int] = (320, 440),
    seed: int = 0,
) -> ToyCorpus:
    """Write ``pages/pages-en-00000.parquet`` and ``train/train-00000.parquet`` under ``out_dir``.

    Training queries are ``train_spans`` contiguous ``span``-word phrases per page. Held-out queries
    (``eval_spans`` per page, never a training query's text):

    - ``heldout="keywords"``: ``span`` words drawn from anywhere on the page, in random order (new
      keyword combinations about pages the retriever was trained on: the standard held-out-query split);
    - ``heldout="spans"``: phrases at positions no training query covers (words never seen in a
      training query of that page: a much harder, pure generalisation test).
    """
    if heldout not in ("keywords", "spans"):
        raise ValueError(f"heldout must be 'keywords' or 'spans', got {heldout!r}")
    rng = random.Random(seed)
    words = vocabulary()
    source_id = hash_id("toy-corpus", seed, n_pages)
    w, h = page_size
    font_px = max(10, w // 28)
    records: list[PageRecord] = []
    spans: dict[str, list[list[str]]] = {}
    for i in range(n_pages):
        regions = []
        page_words: list[str] = []
        for j in range(regions_per_page):
            text_words = rng.sample(words, words_per_region)
            page_words += text_words
            top = 0.08 * h + j * (0.85 * h / regions_per_page)
            bbox = (0.08 * w, top, 0.92 * w, top + 0.8 * h / regions_per_page)
            regions.append(Region("text", bbox, 0.99, " ".join(text_words), translatable=True))
        pid = hash_id(source_id, i)
        records.append(
            PageRecord(
                page_id=pid,
                source_page_id=pid,
                source_id=source_id,
                source_uri=f"toy://{seed}/{i}",
                page_index=i,
                lang="en",
                image_png=render_page(regions, page_size, font_px),
                width=w,
                height=h,
                regions=regions,
                text_source="pdf",
                layout_model="toy",
            )
        )
        chunks = [page_words[k : k + span] for k in range(0, len(page_words) - span + 1, span)]
        rng.shuffle(chunks)
        if heldout == "keywords":
            train_texts = {" ".join(c) for c in chunks[:train_spans]}
            extra = []
            while len(extra) < eval_spans:
                cand = rng.sample(page_words, span)
                if " ".join(cand) not in train_texts:
                    extra.append(cand)
            chunks = chunks[:train_spans] + extra
        spans[pid] = chunks
    cfg = hash_id(
        "toy", seed, n_pages, regions_per_page, words_per_region, span, train_spans, eval_spans, heldout
    )
    pages_entry = commit_shard(
        out_dir,
        pages_table(records),
        name="pages-en-00000",
        kind="pages",
        lang="en",
        rel_path="pages/pages-en-00000.parquet",
        cfg_hash=cfg,
        sources=[source_id],
    )
    query_rows, eval_queries, qrels = [], {}, {}
    for rec in records:
        chunks = spans[rec.page_id]
        for n, chunk in enumerate(chunks[: train_spans + eval_spans]):
            text = " ".join(chunk)
            qid = hash_id(text, "en", rec.page_id, "extractive", "")
            if n >= train_spans:
                eval_queries[qid] = text
                qrels[qid] = {rec.page_id: 1}
                continue
            query_rows.append(
                {
                    "query_id": qid,
                    "query": text,
                    "query_lang": "en",
                    "kind": "phrase",
                    "page_id": rec.page_id,
                    "target_lang": "en",
                    "cross_lingual": False,
                    "source_page_id": rec.source_page_id,
                    "source_id": rec.source_id,
                    "split": "train",
                    "generator": "extractive",
                    "prompt_version": "",
                }
            )
    views = [PageView(r.page_id, r.source_page_id, r.lang, r.text, r.image_png) for r in records]
    qviews = [QueryView.from_row(r) for r in query_rows]
    params = MiningParams(k=k_negatives, top_n=10, margin=0.95, seed=seed)
    mined = mine_negatives(qviews, views, BM25Miner(params=params), k=params.k, top_n=params.top_n, seed=seed)
    rows = mined_to_train_rows(query_rows, mined, views)
    train_entry = commit_shard(
        out_dir,
        train_table(rows),
        name="train-00000",
        kind="train",
        lang="en",
        rel_path="train/train-00000.parquet",
        cfg_hash=cfg,
        inputs=[pages_entry.name],
    )
    return ToyCorpus(
        pages_shard=out_dir / pages_entry.path,
        train_shard=out_dir / train_entry.path,
        pages=views,
        eval_queries=eval_queries,
        qrels=qrels,
        train_rows=len(rows),
        words=words,
    )
