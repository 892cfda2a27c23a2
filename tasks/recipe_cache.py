"""A content-keyed cache of recipe builds, outside the checkout, shared by every clone on a machine.

A recipe's output is a pure function of its builder's code, its config and the libraries that shape it
(the reproducibility test builds it twice and compares). So a build is stored once under
``<cache>/<recipe>-<key>/`` and copied into ``models_dir()`` by every later clone, instead of being
trained again (``nllb-tiny`` alone trains for minutes).

- **Key** (:func:`recipe_key`): sha256 of the recipe name, the source of its builder's module and of
  every ``tasks`` module that module imports (transitively, lazy imports included, read from the
  source without importing), the build config the recipe module reports (``cache_config()``: env
  overrides such as ``M3DR_NLLB_TINY_STEPS``), the Python version and the versions of
  :data:`KEY_LIBRARIES`. A recipe whose ``cache_config()`` returns None (a time-budgeted build) is not
  reproducible and is never cached.
- **Publish**: an entry is built in ``<cache>/.tmp/`` and renamed to its final name with its file list
  (sha256 + size of every file, ``.m3dr-cache.json``) inside: a half-written entry is never visible.
- **Use**: files are copied into the models directory while their sha256 is checked against the list;
  an entry with a changed, missing or extra file is removed and the recipe is built again. Builds of
  one key are serialised by a file lock, so processes that miss at once build it once.

Where: ``M3DR_RECIPE_CACHE``, else ``$XDG_CACHE_HOME/m3dr/recipes``, else ``~/.cache/m3dr/recipes``.
Clearing it (``rm -rf`` the folder) only costs the next build its time. A local-disk cache (it
renames): model *outputs* never go through it.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tasks.paths import REPO_ROOT

CACHE_ENV = "M3DR_RECIPE_CACHE"
ENTRY_RECORD = ".m3dr-cache.json"
# Distributions whose version can change what a recipe build writes (tokenizer training, weight init,
# serialisation, CTranslate2 conversion, the CLDR data). One list for every recipe: a version bump of
# any of them rebuilds all recipes, which is cheaper than a stale model.
KEY_LIBRARIES: tuple[str, ...] = (
    "torch",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "safetensors",
    "ctranslate2",
    "babel",
    "doclayout-yolo",
    "numpy",
    "protobuf",
)
# The code the key covers: our own packages (third-party code is covered by KEY_LIBRARIES).
LOCAL_PACKAGES: tuple[str, ...] = ("tasks",)

log = logging.getLogger(__name__)


class RecipeCacheError(RuntimeError):
    """A cache entry that does not match its record (corrupted, truncated, tampered with)."""


def cache_root() -> Path:
    """The cache folder: ``M3DR_RECIPE_CACHE``, else ``$XDG_CACHE_HOME/m3dr/recipes``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser().resolve() / "m3dr" / "recipes"


def _module_file(module: str) -> Path | None:
    """Source file of a module of ours (``tasks.x.y`` → tasks/x/y.py or tasks/x/y/__init__.py),
    found without importing it; None for a module that is not ours."""
    if module.split(".")[0] not in LOCAL_PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# CPython 3.11 keeps the AST constructor's recursion depth in per-interpreter state, not per thread: two
# threads in ast.parse at once can fail with "SystemError: AST constructor recursion depth mismatch"
# (threaded reports under cpython gh-106905; seen here when two threads asked for one recipe at once).
_PARSE_LOCK = threading.Lock()


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of its code (``from a import b`` gives ``a``
    and ``a.b``: b may be a submodule)."""
    names: set[str] = set()
    with _PARSE_LOCK:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def source_closure(module: str) -> dict[str, Path]:
    """The files of ``module`` and of every local module it imports, transitively, with the
    ``__init__`` of each package on the way (importing a submodule runs them)."""
    root = importlib.util.find_spec(module)
    if root is None or root.origin is None:
        raise ModuleNotFoundError(module)
    found: dict[str, Path] = {module: Path(root.origin)}
    todo = [module]
    while todo:
        for name in _imports(found[todo.pop()]):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in found and (path := _module_file(sub)) is not None:
                    found[sub] = path
                    todo.append(sub)
    return dict(sorted(found.items()))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recipe_key(name: str, target: str, config: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(key, what it was computed from) of recipe ``name`` built by ``target`` (``module:function``)."""
    module = target.partition(":")[0]
    versions = {}
    for dist in KEY_LIBRARIES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    inputs = {
        "recipe": name,
        "builder": target,
        "sources": {m: _sha256(p.read_bytes()) for m, p in source_closure(module).items()},
        "config": dict(config or {}),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "libraries": versions,
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return _sha256(blob)[:24], inputs


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ENTRY_RECORD)


