"""Run summaries for artifacts: counts per language, rejects by reason, a small page gallery.
(What a synthesize run produced; the benchmark's report is ``eval/benchmark_report.py``.)
"""

from __future__ import annotations

import base64
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from tasks.schema import COMPOSED_KIND
from tasks.shards import Manifest, read_rejects
from tasks.storage import Store, open_store


@dataclass
class RunSummary:
    root: str
    pages_per_lang: dict[str, int] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    rejects_by_stage_lang: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    gallery: dict[str, str] = field(default_factory=dict)  # lang -> thumbnail URL
    thumbnails: dict[str, bytes] = field(default_factory=dict, repr=False)  # lang -> PNG bytes
    # lang -> render QA totals over its pages shards (tasks.render.qa.QAStats fields) + pooled "cer"
    render_qa: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total_rejects(self) -> int:
        return sum(self.rejects_by_reason.values())


def _thumbnail_png(png: bytes, width: int) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.thumbnail((width, width * 2))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def summarize_run(
    root: Store | str | Path, *, gallery_langs: list[str] | None = None, thumb_width: int = 360
) -> RunSummary:
    """Read the manifest and rejects of an output root and write gallery thumbnails under artifacts/."""
    store = open_store(root)
    manifest = Manifest(store)
    summary = RunSummary(root=store.url)
    pages = manifest.shards("pages")
    summary.shards = len(pages)
    per_lang: Counter[str] = Counter()
    gone = list(manifest.superseded())
    for e in pages:  # pages of superseded sources (a newer version was ingested) no longer count
        per_lang[e.lang] += (
            manifest.live_table(e, ["source_id"], superseded=gone).num_rows if gone else e.rows
        )
    summary.pages_per_lang = dict(sorted(per_lang.items()))
    summary.render_qa = render_qa_per_lang(pages)
    rejects = read_rejects(store)
    summary.rejects_by_reason = count_rejects(rejects, "reason")
    summary.rejects_by_stage_lang = count_rejects(rejects, "stage", "lang")
    # Gallery: the same source page in every language, so a reader can compare renderings side by side.
    by_lang = {e.lang: e.path for e in sorted(pages, key=lambda e: e.name) if e.rows}
    if "en" in by_lang:
        en = store.read_table(by_lang["en"], columns=["page_id"])
        langs = gallery_langs or sorted(by_lang)
        candidates = en.column("page_id").to_pylist()
        chosen = None
        for pid in candidates:  # first English page that has a rendering in the most languages
            hits = 0
            for lang in langs:
                t = store.read_table(by_lang.get(lang, by_lang["en"]), columns=["source_page_id"])
                hits += int(pc.any(pc.equal(t.column("source_page_id"), pid)).as_py() or False)
            if chosen is None or hits > chosen[1]:
                chosen = (pid, hits)
            if hits == len(langs):
                break
        if chosen is not None:
            for lang in langs:
                if lang not in by_lang:
                    continue
                t = store.read_table(by_lang[lang], columns=["source_page_id", "image"])
                mask = pc.equal(t.column("source_page_id"), chosen[0])
                rows = t.filter(mask).to_pylist()
                if rows:
                    rel = f"artifacts/gallery/{lang}.png"
                    thumb = _thumbnail_png(rows[0]["image"]["bytes"], thumb_width)
                    store.put_bytes(rel, thumb)
                    summary.gallery[lang] = store.url_of(rel)
                    summary.thumbnails[lang] = thumb
    return summary


def count_rejects(rejects: pa.Table, *columns: str) -> dict[str, int]:
    """Rejects rows per value of ``columns`` (joined by "/", an empty value as "-"), sorted."""
    values = zip(*(rejects.column(c).to_pylist() for c in columns), strict=True)
    return dict(sorted(Counter("/".join(v or "-" for v in row) for row in values).items()))


def render_qa_per_lang(entries: list[Any]) -> dict[str, dict[str, float]]:
    """Sum the render QA totals of pages shards' completion records per language; add the pooled CER."""
    keys = ("regions", "chars", "edits", "pages", "pages_rejected")
    out: dict[str, dict[str, float]] = {}
    for e in entries:
        qa = (e.extra or {}).get("render_qa")
        if not qa or not qa.get("pages"):
            continue
        acc = out.setdefault(e.lang, dict.fromkeys(keys, 0))
        for k in keys:
            acc[k] += qa.get(k, 0)
    for acc in out.values():
        acc["cer"] = acc["edits"] / acc["chars"] if acc["chars"] else 0.0
    return dict(sorted(out.items()))


