"""Ingest stage: sources → one English pages shard (page image + layout regions + region text).

Idempotent through the completion records: a shard already complete for the same config is skipped.
A file that cannot be parsed is a rejects row; a storage or engine fault raises (``tasks.faults``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks.config import plain, stage_config
from tasks.faults import reject_or_raise
from tasks.ingest.config import IngestStageConfig
from tasks.ingest.plan import ingest_base_hash
from tasks.ingest.sources import SourceRef
from tasks.models import model_fingerprint
from tasks.schema import PageRecord, Reject, RejectReason, encode_png, pages_table
from tasks.shards import ShardResult, config_hash, config_key
from tasks.stage import ENGINES, ShardPlan, ShardStage, StageOutput
from tasks.storage import Store

log = logging.getLogger(__name__)


def load_detector(layout: dict[str, Any], fingerprint: str = "") -> Any:
    """The layout detector of a normalised ``[layout]`` table, once per process and model content (a
    model replaced in place is loaded again)."""
    from tasks.ingest.layout import build_layout_detector

    return ENGINES.get(("layout", config_key(layout), fingerprint), lambda: build_layout_detector(layout))


def load_ocr(extract: dict[str, Any]) -> Any:
    """The OCR engine of a normalised ``[extract]`` table, once per process."""
    from tasks.ingest.ocr import build_ocr

    return ENGINES.get(("ocr", config_key(extract)), lambda: build_ocr(extract))


class IngestStage(ShardStage):
    """Sources (whole, or page ranges of long ones) → English pages shard + rejects shard."""

    kind = "pages"

    def __init__(
        self,
        root: Store | str | Path,
        shard_name: str,
        sources: list[SourceRef],
        cfg: IngestStageConfig | Any,
        model_fps: dict[str, str] | None = None,
    ) -> None:
        super().__init__(root)
        self.shard_name = shard_name
        self.sources = sources
        self.cfg = stage_config(IngestStageConfig, cfg)
        self.layout = plain(self.cfg.layout)
        self.layout_fp = (model_fps or {}).get("layout") or model_fingerprint(self.layout)

    def plan(self) -> ShardPlan:
        base = ingest_base_hash(self.cfg, self.layout_fp)
        units = [s.unit for s in self.sources]
        return ShardPlan(
            name=self.shard_name,
            lang="en",
            rel=f"pages/en/{self.shard_name}.parquet",
            cfg_hash=config_hash({"base": base, "sources": sorted(units)}),
            entry={
                "sources": units,
                "extra": {"ingest_base": base, "uris": {s.source_id: s.uri for s in self.sources}},
            },
        )

    def process(self, plan: ShardPlan) -> StageOutput:
        detector = load_detector(self.layout, self.layout_fp)
        ocr = load_ocr(plain(self.cfg.extract))
        records: list[PageRecord] = []
        rejects: list[Reject] = []
        for src in sorted(self.sources, key=lambda s: (s.source_id, s.pages or (0, 0))):
            self._source(src, detector, ocr, plan.cfg_hash, records, rejects)
        records.sort(key=lambda r: (r.source_id, r.page_index))
        return StageOutput(pages_table(records), rejects)

    def _source(
        self, src: SourceRef, detector: Any, ocr: Any, cfg_hash: str, records: list, rejects: list
    ) -> None:
        """The pages of one source (or page range) into ``records``; a file that cannot be parsed (further)
        is one rejects row.

        Pages reach the layout detector ``detector.batch_size`` at a time; everything else happens page
        by page in page order, so records and rejects are what one page per call gives: a page that
        fails inside a batch fails alone, after the pages before it are recorded."""
        from tasks.ingest.sources import SourceError, iter_source_pages, local_source

        opts = self.cfg.ingest
        batch = max(1, int(getattr(detector, "batch_size", 1)))
        try:
            with local_source(src) as path, _TextLayers(path) as layers:
                pending: list[Any] = []  # SourcePage | SourceError, in page order
                try:
                    for item in iter_source_pages(
                        path,
                        dpi=opts.dpi,
                        max_side=opts.max_side,
                        min_side=opts.min_side,
                        max_pixels=opts.max_pixels,
                        page_range=src.pages,
                        source_uri=src.uri,
                    ):
                        pending.append(item)
                        if sum(not isinstance(x, SourceError) for x in pending) >= batch:
                            self._flush(src, pending, detector, ocr, layers, cfg_hash, records, rejects)
                except Exception:
                    # the pages read before the file broke count, as they would one page at a time
                    self._flush(src, pending, detector, ocr, layers, cfg_hash, records, rejects)
                    raise
                self._flush(src, pending, detector, ocr, layers, cfg_hash, records, rejects)
        except SourceError as exc:
            rejects.append(Reject("ingest", src.uri, exc.reason, exc.message, "en"))
        except Exception as exc:  # a broken file is a rejects row; a broken world raises
            reject_or_raise(exc)
            log.warning("ingest: %s unreadable: %s: %s", src.uri, type(exc).__name__, exc)
            rejects.append(
                Reject("ingest", src.uri, RejectReason.UNREADABLE, f"{type(exc).__name__}: {exc}", "en")
            )

    def _flush(
        self,
        src: SourceRef,
        pending: list[Any],
        detector: Any,
        ocr: Any,
        layers: _TextLayers,
        cfg_hash: str,
        records: list,
        rejects: list,
    ) -> None:
        """Layout for the pending pages in one ``detect_batch`` call, then text, language check and record
        page by page (pending is emptied)."""
        from tasks.ingest.language import check_page_language
        from tasks.ingest.region_text import extract_region_text
        from tasks.ingest.sources import SourceError, page_id

        items = pending[:]
        pending.clear()
        pages = [x for x in items if not isinstance(x, SourceError)]
        found: list[Any] | None = None
        if pages:
            try:
                found = detector.detect_batch([x.image for x in pages])
            except Exception as exc:  # bad input in the batch: find it page by page, in order
                reject_or_raise(exc)
                found = None
        opts = self.cfg.ingest
        k = 0
        for item in items:
            if isinstance(item, SourceError):
                rejects.append(Reject("ingest", src.uri, item.reason, str(item.message), "en"))
                continue
            layout = found[k] if found is not None else detector.detect(item.image)
            k += 1
            with layers.live(item) as page:
                regions = extract_region_text(page, layout, ocr)
            text = "\n".join(r.text for r in regions)
            bad = check_page_language(text, opts, input_ref=src.uri, page_index=item.page_index)
            if bad is not None:
                rejects.append(bad)  # not English: no page for it
                continue
            pid = page_id(src.source_id, item.page_index)
            records.append(
                PageRecord(
                    page_id=pid,
                    source_page_id=pid,
                    source_id=src.source_id,
                    source_uri=src.uri,
                    page_index=item.page_index,
                    lang="en",
                    image_png=encode_png(item.image),
                    width=item.image.width,
                    height=item.image.height,
                    regions=regions,
                    text_source=item.text_source,
                    layout_model=detector.model_id,
                    config_hash=cfg_hash,
                )
            )


class _TextLayers:
    """Live PDF text layers for pages held for a layout batch.

    ``iter_source_pages`` closes a PDF page when it moves to the next one, and a page's words are read
    after its layout. A page still open is used as it is (always so with ``batch_size`` 1); a page
    already closed is opened again, by index, from a second handle on the same file (opened on first
    need, closed with the source): the same words, and ``pt_to_px`` still comes from the rendered page.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.doc: Any = None

    def __enter__(self) -> _TextLayers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.doc is not None:
            from tasks.ingest.sources import PDFIUM_LOCK

            with PDFIUM_LOCK:
                self.doc.close()
            self.doc = None

    @contextmanager
    def live(self, page: Any) -> Iterator[Any]:
        """``page`` with an open ``pdf_page`` (unchanged when it has none or it is still open)."""
        if page.pdf_page is None or getattr(page.pdf_page, "raw", None) is not None:
            yield page
            return
        import pypdfium2 as pdfium

        from tasks.ingest.sources import PDFIUM_LOCK

        with PDFIUM_LOCK:
            if self.doc is None:
                self.doc = pdfium.PdfDocument(str(self.path))
            again = self.doc[page.page_index]
        try:
            yield replace(page, pdf_page=again)
        finally:
            with PDFIUM_LOCK:
                again.close()


def ingest_shard(
    root: Store | str | Path,
    shard_name: str,
    sources: list[SourceRef],
    profile: IngestStageConfig | Any,
    *,
    model_fps: dict[str, str] | None = None,
) -> ShardResult:
    """Sources → English pages shard (+ rejects); ``profile``: the stage's sub-config or a profile."""
    return IngestStage(root, shard_name, sources, profile, model_fps).run()
