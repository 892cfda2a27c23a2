"""Translate shard driver: an English pages shard → the same pages translated into one language and
re-rendered into their original boxes (PNG, optionally PDF), plus a rejects shard.
"""

from __future__ import annotations

import io
import logging
import unicodedata
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from tasks import languages
from tasks.config import plain, stage_config
from tasks.faults import reject_or_raise
from tasks.models import model_fingerprint
from tasks.schema import PAGES_SCHEMA, PageRecord, Reject, RejectReason, encode_png, pages_table
from tasks.shards import ShardResult, config_hash, config_key, hash_id
from tasks.stage import ENGINES, ShardPlan, ShardStage, StageOutput, shard_name
from tasks.storage import Store
from tasks.translate.config import TranslateStageConfig

log = logging.getLogger(__name__)


def load_translator(translate: dict[str, Any], fingerprint: str = "") -> Any:
    """The translator of a normalised ``[translate]`` table, once per process and model content (a
    model replaced in place is loaded again)."""
    from tasks.translate.engine import build_translator

    return ENGINES.get(("translate", config_key(translate), fingerprint), lambda: build_translator(translate))


def translate_config(profile: Any, formats: list[str] | tuple[str, ...] = ("png",)) -> TranslateStageConfig:
    """The part of a profile that decides translated pages shards' content, typed (a Profile, a profile
    mapping, or the sub-config itself, whose formats then win)."""
    if isinstance(profile, TranslateStageConfig):
        return profile
    return stage_config(TranslateStageConfig, profile, formats=tuple(formats))


def lang_shard_name(en_name: str, lang: str) -> str:
    """The name of a group's pages shard in ``lang``."""
    return shard_name("pages", en_name, lang)


def has_letters(text: str) -> bool:
    """True when ``text`` holds a letter: page numbers, "(3)" or "—" are left as they are."""
    return any(unicodedata.category(ch).startswith("L") for ch in text)


# [translate] keys that decide where and how fast, never what: a chunk's translation depends only on the
# chunk, the model and the decoding options, whatever the batching, threads or calls in flight
# (tests/tasks/translate/test_translate.py). Left out of every hash, so more GPUs or bigger batches
# re-make no shard and keep the translation memory. (``device`` stays: it picks int8 vs int8_float16.)
SPEED_KEYS = (
    "device_index",
    "max_batch_size",
    "batch_type",
    "max_batch_tokens",
    "max_in_flight",
    "inter_threads",
    "intra_threads",
)


def translate_hash_view(translate_cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a normalised ``[translate]`` table that decides the translations."""
    return {k: v for k, v in translate_cfg.items() if k not in SPEED_KEYS}


def memory_rel(lang: str, en_shard: str, translate_cfg: dict[str, Any], fps: dict[str, str]) -> str:
    """Where a shard's translation memory lives: keyed by what decides its translations."""
    key = config_hash({"translate": translate_hash_view(translate_cfg), "models": fps})
    return f"memory/{lang}/{en_shard}-{key}.parquet"


class TranslateStage(ShardStage):
    """English pages shard → the same pages translated into ``lang`` and re-rendered (+ rejects).

    A translator failure raises (a broken engine is not a property of the pages); a page whose text
    cannot be rendered readably is a rejects row."""

    kind = "pages"

    def __init__(
        self,
        root: Store | str | Path,
        en_shard: str,
        lang: str,
        cfg: TranslateStageConfig | Any,
        formats: list[str] | tuple[str, ...] = ("png",),
        model_fps: dict[str, str] | None = None,
    ) -> None:
        super().__init__(root)
        languages.get(lang)
        self.en_shard, self.lang = en_shard, lang
        self.cfg = translate_config(cfg, formats)
        self.translate = plain(self.cfg.translate)
        self.fps = model_fps if model_fps is not None else {"translate": model_fingerprint(self.translate)}

    def plan(self) -> ShardPlan:
        self.en_entry = self.manifest.get(self.en_shard)
        if self.en_entry is None:
            raise FileNotFoundError(f"English shard {self.en_shard} is not in the manifest of {self.store}")
        cfg = {**plain(self.cfg), "translate": translate_hash_view(self.translate)}
        cfg_hash = config_hash(
            {"cfg": cfg, "models": self.fps, "input": self.en_entry.sha256, "lang": self.lang}
        )
        name = lang_shard_name(self.en_shard, self.lang)
        return ShardPlan(
            name, self.lang, f"pages/{self.lang}/{name}.parquet", cfg_hash, {"inputs": [self.en_shard]}
        )

    def process(self, plan: ShardPlan) -> StageOutput:
        from tasks.render.config import assert_raqm
        from tasks.render.qa import QAStats, assert_tesseract
        from tasks.translate.memory import TranslationMemory
        from tasks.translate.texts import TranslateStats, translate_texts

        lang, render_cfg, formats = self.lang, self.cfg.render, list(self.cfg.formats)
        assert_raqm()
        if render_cfg.qa:
            assert_tesseract([lang])
        render_hash = config_hash(
            {
                "render": render_cfg.to_dict(),
                "translate": translate_hash_view(self.translate),
                "models": self.fps,
            }
        )
        translator = load_translator(self.translate, self.fps.get("translate", ""))
        cache = TranslationMemory(self.store, memory_rel(lang, self.en_shard, self.translate, self.fps))
        en_pages = [
            PageRecord.from_row(r)
            for r in self.store.read_table(self.en_entry.path, schema=PAGES_SCHEMA).to_pylist()
        ]
        slots = [
            (i, j)
            for i, p in enumerate(en_pages)
            for j, r in enumerate(p.regions)
            if r.translatable and has_letters(r.text)
        ]
        stats = TranslateStats()
        texts = [en_pages[i].regions[j].text for i, j in slots]
        translated = translate_texts(translator, texts, "en", lang, cache=cache, stats=stats)
        cache.save()  # before the shard's record: a rerun of this shard reuses its translations
        by_page: dict[int, dict[int, str]] = {}
        for (i, j), text in zip(slots, translated, strict=True):
            by_page.setdefault(i, {})[j] = text
        records: list[PageRecord] = []
        rejects: list[Reject] = []
        for i, page in enumerate(en_pages):
            if i not in by_page:  # nothing to translate (e.g. a picture-only page)
                continue
            record, reject = _render_translation(
                page, by_page[i], lang, render_cfg, render_hash, formats, translator.model_id, plan.cfg_hash
            )
            rejects += [reject] if reject is not None else []
            records += [record] if record is not None else []
        qa_stats = QAStats()
        if render_cfg.qa and records:
            records, qa_rejects = _render_qa(records, lang, render_cfg, qa_stats)
            rejects.extend(qa_rejects)
        return StageOutput(
            pages_table(records), rejects, {"translation": asdict(stats), "render_qa": asdict(qa_stats)}
        )


def translate_shard(
    root: Store | str | Path,
    en_shard: str,
    lang: str,
    profile: TranslateStageConfig | Any,
    formats: list[str] | tuple[str, ...] = ("png",),
    *,
    model_fps: dict[str, str] | None = None,
) -> ShardResult:
    """English pages shard → the same pages translated into ``lang`` and re-rendered (+ rejects)."""
    return TranslateStage(root, en_shard, lang, profile, formats, model_fps).run()


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
) -> tuple[PageRecord | None, Reject | None]:
    """Render one translated page; a page with any region that cannot be rendered is rejected whole."""
    from tasks.render.pdf import page_pdf
    from tasks.render.png import render_page

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
        except Exception as exc:  # text the PDF layer cannot hold is a rejects row; a broken world raises
            reject_or_raise(exc)
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
