"""Storage of output roots and sources through fsspec: a local path or a URL (``s3://``, ``gs://``,
``file://``, ``memory://``; ``hf://datasets/…`` for sources).

Every byte a stage writes under an output root goes through :class:`Store`, so the same code is safe on
a local disk and on an object store with no rename and no locks:

- **Publication is atomic.** Local: write a temp file beside the final name, fsync, rename. Object
  store: write the object under its final name in one request (a single PUT, or a multipart upload,
  which S3/GCS also expose only once it completes), never a temp name renamed afterwards.
- **Credentials never travel as parameters.** s3fs/gcsfs read the standard environment
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``) or, when
  ``M3DR_STORAGE_BLOCK`` names a Prefect ``Secret`` block, the fsspec storage options stored in it
  (a JSON object such as ``{"key": …, "secret": …, "client_kwargs": {"endpoint_url": …}}``). Each process
  resolves them itself, so flows pass only URLs to tasks and nothing secret reaches Prefect's
  parameters or logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

STORAGE_BLOCK_ENV = "M3DR_STORAGE_BLOCK"


def is_url(spec: str | Path) -> bool:
    """True for ``scheme://…`` (anything fsspec resolves), False for a plain local path."""
    return "://" in str(spec) and not str(spec).startswith("file://")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside local ``path``, fsync it and rename it onto ``path``.

    Readers never see a partial file; on any failure the temp file is removed and ``path`` keeps its
    old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write bytes to local ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def sha256_of(fh: Any) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def block_storage_options() -> dict[str, Any]:
    """Storage options from the Prefect ``Secret`` block named by ``M3DR_STORAGE_BLOCK`` ({} if unset)."""
    name = os.environ.get(STORAGE_BLOCK_ENV, "").strip()
    if not name:
        return {}
    from prefect.blocks.system import Secret

    value = Secret.load(name).get()
    options = json.loads(value) if isinstance(value, str) else dict(value)
    if not isinstance(options, dict):
        raise ValueError(f"Prefect Secret block {name!r} must hold a JSON object of fsspec storage options")
    return options


def env_storage_options(protocol: str) -> dict[str, Any]:
    """Options the standard environment implies beyond what the backend reads itself.

    botocore reads the AWS key variables; the endpoint variable is passed explicitly because not every
    s3fs/aiobotocore pairing honours ``AWS_ENDPOINT_URL`` on its own.
    """
    if protocol in ("s3", "s3a"):
        # listings must be fresh: other machines write records into the same prefix
        options: dict[str, Any] = {"use_listings_cache": False}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


def storage_options_for(url: str) -> dict[str, Any]:
    """Merged fsspec storage options for ``url``: environment first, the Prefect block over it."""
    protocol = url.split("://", 1)[0] if is_url(url) else "file"
    options = env_storage_options(protocol)
    for key, value in block_storage_options().items():
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return options


