"""Ingest shard driver: sources → one English pages shard (page image + layout regions + region text).

Idempotent through the manifest: a shard already complete for the same config is skipped.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.ingest.plan import ingest_base_hash, ingest_config
from tasks.ingest.sources import SourceRef
from tasks.models import model_fingerprint
from tasks.schema import PageRecord, Reject, RejectReason, encode_png, pages_table
from tasks.shards import Manifest, ShardResult, commit_stage, completed, config_hash, config_key
from tasks.storage import Store

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _detector(cfg_json: str):
    from tasks.ingest.layout import build_layout_detector

    return build_layout_detector(json.loads(cfg_json))


@lru_cache(maxsize=4)
def _ocr(cfg_json: str):
    from tasks.ingest.ocr import build_ocr

    return build_ocr(json.loads(cfg_json))


def ingest_shard(
    root: Store | str | Path,
    shard_name: str,
    sources: list[SourceRef],
    profile: dict[str, Any],
    *,
    model_fps: dict[str, str] | None = None,
) -> ShardResult:
    """Sources (whole, or page ranges of long ones) → English pages shard (page image + layout regions +
    region text) + rejects shard."""
    from tasks.ingest.language import check_page_language
    from tasks.ingest.region_text import extract_region_text
    from tasks.ingest.sources import SourceError, iter_source_pages, local_source, page_id

    cfg = ingest_config(profile)
    fps = model_fps if model_fps is not None else {"layout": model_fingerprint(cfg["layout"])}
    base = ingest_base_hash(profile, fps["layout"])
    cfg_hash = config_hash({"base": base, "sources": sorted(s.unit for s in sources)})
    rel = f"pages/en/{shard_name}.parquet"
    manifest = Manifest(root)
    if done := completed(manifest, shard_name, cfg_hash, "pages", "en", rel):
        return done

    detector = _detector(config_key(cfg["layout"]))
    ocr = _ocr(config_key(cfg["extract"]))
    ingest = cfg["ingest"]
    records: list[PageRecord] = []
    rejects: list[Reject] = []
    for src in sorted(sources, key=lambda s: (s.source_id, s.pages or (0, 0))):
        try:
            with local_source(src) as path:
                for item in iter_source_pages(
                    path,
                    dpi=ingest.get("dpi", 144),
                    max_side=ingest.get("max_side", 1600),
                    min_side=ingest.get("min_side", 1024),
                    max_pixels=ingest.get("max_pixels", 40_000_000),
                    page_range=src.pages,
                    source_uri=src.uri,
                ):  # a PDF page's text layer is live only while the iterator is on it
                    if isinstance(item, SourceError):
                        rejects.append(Reject("ingest", src.uri, item.reason, str(item.message), "en"))
                        continue
                    regions = extract_region_text(item, detector.detect(item.image), ocr)
                    text = "\n".join(r.text for r in regions)
                    bad = check_page_language(text, ingest, input_ref=src.uri, page_index=item.page_index)
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
        sources=[s.unit for s in sources],
        extra={"ingest_base": base, "uris": {s.source_id: s.uri for s in sources}},
    )
    result.stats = {}
    return result
