"""Cost of one train shard (~100 queries) against the per-split mining index as the corpus grows.

    nice .venv/bin/python benchmarks/mining_index.py                        # 10k, 100k, 1M pages
    nice .venv/bin/python benchmarks/mining_index.py --sizes 10000,100000   # quicker

Synthetic corpus: source pages in 4 languages (parallel groups: the same word indices, one word form
per language), each language a Zipf(1.0) vocabulary of ``--vocab`` word forms (disjoint between
languages, one digit token shared), 30–90 tokens per page. Pages are generated pre-tokenised and the
BM25 segment is built in memory by the index's own builder (``build_bm25_files``), then published under
a temporary output root with its completion record (``commit_segment``), as ``build_split_index`` does
after reading Parquet. Queries shards of ``--queries`` extractive queries (1–4 consecutive words of a
random page, every fourth one English for a non-English page) are written as the queries stage writes
them, and real ``train_shard`` calls mine them (tiny profile's selection: k=4 of top-30 under 0.95 ×
positive, modality-aware, wrong_ratio 0.25). The first call of a process loads the index (reported
apart); the median of the others is what a train shard costs: read its queries, search, select,
write its shard (fsync'd: the I/O part is noisy on a VM). "search+select" is the best of 3 runs of the
mining alone on one shard's queries.

The old approach — what every train shard did before, minus its Parquet reads of every page: index the
split corpus (tokenise + build) and score every page for every query — is ``mine_negatives`` with the
exhaustive ``BM25Miner``, timed at the smallest size.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.encoders import PageView
from tasks.negatives.base import MiningParams, ModalityMix, QueryView
from tasks.negatives.index import (
    INDEX_META_SCHEMA,
    build_bm25_files,
    clear_cache,
    commit_segment,
    index_config_hash,
    split_index,
)
from tasks.negatives.miners import BM25Miner
from tasks.negatives.search import mine_with_index
from tasks.negatives.selection import mine_negatives, miner_label
from tasks.negatives.shard import train_shard
from tasks.schema import queries_table
from tasks.shards import Manifest, commit_shard

LANGS = ["en", "hi", "zh", "ar"]
FRACTIONS = {"train": 1.0}
PROFILE = {
    "negatives": {
        "miner": "bm25",
        "k": 4,
        "top_n": 30,
        "margin": 0.95,
        "seed": 0,
        "modality": {"wrong_ratio": 0.25, "match": "lang", "match_kind": True, "backfill": True},
    }
}


def synth(n_pages: int, vocab: int, seed: int) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Pre-tokenised pages and their metadata columns (page_id, source_page_id, lang)."""
    rng = np.random.default_rng(seed)
    n_src = n_pages // len(LANGS)
    lengths = rng.integers(30, 91, size=n_src)
    p = 1.0 / np.arange(1, vocab + 1)
    ids = rng.choice(vocab, size=int(lengths.sum()), p=p / p.sum())
    cuts = np.concatenate([[0], np.cumsum(lengths)])
    forms = {lang: np.array([f"{lang}w{i}" for i in range(vocab)], dtype=object) for lang in LANGS}
    docs: list[list[str]] = []
    meta: dict[str, list[str]] = {"page_id": [], "source_page_id": [], "lang": []}
    for s in range(n_src):
        words = ids[cuts[s] : cuts[s + 1]]
        src = f"s{s:07d}"
        for lang in LANGS:
            toks = forms[lang][words].tolist()
            if s % 50 == 0:
                toks.append("2024")
            docs.append(toks)
            meta["page_id"].append(src if lang == "en" else f"{src}-{lang}")
            meta["source_page_id"].append(src)
            meta["lang"].append(lang)
    return docs, meta


def queries_for(
    docs: list[list[str]], meta: dict[str, list[str]], n: int, seed: int, group: str
) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n):
        i = int(rng.integers(len(docs)))
        toks = docs[i]
        start = int(rng.integers(max(1, len(toks) - 4)))
        lang = meta["lang"][i]
        qlang = "en" if (j % 4 == 3 and lang != "en") else lang
        text = " ".join(toks[start : start + int(rng.integers(1, 5))]).replace(f"{lang}w", f"{qlang}w")
        rows.append(
            {
                "query_id": f"{group}-q{j:04d}",
                "query": text,
                "query_lang": qlang,
                "kind": "keyword",
                "page_id": meta["page_id"][i],
                "target_lang": lang,
                "cross_lingual": qlang != lang,
                "source_page_id": meta["source_page_id"][i],
                "source_id": meta["source_page_id"][i],
                "split": "train",
                "generator": "synthetic",
                "prompt_version": "",
            }
        )
    return rows


