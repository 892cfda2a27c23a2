"""Optional rerank stage of the benchmark: MM-Embed style zero-shot relevance (arXiv 2411.02571).

A VLM behind an OpenAI-compatible chat server (``vllm serve``; any server that returns ``logprobs``)
reads one (query, candidate page) pair at a time and is asked for exactly ``True`` or ``False``
(``assets/prompts/rerank_v1.toml``). The score is read from the logprobs of the one reply token::

    P(True) = p_T / (p_T + p_F)

where ``p_T`` (``p_F``) sums the probabilities of the returned tokens whose stripped, case-folded text
is ``true`` (``false``): the ``top_logprobs`` alternatives plus the sampled token itself (it may lie
outside the top list when sampling is constrained). Greedy (``temperature`` 0), ``max_tokens`` 1,
``top_logprobs`` 20 (OpenAI's and vLLM's default maximum). A label below the top list counts 0, so a
page whose reply has only ``True`` among the alternatives scores 1. When neither label is there the
score is ``missing_label_p`` (default 0.5: no evidence either way), counted in ``stats.missing_label``.

Portable by default: nothing but standard OpenAI fields is sent. ``constrain = "choice"`` adds vLLM's
``structured_outputs: {"choice": ["True", "False"]}``: the decoder may then only start one of the two
labels, so the sampled token always counts; a label can then also be split over several tokens, so in
this mode a token counts for a label when its text is a non-empty prefix of it (``T``, ``Tr`` …).
vLLM returns the model's logprobs *before* sampling parameters and logits processors by default
(``--logprobs-mode raw_logprobs``); see ``VlmReranker`` for what the server flags change.

The new run (``merge_run``): each query's first-stage top ``top_k`` (in trec_eval order: score desc,
then doc id desc, as ``eval.metrics.rank_docs`` sees the run) is sorted by P(True), ties kept in
first-stage order; their scores are P(True) shrunk by a rank epsilon (1e-6 per place, so the order is
strict even as float32, which trec_eval compares) and stay in [0, 1]. A candidate whose request failed
(a reply without logprobs, a request the server refuses as invalid, a page that cannot be loaded) keeps
its first-stage place: that pair's failure is logged and counted, and the benchmark goes on. A server
that cannot answer (unreachable, timing out, 5xx after the retries, 401/403/404) is a broken world, not
a pair's fault: the first ``EndpointUnavailable`` cancels the other requests and ``rerank`` raises it
(a benchmark with a dead reranker is a failed run, not a silently un-reranked one). Docs beyond
``top_k`` keep their first-stage order with scores -1, -2, … below every reranked doc.

Off by default: ``build_reranker`` returns None for no (or an empty) table, ``engine = "none"`` or
``enabled = false``; a filled table without ``engine`` means ``vllm``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from eval.metrics import rank_docs
from tasks.config import check_config
from tasks.encoders import PageView
from tasks.faults import reject_or_raise
from tasks.llm.client import ChatEndpoint, EndpointConfig, Session, gather_or_fail, run_sync
from tasks.llm.prompts import load_prompt
from tasks.queries.vllm import Prompt

log = logging.getLogger(__name__)

Run = Mapping[str, Mapping[str, float]]

MODALITIES: tuple[str, ...] = ("image", "text", "image+text")
CONSTRAINTS: tuple[str, ...] = ("none", "choice")
LABELS: tuple[str, str] = ("True", "False")
RANK_EPS = 1e-6  # score gap per place: > 8 float32 ulps below 1.0, so float32 keeps the order strict
MAX_TOP_K = 10_000  # top_k * RANK_EPS stays <= 1 %: scores remain P(True) to two decimals
PAGE_SLOT = "\x00PAGE\x00"


class RerankConfig(EndpointConfig):
    """``rerank`` table of benchmark-nayana (``engine = "vllm"``): the server, then how to judge."""

    engine: Literal["vllm", "none"] = "vllm"
    enabled: bool = True
    prompt: str = "rerank_v1"
    top_k: int = 10
    modality: str = "image"  # image | text | image+text
    max_page_chars: int = 6000
    top_logprobs: int = 20
    missing_label_p: float = 0.5
    constrain: str = "none"  # none | choice (vLLM structured outputs)


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Judgement:
    """The verdict on one (query, page) pair, read from the first reply token's logprobs."""

    p_true: float  # p_T / (p_T + p_F), or the fallback when both are absent
    true_mass: float  # p_T: summed probability of the tokens that count as True
    false_mass: float  # p_F
    missing: bool  # neither label among the returned tokens (p_true is then the fallback)
    token: str  # the sampled token
    logprobs: tuple[tuple[str, float], ...] = ()  # the (token, logprob) pairs it was computed from


