"""Where m3dr finds its bundled files and its model cache."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FONTS_DIR = REPO_ROOT / "fonts"
ASSETS_DIR = REPO_ROOT / "assets"
PROFILES_DIR = ASSETS_DIR / "profiles"
SAMPLES_DIR = ASSETS_DIR / "samples"


def models_dir() -> Path:
    """Cache of built/downloaded/converted models (``M3DR_MODELS`` overrides, default ./models)."""
    return Path(os.environ.get("M3DR_MODELS", REPO_ROOT / "models")).resolve()
