"""BM25 over bm25s: our language-agnostic tokenizer, a segment (build / save / mmap load) and exact scoring.

bm25s (PyPI ``bm25s``, method ``"lucene"``) precomputes every (term, page) weight into a term-major CSC
matrix: ``idf(t) · tf / (tf + k1·(1 - b + b·|d|/avgdl))`` with Lucene's idf ``log(1 + (N - df + 0.5) /
(df + 0.5))``. That is the classic Lucene/Okapi weight divided by the constant ``k1 + 1`` (Lucene ≥ 8
dropped the factor), so rankings and every score *ratio* (what the positive-aware threshold compares)
equal those of the textbook formula this project used before.

We feed bm25s pre-tokenised ids (:func:`tokenize`, vocabulary in first-occurrence order) and read its
matrix directly instead of calling ``BM25.retrieve``, for two reasons: scores must be bit-identical
whichever subset of pages is scored (one canonical summation: float64, query terms in ascending id
order, then float32), so an index search and an exhaustive scan pick the same negatives; and a search
must not cost O(pages) per query.

Beside the bm25s files a segment keeps, per term, its largest weight and a language bitmask, and an
**impact-ordered** copy of every long posting list (``df >= IMPACT_MIN_DF``: rows sorted by weight,
``impact_*.npy``; shorter lists are sorted when asked). A search (``search.py``) cuts each query term's
impact list to a window of weights (``cut < weight·count < threshold``): pages scoring at or above the
positive-aware threshold are never candidates, and pages below every term's cut provably score under
the pool's running n-th best (Fagin's threshold argument, with cuts chosen per query). ``BM25_FORMAT``
names this file layout; the index config hashes it, so a segment of another format is rebuilt, never
read.
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import regex

TOKENIZER_VERSION = "nfkc-casefold-words-bigrams-v1"

_NOSPACE_CLASS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u30fc\u3005"
_TOKEN_RE = regex.compile(
    rf"(?P<ns>[{_NOSPACE_CLASS}]+)|(?P<w>(?:(?![{_NOSPACE_CLASS}])[\p{{L}}\p{{M}}\p{{N}}])+)"
)
_CLUSTER_RE = regex.compile(r"\X")


def tokenize(text: str) -> list[str]:
    """Language-agnostic BM25 tokens: NFKC + casefold; words, or grapheme bigrams for unspaced scripts."""
    text = unicodedata.normalize("NFKC", text).casefold()
    out: list[str] = []
    for m in _TOKEN_RE.finditer(text):
        if m.group("w") is not None:
            out.append(m.group("w"))
            continue
        clusters = _CLUSTER_RE.findall(m.group("ns"))
        if len(clusters) == 1:
            out.append(clusters[0])
        else:
            out.extend(a + b for a, b in itertools.pairwise(clusters))
    return out


MAX_LANG_BITS = 64
BM25_FORMAT = 2  # 1: bm25s + term_max + term_langs; 2: + impact-ordered long postings (impact_*.npy)
IMPACT_MIN_DF = 1024  # posting lists at least this long are stored impact-ordered (shorter: sorted on use)
_IMPACT_CHUNK = 1 << 22  # postings sorted per step at build time (bounded memory)
_IMPACT_FILES = ("impact_ptr.npy", "impact_rows.npy", "impact_w.npy")


@dataclass(frozen=True)
class QueryTerms:
    """A query in one segment's vocabulary: unique term ids (ascending) and their counts in the query."""

    ids: np.ndarray  # int64, ascending
    weights: np.ndarray  # float64, how often each term occurs in the query

    @property
    def empty(self) -> bool:
        return self.ids.size == 0