def build_root(root: Path, docs, meta) -> float:
    """Build + publish the split's one segment; returns the build seconds."""
    import pyarrow as pa

    t = time.perf_counter()
    shard_of = [f"pages-{lang}-corpus" for lang in meta["lang"]]
    table = pa.table(
        {
            "page_id": meta["page_id"],
            "source_page_id": meta["source_page_id"],
            "source_id": meta["source_page_id"],
            "lang": meta["lang"],
            "kind": ["text"] * len(docs),
            "shard": shard_of,
        },
        schema=INDEX_META_SCHEMA,
    )
    cfg = PROFILE["negatives"]
    with tempfile.TemporaryDirectory(prefix="m3dr-bench-") as tmp:
        files, _ = build_bm25_files(docs, meta["lang"], cfg, Path(tmp))
        commit_segment(
            Manifest(root),
            split="train",
            icfg_hash=index_config_hash(cfg, FRACTIONS),
            miner="bm25",
            covers={f"pages-{lang}-corpus": "synthetic" for lang in LANGS},
            meta=table,
            directory=Path(tmp),
            files=files,
            generation=1,
        )
    return time.perf_counter() - t


def write_queries(root: Path, rows: list[dict], group: str) -> str:
    commit_shard(
        root,
        queries_table(rows),
        name=f"queries-{group}",
        kind="queries",
        lang="",
        rel_path=f"queries/queries-{group}.parquet",
        cfg_hash="bench",
        inputs=[f"pages-en-{group}"],
    )
    return f"pages-en-{group}"


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=100, help="queries per train shard")
    ap.add_argument("--shards", type=int, default=9, help="train shards timed per size (first = cold)")
    ap.add_argument("--vocab", type=int, default=50_000, help="word forms per language")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    old = None
    for n in sizes:
        t = time.perf_counter()
        docs, meta = synth(n, args.vocab, args.seed)
        gen_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory(prefix="m3dr-bench-root-") as tmp:
            root = Path(tmp)
            build_s = build_root(root, docs, meta)
            groups = [f"g{j}" for j in range(args.shards)]
            qrows = {
                g: queries_for(docs, meta, args.queries, args.seed + 1 + j, g) for j, g in enumerate(groups)
            }
            shards = [write_queries(root, qrows[g], g) for g in groups]
            clear_cache()
            times = []
            negs = 0
            for en in shards:
                t = time.perf_counter()
                res = train_shard(root, en, PROFILE, split_fractions=FRACTIONS)
                times.append(time.perf_counter() - t)
                negs += res.stats["negatives_per_query"] * res.rows
            # the search + selection alone, for the warm index
            index = split_index(root, PROFILE, FRACTIONS, "train")
            params = MiningParams(4, 30, 0.95, 0, ModalityMix(0.25))
            views = [QueryView.from_row(r) for r in qrows[groups[-1]]]
            search_s = float("inf")
            for _ in range(3):  # best of 3: the search alone, without the shard's I/O
                t = time.perf_counter()
                mine_with_index(views, index, params, label="bm25", cfg=PROFILE["negatives"])
                search_s = min(search_s, time.perf_counter() - t)
            if old is None:  # the old approach at the smallest size
                corpus = [
                    PageView(pid, spid, lang, " ".join(toks))
                    for pid, spid, lang, toks in zip(
                        meta["page_id"], meta["source_page_id"], meta["lang"], docs, strict=True
                    )
                ]
                miner = BM25Miner(params=params)
                t = time.perf_counter()
                mine_negatives(
                    views, corpus, miner, k=4, top_n=30, margin=0.95, seed=0, modality=params.modality
                )
                old = (n, time.perf_counter() - t)
                del corpus
            del index
            clear_cache()
        warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
        results.append(
            {
                "pages": n,
                "gen_s": gen_s,
                "build_s": build_s,
                "cold_s": times[0],
                "warm_s": warm,
                "search_s": search_s,
                "neg_per_q": negs / (args.queries * len(shards)),
                "rss_gb": rss_gb(),
            }
        )
        r = results[-1]
        print(
            f"... {n:>9,} pages: generated {gen_s:.1f}s, index built+published {build_s:.1f}s, "
            f"first shard {r['cold_s']:.2f}s, next {warm:.3f}s",
            flush=True,
        )
        del docs, meta

    label = miner_label(BM25Miner(), MiningParams(4, 30, 0.95, 0, ModalityMix(0.25)))
    print()
    print(f"train shard of {args.queries} queries, {label}")
    head = (
        f"{'corpus pages':>13} {'index build s':>14} {'1st shard s':>12} {'shard s':>9} "
        f"{'search+select s':>16} {'ms/query':>9} {'neg/query':>10} {'peak RSS GB':>12}"
    )
    print(head)
    for r in results:
        print(
            f"{r['pages']:>13,} {r['build_s']:>14.1f} {r['cold_s']:>12.2f} {r['warm_s']:>9.3f} "
            f"{r['search_s']:>16.3f} {1000 * r['search_s'] / args.queries:>9.2f} {r['neg_per_q']:>10.2f} "
            f"{r['rss_gb']:>12.2f}"
        )
    base = results[0]
    for r in results[1:]:
        shard, search = r["warm_s"] / base["warm_s"], r["search_s"] / base["search_s"]
        print(
            f"ratio {r['pages']:,}:{base['pages']:,} pages (corpus {r['pages'] / base['pages']:.0f}×): "
            f"train shard {shard:.2f}×, search+select {search:.2f}×"
        )
    if old is not None:
        n, secs = old
        print(
            f"old approach at {n:,} pages (index the corpus per shard + score every page; no Parquet reads): "
            f"{secs:.2f}s per shard = {secs / base['warm_s']:.1f}× the indexed train shard"
        )


if __name__ == "__main__":
    main()
