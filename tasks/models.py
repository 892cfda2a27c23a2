"""Model profiles and model sources: the one place a stage's model string becomes a local path.

A profile (``assets/profiles/<name>.toml``) names, per stage, an engine and a model *source*:

- ``recipe:<name>``: built locally by ``m3dr models build`` (tiny configs of the production classes,
  one builder per recipe in the table of :mod:`tasks.recipes`), cached under ``models_dir()/<name>``;
- ``hf:<repo id>`` or ``hf:<repo id>:<file>``: downloaded once from the Hugging Face hub;
- a local path (absolute, or relative to the working directory).

Stages ask ``resolve_source`` for a path and never look at the profile name, so the tiny and the full
profile run the same code. :func:`fingerprint` is the one model identity used in config hashes and
caches: it depends on what the model computes (weights, configs, tokenizer files), never on where or
when it was built.

Pickles: a ``.pt`` checkpoint (DocLayout-YOLO) is unpickled in full by the library that loads it, so
loading one runs whatever code it carries. :func:`verify_pickle` stands before every such load: the file's
sha256 must equal the pin of its profile table (``sha256 = "…"``), or the table says
``trust_unpinned = true``; otherwise it is refused with the actual hash and the line to add.

A leaf module: it imports only :mod:`tasks.paths` and :mod:`tasks.recipe_cache` (recipe modules are
named in :data:`RECIPES`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
import sys
import tomllib
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tasks.paths import PROFILES_DIR, models_dir
from tasks.recipe_cache import RecipeCache, RecipeCacheError, recipe_key

# Files a fingerprint skips: provenance we write beside a model (build times, absolute build paths),
# which says how a model was made, not what it computes.
PROVENANCE_FILES: frozenset[str] = frozenset({"recipe.json", "m3dr_conversion.json", "README.md"})
# Files at least this large are fingerprinted by size + first and last MiB (multi-GB weights).
WHOLE_FILE_LIMIT = 64 << 20
# Checkpoint formats that are pickles (loading runs code); safetensors / ONNX / CTranslate2 files are not.
PICKLE_SUFFIXES: frozenset[str] = frozenset({".pt", ".pth", ".ckpt", ".pkl"})
# sha256 of every pickle a recipe build wrote, recorded by build_recipe (a dotfile: not fingerprinted).
PICKLE_RECORD = ".pickle-sha256.json"

log = logging.getLogger(__name__)


# The recipe table: name -> "module:builder" (modules under tasks/recipes/, one per recipe). Named by
# string and imported when built, so this module stays a leaf and reading the table costs nothing.
RECIPES: dict[str, str] = {
    "nllb-tiny": "tasks.recipes.nllb_tiny:build_nllb_tiny",
    "doclayout-yolo-tiny": "tasks.recipes.doclayout_yolo_tiny:build",
    "llm-tiny": "tasks.recipes.llm_tiny:build_llm_tiny",
    "gemma3-tiny": "tasks.recipes.gemma3_tiny:build_gemma3_tiny",
    "vlm-tiny": "tasks.recipes.vlm_tiny:build_vlm_tiny",
}


class ModelSourceError(RuntimeError):
    """A model source that cannot be resolved (missing recipe build, bad path, no hub access)."""


class UntrustedPickleError(ModelSourceError):
    """A pickle checkpoint whose sha256 is not pinned, or does not match its pin or recipe record."""


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Load a profile by name (``tiny``, ``full``) or by path to a TOML file (not validated here:
    ``tasks.run.prepare.validate_profile`` checks every stage table against its engine's config)."""
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


