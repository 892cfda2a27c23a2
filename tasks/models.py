"""Model profiles and the model registry.

A profile (``assets/profiles/<name>.toml``) names, per stage, an engine and a model *source*:

- ``recipe:<name>``: built locally by ``m3dr models build`` (tiny configs of the production classes),
  cached under ``models_dir()/<name>``;
- ``hf:<repo id>`` or ``hf:<repo id>:<file>``: downloaded once from the Hugging Face hub;
- a local path (absolute, or relative to the working directory).

Stages ask ``resolve_source`` for a path and never look at the profile name, so the tiny and the full
profile run the same code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.paths import PROFILES_DIR, models_dir

# name -> builder(out_dir) ; filled by tasks.recipes (imported lazily to keep start-up light)
RECIPES: dict[str, Callable[[Path], Path]] = {}


class ModelSourceError(RuntimeError):
    """A model source that cannot be resolved (missing recipe build, bad path, no hub access)."""


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Load a profile by name (``tiny``, ``full``) or by path to a TOML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
        raise ModelSourceError(f"profile {name_or_path!r} not found (known profiles: {known})")
    with path.open("rb") as fh:
        profile = tomllib.load(fh)
    profile.setdefault("name", path.stem)
    return profile


def _recipes() -> dict[str, Callable[[Path], Path]]:
    if not RECIPES:
        import tasks.recipes  # noqa: F401  (registers builders)
    return RECIPES


def recipe_dir(name: str) -> Path:
    return models_dir() / name


def build_recipe(name: str, *, force: bool = False) -> Path:
    """Build a tiny local model by recipe name into the model cache (no-op when already built)."""
    builders = _recipes()
    if name not in builders:
        raise ModelSourceError(f"unknown recipe {name!r}; known: {', '.join(sorted(builders))}")
    out = recipe_dir(name)
    done = out / ".complete"
    if done.exists() and not force:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    builders[name](tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").write_text("ok\n")
    return out


def resolve_source(source: str) -> Path:
    """Turn a model source string into a local path (directory or file)."""
    if source.startswith("recipe:"):
        name = source.split(":", 1)[1]
        out = recipe_dir(name)
        if not (out / ".complete").exists():
            raise ModelSourceError(
                f"model {source!r} is not built yet; run `m3dr models build {name}` (or `make models`)"
            )
        return out
    if source.startswith("hf:"):
        spec = source[3:]
        repo, _, filename = spec.partition(":")
        try:
            if filename:
                from huggingface_hub import hf_hub_download

                return Path(hf_hub_download(repo, filename))
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo))
        except Exception as exc:  # no network, gated repo, ...
            raise ModelSourceError(f"cannot download {source!r} from the hub: {exc}") from exc
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    raise ModelSourceError(f"model source {source!r} is neither recipe:, hf: nor an existing path")


def fingerprint(path: Path) -> str:
    """A short, stable id of a model's files (used in config hashes and caches)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.name.startswith("."):
            continue
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        st = f.stat()
        if st.st_size < 64 << 20:
            h.update(f.read_bytes())
        else:  # large weights: size + head/tail is enough to tell builds apart, and cheap
            with f.open("rb") as fh:
                h.update(str(st.st_size).encode())
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def convert_nllb_to_ct2(hf_dir: Path, out_dir: Path, quantization: str = "int8") -> Path:
    """Convert an NLLB/M2M100 transformers checkpoint to CTranslate2 with CT2's own converter.

    The tokenizer is saved beside the CT2 weights so one directory serves both.
    """
    import ctranslate2
    from transformers import AutoTokenizer

    converter = ctranslate2.converters.TransformersConverter(str(hf_dir))
    converter.convert(str(out_dir), quantization=quantization, force=True)
    AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(out_dir))
    (out_dir / "m3dr_conversion.json").write_text(
        json.dumps({"from": str(hf_dir), "quantization": quantization}, indent=2)
    )
    return out_dir
