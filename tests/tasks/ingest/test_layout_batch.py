"""Batched layout inference and GPU placement: several pages per detector call give exactly what one page
per call gives (both engines, pages of different sizes), the ingest shard's bytes do not depend on the
batch size; the detector's GPU comes from ``tasks.devices`` (tested with made-up device lists in
``tests/tasks/test_devices.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.ingest.layout import (
    DocLayoutYoloDetector,
    LayoutDetector,
    RapidLayoutDetector,
    build_layout_detector,
)
from tasks.models import sha256_file
from tests.support.layout_models import calibrated_doclayout_yolo
from tests.tasks.ingest.test_layout import make_page

FRENCH = (
    "La Révolution française est une période de bouleversements politiques et sociaux en France et dans "
    "ses colonies, qui débute en 1789 et se termine en 1799. Elle met fin à l'Ancien Régime en remplaçant "
    "la monarchie absolue par une monarchie constitutionnelle, puis par la Première République. Les "
    "historiens considèrent qu'elle a profondément transformé la société française et influencé de "
    "nombreux pays européens au cours du siècle suivant."
)
ENGLISH = (
    "The committee reviewed the annual report on the state of the environment and recommended that its "
    "findings be published before the end of the year. Each chapter describes the methods used to collect "
    "the measurements, the uncertainty of every estimate, and the changes since the previous edition."
)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe's random checkpoint with BatchNorm statistics measured on a page, so that its
    boxes and scores depend on the page (as built they do not: see ``tests/support/layout_models.py``)."""
    page = make_page(tmp_path_factory.mktemp("calib") / "page.pdf")
    return calibrated_doclayout_yolo(tmp_path_factory.mktemp("dly"), page)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    """Seven pages in three sizes, interleaved: a rendered two-column page (three times: one image, two
    re-renders), the same page scaled to a landscape-ish slide, and drawn pages of a third size."""
    page = make_page(tmp_path_factory.mktemp("pages") / "page.pdf")  # 1191 × 1684
    slide = page.resize((1280, 720))
    rng = np.random.default_rng(7)

    def drawn() -> Image.Image:
        a = np.full((900, 700, 3), 255, np.uint8)
        for _ in range(25):
            x, y = int(rng.integers(0, 600)), int(rng.integers(0, 880))
            a[y : y + int(rng.integers(4, 18)), x : x + int(rng.integers(20, 300))] = int(
                rng.integers(0, 120)
            )
        return Image.fromarray(a)

    return [
        page,
        slide,
        drawn(),
        page.copy(),
        drawn(),
        slide.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        page,
    ]