class Store:
    """An output root (or a source prefix): an fsspec filesystem plus the root path inside it.

    Paths given to methods are relative to the root, with ``/`` separators. Objects are immutable
    once published except where a caller overwrites a name on purpose (a completion record).
    """

    def __init__(self, spec: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        spec = str(spec)
        if spec.startswith("file://"):
            spec = spec[len("file://") :]
        if is_url(spec):
            opts = storage_options_for(spec) if storage_options is None else storage_options
            fs, path = fsspec.core.url_to_fs(spec, **opts)
            self.fs = fs
            self.root = path.rstrip("/")
            protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
            self.url = f"{protocol}://{self.root}"
            self.storage_options = opts
        else:
            self.fs = LocalFileSystem()
            self.root = str(Path(spec).expanduser().resolve())
            self.url = self.root
            self.storage_options = {}
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __str__(self) -> str:
        return self.url

    # ---------------------------------------------------------------- names
    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (for pyarrow / fsspec calls with ``self.fs``)."""
        rel = str(rel).strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        """The full URL of ``rel`` (what a user or ``datasets.load_dataset`` is given)."""
        if self.local:
            return self.path(rel)
        rel = str(rel).strip("/")
        return f"{self.url}/{rel}" if rel else self.url

    def local_path(self, rel: str = "") -> Path:
        """The local path of ``rel``; only for local roots (a clear error otherwise)."""
        if not self.local:
            raise ValueError(f"{self.url} is not on a local disk")
        return Path(self.path(rel))

    # ---------------------------------------------------------------- reads
    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when the object does not exist (one HEAD / stat, never a read)."""
        try:
            info = self.fs.info(self.path(rel))
        except (FileNotFoundError, OSError):
            return None
        if info.get("type") == "directory":
            return None
        return int(info.get("size") or 0)

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> Any | None:
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def sha256(self, rel: str) -> str:
        with self.fs.open(self.path(rel), "rb") as fh:
            return sha256_of(fh)

    def read_table(
        self, rel: str, columns: list[str] | None = None, schema: pa.Schema | None = None
    ) -> pa.Table:
        if self.local:
            return pq.read_table(self.path(rel), columns=columns, schema=schema)
        return pq.read_table(self.path(rel), columns=columns, schema=schema, filesystem=self.fs)

    def list(self, prefix: str, suffix: str = "") -> dict[str, dict[str, Any]]:
        """Objects under ``prefix`` (recursive): ``{relative path: info}`` with size and a change stamp.

        One listing call per 1,000 objects on S3; no object is read.
        """
        base = self.path(prefix)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[str, dict[str, Any]] = {}
        cut = len(self.root) + 1
        for path, info in found.items():
            if info.get("type") == "directory" or not path.endswith(suffix):
                continue
            name = path.rsplit("/", 1)[-1]
            if name.startswith("."):  # local temp files of an atomic write in progress
                continue
            out[path[cut:] if path.startswith(self.root + "/") else path] = info
        if self.local:  # fsspec's local listing is unsorted
            out = dict(sorted(out.items()))
        return out

    @contextlib.contextmanager
    def local_file(self, rel: str) -> Iterator[Path]:
        """A local path holding ``rel``'s bytes (the object itself when local, a temp copy otherwise)."""
        if self.local:
            yield Path(self.path(rel))
            return
        suffix = Path(rel).suffix
        with tempfile.TemporaryDirectory(prefix="m3dr-src-") as tmp:
            target = Path(tmp) / f"source{suffix}"
            self.fs.get_file(self.path(rel), str(target))
            yield target

    # ---------------------------------------------------------------- writes
    def put_bytes(self, rel: str, data: bytes) -> None:
        """Publish ``data`` under ``rel`` atomically (local rename, or one PUT of the final name)."""
        if self.local:
            write_bytes_atomic(data, Path(self.path(rel)))
        else:
            self.fs.pipe_file(self.path(rel), data)

    def put_json(self, rel: str, obj: Any) -> None:
        self.put_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")

    def write_with(self, rel: str, write: Callable[[str], None], suffix: str = "") -> tuple[str, int]:
        """Publish what ``write(local_tmp_path)`` writes under ``rel``; returns (sha256, size).

        Local: the temp file sits beside the final name and is renamed. Object store: the temp file is
        on local disk and uploaded under the final name (one PUT, or a multipart upload that the store
        exposes only when complete), so memory stays bounded by the writer, not the object.
        """
        if self.local:
            target = Path(self.path(rel))
            atomic_write(target, write)
            with target.open("rb") as fh:
                return sha256_of(fh), target.stat().st_size
        with tempfile.TemporaryDirectory(prefix="m3dr-put-") as tmp:
            local = str(Path(tmp) / f"object{suffix}")
            write(local)
            with open(local, "rb") as fh:
                sha = sha256_of(fh)
            size = os.path.getsize(local)
            self.fs.put_file(local, self.path(rel))
        return sha, size

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))


@lru_cache(maxsize=64)
def _cached_store(spec: str, block: str) -> Store:
    return Store(spec)


def open_store(spec: str | Path | Store) -> Store:
    """The :class:`Store` of a path or URL (cached per process: fsspec clients are reused)."""
    if isinstance(spec, Store):
        return spec
    spec = str(spec)
    if not is_url(spec):
        return Store(spec)  # cheap, and a relative path must resolve against the current directory
    return _cached_store(spec, os.environ.get(STORAGE_BLOCK_ENV, ""))


def split_url(spec: str) -> tuple[Store, str]:
    """A source URL → (store of its parent, its name), for reading a single object."""
    spec = str(spec).rstrip("/")
    parent, _, name = spec.rpartition("/")
    return open_store(parent), name