@dataclass
class Bm25Segment:
    """A bm25s index over one segment's pages plus the per-term data the pruned search needs.

    ``term_langs[t]`` has bit ``i`` set when term ``t`` occurs in a page of language ``langs[i]``
    (all bits when the segment has more than 64 languages: no pruning by language then).
    ``impact_ptr[t]:impact_ptr[t + 1]`` spans term ``t``'s impact-ordered postings in ``impact_rows`` /
    ``impact_w`` (weight ascending, row ascending among equal weights); empty for short lists.
    """

    model: object = field(repr=False)  # bm25s.BM25
    vocab: dict[str, int] = field(repr=False)
    term_max: np.ndarray = field(repr=False)  # [V] float32: the largest weight of the term in any page
    term_langs: np.ndarray = field(repr=False)  # [V] uint64 language bitmask
    langs: list[str]
    n_docs: int
    impact_ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64), repr=False)  # [V + 1]
    impact_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32), repr=False)
    impact_w: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)

    # ------------------------------------------------------------------------------------- build / io
    @classmethod
    def build(
        cls,
        docs: Sequence[Sequence[str]],
        doc_langs: Sequence[str],
        *,
        k1: float = 1.2,
        b: float = 0.75,
    ) -> Bm25Segment:
        """Index pre-tokenised pages (``docs[i]`` = tokens of page i, in language ``doc_langs[i]``)."""
        import bm25s

        if len(docs) != len(doc_langs):
            raise ValueError(f"{len(docs)} documents but {len(doc_langs)} languages")
        # ids in first-occurrence order (C-level loops: this is most of a large build's Python time)
        vocab = {tok: i for i, tok in enumerate(dict.fromkeys(itertools.chain.from_iterable(docs)))}
        lookup = vocab.__getitem__
        ids = [list(map(lookup, doc)) for doc in docs]
        langs = sorted(set(doc_langs))
        model = bm25s.BM25(k1=float(k1), b=float(b), method="lucene")
        if vocab:
            model.index((ids, vocab), create_empty_token=False, show_progress=False)
        else:  # no page has a single token: an empty matrix, every score 0
            model.scores = {
                "data": np.zeros(0, np.float32),
                "indices": np.zeros(0, np.int32),
                "indptr": np.zeros(1, np.int64),
                "num_docs": len(docs),
            }
            model.vocab_dict = {}
        seg = cls(model, vocab, np.zeros(0, np.float32), np.zeros(0, np.uint64), langs, len(docs))
        seg._derive(np.array([langs.index(x) for x in doc_langs], dtype=np.int64))
        return seg

    def _derive(self, doc_lang_codes: np.ndarray) -> None:
        """Per-term maximum weight, language bitmask and impact order (from the CSC matrix; no empty
        columns)."""
        data, indices, indptr = self._csc()
        n_terms = indptr.size - 1
        self._derive_impacts()
        if n_terms == 0 or data.size == 0:
            self.term_max = np.zeros(n_terms, np.float32)
            self.term_langs = np.zeros(n_terms, np.uint64)
            return
        starts = indptr[:-1]
        self.term_max = np.maximum.reduceat(data, starts).astype(np.float32)
        if len(self.langs) > MAX_LANG_BITS:
            self.term_langs = np.full(n_terms, np.iinfo(np.uint64).max, np.uint64)
        else:
            bits = np.left_shift(np.uint64(1), doc_lang_codes.astype(np.uint64))
            self.term_langs = np.bitwise_or.reduceat(bits[indices], starts).astype(np.uint64)

    def _derive_impacts(self) -> None:
        """Impact order of every posting list of ``IMPACT_MIN_DF`` or more entries: a stable sort by
        weight per list (ties keep row order), a few million postings at a time."""
        data, indices, indptr = self._csc()
        df = np.diff(indptr)
        long = np.flatnonzero(df >= IMPACT_MIN_DF)
        ptr = np.zeros(df.size + 1, np.int64)
        ptr[long + 1] = df[long]
        np.cumsum(ptr, out=ptr)
        rows = np.empty(int(ptr[-1]), dtype=indices.dtype)
        weights = np.empty(int(ptr[-1]), dtype=np.float32)
        a = 0
        while a < long.size:  # chunks of whole lists: one lexsort per chunk
            b = a + 1
            while b < long.size and ptr[long[b] + 1] - ptr[long[a]] <= _IMPACT_CHUNK:
                b += 1
            terms = long[a:b]
            lo, hi = int(ptr[terms[0]]), int(ptr[terms[-1] + 1])
            parts = [np.arange(int(indptr[t]), int(indptr[t + 1])) for t in terms.tolist()]
            src = np.concatenate(parts)
            which = np.repeat(np.arange(terms.size), df[terms])
            w = np.asarray(data[src], dtype=np.float32)
            order = np.lexsort((w, which))  # by list, then weight; stable: row order among ties
            rows[lo:hi] = indices[src[order]]
            weights[lo:hi] = w[order]
            a = b
        self.impact_ptr, self.impact_rows, self.impact_w = ptr, rows, weights

    def save(self, directory: Path) -> list[str]:
        """Write the bm25s files and ours into ``directory``; returns the file names written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        before = set(p.name for p in directory.iterdir())
        if self.vocab:
            self.model.save(str(directory), show_progress=False)
        np.save(directory / "term_max.npy", self.term_max)
        np.save(directory / "term_langs.npy", self.term_langs)
        np.save(directory / "impact_ptr.npy", self.impact_ptr)
        np.save(directory / "impact_rows.npy", self.impact_rows)
        np.save(directory / "impact_w.npy", self.impact_w)
        meta = {
            "format": BM25_FORMAT,
            "impact_min_df": IMPACT_MIN_DF,
            "langs": self.langs,
            "n_docs": self.n_docs,
            "tokenizer": TOKENIZER_VERSION,
        }
        (directory / "segment.json").write_text(json.dumps(meta, sort_keys=True))
        return sorted(set(p.name for p in directory.iterdir()) - before)

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = True) -> Bm25Segment:
        """A saved segment; the score matrix is memory-mapped (bm25s ``load(mmap=True)``)."""
        import bm25s

        directory = Path(directory)
        meta = json.loads((directory / "segment.json").read_text())
        if meta.get("format", 1) != BM25_FORMAT or meta.get("impact_min_df") != IMPACT_MIN_DF:
            raise ValueError(
                f"{directory}: BM25 segment format {meta.get('format', 1)} (impact lists from df "
                f"{meta.get('impact_min_df')}), this code reads {BM25_FORMAT} (from df {IMPACT_MIN_DF}): "
                "rebuild the index"
            )
        mode = "r" if mmap else None
        arrays = {
            name: np.load(directory / f"{name}.npy", mmap_mode=mode)
            for name in ("term_max", "term_langs", "impact_ptr", "impact_rows", "impact_w")
        }
        if (directory / "params.index.json").exists():
            model = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False)
            vocab = model.vocab_dict
        else:
            model, vocab = None, {}
        return cls(
            model,
            vocab,
            arrays["term_max"],
            arrays["term_langs"],
            list(meta["langs"]),
            int(meta["n_docs"]),
            np.asarray(arrays["impact_ptr"]),
            arrays["impact_rows"],
            arrays["impact_w"],
        )

    # ------------------------------------------------------------------------------------- scoring
    def _csc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.model is None or not self.vocab:
            return np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64)
        s = self.model.scores
        return s["data"], s["indices"], s["indptr"]

    def terms(self, tokens: Sequence[str]) -> QueryTerms:
        """The query's tokens in this segment's vocabulary (unknown tokens dropped: they score nothing)."""
        ids = [self.vocab[t] for t in tokens if t in self.vocab]
        if not ids:
            return QueryTerms(np.zeros(0, np.int64), np.zeros(0, np.float64))
        uniq, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        return QueryTerms(uniq, counts.astype(np.float64))

    def postings(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        """(page rows ascending, weights) of one term: views of the (memory-mapped) matrix, no copy."""
        data, indices, indptr = self._csc()
        s, e = int(indptr[term]), int(indptr[term + 1])
        return indices[s:e], data[s:e]

    def impact(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, weights) of one term by weight ascending (row ascending among ties): views of the
        stored impact order for long lists, sorted here for short ones."""
        a, b = int(self.impact_ptr[term]), int(self.impact_ptr[term + 1])
        if b > a:
            return self.impact_rows[a:b], self.impact_w[a:b]
        post, weight = self.postings(term)
        order = np.argsort(weight, kind="stable")
        return post[order], np.asarray(weight)[order]

    def distinct(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` unique and ascending (int64): a mark per page when they are many, else a sort."""
        if rows.size > self.n_docs // 64:
            mark = np.zeros(self.n_docs, dtype=bool)
            mark[rows] = True
            return np.flatnonzero(mark)
        out = np.sort(rows.astype(np.int64))
        return out[np.concatenate([[True], out[1:] != out[:-1]])] if out.size else out

    def dense_cheaper(self, q: QueryTerms, n_rows: int) -> bool:
        """Whether one pass over the query's postings (:meth:`scores_all`) costs less than a binary
        search per row and term (measured: ~10 postings summed per binary search, ~6 pages zeroed)."""
        return n_rows * q.ids.size * 10 > int(self.df(q).sum()) + self.n_docs // 6

    def df(self, q: QueryTerms) -> np.ndarray:
        _, _, indptr = self._csc()
        return (np.asarray(indptr[q.ids + 1]) - np.asarray(indptr[q.ids])).astype(np.int64)

    def score_rows(self, q: QueryTerms, rows: np.ndarray) -> np.ndarray:
        """Exact float32 scores of ``rows`` (unique, ascending; the canonical sum: float64, terms in
        ascending id order). Each term searches the shorter side: the rows in its postings, or its
        postings in the rows."""
        acc = np.zeros(len(rows), dtype=np.float64)
        if acc.size == 0:
            return acc.astype(np.float32)
        _, indices, _ = self._csc()
        if self.dense_cheaper(q, acc.size):
            return self.scores_all(q)[np.asarray(rows, dtype=np.int64)]
        rows = np.asarray(rows, dtype=indices.dtype)  # same dtype as the postings: searched without a copy
        for t, w in zip(q.ids.tolist(), q.weights.tolist(), strict=True):
            post, weight = self.postings(t)
            if post.size == 0:
                continue
            if rows.size <= post.size:
                pos = np.minimum(np.searchsorted(post, rows), post.size - 1)
                hit = post[pos] == rows
                acc[hit] += w * weight[pos[hit]].astype(np.float64)
            else:
                pos = np.minimum(np.searchsorted(rows, post), rows.size - 1)
                hit = rows[pos] == post
                acc[pos[hit]] += w * weight[hit].astype(np.float64)
        return acc.astype(np.float32)

    def scores_all(self, q: QueryTerms) -> np.ndarray:
        """[n_docs] float32 scores of every page (exhaustive; same values as :meth:`score_rows`)."""
        return self.sums(q).astype(np.float32)

    def sums(self, q: QueryTerms) -> np.ndarray:
        """[n_docs] float64 canonical sums of every page (float32 of them: the scores)."""
        if q.empty:
            return np.zeros(self.n_docs, dtype=np.float64)
        rows, contrib = self._concat(q, q.ids)
        return np.bincount(rows, weights=contrib, minlength=self.n_docs)

    def _concat(self, q: QueryTerms, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Postings of ``terms`` (ascending ids) concatenated, weights × query counts in float64."""
        w_of = dict(zip(q.ids.tolist(), q.weights.tolist(), strict=True))
        rows, contrib = [], []
        for t in np.sort(terms).tolist():
            post, weight = self.postings(t)
            rows.append(post)
            contrib.append(w_of[t] * weight.astype(np.float64))
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        return np.concatenate(rows), np.concatenate(contrib)

    def nonzero(self, q: QueryTerms) -> tuple[np.ndarray, np.ndarray]:
        """Every page with a non-zero score (rows ascending) and its exact score."""
        if q.empty:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, contrib = self._concat(q, q.ids)
        if rows.size > self.n_docs // 32:  # dense accumulation is cheaper than sorting the postings
            full = np.bincount(rows, weights=contrib, minlength=self.n_docs)
            hit = np.flatnonzero(full > 0)
            return hit, full[hit].astype(np.float32)
        uniq, inv = np.unique(rows, return_inverse=True)
        sums = np.bincount(inv, weights=contrib, minlength=uniq.size).astype(np.float32)
        return uniq.astype(np.int64), sums

    def upper_bounds(self, q: QueryTerms) -> np.ndarray:
        """[terms] float64: the most a term can add to any page's score (query count × its max weight)."""
        if q.empty:
            return np.zeros(0, np.float64)
        return q.weights * np.asarray(self.term_max[q.ids], dtype=np.float64)

    def lang_bits(self, langs: set[str]) -> int:
        """The bitmask of ``langs`` in this segment (all bits when languages are not tracked)."""
        if len(self.langs) > MAX_LANG_BITS:
            return int(np.iinfo(np.uint64).max)
        return sum(1 << i for i, lang in enumerate(self.langs) if lang in langs)


def bound_of(upper: np.ndarray) -> float:
    """An upper bound of a sum of scores each below ``upper[i]``, safe against float rounding."""
    total = float(np.sum(upper))
    return total * (1.0 + 1e-9) if total > 0 else 0.0
