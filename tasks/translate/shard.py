"""Translate shard driver: an English pages shard → the same pages translated into one language and
re-rendered into their original boxes (PNG, optionally PDF), plus a rejects shard.
"""

from __future__ import annotations

import io
import json
import logging
import unicodedata
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from tasks import languages
from tasks.models import model_fingerprint
from tasks.schema import PAGES_SCHEMA, PageRecord, Reject, RejectReason, encode_png, pages_table
from tasks.shards import (
    Manifest,
    ShardResult,
    commit_stage,
    completed,
    config_hash,
    config_key,
    hash_id,
)
from tasks.storage import Store

log = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def _translator(cfg_json: str):
    from tasks.translate.engine import build_translator

    return build_translator(json.loads(cfg_json))


def translate_config(profile: dict[str, Any], formats: list[str]) -> dict[str, Any]:
    """The part of a profile that decides translated pages shards' content."""
    return {
        "translate": profile.get("translate", {}),
        "render": profile.get("render", {}),
        "formats": sorted(formats),
    }


def lang_shard_name(en_name: str, lang: str) -> str:
    return en_name.replace("pages-en-", f"pages-{lang}-", 1)


def has_letters(text: str) -> bool:
    """True when ``text`` holds a letter: page numbers, "(3)" or "—" are left as they are."""
    return any(unicodedata.category(ch).startswith("L") for ch in text)


def memory_rel(lang: str, en_shard: str, translate_cfg: dict[str, Any], fps: dict[str, str]) -> str:
    """Where a shard's translation memory lives: keyed by what decides its translations."""
    key = config_hash({"translate": translate_cfg, "models": fps})
    return f"memory/{lang}/{en_shard}-{key}.parquet"


def translate_shard(
    root: Store | str | Path,
    en_shard: str,
    lang: str,
    profile: dict[str, Any],
    formats: list[str],
    *,
    model_fps: dict[str, str] | None = None,
) -> ShardResult:
    """English pages shard → the same pages translated into ``lang`` and re-rendered (+ rejects)."""
    from tasks.render.config import RenderConfig, assert_raqm
    from tasks.render.pdf import page_pdf
    from tasks.render.png import render_page
    from tasks.render.qa import QAStats, assert_tesseract
    from tasks.translate.memory import TranslationMemory
    from tasks.translate.texts import TranslateStats, translate_texts

    languages.get(lang)
    manifest = Manifest(root)
    store = manifest.store
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
    if render_cfg.qa:
        assert_tesseract([lang])
    render_hash = config_hash({"render": render_cfg.to_dict(), "translate": cfg["translate"], "models": fps})
    translator = _translator(config_key(cfg["translate"]))
    cache = TranslationMemory(store, memory_rel(lang, en_shard, cfg["translate"], fps))
    en_pages = [
        PageRecord.from_row(r) for r in store.read_table(en_entry.path, schema=PAGES_SCHEMA).to_pylist()
    ]

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
        cache.save()  # before the shard's record: a rerun of this shard reuses its translations
    except Exception as exc:
        log.exception("translation failed for %s → %s", en_shard, lang)
        rejects.append(Reject("translate", en_shard, RejectReason.TRANSLATION_FAILED, str(exc), lang))
        translated = None

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
    qa_stats = QAStats()
    if render_cfg.qa and records:
        records, qa_rejects = _render_qa(records, lang, render_cfg, qa_stats)
        rejects.extend(qa_rejects)
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
        extra={"translation": asdict(stats), "render_qa": asdict(qa_stats)},
    )


def _render_qa(
    records: list[PageRecord], lang: str, render_cfg: Any, stats: Any
) -> tuple[list[PageRecord], list[Reject]]:
    """OCR round trip of a shard's rendered pages (batched tesseract runs; ``qa_sample`` of them):
    unreadable pages are rejects, the others keep their order in the shard."""
    from tasks.render.qa import check_pages

    max_cer = render_cfg.max_cer(languages.get(lang).script)
    checks = [render_cfg.qa_checks(r.page_id) for r in records]  # one hash per page id
    checked = [r for r, check in zip(records, checks, strict=True) if check]
    pages = ((Image.open(io.BytesIO(r.image_png)).convert("RGB"), r.regions) for r in checked)
    verdicts = check_pages(pages, lang, max_cer, min_chars=render_cfg.qa_min_chars)
    if len(verdicts) != len(checked):
        raise ValueError(f"render QA returned {len(verdicts)} verdicts for {len(checked)} pages")
    # one walk in shard order, a verdict pulled per checked page: kept pages need no re-sort
    pending = iter(verdicts)
    kept: list[PageRecord] = []
    rejects: list[Reject] = []
    for record, check in zip(records, checks, strict=True):
        if not check:  # not sampled: kept unread
            kept.append(record)
            continue
        verdict = next(pending)
        stats.add(verdict)
        if verdict.ok:
            kept.append(record)
        else:
            rejects.append(
                Reject(
                    "render", record.source_page_id, RejectReason.RENDER_UNREADABLE, verdict.message(), lang
                )
            )
    return kept, rejects


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
            image_png=encode_png(result.image),
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
