"""Shard-level work of the pages half of `synthesize`: ingest (layout + text) and translate + render.

Each function takes and returns paths/names, reads its inputs from shards, writes its outputs as
shards through :mod:`tasks.shards` and is a no-op when the manifest already holds a complete shard
for the same config. The Prefect ``@task`` wrappers at the bottom only add names, retries and logs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import unicodedata
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image
from prefect import task

from tasks import languages
from tasks.models import fingerprint, resolve_source
from tasks.schema import PAGES_SCHEMA, PageRecord, Reject, RejectReason, pages_table
from tasks.shards import Manifest, commit_rejects, commit_shard, config_hash, hash_id, read_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceRef:
    """A source file to ingest: where it is, its content id, and the name it is recorded under."""

    path: str
    source_id: str
    uri: str


@dataclass
class ShardResult:
    """What a shard task reports back to the flow (small: names and counts, never page data)."""

    name: str
    kind: str
    lang: str
    path: str
    rows: int
    rejects: int
    skipped: bool
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def completed(
    manifest: Manifest, name: str, cfg_hash: str, kind: str, lang: str, rel: str
) -> ShardResult | None:
    """The skip result when ``name`` is already complete for this config (the resume check of every stage)."""
    if not manifest.is_complete(name, cfg_hash):
        return None
    entry = manifest.get(name)
    assert entry is not None
    return ShardResult(name, kind, lang, rel, entry.rows, 0, skipped=True)


def commit_stage(
    root: Path,
    table: Any,
    rejects: list[Reject],
    *,
    name: str,
    kind: str,
    lang: str,
    rel: str,
    cfg_hash: str,
    **entry: Any,
) -> ShardResult:
    """Write a stage's rejects shard, then its output shard, whose manifest entry marks the stage done."""
    commit_rejects(root, rejects, name=f"rejects-{name}", cfg_hash=cfg_hash)
    commit_shard(root, table, name=name, kind=kind, lang=lang, rel_path=rel, cfg_hash=cfg_hash, **entry)
    return ShardResult(name, kind, lang, rel, table.num_rows, len(rejects), False, entry.get("extra") or {})


# ---------------------------------------------------------------------------- model handles
def model_fingerprint(stage_cfg: dict[str, Any]) -> str:
    """Fingerprint of the model a stage config points at ('' for engines with bundled weights)."""
    source = stage_cfg.get("model")
    return fingerprint(resolve_source(source)) if source else ""


def _key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True)


@lru_cache(maxsize=4)
def _detector(cfg_json: str):
    from tasks.layout import build_layout_detector

    return build_layout_detector(json.loads(cfg_json))


@lru_cache(maxsize=4)
def _ocr(cfg_json: str):
    from tasks.extract import build_ocr

    return build_ocr(json.loads(cfg_json))


@lru_cache(maxsize=2)
def _translator(cfg_json: str):
    from tasks.translate import build_translator

    return build_translator(json.loads(cfg_json))


def ingest_config(profile: dict[str, Any]) -> dict[str, Any]:
    """The part of a profile that decides English pages shards' content."""
    return {
        "ingest": profile.get("ingest", {}),
        "layout": profile.get("layout", {}),
        "extract": profile.get("extract", {}),
    }


def translate_config(profile: dict[str, Any], formats: list[str]) -> dict[str, Any]:
    """The part of a profile that decides translated pages shards' content."""
    return {
        "translate": profile.get("translate", {}),
        "render": profile.get("render", {}),
        "formats": sorted(formats),
    }


def ingest_base_hash(profile: dict[str, Any], layout_fp: str) -> str:
    """Hash of everything but the sources that decides an English shard (config + layout model)."""
    return config_hash({"cfg": ingest_config(profile), "models": {"layout": layout_fp}})


def en_shard_name(source_ids: list[str]) -> str:
    return f"pages-en-{hash_id(*sorted(source_ids), n=16)}"


def lang_shard_name(en_name: str, lang: str) -> str:
    return en_name.replace("pages-en-", f"pages-{lang}-", 1)


def has_letters(text: str) -> bool:
    """True when ``text`` holds a letter: page numbers, "(3)" or "—" are left as they are."""
    return any(unicodedata.category(ch).startswith("L") for ch in text)


