"""Profile validation: every stage table against its engine's config model, before any work.

A mistyped key (``[translate] beem_size = 4``) or an unknown engine stops the run with a
:class:`tasks.config.ProfileError` that names the profile, the table, the key and the allowed keys.
"""

from __future__ import annotations

from typing import Any

from tasks.config import ProfileError, check_config, pick_engine
from tasks.encoders import check_encoder_config
from tasks.ingest.config import LAYOUT_CONFIGS, OCR_CONFIGS, IngestOptions
from tasks.negatives.base import ModalityMix
from tasks.negatives.config import NegativesConfig
from tasks.queries.config import QUERY_CONFIGS
from tasks.queries.filters import FilterConfig
from tasks.render.config import RenderConfig
from tasks.translate.config import TRANSLATE_CONFIGS

# Top-level keys of a profile besides the stage tables.
PROFILE_KEYS = {"name", "description", "recipes"}
STAGES = ("ingest", "layout", "extract", "translate", "render", "queries", "negatives")


def validate_profile(profile: dict[str, Any]) -> dict[str, Any]:
    """Check every table of a loaded profile; returns the profile unchanged when it is valid."""
    name = profile.get("name", "?")
    try:
        unknown = sorted(set(profile) - PROFILE_KEYS - set(STAGES))
        if unknown:
            raise ProfileError(
                f"unknown table(s) {unknown}; allowed: {', '.join(sorted(PROFILE_KEYS | set(STAGES)))}"
            )
        check_config("ingest", profile.get("ingest"), IngestOptions)
        layout = profile.get("layout", {})
        check_config(
            "layout", layout, pick_engine("layout", layout, "engine", LAYOUT_CONFIGS, "rapid-layout")
        )
        extract = profile.get("extract", {})
        check_config("extract", extract, pick_engine("extract", extract, "engine", OCR_CONFIGS, "none"))
        if "translate" in profile:
            tr = profile["translate"]
            check_config(
                "translate", tr, pick_engine("translate", tr, "engine", TRANSLATE_CONFIGS, "ctranslate2")
            )
        check_config("render", profile.get("render"), RenderConfig)
        q = profile.get("queries", {})
        check_config("queries", q, pick_engine("queries", q, "engine", QUERY_CONFIGS, "extractive"))
        check_config("queries.filter", q.get("filter"), FilterConfig)
        neg = profile.get("negatives", {})
        check_config("negatives", neg, NegativesConfig)
        if neg.get("modality"):
            check_config("negatives.modality", neg["modality"], ModalityMix)
        if neg.get("encoder"):
            check_encoder_config(neg["encoder"], "negatives.encoder")
    except ProfileError as exc:
        raise ProfileError(f"profile {name!r}: {exc}") from None
    return profile
