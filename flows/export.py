"""`export-dataset` flow: a synthesize output as a Hugging Face dataset repository.

Orchestration only: one task streams the export (`eval.dataset_export`: corpus pages a row group at a
time into hub-sized files, then the train/dev rows, the held-out suite, the card), then the flow
publishes the card as a markdown artifact and the configs as a table. `m3dr export-dataset` runs the
same export without Prefect (a progress bar instead of task states).
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from eval.dataset_export import ExportResult, card_body, export_dataset
from flows.params import ExportParams


def run_export(params: ExportParams, *, progress: bool = False) -> ExportResult:
    """The export the parameters describe (shared by the flow's task and the CLI)."""
    return export_dataset(
        params.data,
        params.out,
        fmt=params.format,
        positives=params.positives,
        min_negatives=params.min_negatives,
        max_file_bytes=int(params.max_file_mb * 1000**2),
        license=params.license,
        pretty_name=params.name,
        benchmark=params.benchmark,
        max_queries_per_lang=params.max_queries_per_lang,
        overwrite=params.overwrite,
        progress=progress,
    )


@task(name="export-dataset", task_run_name="export {params.data} -> {params.out}")
def export_task(params: ExportParams) -> dict[str, Any]:
    result = run_export(params)
    get_run_logger().info(
        "%s: %s%s",
        result.dest,
        ", ".join(f"{c['config_name']} {c['rows']}" for c in result.configs),
        " (unchanged inputs: nothing rewritten)" if result.reused else "",
    )
    return {"dest": result.dest, "fingerprint": result.fingerprint, "configs": result.configs,
            "reused": result.reused}  # fmt: skip


@flow(name="export-dataset", log_prints=True)
def export_dataset_flow(params: ExportParams | None = None) -> dict[str, Any]:
    """Write the dataset repository, then show its card and configs as artifacts."""
    params = params or ExportParams()
    result = export_task(params)
    body = card_body(result["dest"])
    create_markdown_artifact(body, key="export-dataset-card", description=f"dataset card of {result['dest']}")
    create_table_artifact(
        [{k: c[k] for k in ("config_name", "split", "rows", "path")} for c in result["configs"]],
        key="export-dataset-configs",
        description="configs of the exported dataset",
    )
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if export_dataset_flow() else 1)