def lookup(table: Mapping[str, str], name: str, what: str, error: type[Exception] = ValueError) -> Any:
    """The object a ``"module:attribute"`` entry of a lazy table names (recipes, encoders), its module
    imported now; an unknown name fails listing the known ones."""
    try:
        target = table[name]
    except KeyError:
        raise error(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def recipe_builder(name: str) -> Callable[[Path], Path]:
    """The builder of a recipe (its module imported now)."""
    return lookup(RECIPES, name, "recipe", ModelSourceError)


def recipe_dir(name: str) -> Path:
    return models_dir() / name


def recipe_cache_key(name: str) -> tuple[str | None, dict[str, Any]]:
    """(key, inputs) of a recipe's build in the recipe cache; key None: the build is not reproducible
    (its module's ``cache_config()`` returns None, e.g. a time-budgeted ``nllb-tiny``) and is not cached."""
    builder = recipe_builder(name)
    config_fn = getattr(sys.modules[builder.__module__], "cache_config", None)
    config = config_fn() if config_fn is not None else {}
    key, inputs = recipe_key(name, RECIPES[name], config)
    return (key if config is not None else None), inputs


def _built_key(out: Path) -> str | None:
    """The cache key a models-dir build was made for (None: no complete build; '' : an older build that
    recorded none)."""
    done = out / ".complete"
    if not done.is_file():
        return None
    try:
        return str(json.loads(done.read_text()).get("key") or "")
    except ValueError:
        return ""


def build_recipe(name: str, *, force: bool = False, use_cache: bool = True) -> Path:
    """Build a tiny local model by recipe name into the models directory.

    A no-op when the directory already holds the build of the recipe's current key (builder code,
    config, library versions: :func:`tasks.recipe_cache.recipe_key`). Otherwise the build comes from the
    recipe cache when it holds a verified entry for that key, else the builder runs (and its output is
    published to the cache). ``force`` redoes the models-directory copy; ``use_cache=False`` neither
    reads nor writes the cache (a build from scratch).
    """
    builder = recipe_builder(name)
    out = recipe_dir(name)
    key, inputs = recipe_cache_key(name)
    have = _built_key(out)
    # a build with pickles but no sha256 record predates the record (see verify_pickle): rebuild it
    recorded = (out / PICKLE_RECORD).exists() or not pickle_files(out)
    if have is not None and not force and recorded and (key is None or have == key):
        return out

    def run_builder(dst: Path) -> None:
        builder(dst)
        record = {f.relative_to(dst).as_posix(): sha256_file(f) for f in pickle_files(dst)}
        if record:
            (dst / PICKLE_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")  # own folder: builds may run at once
    source = "build"
    if key is not None and use_cache:
        cache = RecipeCache()
        with cache.lock(name, key):
            if cache.copy_out(name, key, tmp):
                source = f"cache {cache.entry(name, key)}"
            else:
                entry = cache.publish(name, key, inputs, run_builder)
                if not cache.copy_out(name, key, tmp):
                    raise RecipeCacheError(f"recipe {name}: the entry just published is bad: {entry}")
    else:
        tmp.mkdir(parents=True)
        run_builder(tmp)
    log.info("recipe %s: %s", name, source)
    (tmp / ".complete").write_text(json.dumps({"key": key, "from": source}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process put the same build there meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if _built_key(out) != (key or ""):
            raise
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


def _model_files(path: Path) -> list[tuple[str, Path]]:
    """(relative name, file) of a model file or directory, minus dotfiles and provenance files."""
    if path.is_file():
        return [(path.name, path)]
    out = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or f.name in PROVENANCE_FILES:
            continue
        out.append((rel.as_posix(), f))
    return out


def fingerprint(path: Path, n: int = 16) -> str:
    """A short, stable id of what a model computes: sha256 over its files' relative names and bytes.

    Independent of the directory it lives in and of provenance files (``recipe.json`` with build
    times, ``m3dr_conversion.json`` with the absolute path it was converted from), so two builds
    with the same weights and tokenizer share a fingerprint wherever and whenever they were built.
    """
    h = hashlib.sha256()
    for rel, f in _model_files(Path(path)):
        size = f.stat().st_size
        h.update(len(rel.encode()).to_bytes(8, "little") + rel.encode())
        h.update(size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            if size < WHOLE_FILE_LIMIT:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:  # multi-GB weights: size + head + tail tell builds apart cheaply
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:n]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (what ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pickle_files(path: Path) -> list[Path]:
    """The pickle checkpoints (:data:`PICKLE_SUFFIXES`) a model file or directory holds, dotfiles aside."""
    return [f for _, f in _model_files(Path(path)) if f.suffix.lower() in PICKLE_SUFFIXES]


def verify_pickle(
    path: Path,
    *,
    source: str,
    sha256: str | None = None,
    trust_unpinned: bool = False,
    table: str = "layout",
) -> str | None:
    """Check a checkpoint before anything unpickles it; returns its sha256 (None: not a pickle).

    - not a pickle (safetensors, ONNX, …): nothing to check;
    - ``sha256`` pinned: the file must match it, whatever ``trust_unpinned`` says;
    - a ``recipe:`` source, unpinned: the file must match the sha256 :func:`build_recipe` recorded when
      our own builder wrote it in the model cache. Recipe pickles are ours, so they need no pin in the
      tiny profile; the record still refuses a file that changed after the build (swapped in a shared
      ``M3DR_MODELS`` volume, a stray copy). A record is only read from the recipe's own build dir,
      never from beside a downloaded or local file (a hub repo could ship one);
    - anything else unpinned: refused, unless ``trust_unpinned``.

    The refusal prints the actual sha256 and the profile line that pins it.
    """
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return None
    actual = sha256_file(path)
    where = f"{path.name} (model {source!r})"
    pin_hint = (
        f"If you trust this file (check where it came from first), pin it in the profile's [{table}] table:\n"
        f'    sha256 = "{actual}"\n'
        f"or set `trust_unpinned = true` there to load it unchecked."
    )
    if sha256:
        if actual != sha256.lower():
            raise UntrustedPickleError(
                f"refusing to load {where}: its sha256 {actual} does not match the pinned "
                f'[{table}] sha256 = "{sha256}". A .pt checkpoint is a pickle: loading it runs code. '
                f"Re-download the file, or, if the new file is the one you mean, update the pin.\n{pin_hint}"
            )
        return actual
    if source.startswith("recipe:"):
        name = source.split(":", 1)[1]
        build = recipe_dir(name).resolve()
        record_file = build / PICKLE_RECORD
        rel = path.resolve().relative_to(build).as_posix() if path.resolve().is_relative_to(build) else None
        recorded = json.loads(record_file.read_text()).get(rel) if rel and record_file.is_file() else None
        if recorded == actual:
            return actual
        if recorded is not None:
            raise UntrustedPickleError(
                f"refusing to load {where}: it changed after `m3dr models build {name}` wrote it "
                f"(recorded sha256 {recorded}, now {actual}); rebuild it with "
                f"`m3dr models build {name} --force`.\n{pin_hint}"
            )
        if not trust_unpinned:
            raise UntrustedPickleError(
                f"refusing to load {where}: the recipe build has no sha256 record of it (built before "
                f"records existed, or not by `m3dr models build`); rebuild it with "
                f"`m3dr models build {name} --force`.\n{pin_hint}"
            )
    elif not trust_unpinned:
        raise UntrustedPickleError(
            f"refusing to load {where}: a .pt checkpoint is a pickle (loading it runs code) and its sha256 "
            f"{actual} is not pinned.\n{pin_hint}"
        )
    log.warning("loading unpinned pickle %s (sha256 %s): trust_unpinned = true", path, actual)
    return actual


def model_fingerprint(stage_cfg: dict[str, Any]) -> str:
    """Fingerprint of the model a stage config points at ('' for engines with bundled weights)."""
    source = stage_cfg.get("model")
    return fingerprint(resolve_source(source)) if source else ""
