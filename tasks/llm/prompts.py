"""Versioned prompts (``assets/prompts/<name>.toml``): the one loader for queries and rerank."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tasks.paths import ASSETS_DIR

PROMPTS_DIR = ASSETS_DIR / "prompts"


@dataclass(frozen=True)
class Prompt:
    """A versioned prompt file of ``assets/prompts/`` (TOML: version, system, user, optional [kinds])."""

    name: str
    version: str  # "<version>+<sha256 of the file, 8 hex>"
    system: str
    user: str
    kinds: dict[str, str]

    BEGIN = "<<<PAGE_TEXT_BEGIN>>>"
    END = "<<<PAGE_TEXT_END>>>"


def load_prompt(name: str = "queries_v1", prompts_dir: Path = PROMPTS_DIR) -> Prompt:
    path = Path(name) if Path(name).suffix == ".toml" else prompts_dir / f"{name}.toml"
    raw = path.read_bytes()
    data = tomllib.loads(raw.decode("utf-8"))
    digest = hashlib.sha256(raw).hexdigest()[:8]
    kinds = dict(data.get("kinds", {}))  # only the query prompts have a [kinds] table
    return Prompt(path.stem, f"{data['version']}+{digest}", data["system"], data["user"], kinds)