def summary_markdown(
    summary: RunSummary,
    *,
    queries: dict | None = None,
    title: str = "m3dr synthesize",
    embed_images: bool = True,
) -> str:
    """Markdown for the Prefect artifact and ``artifacts/summary.md``."""
    lines = [f"# {title}", "", f"Output: `{summary.root}` · {summary.shards} pages shards", ""]
    lines += ["## Pages per language", ""]
    if summary.render_qa:  # render QA: OCR round trip CER (whitespace ignored) of the drawn text
        lines += ["| lang | pages | render CER | render_unreadable |", "|---|---:|---:|---:|"]
        for lang, n in summary.pages_per_lang.items():
            q = summary.render_qa.get(lang)
            qa = f"{q['cer']:.1%} | {int(q['pages_rejected'])}" if q else "– | –"
            lines.append(f"| {lang} | {n} | {qa} |")
    else:
        lines += ["| lang | pages |", "|---|---:|"]
        lines += [f"| {lang} | {n} |" for lang, n in summary.pages_per_lang.items()]
    if queries is not None:
        lines += ["", f"## Queries ({queries['queries']}, {queries['cross_lingual']} cross-lingual)", ""]
        lines += ["| lang/kind (monolingual) | queries |", "|---|---:|"]
        lines += [f"| {k} | {n} |" for k, n in queries["mono_per_lang_kind"].items()]
        composed = queries.get("composed_per_lang") or {}
        lines += [
            "",
            f"### Composed queries (region crop + question, monolingual): {sum(composed.values())}",
            "",
        ]
        if composed:
            lines += ["| lang | composed |", "|---|---:|"]
            lines += [f"| {lang} | {n} |" for lang, n in composed.items()]
        else:
            lines.append(
                "none (no page had a usable figure, table or formula, or the kind was not asked for)"
            )
        lines += [
            "",
            f"Train rows: {queries['train_rows']} · negatives per query: "
            f"{queries['negatives_per_query']:.2f}",
        ]
    lines += ["", f"## Rejects by reason ({summary.total_rejects})", ""]
    if summary.rejects_by_reason:
        lines += ["| reason | rows |", "|---|---:|"]
        lines += [f"| {r} | {n} |" for r, n in summary.rejects_by_reason.items()]
        lines += ["", "| stage/lang | rows |", "|---|---:|"]
        lines += [f"| {k} | {n} |" for k, n in summary.rejects_by_stage_lang.items()]
    else:
        lines.append("none")
    if summary.gallery:
        lines += ["", "## Gallery (one source page in each language)", ""]
        for lang, path in summary.gallery.items():
            if embed_images and lang in summary.thumbnails:
                b64 = base64.b64encode(summary.thumbnails[lang]).decode()
                lines.append(f"**{lang}**  \n![{lang}](data:image/png;base64,{b64})\n")
            else:
                lines.append(f"**{lang}**  \n![{lang}](gallery/{path.rsplit('/', 1)[-1]})\n")
    return "\n".join(lines) + "\n"


def queries_summary(root: Store | str | Path) -> dict[str, Any]:
    """Counts for the artifact: queries per language and kind, composed (crop + text) queries per
    language, cross-lingual share, negatives per query."""
    manifest = Manifest(root)
    store = manifest.store
    per_lang_kind: Counter[str] = Counter()
    composed: Counter[str] = Counter()
    cross = 0
    total = 0
    for e in manifest.shards("queries"):
        t = store.read_table(e.path, columns=["query_lang", "kind", "cross_lingual"]).to_pylist()
        for r in t:
            if not r["cross_lingual"]:
                per_lang_kind[f"{r['query_lang']}/{r['kind']}"] += 1
                composed[r["query_lang"]] += r["kind"] == COMPOSED_KIND
            cross += int(r["cross_lingual"])
            total += 1
    negs = [
        len(r)
        for e in manifest.shards("train")
        for r in store.read_table(e.path, columns=["negative_page_ids"]).column(0).to_pylist()
    ]
    return {
        "queries": total,
        "cross_lingual": cross,
        "mono_per_lang_kind": dict(sorted(per_lang_kind.items())),
        "composed_per_lang": {lang: n for lang, n in sorted(composed.items()) if n},
        "train_rows": len(negs),
        "negatives_per_query": (sum(negs) / len(negs)) if negs else math.nan,
    }


@dataclass
class RunReport:
    """The end of a synthesize run: counts, the artifact markdown and what the flow returns."""

    summary: RunSummary
    queries: dict[str, Any] | None
    markdown: str
    artifact_path: str


def write_run_report(root: Store | str | Path, langs: list[str], *, with_queries: bool) -> RunReport:
    """Summarise an output root and write ``artifacts/summary.md`` (thumbnails as files; the returned
    markdown embeds them, for the Prefect artifact)."""
    store = open_store(root)
    summary = summarize_run(store, gallery_langs=["en", *langs])
    qsum = queries_summary(store) if with_queries else None
    rel = "artifacts/summary.md"
    store.put_bytes(rel, summary_markdown(summary, queries=qsum, embed_images=False).encode())
    return RunReport(summary, qsum, summary_markdown(summary, queries=qsum), store.url_of(rel))


def run_result(
    root: Store | str | Path,
    langs: list[str],
    en_shards: list[str],
    results: list[dict[str, Any]],
    report: RunReport,
    *,
    throughput: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The synthesize flow's return value: counts and paths (never page data)."""
    from tasks.translate.shard import lang_shard_name

    store = open_store(root)
    worked = [r for r in results if not r["skipped"]]
    return {
        "out": store.url,
        "pages_per_lang": report.summary.pages_per_lang,
        "rejects_by_reason": report.summary.rejects_by_reason,
        "shards": sorted(results, key=lambda r: r["name"]),
        "shards_worked": len(worked),
        "queries": report.queries,
        "manifest": store.url_of("manifest.json"),
        "rejects_dir": store.url_of("rejects"),
        "artifact": str(report.artifact_path),
        "lang_shards": {lang: [lang_shard_name(en, lang) for en in en_shards] for lang in langs},
        "throughput": throughput or {},
    }
