"""Config models of the translate stage: ``[translate]``, and the stage's typed sub-config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from tasks.config import StrictModel, check_config
from tasks.render.config import RenderConfig

DEFAULT_ENGINE = "ctranslate2"  # the [translate] engine when a table names none


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


class TranslateStageConfig(StrictModel):
    """What decides a translated pages shard: ``[translate]``, ``[render]`` and the output formats."""

    translate: Ct2TranslateConfig
    render: RenderConfig = RenderConfig()
    formats: tuple[str, ...] = ("png",)

    @field_validator("render", mode="before")
    @classmethod
    def _render(cls, value: Any) -> Any:
        """A ``[render]`` table is checked key by key (RenderConfig is a dataclass: unknown keys fail)."""
        if isinstance(value, RenderConfig):
            return value
        return RenderConfig(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in check_config("render", value, RenderConfig).items()
            }
        )

    @field_validator("formats", mode="after")
    @classmethod
    def _formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(value)))