@pytest.fixture
def torch_threads():
    """Restore torch's process-wide thread count after a test whose detector sets it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _doclayout(ckpt: Path, batch_size: int) -> DocLayoutYoloDetector:
    det = build_layout_detector(
        {
            "engine": "doclayout-yolo",
            "model": str(ckpt),
            "sha256": sha256_file(ckpt),
            "imgsz": 640,
            "conf": 0.0015,  # random weights score ~0.0014-0.002: keeps a page's stronger boxes
            "threads": 1,
            "batch_size": batch_size,
        }
    )
    assert isinstance(det, DocLayoutYoloDetector) and isinstance(det, LayoutDetector)
    return det


# ---------------------------------------------------------------------------- detectors
def test_doclayout_batches_equal_one_page_per_call(
    random_ckpt: Path, pages: list[Image.Image], torch_threads, monkeypatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    one = _doclayout(random_ckpt, 1)
    alone = [one.detect(p) for p in pages]
    assert all(alone), "the calibrated random weights give boxes on every page"
    assert len({tuple(r.bbox for r in regions) for regions in alone[:3]}) == 3, "boxes depend on the page"
    for batch_size in (2, 4, 8):
        det = _doclayout(random_ckpt, batch_size)
        calls = _count_calls(det)
        # exact: same labels, same float boxes and scores, same reading order
        assert det.detect_batch(pages) == alone, f"batch_size {batch_size}"
        assert [len(c) for c in calls] == [1] * len(pages), "on CPU a page gets its own model call"
    assert det.device == "cpu" and det.half is False and det.stack == 1  # fp16 and stacking: CUDA only
    assert det.detect_batch([]) == []
    # the device reaches doclayout_yolo as a torch.device: its select_device, given the string "cpu",
    # would set CUDA_VISIBLE_DEVICES=-1 for the whole process (hiding every GPU from the translator)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_doclayout_stacked_model_calls_group_pages_by_size(
    random_ckpt: Path, pages: list[Image.Image], torch_threads
) -> None:
    """What CUDA does (same-size pages stacked into one call), run on CPU: the grouping, and results equal
    up to rounding only. Not bit-equal on CPU: oneDNN picks other convolution kernels for a batch (seen:
    boxes moved by ~1e-4 px), which is why CPU keeps one page per call."""
    single = _doclayout(random_ckpt, 1)
    det = _doclayout(random_ckpt, 4)
    det.stack = det.batch_size  # the CUDA path
    calls = _count_calls(det)
    stacked = det.detect_batch(pages)
    assert sorted(len(c) for c in calls) == [2, 2, 3], "three pages of one size, two of two others"
    assert all(len(set(c)) == 1 for c in calls), "a model call holds one page size"
    for page, got in zip(pages, stacked, strict=True):
        want = single.detect(page)
        assert [r.label for r in got] == [r.label for r in want]
        np.testing.assert_allclose([r.bbox for r in got], [r.bbox for r in want], rtol=0, atol=0.05)
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-4, atol=0)


def _count_calls(det: DocLayoutYoloDetector) -> list[list[tuple[int, int]]]:
    """Record the page sizes of each real model call the detector makes."""
    calls: list[list[tuple[int, int]]] = []
    predict = det._predict

    def counting(rgbs: list[Image.Image]) -> list:
        calls.append([im.size for im in rgbs])
        return predict(rgbs)

    det._predict = counting  # type: ignore[method-assign]
    return calls


def test_rapid_layout_batch_equals_one_page_per_call(pages: list[Image.Image]) -> None:
    single = build_layout_detector({"engine": "rapid-layout"})
    det = build_layout_detector({"engine": "rapid-layout", "batch_size": 4})
    assert isinstance(det, RapidLayoutDetector) and isinstance(det, LayoutDetector)
    assert (single.batch_size, det.batch_size) == (1, 4)
    alone = [single.detect(p) for p in pages]
    assert any(alone)
    assert det.detect_batch(pages) == alone


# ---------------------------------------------------------------------------- the ingest shard
def _write_pdf(path: Path) -> Path:
    """Pages of four sizes; page 2 is French (a source_language reject) and page 4 is too thin to render
    (a per-page unreadable reject): rejects sit between pages held for one layout batch."""
    from reportlab.lib.pagesizes import A4, A5, landscape, letter
    from reportlab.lib.utils import simpleSplit
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), invariant=1)
    sizes = [A4, landscape(A5), A5, letter, (600, 2), A4, landscape(A4)]
    for i, size in enumerate(sizes):
        c.setPageSize(size)
        w, h = size
        if h > 10:
            c.setFont("Helvetica-Bold", 16)
            c.drawString(40, h - 50, f"Section {i + 1}: Annual Environment Report")
            c.setFont("Helvetica", 10)
            y = h - 80
            for line in simpleSplit(FRENCH if i == 2 else ENGLISH * 2, "Helvetica", 10, w - 80):
                c.drawString(40, y, line)
                y -= 13
        c.showPage()
    c.save()
    return path


@pytest.mark.parametrize("engine", ["rapid-layout", "doclayout-yolo"])
def test_ingest_shard_bytes_do_not_depend_on_batch_size(
    tmp_path: Path, random_ckpt: Path, engine: str, torch_threads
) -> None:
    from tasks.ingest.plan import plan_en_shards
    from tasks.ingest.shard import ingest_shard
    from tasks.ingest.sources import scan_sources
    from tasks.shards import read_rejects

    src = tmp_path / "src"
    src.mkdir()
    _write_pdf(src / "report.pdf")
    _write_pdf(src / "copy.pdf").write_bytes((src / "report.pdf").read_bytes() + b"\n% another source\n")
    layout: dict = {"engine": engine}
    if engine == "doclayout-yolo":
        layout |= {"model": str(random_ckpt), "sha256": sha256_file(random_ckpt), "imgsz": 640}
        layout |= {"conf": 0.0015, "threads": 1}

    def run(batch_size: int) -> tuple[dict[str, bytes], Path]:
        root = tmp_path / f"out-{batch_size}"
        profile = {"layout": {**layout, "batch_size": batch_size}, "extract": {"engine": "none"}}
        for name, group in plan_en_shards(scan_sources(src), 64, set()).items():
            ingest_shard(root, name, group, profile)
        files = sorted(root.glob("pages/en/*.parquet")) + sorted(root.glob("rejects/*.parquet"))
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}, root

    one, root = run(1)
    rows = pq.read_table(next(iter(root.glob("pages/en/*.parquet")))).to_pylist()
    assert sorted((r["source_uri"], r["page_index"]) for r in rows) == [
        (uri, i) for uri in ("copy.pdf", "report.pdf") for i in (0, 1, 3, 5, 6)
    ]
    assert any(r["regions"] for r in rows)
    reasons = sorted((r["input_ref"], r["reason"]) for r in read_rejects(root).to_pylist())
    assert reasons == sorted(
        (uri, why) for uri in ("copy.pdf", "report.pdf") for why in ("source_language", "unreadable_file")
    )
    for batch_size in (3, 8):
        files, _ = run(batch_size)
        assert files == one, f"batch_size {batch_size}: shard bytes differ from one page per call"


def test_text_layers_reopen_pages_the_iterator_closed(tmp_path: Path) -> None:
    from tasks.ingest.region_text import pdf_words
    from tasks.ingest.shard import _TextLayers
    from tasks.ingest.sources import SourcePage, iter_source_pages

    path = _write_pdf(tmp_path / "report.pdf")
    words, held = {}, []
    for item in iter_source_pages(path):
        if isinstance(item, SourcePage):
            words[item.page_index] = [(w.text, w.bbox) for w in pdf_words(item)]
            held.append(item)
    with pytest.raises(ValueError, match="closed"):
        pdf_words(held[0])
    with _TextLayers(path) as layers:
        for item in held:
            with layers.live(item) as page:
                assert [(w.text, w.bbox) for w in pdf_words(page)] == words[item.page_index]
        assert layers.doc is not None
    assert layers.doc is None


# ---------------------------------------------------------------------------- configuration
def test_layout_config_keys() -> None:
    from tasks.config import ProfileError
    from tasks.ingest.plan import ingest_base_hash

    base = {"engine": "doclayout-yolo", "model": "recipe:doclayout-yolo-tiny"}

    def h(**layout) -> str:
        return ingest_base_hash({"layout": {**base, **layout}}, "fp")

    # on CPU, pages per call and half change no byte: same shards, same hash; nor does the GPU number
    assert h() == h(batch_size=8) == h(half=False)
    assert h(device="cuda") == h(device="cuda", device_index=[0, 1]) == h(device="cuda", device_index=1)
    # on CUDA, fp16 and the batch shape can move a box: they are part of what decides the shard
    assert h(device="cuda") != h(device="cuda", half=False)
    assert h(device="cuda") != h(device="cuda", batch_size=8)
    assert h(device="cuda") != h()
    rapid = ingest_base_hash({"layout": {"engine": "rapid-layout"}}, "fp")
    assert rapid == ingest_base_hash({"layout": {"engine": "rapid-layout", "batch_size": 4}}, "fp")

    for bad, match in [
        ({"batch_size": 0}, "batch_size"),
        ({"device_index": 1}, "device_index needs device = 'cuda'"),
        ({"device": "cuda:1", "device_index": 1}, "device_index needs device = 'cuda'"),
        ({"device": "cuda", "device_index": []}, "non-empty list"),
        ({"device": "cuda", "device_index": [0, -1]}, "non-empty list"),
    ]:
        with pytest.raises(ProfileError, match=match):
            build_layout_detector({**base, **bad})
