"""Config models of the translate stage: ``[translate]``, and the stage's typed sub-config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.config import StrictModel, check_config
from tasks.devices import check_devices
from tasks.render.config import RenderConfig

DEFAULT_ENGINE = "ctranslate2"  # the [translate] engine when a table names none


class Ct2TranslateConfig(StrictModel):
    """``[translate] engine = "ctranslate2"``: NLLB-200 (any M2M100-layout model) through CTranslate2."""

    engine: Literal["ctranslate2"] = "ctranslate2"
    model: str  # recipe:, hf: or a path; a transformers checkpoint is converted once
    device: str = "cpu"  # cpu, cuda (GPUs of device_index) or cuda:N
    # GPUs the translator may use: an int, a list, or none (every visible GPU). A Dask worker of rank r
    # takes the r-th of them (tasks.devices); a lone process keeps one replica on each.
    device_index: int | list[int] | None = None
    compute_type: str = "auto"  # auto: int8_float16 on GPU, int8 on CPU
    quantization: str | None = None  # of the one-off conversion (default follows the device)
    beam_size: int = 1
    max_batch_size: int = 32  # sources per CTranslate2 call
    batch_type: Literal["examples", "tokens"] = "tokens"  # tokens: also cap padded tokens per call
    max_batch_tokens: int = Field(default=4096, ge=1)  # padded source tokens per call (batch_type tokens)
    max_in_flight: int = Field(default=0, ge=0)  # asynchronous calls queued; 0: 2 per replica
    inter_threads: int = 1
    intra_threads: int = 0
    max_decoding_length: int = 256
    no_repeat_ngram_size: int = 0
    max_length_ratio: float = 3.0

    @model_validator(mode="after")
    def _devices(self) -> Ct2TranslateConfig:
        check_devices(self.device, self.device_index)
        return self


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
