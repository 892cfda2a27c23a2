"""Ingest stage: sources → one English pages shard (page image + layout regions + region text).

Idempotent through the completion records: a shard already complete for the same config is skipped.
A file that cannot be parsed is a rejects row; a storage or engine fault raises (``tasks.faults``).
"""

from __future__ import annotations

import logging
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
        is one rejects row."""
        from tasks.ingest.language import check_page_language
        from tasks.ingest.region_text import extract_region_text
        from tasks.ingest.sources import SourceError, iter_source_pages, local_source, page_id

        opts = self.cfg.ingest
        try:
            with local_source(src) as path:
                for item in iter_source_pages(
                    path,
                    dpi=opts.dpi,
                    max_side=opts.max_side,
                    min_side=opts.min_side,
                    max_pixels=opts.max_pixels,
                    page_range=src.pages,
                    source_uri=src.uri,
                ):  # a PDF page's text layer is live only while the iterator is on it
                    if isinstance(item, SourceError):
                        rejects.append(Reject("ingest", src.uri, item.reason, str(item.message), "en"))
                        continue
                    regions = extract_region_text(item, detector.detect(item.image), ocr)
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
        except SourceError as exc:
            rejects.append(Reject("ingest", src.uri, exc.reason, exc.message, "en"))
        except Exception as exc:  # a broken file is a rejects row; a broken world raises
            reject_or_raise(exc)
            log.warning("ingest: %s unreadable: %s: %s", src.uri, type(exc).__name__, exc)
            rejects.append(
                Reject("ingest", src.uri, RejectReason.UNREADABLE, f"{type(exc).__name__}: {exc}", "en")
            )


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