def _hash_file(path: Path, copy_to: Path | None = None) -> str:
    """sha256 of a file, optionally copying it on the same read."""
    h = hashlib.sha256()
    with path.open("rb") as src:
        dst = copy_to.open("wb") if copy_to is not None else None
        try:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                if dst is not None:
                    dst.write(chunk)
        finally:
            if dst is not None:
                dst.close()
    return h.hexdigest()


class RecipeCache:
    """The entries of one cache folder: ``<root>/<recipe>-<key>/`` + ``<root>/.tmp/`` for builds."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()

    def entry(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}"

    @contextlib.contextmanager
    def lock(self, name: str, key: str) -> Iterator[None]:
        """One builder per key at a time on this machine (parallel test workers, two clones set up at
        once): the others wait, then copy the published entry. An flock dies with its process."""
        path = self.root / ".locks" / f"{name}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(self, name: str, key: str, inputs: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
        """Run ``build`` into a fresh folder and publish it as the entry (atomic rename, its file record
        inside). If another process published the same key first, its entry is kept and ours dropped."""
        tmp = self.root / ".tmp" / f"{name}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            record = {
                "recipe": name,
                "key": key,
                "inputs": dict(inputs),
                "files": {
                    f.relative_to(tmp).as_posix(): {"sha256": _hash_file(f), "size": f.stat().st_size}
                    for f in _files(tmp)
                },
            }
            (tmp / ENTRY_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            final = self.entry(name, key)
            try:
                tmp.rename(final)
            except OSError:  # a non-empty folder is in the way
                if (final / ENTRY_RECORD).is_file():  # published meanwhile by another process: keep it
                    return final
                self.discard(name, key, reason="a folder without a record was in the way")
                tmp.rename(final)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def copy_out(self, name: str, key: str, dst: Path) -> bool:
        """Copy entry (name, key) into ``dst`` (which must not exist), checking every file against the
        entry's record on the same read. False on a miss; a corrupted entry is removed (and False)."""
        entry = self.entry(name, key)
        record_file = entry / ENTRY_RECORD
        if not record_file.is_file():
            return False
        try:
            self._copy_verified(entry, json.loads(record_file.read_text())["files"], dst)
        # a bad entry is dropped and rebuilt; other I/O errors (a full disk where the copy goes) raise
        except (RecipeCacheError, FileNotFoundError, ValueError, KeyError) as exc:
            shutil.rmtree(dst, ignore_errors=True)
            self.discard(name, key, reason=str(exc))
            return False
        return True

    @staticmethod
    def _copy_verified(entry: Path, files: Mapping[str, Mapping[str, Any]], dst: Path) -> None:
        present = {f.relative_to(entry).as_posix() for f in _files(entry)}
        if present != set(files):
            extra, missing = sorted(present - set(files)), sorted(set(files) - present)
            raise RecipeCacheError(f"files differ from the record (extra {extra}, missing {missing})")
        for rel, meta in files.items():
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = _hash_file(entry / rel, copy_to=target)
            if digest != meta["sha256"]:
                raise RecipeCacheError(f"{rel}: sha256 {digest} does not match the recorded {meta['sha256']}")

    def discard(self, name: str, key: str, reason: str = "") -> None:
        """Remove an entry: first out of the way (rename), then delete, so no reader sees half of it."""
        entry = self.entry(name, key)
        trash = self.root / ".tmp" / f"discard-{name}-{key}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            entry.rename(trash)
        except OSError:
            return
        log.warning("recipe cache: dropped %s (%s); building it again", entry.name, reason)
        shutil.rmtree(trash, ignore_errors=True)
