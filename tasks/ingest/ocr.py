"""Full-page OCR engines (rapidocr with its bundled PP-OCR ONNX models) behind one protocol."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from tasks.config import check_config

Box = tuple[float, float, float, float]


@runtime_checkable
class OcrEngine(Protocol):
    """Full-page OCR: ``recognize`` returns text lines as (x0, y0, x1, y1) pixel box, text, score."""

    model_id: str

    def recognize(self, image: Image.Image) -> list[tuple[Box, str, float]]: ...


class RapidOcrEngine:
    """rapidocr 3.x with the PP-OCRv6 det/rec and PP-OCR cls ONNX models bundled in its wheel.

    The model files are passed explicitly, so rapidocr never reaches its downloader. PP-OCRv6 ``small``
    recognises English among ~50 Latin-script languages (and Chinese/Japanese).
    """

    def __init__(
        self,
        *,
        text_score: float = 0.5,
        use_cls: bool = True,
        det_model: str | Path | None = None,
        rec_model: str | Path | None = None,
        cls_model: str | Path | None = None,
        threads: int = -1,
    ) -> None:
        import rapidocr
        from rapidocr import RapidOCR

        from tasks.models import fingerprint

        bundled = Path(rapidocr.__file__).parent / "models"
        paths = {
            "Det": Path(det_model) if det_model else bundled / "PP-OCRv6_det_small.onnx",
            "Rec": Path(rec_model) if rec_model else bundled / "PP-OCRv6_rec_small.onnx",
            "Cls": Path(cls_model) if cls_model else bundled / "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
        }
        for key, p in paths.items():
            if not p.is_file():
                raise FileNotFoundError(
                    f"rapidocr {key} model not found: {p} (m3dr never downloads at run time)"
                )
        params: dict[str, Any] = {
            "Global.log_level": "warning",
            "Global.text_score": float(text_score),
            "Global.use_cls": bool(use_cls),
            "EngineConfig.onnxruntime.intra_op_num_threads": int(threads),
        }
        params.update({f"{k}.model_path": str(p) for k, p in paths.items()})
        self.engine = RapidOCR(params=params)
        self.model_id = "rapidocr:" + ",".join(f"{p.stem}:{fingerprint(p)[:8]}" for p in paths.values())
        self._lock = threading.Lock()

    def recognize(self, image: Image.Image) -> list[tuple[Box, str, float]]:
        with self._lock:
            out = self.engine(image.convert("RGB"))
        if out.boxes is None or out.txts is None:
            return []
        lines: list[tuple[Box, str, float]] = []
        for poly, text, score in zip(out.boxes, out.txts, out.scores, strict=True):
            pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            box = (
                float(pts[:, 0].min()),
                float(pts[:, 1].min()),
                float(pts[:, 0].max()),
                float(pts[:, 1].max()),
            )
            lines.append((box, str(text), float(score)))
        return lines


OCR_ENGINES: dict[str, Callable[..., OcrEngine]] = {"rapidocr": RapidOcrEngine}


def build_ocr(cfg: Mapping[str, Any]) -> OcrEngine | None:
    """Build the OCR engine a profile's ``[extract]`` table names; ``engine = "none"`` (or absent) → None."""
    from tasks.ingest.config import DEFAULT_OCR, OCR_CONFIGS

    engine = dict(cfg).get("engine") or DEFAULT_OCR
    if engine == "none":
        return None
    if engine not in OCR_ENGINES:
        raise ValueError(f"unknown OCR engine {engine!r}; known: {sorted(OCR_ENGINES)} or 'none'")
    cfg = check_config("extract", cfg, OCR_CONFIGS[engine])  # normalised: every key, defaults once
    options = {k: v for k, v in cfg.items() if k != "engine"}
    return OCR_ENGINES[engine](**options)
