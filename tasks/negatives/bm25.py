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
must not cost O(pages) per query. :meth:`Bm25Segment.candidates` is a MaxScore-style pruned search:
the rarest query terms' postings give the candidates, their scores are exact (the other terms looked
up by binary search in their sorted postings), and the remaining terms' score upper bounds say how
high a page outside the candidates could score. Per-term maxima and per-term language bitmasks are
saved beside the bm25s files for that.
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
_EXTRA_FILES = ("term_max.npy", "term_langs.npy", "segment.json")


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
    """

    model: object = field(repr=False)  # bm25s.BM25
    vocab: dict[str, int] = field(repr=False)
    term_max: np.ndarray = field(repr=False)  # [V] float32: the largest weight of the term in any page
    term_langs: np.ndarray = field(repr=False)  # [V] uint64 language bitmask
    langs: list[str]
    n_docs: int

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
        """Per-term maximum weight and language bitmask (from the CSC matrix; no empty columns)."""
        data, indices, indptr = self._csc()
        n_terms = indptr.size - 1
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

    def save(self, directory: Path) -> list[str]:
        """Write the bm25s files and ours into ``directory``; returns the file names written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        before = set(p.name for p in directory.iterdir())
        if self.vocab:
            self.model.save(str(directory), show_progress=False)
        np.save(directory / "term_max.npy", self.term_max)
        np.save(directory / "term_langs.npy", self.term_langs)
        meta = {"langs": self.langs, "n_docs": self.n_docs, "tokenizer": TOKENIZER_VERSION}
        (directory / "segment.json").write_text(json.dumps(meta, sort_keys=True))
        return sorted(set(p.name for p in directory.iterdir()) - before)

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = True) -> Bm25Segment:
        """A saved segment; the score matrix is memory-mapped (bm25s ``load(mmap=True)``)."""
        import bm25s

        directory = Path(directory)
        meta = json.loads((directory / "segment.json").read_text())
        term_max = np.load(directory / "term_max.npy", mmap_mode="r" if mmap else None)
        term_langs = np.load(directory / "term_langs.npy", mmap_mode="r" if mmap else None)
        if (directory / "params.index.json").exists():
            model = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False)
            vocab = model.vocab_dict
        else:
            model, vocab = None, {}
        return cls(model, vocab, term_max, term_langs, list(meta["langs"]), int(meta["n_docs"]))

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

    def union(self, terms: Sequence[int]) -> np.ndarray:
        """Rows (ascending, int64) holding at least one of ``terms``."""
        parts = [self.postings(int(t))[0] for t in terms]
        total = sum(p.size for p in parts)
        if len(parts) == 1:
            return np.asarray(parts[0], dtype=np.int64)
        if total > self.n_docs // 32:  # a mark per page beats sorting many postings
            mark = np.zeros(self.n_docs, dtype=bool)
            for p in parts:
                mark[p] = True
            return np.flatnonzero(mark)
        return np.unique(np.concatenate(parts)).astype(np.int64)

    def df(self, q: QueryTerms) -> np.ndarray:
        _, _, indptr = self._csc()
        return (np.asarray(indptr[q.ids + 1]) - np.asarray(indptr[q.ids])).astype(np.int64)

    def score_rows(self, q: QueryTerms, rows: np.ndarray) -> np.ndarray:
        """Exact float32 scores of ``rows`` (the canonical sum: float64, terms in ascending id order)."""
        acc = np.zeros(len(rows), dtype=np.float64)
        if acc.size == 0:
            return acc.astype(np.float32)
        _, indices, _ = self._csc()
        rows = np.asarray(rows, dtype=indices.dtype)  # same dtype as the postings: searched without a copy
        for t, w in zip(q.ids.tolist(), q.weights.tolist(), strict=True):
            post, weight = self.postings(t)
            if post.size == 0:
                continue
            pos = np.minimum(np.searchsorted(post, rows), post.size - 1)
            hit = post[pos] == rows
            acc[hit] += w * weight[pos[hit]].astype(np.float64)
        return acc.astype(np.float32)

    def scores_all(self, q: QueryTerms) -> np.ndarray:
        """[n_docs] float32 scores of every page (exhaustive; same values as :meth:`score_rows`)."""
        if q.empty:
            return np.zeros(self.n_docs, dtype=np.float32)
        rows, contrib = self._concat(q, q.ids)
        return np.bincount(rows, weights=contrib, minlength=self.n_docs).astype(np.float32)

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