def preload_engines() -> None:
    """Import the stage modules in the calling thread before shard tasks run in worker threads.

    transformers' lazy module loader is not thread-safe: two threads importing ``AutoTokenizer`` at
    once can fail with ImportError, so flows call this once before submitting tasks.
    """
    import ctranslate2  # noqa: F401
    from transformers import AutoTokenizer, NllbTokenizer, NllbTokenizerFast  # noqa: F401

    import tasks.extract
    import tasks.layout
    import tasks.render
    import tasks.translate  # noqa: F401


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------------- ingest
def ingest_shard(
    root: Path,
    shard_name: str,
    sources: list[SourceRef],
    profile: dict[str, Any],
    *,
    model_fps: dict[str, str] | None = None,
) -> ShardResult:
    """Sources → English pages shard (page image + layout regions + region text) + rejects shard."""
    from tasks.extract import SourceError, extract_region_text, iter_source_pages, page_id

    root = Path(root)
    cfg = ingest_config(profile)
    fps = model_fps if model_fps is not None else {"layout": model_fingerprint(cfg["layout"])}
    base = ingest_base_hash(profile, fps["layout"])
    cfg_hash = config_hash({"base": base, "sources": sorted(s.source_id for s in sources)})
    rel = f"pages/en/{shard_name}.parquet"
    manifest = Manifest(root)
    if done := completed(manifest, shard_name, cfg_hash, "pages", "en", rel):
        return done

    detector = _detector(_key(cfg["layout"]))
    ocr = _ocr(_key(cfg["extract"]))
    ingest = cfg["ingest"]
    records: list[PageRecord] = []
    rejects: list[Reject] = []
    for src in sorted(sources, key=lambda s: s.source_id):
        try:
            for item in iter_source_pages(
                Path(src.path),
                dpi=ingest.get("dpi", 144),
                max_side=ingest.get("max_side", 1600),
                min_side=ingest.get("min_side", 1024),
                max_pixels=ingest.get("max_pixels", 40_000_000),
            ):
                if isinstance(item, SourceError):
                    rejects.append(Reject("ingest", src.uri, item.reason, str(item.message), "en"))
                    continue
                regions = extract_region_text(item, detector.detect(item.image), ocr)
                pid = page_id(src.source_id, item.page_index)
                records.append(
                    PageRecord(
                        page_id=pid,
                        source_page_id=pid,
                        source_id=src.source_id,
                        source_uri=src.uri,
                        page_index=item.page_index,
                        lang="en",
                        image_png=_png(item.image),
                        width=item.image.width,
                        height=item.image.height,
                        regions=regions,
                        text_source=item.text_source,
                        layout_model=detector.model_id,
                        config_hash=cfg_hash,
                    )
                )
        except SourceError as exc:
            rejects.append(Reject("ingest", src.uri, exc.reason, exc.message, "en"))
        except Exception as exc:  # a broken file must never stop the shard
            log.exception("ingest failed for %s", src.uri)
            rejects.append(
                Reject("ingest", src.uri, RejectReason.UNREADABLE, f"{type(exc).__name__}: {exc}", "en")
            )
    records.sort(key=lambda r: (r.source_id, r.page_index))
    result = commit_stage(
        root,
        pages_table(records),
        rejects,
        name=shard_name,
        kind="pages",
        lang="en",
        rel=rel,
        cfg_hash=cfg_hash,
        sources=[s.source_id for s in sources],
        extra={"ingest_base": base, "uris": {s.source_id: s.uri for s in sources}},
    )
    result.stats = {}
    return result


