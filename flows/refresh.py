"""`refresh` flow: the scheduled dataset refresh (cron deployment in prefect.yaml).

Runs `synthesize` as a subflow. Because ids are content hashes and the manifest records which sources
are done, only new or changed source files are processed and their shards are appended; files whose
content changed are ingested anew and their old version is marked superseded in the manifest.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import SynthesizeParams
from flows.synthesize import synthesize


@flow(name="refresh", log_prints=True)
def refresh(params: SynthesizeParams | None = None) -> dict[str, Any]:
    """Process only new or changed sources into the existing output root (append-only)."""
    return synthesize(params or SynthesizeParams())
