"""The typed profile: every stage table checked against its engine's config model, before any work.

A mistyped key (``[translate] beem_size = 4``) or an unknown engine stops the run with a
:class:`tasks.config.ProfileError` that names the profile, the table, the key and the allowed keys.
:func:`validate_profile` returns a :class:`Profile` whose tables are normalised (every default filled
in, from the config models only), and each stage gets its own typed sub-config from it; config hashes
are taken over those, so a profile that spells out a default makes the same shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from tasks.config import ProfileError, StrictModel, check_config, pick_engine, plain
from tasks.encoders import check_encoder_config
from tasks.ingest.config import (
    DEFAULT_LAYOUT,
    DEFAULT_OCR,
    LAYOUT_CONFIGS,
    OCR_CONFIGS,
    IngestOptions,
    IngestStageConfig,
    LayoutConfig,
    NoOcrConfig,
    OcrConfig,
    RapidLayoutConfig,
)
from tasks.negatives.base import ModalityMix
from tasks.negatives.config import NegativesConfig
from tasks.queries.config import DEFAULT_ENGINE as DEFAULT_QUERIES
from tasks.queries.config import QUERY_CONFIGS, ExtractiveConfig, QueriesConfig
from tasks.queries.filters import FilterConfig
from tasks.render.config import RenderConfig
from tasks.translate.config import DEFAULT_ENGINE as DEFAULT_TRANSLATE
from tasks.translate.config import TRANSLATE_CONFIGS, Ct2TranslateConfig, TranslateStageConfig

# Top-level keys of a profile besides the stage tables.
PROFILE_KEYS = {"name", "description", "recipes", "train"}
STAGES = ("ingest", "layout", "extract", "translate", "render", "queries", "negatives")


class Profile(StrictModel):
    """A validated profile: one typed field per table, the engine tables as unions keyed on ``engine``."""

    name: str = "?"
    description: str = ""
    recipes: dict[str, Any] = Field(default_factory=dict)  # [recipes] build = [...] (m3dr models build)
    # [train]: TrainConfig fields train-netra starts from (``--profile``); checked by training.config,
    # a layer above this one, where train-netra reads it (flows.params.TrainParams)
    train: dict[str, Any] = Field(default_factory=dict)
    ingest: IngestOptions = IngestOptions()
    layout: LayoutConfig = RapidLayoutConfig()
    extract: OcrConfig = NoOcrConfig()
    translate: Ct2TranslateConfig | None = None  # needed by the translate stage only
    render: dict[str, Any] = Field(default_factory=lambda: plain(RenderConfig()))  # normalised RenderConfig
    queries: QueriesConfig = ExtractiveConfig()
    negatives: NegativesConfig = NegativesConfig()

    def ingest_stage(self) -> IngestStageConfig:
        """The English pages stage's sub-config."""
        return IngestStageConfig(ingest=self.ingest, layout=self.layout, extract=self.extract)

    def translate_stage(self, formats: list[str] | tuple[str, ...] = ("png",)) -> TranslateStageConfig:
        """The translate + render stage's sub-config (fails naming the table when [translate] is missing)."""
        if self.translate is None:
            raise ProfileError(f"profile {self.name!r}: no [translate] table (model and engine)")
        return TranslateStageConfig(translate=self.translate, render=self.render, formats=tuple(formats))

    def model_source(self, stage: str) -> str:
        """The ``model`` source a stage table names ('' when it names none)."""
        return str(getattr(getattr(self, stage, None), "model", None) or "")


def validate_profile(profile: Mapping[str, Any] | Profile) -> Profile:
    """Check every table of a loaded profile; returns it typed and normalised (a Profile as is)."""
    if isinstance(profile, Profile):
        return profile
    name = profile.get("name", "?")
    try:
        unknown = sorted(set(profile) - PROFILE_KEYS - set(STAGES))
        if unknown:
            raise ProfileError(
                f"unknown table(s) {unknown}; allowed: {', '.join(sorted(PROFILE_KEYS | set(STAGES)))}"
            )
        tables: dict[str, Any] = {k: profile[k] for k in PROFILE_KEYS if k in profile}
        tables["ingest"] = check_config("ingest", profile.get("ingest"), IngestOptions)
        layout = profile.get("layout")
        tables["layout"] = check_config(
            "layout", layout, pick_engine("layout", layout, "engine", LAYOUT_CONFIGS, DEFAULT_LAYOUT)
        )
        extract = profile.get("extract")
        tables["extract"] = check_config(
            "extract", extract, pick_engine("extract", extract, "engine", OCR_CONFIGS, DEFAULT_OCR)
        )
        if "translate" in profile:
            tr = profile["translate"]
            tables["translate"] = check_config(
                "translate", tr, pick_engine("translate", tr, "engine", TRANSLATE_CONFIGS, DEFAULT_TRANSLATE)
            )
        tables["render"] = check_config("render", profile.get("render"), RenderConfig)
        q = profile.get("queries")
        queries = check_config(
            "queries", q, pick_engine("queries", q, "engine", QUERY_CONFIGS, DEFAULT_QUERIES)
        )
        queries["filter"] = check_config("queries.filter", (q or {}).get("filter"), FilterConfig)
        tables["queries"] = queries
        neg = check_config("negatives", profile.get("negatives"), NegativesConfig)
        if neg["modality"]:
            neg["modality"] = check_config("negatives.modality", neg["modality"], ModalityMix)
        if neg["encoder"]:
            neg["encoder"] = check_encoder_config(neg["encoder"], "negatives.encoder")
        tables["negatives"] = neg
        return Profile.model_validate(tables)
    except ProfileError as exc:
        raise ProfileError(f"profile {name!r}: {exc}") from None