# ---------------------------------------------------------------------------- translate + render
def translate_shard(
    root: Path,
    en_shard: str,
    lang: str,
    profile: dict[str, Any],
    formats: list[str],
    *,
    model_fps: dict[str, str] | None = None,
) -> ShardResult:
    """English pages shard → the same pages translated into ``lang`` and re-rendered (+ rejects)."""
    from tasks.render import RenderConfig, assert_raqm, page_pdf, render_page
    from tasks.translate import TranslateStats, TranslationCache, translate_texts

    root = Path(root)
    languages.get(lang)
    manifest = Manifest(root)
    en_entry = manifest.get(en_shard)
    if en_entry is None:
        raise FileNotFoundError(f"English shard {en_shard} is not in the manifest of {root}")
    cfg = translate_config(profile, formats)
    fps = model_fps if model_fps is not None else {"translate": model_fingerprint(cfg["translate"])}
    cfg_hash = config_hash({"cfg": cfg, "models": fps, "input": en_entry.sha256, "lang": lang})
    name = lang_shard_name(en_shard, lang)
    rel = f"pages/{lang}/{name}.parquet"
    if done := completed(manifest, name, cfg_hash, "pages", lang, rel):
        return done

    assert_raqm()
    render_cfg = RenderConfig(**cfg["render"])
    render_hash = config_hash({"render": render_cfg.to_dict(), "translate": cfg["translate"], "models": fps})
    translator = _translator(_key(cfg["translate"]))
    cache = TranslationCache(root / "cache" / "translations.sqlite")
    en_pages = [PageRecord.from_row(r) for r in read_table(root / en_entry.path, PAGES_SCHEMA).to_pylist()]

    slots = [
        (i, j)
        for i, p in enumerate(en_pages)
        for j, r in enumerate(p.regions)
        if r.translatable and has_letters(r.text)
    ]
    texts = [en_pages[i].regions[j].text for i, j in slots]
    stats = TranslateStats()
    rejects: list[Reject] = []
    try:
        translated = translate_texts(translator, texts, "en", lang, cache=cache, stats=stats)
    except Exception as exc:
        log.exception("translation failed for %s → %s", en_shard, lang)
        rejects.append(Reject("translate", en_shard, RejectReason.TRANSLATION_FAILED, str(exc), lang))
        translated = None
    finally:
        cache.close()

    records: list[PageRecord] = []
    if translated is not None:
        by_page: dict[int, dict[int, str]] = {}
        for (i, j), text in zip(slots, translated, strict=True):
            by_page.setdefault(i, {})[j] = text
        for i, page in enumerate(en_pages):
            if i not in by_page:  # nothing to translate (e.g. a picture-only page)
                continue
            record, reject = _render_translation(
                page,
                by_page[i],
                lang,
                render_cfg,
                render_hash,
                formats,
                translator.model_id,
                cfg_hash,
                render_page,
                page_pdf,
            )
            if reject is not None:
                rejects.append(reject)
            if record is not None:
                records.append(record)
    return commit_stage(
        root,
        pages_table(records),
        rejects,
        name=name,
        kind="pages",
        lang=lang,
        rel=rel,
        cfg_hash=cfg_hash,
        inputs=[en_shard],
        extra={"translation": asdict(stats)},
    )


def _render_translation(
    page: PageRecord,
    texts: dict[int, str],
    lang: str,
    render_cfg: Any,
    render_hash: str,
    formats: list[str],
    model_id: str,
    cfg_hash: str,
    render_page: Any,
    page_pdf: Any,
) -> tuple[PageRecord | None, Reject | None]:
    """Render one translated page; a page with any region that cannot be rendered is rejected whole."""
    # Regions without a translation (figures, page numbers and other letter-free text) keep their pixels.
    regions = [
        type(r)(r.label, r.bbox, r.score, texts.get(j, r.text), j in texts, False)
        for j, r in enumerate(page.regions)
    ]
    image = Image.open(io.BytesIO(page.image_png)).convert("RGB")
    result = render_page(image, regions, lang, render_cfg)
    if result.failures:
        f = result.failures[0]
        more = f" (+{len(result.failures) - 1} more regions)" if len(result.failures) > 1 else ""
        return None, Reject("render", page.page_id, f.reason, f"region {f.index}: {f.message}{more}", lang)
    pdf_bytes = None
    if "pdf" in formats:
        try:
            pdf_bytes = page_pdf(image, result.regions, lang, render_cfg)
        except Exception as exc:
            return None, Reject("render", page.page_id, RejectReason.PDF_FAILED, str(exc), lang)
    return (
        PageRecord(
            page_id=hash_id(page.page_id, lang, render_hash),
            source_page_id=page.page_id,
            source_id=page.source_id,
            source_uri=page.source_uri,
            page_index=page.page_index,
            lang=lang,
            image_png=_png(result.image),
            width=result.image.width,
            height=result.image.height,
            regions=result.regions,
            text_source="translation",
            layout_model=page.layout_model,
            translation_model=model_id,
            config_hash=cfg_hash,
            pdf=pdf_bytes,
        ),
        None,
    )


# ---------------------------------------------------------------------------- sources
def scan_sources(spec: str | Path, *, base: Path | None = None) -> list[SourceRef]:
    """Expand a directory, a glob or a manifest file (one path per line) into SourceRefs.

    Files are sorted, hashed by content (the source id) and de-duplicated by content. Unsupported
    suffixes are kept: the ingest stage turns them into rejects rows with a clear reason.
    """
    from tasks.extract import source_id

    spec_path = Path(spec)
    if spec_path.is_dir():
        files = sorted(p for p in spec_path.rglob("*") if p.is_file() and not p.name.startswith("."))
        rel_base = spec_path
    elif spec_path.is_file() and spec_path.suffix in {".txt", ".lst"}:
        files = [Path(line.strip()) for line in spec_path.read_text().splitlines() if line.strip()]
        rel_base = spec_path.parent
        files = [f if f.is_absolute() else rel_base / f for f in files]
    elif spec_path.is_file():
        files, rel_base = [spec_path], spec_path.parent
    else:
        import glob

        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        rel_base = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    base = base or rel_base
    refs: dict[str, SourceRef] = {}
    for f in files:
        if f.suffix.lower() in {".md", ".txt", ".toml", ".py", ".json"} or f.parent.name == "licenses":
            continue  # documentation that lives beside samples is not a source
        sid = source_id(f)
        if sid not in refs:
            refs[sid] = SourceRef(str(f), sid, os.path.relpath(f, base))
    return sorted(refs.values(), key=lambda r: r.uri)


