"""Extractive query engine: deterministic keyword and phrase queries from the page's own text."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace
from typing import Any

import regex

from tasks.queries.base import STAGE, GeneratedQuery, QueryRequest
from tasks.queries.composed import pick_composed
from tasks.queries.config import ComposedConfig
from tasks.queries.text import (
    _EN_STOPWORDS,
    _LETTER_RUN_RE,
    _SPACE_RE,
    _WORD_RE,
    _uses_words,
    sentences,
    strip_instructions,
)
from tasks.schema import COMPOSED_KIND, Reject, RejectReason
from tasks.shards import hash_id


# ---------------------------------------------------------------------------- extractive engine
def _seed(*parts: Any) -> int:
    return int(hash_id(*[str(p) for p in parts], n=12), 16)


class ExtractiveQueryGenerator:
    """Deterministic queries from spans of the page's own text (kinds ``keyword``, ``phrase``, and
    ``composed``: a region crop with a span of its caption or nearest text, in the page's language).

    Instruction-like sentences are removed before any span is chosen, so an injected sentence never
    becomes a query and never shifts the choice: a page with an injection gives exactly the queries of
    the same page without it. Other requested kinds are skipped (an extractive engine cannot paraphrase).
    """

    name = "extractive"
    model_id = "spans-v1"
    prompt_version = ""
    supported_kinds: tuple[str, ...] = ("keyword", "phrase", COMPOSED_KIND)

    def __init__(
        self,
        *,
        keywords: tuple[int, int] = (2, 4),
        phrase_units: tuple[int, int] = (4, 8),
        composed: ComposedConfig | None = None,
    ):
        self.keywords = keywords
        self.phrase_units = phrase_units
        self.composed = composed or ComposedConfig()

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ExtractiveQueryGenerator:
        from tasks.queries.config import ExtractiveConfig

        c = ExtractiveConfig.model_validate(cfg)  # every default lives in the model
        return cls(keywords=tuple(c.keywords), phrase_units=tuple(c.phrase_units), composed=c.composed)

    @property
    def generator(self) -> str:
        return f"{self.name}:{self.model_id}"

    def __repr__(self) -> str:
        return f"ExtractiveQueryGenerator(keywords={self.keywords}, phrase_units={self.phrase_units})"

    def generate(self, requests: list[QueryRequest]) -> list[GeneratedQuery]:
        return self.generate_with_rejects(requests)[0]

    def generate_with_rejects(
        self, requests: list[QueryRequest]
    ) -> tuple[list[GeneratedQuery], list[Reject]]:
        out: list[GeneratedQuery] = []
        rejects: list[Reject] = []
        for req in requests:
            if req.out_lang != req.lang:
                rejects.append(
                    Reject(STAGE, req.page_id, RejectReason.QUERY_GENERATION_FAILED,
                           "extractive queries can only be in the page's own language", lang=req.out_lang)
                )  # fmt: skip
                continue
            text = strip_instructions(req.text)
            made = []
            for kind in req.kinds:
                if kind == "keyword":
                    made += [(kind, q) for q in self._keywords(req, text)]
                elif kind == "phrase":
                    made += [(kind, q) for q in self._phrases(req, text)]
            if not made and any(k in ("keyword", "phrase") for k in req.kinds):
                rejects.append(
                    Reject(STAGE, req.page_id, RejectReason.QUERY_GENERATION_FAILED,
                           "no usable text on the page", lang=req.lang)
                )  # fmt: skip
            out += [GeneratedQuery(q, req.lang, kind, req.page_id, self.generator, "") for kind, q in made]
            if COMPOSED_KIND in req.kinds:  # most pages have no figure: no composed query, no reject
                out += self._composed(req, text)
        return out, rejects

    def _composed(self, req: QueryRequest, page_text: str) -> list[GeneratedQuery]:
        """One query per picked region (up to ``n``): a phrase (else keywords) of the region's caption or
        nearest text, else of the page text, with the region crop as its image."""
        out = []
        for region in pick_composed(req.image_png, req.regions, req.lang, req.n, self.composed):
            one = replace(req, n=1)
            salt = f"{COMPOSED_KIND}:{region.index}"
            query = ""
            for text in dict.fromkeys((strip_instructions(region.context), page_text)):
                found = self._phrases(one, text, salt) or self._keywords(one, text, salt)
                if found:
                    query = found[0]
                    break
            if query:
                out.append(
                    GeneratedQuery(
                        query, req.lang, COMPOSED_KIND, req.page_id, self.generator, "", region.png
                    )
                )
        return out

    def _keywords(self, req: QueryRequest, text: str, salt: str = "keyword") -> list[str]:
        """Frequent, long, non-stopword words (letter n-grams for zh/ja/th), 2–4 per query."""
        if _uses_words(req.lang):
            words = [w for w in _WORD_RE.findall(text) if _LETTER_RUN_RE.search(w)]
            counts: Counter[str] = Counter()
            first: dict[str, str] = {}
            for w in words:
                key = w.casefold()
                if len(key) < 3 or key in _EN_STOPWORDS:
                    continue
                counts[key] += 1
                first.setdefault(key, w)
        else:
            n = 3 if req.lang == "th" else 2
            counts = Counter()
            first = {}
            for run in _LETTER_RUN_RE.findall(text):
                for i in range(len(run) - n + 1):
                    gram = run[i : i + n]
                    counts[gram] += 1
                    first.setdefault(gram, gram)
        if not counts:
            return []
        ranked = sorted(counts, key=lambda k: (-counts[k] * math.log1p(len(k)), k))[:12]
        queries: list[str] = []
        for i in range(req.n * 3):  # a few extra tries: different windows may coincide on short pages
            if len(queries) >= req.n:
                break
            rng = random.Random(_seed(req.page_id, salt, i))
            k = min(len(ranked), rng.randint(*self.keywords))
            pick = sorted(rng.sample(range(len(ranked)), k))
            q = " ".join(first[ranked[j]] for j in pick)
            if q not in queries:
                queries.append(q)
        return queries

    def _phrases(self, req: QueryRequest, text: str, salt: str = "phrase") -> list[str]:
        """Contiguous spans of 4–8 words (8–16 letters for zh/ja/th) of one sentence, as written."""
        factor = 1 if _uses_words(req.lang) else 2
        lo, hi = self.phrase_units[0] * factor, self.phrase_units[1] * factor
        unit_re = _WORD_RE if factor == 1 else regex.compile(r"[\p{L}\p{N}]\p{M}*")
        sents = []
        for s in sentences(text):
            spans = [m.span() for m in unit_re.finditer(s)]
            if len(spans) >= lo:
                sents.append((s, spans))
        queries: list[str] = []
        for i in range(req.n * 3):
            if len(queries) >= req.n or not sents:
                break
            rng = random.Random(_seed(req.page_id, salt, i))
            sent, spans = sents[rng.randrange(len(sents))]
            length = min(len(spans), rng.randint(lo, hi))
            start = rng.randrange(len(spans) - length + 1)
            q = _SPACE_RE.sub(" ", sent[spans[start][0] : spans[start + length - 1][1]]).strip()
            if q not in queries:
                queries.append(q)
        return queries
