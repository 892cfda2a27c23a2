"""The benchmark report: a markdown page with a PNG plot, from :func:`eval.evaluate.summarise`'s output.

The plot has two panels: NDCG@5 per language (the monolingual set of each language, and the
cross-lingual set's queries of that language) for the widest dense retriever and the multi-vector
one, and the Matryoshka sweep (dense dim vs NDCG@5 on the cross set and the mono mean, multi-vector
as a reference line). The markdown holds the summary table (cross / mono mean, storage per document,
latency), the per-language table and the set sizes, so it reads the same in the Prefect UI, on disk
and in a PR.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.evaluate import MULTI, SetResult, result_rows
from eval.metrics import MAIN_METRIC
from tasks.languages import ALL_LANGS
from tasks.storage import atomic_write


def _dense_dims(summary: Mapping[str, Any]) -> list[int]:
    return sorted(int(n.split("@")[1]) for n in summary if n.startswith("dense@") and "+" not in n)


def headline(summary: Mapping[str, Any]) -> list[str]:
    """The retrievers the per-language view shows: the widest dense one and the multi-vector one."""
    dims = _dense_dims(summary)
    out = [f"dense@{dims[-1]}"] if dims else []
    if MULTI in summary:
        out.append(MULTI)
    out += [n for n in summary if n.endswith("+rerank")]
    if dims and f"text:dense@{dims[-1]}" in summary:  # the text view's widest dense retriever
        out.append(f"text:dense@{dims[-1]}")
    return out


def languages(summary: Mapping[str, Any]) -> list[str]:
    """Languages with a mono set or cross-set queries, in the registry's order."""
    found = {lang for e in summary.values() for lang in [*e["mono"], *e["cross_per_language"]]}
    order = {c: i for i, c in enumerate(ALL_LANGS)}
    return sorted(found, key=lambda c: (order.get(c, 99), c))


def plot_png(summary: Mapping[str, Any], out_png: Path, metric: str = MAIN_METRIC) -> Path:
    """Per-language bars + Matryoshka sweep, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = languages(summary)
    shown = headline(summary)
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(max(8.0, 3.0 + 0.55 * len(langs) * max(1, len(shown))), 3.6), dpi=110,
        gridspec_kw={"width_ratios": [max(2, len(langs)), 2]},
    )  # fmt: skip
    series = []
    for name in shown:
        e = summary[name]
        series.append((f"{name} mono", [e["mono"].get(lang, {}).get(metric) for lang in langs]))
        if e["cross_per_language"]:
            series.append(
                (f"{name} cross", [e["cross_per_language"].get(lang, {}).get(metric) for lang in langs])
            )
    width = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(langs))]
        ax1.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=label)
    ax1.set_xticks(range(len(langs)), langs)
    ax1.set_ylabel(metric.upper())
    ax1.set_ylim(0, 1)
    ax1.set_title(f"{metric.upper()} per language")
    ax1.grid(axis="y", alpha=0.3)
    if series:
        ax1.legend(fontsize=7, ncol=2)

    dims = _dense_dims(summary)
    for key, label, style in (("cross", "cross-lingual", "o-"), ("mono_mean", "mono mean", "s--")):
        ys = [(summary[f"dense@{d}"].get(key) or {}).get(metric) for d in dims]
        pts = [(d, y) for d, y in zip(dims, ys, strict=True) if y is not None]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"dense {label}")
    if MULTI in summary:
        for key, label, ls in (("cross", "cross-lingual", ":"), ("mono_mean", "mono mean", "-.")):
            y = (summary[MULTI].get(key) or {}).get(metric)
            if y is not None:
                ax2.axhline(y, ls=ls, color="grey", label=f"multi-vector {label}")
    if dims:
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(dims, [str(d) for d in dims])
    ax2.set_xlabel("Matryoshka dim")
    ax2.set_ylabel(metric.upper())
    ax2.set_ylim(0, 1)
    ax2.set_title("Matryoshka sweep")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)

    def save(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    atomic_write(out_png, save)
    plt.close(fig)
    return out_png


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def _table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def language_rows(summary: Mapping[str, Any], metric: str = MAIN_METRIC) -> list[dict[str, Any]]:
    """One row per language: each headline retriever's mono and cross (by query language) value."""
    rows = []
    for lang in languages(summary):
        row: dict[str, Any] = {"language": lang}
        for name in headline(summary):
            e = summary[name]
            row[f"{name} mono"] = e["mono"].get(lang, {}).get(metric)
            row[f"{name} cross"] = e["cross_per_language"].get(lang, {}).get(metric)
        rows.append(row)
    return rows