def source_page_count(ref: SourceRef) -> int:
    """Cheap page count for shard packing (1 for images and unreadable files)."""
    if not ref.path.lower().endswith(".pdf"):
        return 1
    try:
        import pypdfium2 as pdfium

        with open(ref.path, "rb") as fh:
            doc = pdfium.PdfDocument(fh.read())
        n = len(doc)
        doc.close()
        return max(n, 1)
    except Exception:
        return 1


def changed_sources(refs: list[SourceRef], manifest: Manifest) -> dict[str, str]:
    """Recorded source ids whose file (same uri) now has different content: ``{old_id: uri}``.

    Their pages stay on disk (shards are immutable) but are marked superseded in the manifest, so
    later stages and readers skip them; the new content is ingested as a new source.
    """
    current = {r.uri: r.source_id for r in refs}
    out: dict[str, str] = {}
    for entry in manifest.shards("pages", "en"):
        for sid, uri in entry.extra.get("uris", {}).items():
            if uri in current and current[uri] != sid:
                out[sid] = uri
    return out


def done_en_shards(
    manifest: Manifest, ingest_base: str, source_ids: set[str] | None = None
) -> dict[str, set[str]]:
    """Complete English shards made with this ingest config: ``{shard name: its source ids}``
    (only shards holding one of ``source_ids`` when given)."""
    return {
        e.name: set(e.sources)
        for e in manifest.shards("pages", "en")
        if e.extra.get("ingest_base") == ingest_base and (source_ids is None or set(e.sources) & source_ids)
    }


def reject_unknown_langs(root: Path, unknown: list[str]) -> None:
    """One rejects row per unknown language code of a run (the run goes on with the known ones)."""
    rejects = [
        Reject(
            "config",
            code,
            RejectReason.UNKNOWN_LANGUAGE,
            f"unknown language code {code!r}; supported: {', '.join(languages.ALL_LANGS)}",
            code,
        )
        for code in unknown
    ]
    commit_rejects(
        root, rejects, name=f"rejects-config-{config_hash(unknown)}", cfg_hash=config_hash(unknown)
    )


def plan_en_shards(refs: list[SourceRef], pages_per_shard: int, done: set[str]) -> dict[str, list[SourceRef]]:
    """Pack sources that are not yet covered into shards of at most ``pages_per_shard`` pages.

    Packing is by source id so the same new sources always give the same shards; sources already in
    a complete shard (``done``) are left alone, which is what makes refreshes append-only.
    """
    todo = sorted((r for r in refs if r.source_id not in done), key=lambda r: r.source_id)
    shards: list[list[SourceRef]] = []
    current: list[SourceRef] = []
    pages = 0
    for ref in todo:
        n = source_page_count(ref)
        if current and pages + n > pages_per_shard:
            shards.append(current)
            current, pages = [], 0
        current.append(ref)
        pages += n
    if current:
        shards.append(current)
    return {en_shard_name([r.source_id for r in group]): group for group in shards}


# ---------------------------------------------------------------------------- Prefect tasks
@task(name="ingest-shard", task_run_name="ingest {shard_name}", retries=1, retry_delay_seconds=5)
def ingest_shard_task(
    root: str, shard_name: str, sources: list[SourceRef], profile: dict[str, Any], model_fps: dict[str, str]
) -> dict[str, Any]:
    """Prefect wrapper of :func:`ingest_shard` (one task per shard, never per page)."""
    return ingest_shard(Path(root), shard_name, sources, profile, model_fps=model_fps).to_dict()


@task(name="translate-shard", task_run_name="translate {en_shard} → {lang}", retries=1, retry_delay_seconds=5)
def translate_shard_task(
    root: str,
    en_shard: str,
    lang: str,
    profile: dict[str, Any],
    formats: list[str],
    model_fps: dict[str, str],
) -> dict[str, Any]:
    """Prefect wrapper of :func:`translate_shard`."""
    return translate_shard(Path(root), en_shard, lang, profile, formats, model_fps=model_fps).to_dict()
