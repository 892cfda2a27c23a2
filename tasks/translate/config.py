"""Config model of the translate stage: ``[translate]``."""

from __future__ import annotations

from typing import Literal

from tasks.config import StrictModel


class Ct2TranslateConfig(StrictModel):
    """``[translate] engine = "ctranslate2"``: NLLB-200 (any M2M100-layout model) through CTranslate2."""

    engine: Literal["ctranslate2"] = "ctranslate2"
    model: str  # recipe:, hf: or a path; a transformers checkpoint is converted once
    device: str = "cpu"
    compute_type: str = "auto"  # auto: int8_float16 on GPU, int8 on CPU
    quantization: str | None = None  # of the one-off conversion (default follows the device)
    beam_size: int = 1
    max_batch_size: int = 32
    inter_threads: int = 1
    intra_threads: int = 0
    max_decoding_length: int = 256
    no_repeat_ngram_size: int = 0
    max_length_ratio: float = 3.0


TRANSLATE_CONFIGS = {"ctranslate2": Ct2TranslateConfig}