def markdown(
    summaries: Mapping[str, Mapping[str, Any]],
    sets: Sequence[SetResult],
    *,
    model: str,
    pngs: Mapping[str, Path] | None = None,
    embed_png: bool = False,
    rejects: Sequence[Mapping[str, str]] = (),
    metric: str = MAIN_METRIC,
) -> str:
    """The report page: per suite the plot, summary and per-language tables; then every set's size.

    ``embed_png`` inlines the plots as data URLs (Prefect artifacts show them)."""
    lines = [f"# benchmark-nayana: `{model}`", ""]
    lines.append(
        f"Main metric {metric.upper()}. Per suite: **cross** = the cross-lingual set alone, **mono mean** = "
        "the unweighted mean over its monolingual sets (the paper's aggregation). Storage is bytes per "
        "document of the index (dense: dim × 2 or 4 bytes; multi-vector: mean tokens × dim × 2 or 4). "
        "Query ms is query encoding per query; search ms is search (+ rerank) per query."
    )
    lines.append("")
    for suite, summary in summaries.items():
        in_suite = [x for x in sets if x.suite == suite and not x.error]
        n_cross = sum(x.kind == "cross" for x in in_suite)
        lines += [
            f"## Suite `{suite}`",
            "",
            f"{n_cross} cross-lingual set(s), {len(in_suite) - n_cross} monolingual.",
        ]
        lines.append("")
        png = (pngs or {}).get(suite)
        if png is not None:
            data = base64.b64encode(Path(png).read_bytes()).decode()
            src = f"data:image/png;base64,{data}" if embed_png else Path(png).name
            lines += [f"![{suite}: per-language and Matryoshka sweep]({src})", ""]
        rows = [{k: v for k, v in r.items() if k != "suite"} for r in result_rows({suite: summary})]
        lines += ["### Summary", "", *_table(rows), ""]
        lines += [f"### {metric.upper()} per language", "", *_table(language_rows(summary, metric)), ""]
    lines += ["## Sets", ""]
    lines += _table(
        [
            {
                "suite": x.suite,
                "set": x.name,
                "kind": x.kind,
                "language": x.language or "all",
                "queries": x.queries,
                "corpus": x.corpus,
                "corpus ms/page": round(x.corpus_ms_per_page, 1) if not x.cached else "cached",
                "error": x.error or "",
            }
            for x in sets
        ]
    )
    if rejects:
        lines += ["", "## Rejected sets", "", *_table(list(rejects))]
    return "\n".join(lines) + "\n"


def write_report(path: Path, text: str) -> Path:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Path(path)


def compare_rows(
    runs: Sequence[tuple[str, Mapping[str, Any]]], metric: str = MAIN_METRIC
) -> list[dict[str, Any]]:
    """Rows comparing several ``results.json`` payloads (label, payload): per suite and retriever the
    cross-lingual and mono-mean ``metric``, and the change against the first run's same retriever (or
    its widest dense retriever when the first run has no such name, e.g. a text baseline)."""
    if not runs:
        return []
    base_label, base = runs[0]
    views = [("cross", "cross"), ("mono_mean", "mono mean")]
    if any(e.get("composed") for _, p in runs for s in p["summary"].values() for e in s.values()):
        views.append(("composed", "composed"))
    rows = []
    for label, payload in runs:
        for suite, summary in payload["summary"].items():
            ref_summary = base["summary"].get(suite, {})
            for name, e in summary.items():
                ref = ref_summary.get(name) or ref_summary.get(next(iter(headline(ref_summary)), ""), {})
                row: dict[str, Any] = {"run": label, "suite": suite, "retriever": name}
                for key, col in views:
                    v = (e.get(key) or {}).get(metric)
                    r = (ref.get(key) or {}).get(metric) if ref else None
                    row[f"{col} {metric}"] = v
                    delta = None if v is None or r is None or label == base_label else v - r
                    row[f"Δ {col} vs {base_label}"] = None if delta is None else f"{delta:+.4f}"
                rows.append(row)
    return rows


def compare_markdown(runs: Sequence[tuple[str, Mapping[str, Any]]], metric: str = MAIN_METRIC) -> str:
    """A markdown page comparing benchmark runs (e.g. the untrained backbone vs the trained retriever)."""
    lines = [f"# benchmark-nayana comparison ({metric.upper()})", ""]
    for label, payload in runs:
        lines.append(f"- **{label}**: `{json.dumps(payload.get('encoder', {}), sort_keys=True)}`")
    lines += ["", *_table(compare_rows(runs, metric)), ""]
    return "\n".join(lines)


@dataclass
class BenchmarkOutputs:
    """What a benchmark run leaves: files on disk, and the artifact markdown + table for Prefect."""

    summary: dict[str, Any]
    artifact_markdown: str
    table: list[dict[str, Any]]
    results_path: Path
    report_path: Path


def write_benchmark_outputs(
    out: Path, encoder: Mapping[str, Any], settings: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> BenchmarkOutputs:
    """results.json, report.md + report-<suite>.png and rejects.parquet (one row per unreadable set).

    Raises when no set could be scored (the report, with the rejects, is still written)."""
    from eval.evaluate import save_results, summarise
    from tasks.schema import Reject, RejectReason, rejects_table
    from tasks.shards import write_table
    from tasks.storage import open_store

    out = Path(out)
    sets = [SetResult.from_json(dict(r)) for r in results]
    summary = summarise(sets)
    model = json.dumps(dict(encoder), sort_keys=True)
    rejects = [Reject("benchmark", s.name, RejectReason.BENCHMARK_INVALID, s.error) for s in sets if s.error]
    write_table(open_store(out), "rejects.parquet", rejects_table(rejects))
    payload = {
        "encoder": dict(encoder),
        "settings": dict(settings),
        "summary": summary,
        "sets": list(results),
    }
    results_path = save_results(out / "results.json", payload)
    reject_rows = [{"set": r.input_ref, "reason": r.reason, "message": r.message[:200]} for r in rejects]
    report_path = out / "report.md"
    if not summary:
        write_report(report_path, markdown(summary, sets, model=model, rejects=reject_rows))
        raise RuntimeError(f"no set could be scored ({len(rejects)} rejected); see {report_path}")
    pngs = {suite: plot_png(s, out / f"report-{suite}.png") for suite, s in summary.items()}
    write_report(report_path, markdown(summary, sets, model=model, pngs=pngs, rejects=reject_rows))
    artifact = markdown(summary, sets, model=model, pngs=pngs, embed_png=True, rejects=reject_rows)
    return BenchmarkOutputs(summary, artifact, result_rows(summary), results_path, report_path)