@dataclass
class RerankStats:
    """Counters of one ``rerank`` call."""

    requests: int = 0  # (query, candidate) pairs to judge
    http_calls: int = 0  # including retries and the model lookup
    retries: int = 0
    failures: int = 0  # pairs left unjudged (request refused as invalid, unusable reply, no page)
    missing_label: int = 0  # judged pairs with neither True nor False in the logprobs
    prompt_tokens: int = 0  # the server's ``usage`` summed over replies
    completion_tokens: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class RerankResult:
    """The reranked run, the P(True) of every judged pair, why the others failed, and counters."""

    run: dict[str, dict[str, float]]
    scores: dict[str, dict[str, float]]  # qid → docid → P(True), judged pairs only
    stats: RerankStats
    judgements: dict[str, dict[str, Judgement]] = field(default_factory=dict)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # qid → docid → error


@runtime_checkable
class Reranker(Protocol):
    """What every rerank engine offers."""

    name: str
    model_id: str
    prompt_version: str
    top_k: int

    def rerank(
        self, queries: Mapping[str, str], run: Run, page: Callable[[str], PageView]
    ) -> RerankResult: ...


# ---------------------------------------------------------------------------- pure parts
def candidates(scores: Mapping[str, float], top_k: int) -> list[str]:
    """The first-stage top ``top_k`` doc ids of one query, in trec_eval order (as metrics rank them)."""
    return rank_docs(scores, top_k)


def _norm(token: str) -> str:
    return token.strip().casefold()


def _label_of(token: str, *, prefix: bool) -> int | None:
    """0 for True, 1 for False, None for anything else (``prefix``: any non-empty prefix counts)."""
    text = _norm(token)
    for i, label in enumerate(LABELS):
        target = label.casefold()
        if text == target or (prefix and text and target.startswith(text)):
            return i
    return None


def token_logprobs(entry: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(token, logprob) of one reply position: the ``top_logprobs`` alternatives, plus the sampled
    token when it is not among them (same text and logprob). Non-finite or absent logprobs are dropped."""
    pairs: list[tuple[str, float]] = []
    for alt in entry.get("top_logprobs") or []:
        lp = alt.get("logprob")
        if isinstance(alt.get("token"), str) and isinstance(lp, int | float) and math.isfinite(lp):
            pairs.append((alt["token"], float(lp)))
    token, lp = entry.get("token"), entry.get("logprob")
    usable = isinstance(token, str) and isinstance(lp, int | float) and math.isfinite(lp)
    if usable and not any(t == token and math.isclose(p, lp, abs_tol=1e-6) for t, p in pairs):
        pairs.append((token, float(lp)))
    return pairs


def _masses(pairs: list[tuple[str, float]], prefix: bool) -> tuple[float, float]:
    mass = [0.0, 0.0]
    for token, lp in pairs:
        label = _label_of(token, prefix=prefix)
        if label is not None:
            mass[label] += math.exp(lp)
    return mass[0], mass[1]


def label_masses(entry: Mapping[str, Any], *, prefix: bool = False) -> tuple[float, float]:
    """(p_T, p_F): summed probabilities of the tokens of one reply position that count as each label."""
    return _masses(token_logprobs(entry), prefix)


def judge(choice: Mapping[str, Any], *, missing_label_p: float = 0.5, prefix: bool = False) -> Judgement:
    """The ``Judgement`` of one chat-completion choice; ValueError when it carries no logprobs."""
    try:
        entry = choice["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("reply has no logprobs (does the server support them?)") from exc
    pairs = token_logprobs(entry)
    t, f = _masses(pairs, prefix)
    missing = t + f <= 0.0
    p = missing_label_p if missing else t / (t + f)
    return Judgement(min(1.0, max(0.0, p)), t, f, missing, str(entry.get("token", "")), tuple(pairs))


def page_block(text: str, max_page_chars: int) -> str:
    """The page text inside the data block; the block's markers are removed from the text first."""
    text = text.replace(Prompt.BEGIN, " ").replace(Prompt.END, " ")[:max_page_chars]
    return f"{Prompt.BEGIN}\n{text}\n{Prompt.END}"


def image_part(png: bytes) -> dict[str, Any]:
    """An OpenAI ``image_url`` content part carrying the PNG as a base64 data URL."""
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def render_messages(
    prompt: Prompt, query: str, page: PageView, *, modality: str, max_page_chars: int
) -> list[dict[str, Any]]:
    """The chat messages that ask whether ``page`` is relevant to ``query``.

    ``text``: one string, the page's text (cut to ``max_page_chars``) in the data block. ``image``: the
    page PNG as an image part where the prompt says ``{page}``; a page without an image falls back to
    its text. ``image+text``: the image, then the text block.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    fields = {"begin": Prompt.BEGIN, "end": Prompt.END}
    clean_query = " ".join(query.replace(Prompt.BEGIN, " ").replace(Prompt.END, " ").split())
    system = prompt.system.format(**fields)
    user = (
        prompt.user.replace("{query}", "\x00QUERY\x00")
        .replace("{page}", PAGE_SLOT)
        .format(**fields)
        .replace("\x00QUERY\x00", clean_query)
    )
    before, _, after = user.partition(PAGE_SLOT)
    use_image = modality != "text" and page.image_png is not None
    use_text = modality != "image" or not use_image
    if not use_image:
        content: str | list[dict[str, Any]] = before + page_block(page.text, max_page_chars) + after
    else:
        parts: list[dict[str, Any]] = [{"type": "text", "text": before}] if before.strip() else []
        parts.append(image_part(page.image_png))  # type: ignore[arg-type]
        tail = ("\n" + page_block(page.text, max_page_chars) if use_text else "") + after
        if tail.strip():
            parts.append({"type": "text", "text": tail})
        content = parts
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def merge_run(first_stage: Mapping[str, float], p_true: Mapping[str, float], top_k: int) -> dict[str, float]:
    """One query's new run: the first-stage top ``top_k`` reordered by ``p_true``, the rest below.

    Candidates in ``p_true`` are sorted by P(True) desc, ties in first-stage order; a candidate missing
    from ``p_true`` (its request failed) keeps its first-stage place. Place ``i`` of ``k`` candidates
    scores ``s * (1 - k*eps) + (k - 1 - i) * eps`` with ``s`` its P(True) (a failed candidate takes the
    ``s`` of the place above, 1 at the top), so scores are strictly decreasing, in [0, 1], and within
    ``k*eps`` of P(True). The docs beyond ``top_k`` score -1, -2, … in first-stage order.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    order = rank_docs(first_stage)
    head, tail = order[:top_k], order[top_k:]
    place = {d: i for i, d in enumerate(head)}
    judged = iter(sorted((d for d in head if d in p_true), key=lambda d: (-p_true[d], place[d])))
    new_order = [next(judged) if d in p_true else d for d in head]
    k = len(head)
    out: dict[str, float] = {}
    level = 1.0
    for i, d in enumerate(new_order):
        if d in p_true:
            level = min(1.0, max(0.0, float(p_true[d])))
        out[d] = level * (1.0 - k * RANK_EPS) + (k - 1 - i) * RANK_EPS
    for j, d in enumerate(tail):
        out[d] = -1.0 - j
    return out


# ---------------------------------------------------------------------------- engine
class VlmReranker:
    """P(True) reranking with a VLM behind an OpenAI-compatible chat server, many requests in flight.

    On vLLM: returned logprobs are the model's own distribution by default (``--logprobs-mode
    raw_logprobs``), untouched by ``temperature``, ``allowed_token_ids``, ``logit_bias`` or penalties.
    Structured outputs (``constrain = "choice"``) mask the logits before that point, so their logprobs
    cover the allowed label tokens only. ``--max-logprobs`` (default 20) caps ``top_logprobs``. vLLM
    0.32 also takes ``logprob_token_ids`` (logprobs of given vocab ids) and ``allowed_token_ids``; both
    need the label token ids of the served tokenizer, so they are not used here.
    """

    name = "vllm"

    def __init__(
        self,
        endpoint: ChatEndpoint,
        *,
        prompt: Prompt | None = None,
        top_k: int = 10,
        modality: str = "image",
        max_page_chars: int = 6000,
        top_logprobs: int = 20,
        missing_label_p: float = 0.5,
        constrain: str = "none",
    ) -> None:
        if not 1 <= int(top_k) <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if constrain not in CONSTRAINTS:
            raise ValueError(f"constrain must be one of {CONSTRAINTS}, got {constrain!r}")
        if not 1 <= int(top_logprobs) <= 20:
            raise ValueError(f"top_logprobs must be in [1, 20], got {top_logprobs}")
        if not 0.0 <= float(missing_label_p) <= 1.0:
            raise ValueError(f"missing_label_p must be in [0, 1], got {missing_label_p}")
        if int(max_page_chars) < 1:
            raise ValueError("max_page_chars must be >= 1")
        self.endpoint = endpoint
        self.prompt = prompt or load_prompt("rerank_v1")
        self.prompt_version = self.prompt.version
        self.top_k = int(top_k)
        self.modality = modality
        self.max_page_chars = int(max_page_chars)
        self.top_logprobs = int(top_logprobs)
        self.missing_label_p = float(missing_label_p)
        self.constrain = constrain
        self.stats = RerankStats()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | RerankConfig) -> VlmReranker:
        """From a ``[rerank]`` table, validated into ``RerankConfig`` (which holds every default); unknown
        keys are an error (a typo must not silently do nothing)."""
        if not isinstance(cfg, RerankConfig):
            cfg = RerankConfig.model_validate(check_config("rerank", cfg, RerankConfig))
        return cls(
            ChatEndpoint.from_config(cfg, "rerank"),
            prompt=load_prompt(cfg.prompt),
            top_k=cfg.top_k,
            modality=cfg.modality,
            max_page_chars=cfg.max_page_chars,
            top_logprobs=cfg.top_logprobs,
            missing_label_p=cfg.missing_label_p,
            constrain=cfg.constrain,
        )

    @property
    def model_id(self) -> str:
        return self.endpoint.model

    @property
    def reranker(self) -> str:
        return f"{self.name}:{self.model_id}"

    def __repr__(self) -> str:  # never the key, never a URL that could carry credentials
        return (
            f"VlmReranker(model={self.model_id!r}, {self.endpoint.sources}, "
            f"prompt={self.prompt_version!r}, top_k={self.top_k}, modality={self.modality!r}, "
            f"constrain={self.constrain!r})"
        )

    # -- request building (pure) --------------------------------------------------------------------
    def request_body(self, query: str, page: PageView) -> dict[str, Any]:
        """The ``/chat/completions`` body for one pair: one greedy token with its top logprobs."""
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": render_messages(
                self.prompt, query, page, modality=self.modality, max_page_chars=self.max_page_chars
            ),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        if self.constrain == "choice":  # vLLM extension: only the labels may be started
            body["structured_outputs"] = {"choice": list(LABELS)}
        return body

    # -- sync facade ---------------------------------------------------------------------------------
    def rerank(self, queries: Mapping[str, str], run: Run, page: Callable[[str], PageView]) -> RerankResult:
        """Judge each query's first-stage top ``top_k`` and return the merged run (see ``merge_run``).

        ``page(doc_id)`` is called once per judged pair, inside the concurrency limit, so page images
        are loaded only while their request is being built. Raises ``EndpointUnavailable`` when the
        server cannot answer; a pair's own failure only keeps that pair in its first-stage place.
        """
        return run_sync(lambda: self.arerank(queries, run, page))

    # -- async core ----------------------------------------------------------------------------------
    async def arerank(
        self, queries: Mapping[str, str], run: Run, page: Callable[[str], PageView]
    ) -> RerankResult:
        stats = self.stats = RerankStats()
        t0 = time.perf_counter()
        pairs = [(qid, d) for qid, scores in run.items() for d in candidates(scores, self.top_k)]
        stats.requests = len(pairs)
        judgements: dict[str, dict[str, Judgement]] = {qid: {} for qid in run}
        failed: dict[str, dict[str, str]] = {}
        sem = asyncio.Semaphore(self.endpoint.concurrency)

        async def one(chat: Session, qid: str, doc_id: str) -> None:
            async with sem:
                try:
                    if qid not in queries:
                        raise LookupError(f"no text for query {qid!r}")
                    data = await chat.chat(self.request_body(queries[qid], page(doc_id)))
                    verdict = judge(
                        data["choices"][0],
                        missing_label_p=self.missing_label_p,
                        prefix=self.constrain == "choice",
                    )
                except Exception as exc:  # a pair's bad input fails that pair; a broken world raises
                    reject_or_raise(exc)
                    failed.setdefault(qid, {})[doc_id] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    log.debug("rerank %s/%s failed: %s", qid, doc_id, exc)
                    return
                judgements[qid][doc_id] = verdict
                stats.missing_label += verdict.missing

        if pairs:
            async with self.endpoint.session(stats) as chat:
                await chat.resolve()
                await gather_or_fail(one(chat, qid, d) for qid, d in pairs)
        scores = {qid: {d: j.p_true for d, j in js.items()} for qid, js in judgements.items()}
        new_run = {qid: merge_run(run[qid], scores[qid], self.top_k) for qid in run}
        stats.failures = sum(len(v) for v in failed.values())
        stats.seconds = time.perf_counter() - t0
        if stats.failures:
            first = next(iter(next(iter(failed.values())).values()))
            log.warning(
                "rerank: %d of %d pairs failed and keep their first-stage place (first error: %s)",
                stats.failures, stats.requests, first,
            )  # fmt: skip
        log.info(
            "rerank %s: %d queries, %d pairs, %d failed, %d without a label, %d retries, %.1f s",
            self.reranker, len(run), stats.requests, stats.failures, stats.missing_label, stats.retries,
            stats.seconds,
        )  # fmt: skip
        return RerankResult(new_run, scores, stats, judgements, failed)


# ---------------------------------------------------------------------------- factory
ENGINES: dict[str, Callable[[Mapping[str, Any]], Reranker]] = {
    "vllm": VlmReranker.from_config,
}
OFF = ("", "none", "off")


def build_reranker(cfg: Mapping[str, Any] | None) -> Reranker | None:
    """A reranker from a profile's ``[rerank]`` table, or None when reranking is off (the default:
    no or an empty table, ``engine = "none"``, or ``enabled = false``). ``engine`` defaults to vllm."""
    if not cfg or cfg.get("enabled", True) is False:
        return None
    engine = str(cfg.get("engine", "vllm"))
    if engine in OFF:
        return None
    if engine not in ENGINES:
        raise ValueError(f"unknown rerank engine {engine!r}; known: {', '.join(sorted(ENGINES))}")
    return ENGINES[engine](cfg)


__all__ = [
    "CONSTRAINTS",
    "ENGINES",
    "LABELS",
    "MODALITIES",
    "RANK_EPS",
    "Judgement",
    "RerankResult",
    "RerankStats",
    "Reranker",
    "VlmReranker",
    "build_reranker",
    "candidates",
    "judge",
    "label_masses",
    "merge_run",
    "render_messages",
    "token_logprobs",
]
