"""Run-level preparation of ``synthesize``: profile validation, models, engine imports, language rejects.

These steps run once per run in the flow's process before any shard task is submitted, so a bad profile
or a missing model stops the run before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks import languages
from tasks.config import plain
from tasks.ingest.plan import changed_sources, done_en_shards, ingest_base_hash, plan_en_shards
from tasks.ingest.sources import SourceRef, scan_sources
from tasks.models import build_recipe, load_profile, model_fingerprint
from tasks.run.profile import Profile, validate_profile
from tasks.schema import Reject, RejectReason
from tasks.shards import Manifest, commit_rejects, config_hash
from tasks.storage import Store, open_store


def prepare_models(profile: Profile, build: bool) -> dict[str, str]:
    """Build missing recipe models (if allowed) and fingerprint every stage's model once per run."""
    if build:
        for stage in ("layout", "translate"):
            source = profile.model_source(stage)
            if source.startswith("recipe:"):
                build_recipe(source.split(":", 1)[1])
    return {
        "layout": model_fingerprint(plain(profile.layout)),
        "translate": model_fingerprint(plain(profile.translate_stage().translate)),
    }


def preload_engines() -> None:
    """Import the stage modules in the calling thread before shard tasks run in worker threads.

    transformers' lazy module loader is not thread-safe: two threads importing ``AutoTokenizer`` at
    once can fail with ImportError, so flows call this once before submitting tasks.
    """
    import ctranslate2  # noqa: F401
    from transformers import AutoTokenizer, NllbTokenizer, NllbTokenizerFast  # noqa: F401

    import tasks.ingest.layout
    import tasks.ingest.region_text
    import tasks.render.png
    import tasks.translate.engine  # noqa: F401


def reject_unknown_langs(root: Store | str | Path, unknown: list[str]) -> None:
    """One rejects row per unknown language code of a run (the run goes on with the known ones)."""
    rejects = [
        Reject(
            "config",
            code,
            RejectReason.UNKNOWN_LANGUAGE,
            f"unknown language code {code!r}; supported: {', '.join(languages.ALL_LANGS)}",
            code,
        )
        for code in unknown
    ]
    commit_rejects(
        root, rejects, name=f"rejects-config-{config_hash(unknown)}", cfg_hash=config_hash(unknown)
    )


@dataclass
class RunPlan:
    """What one synthesize run will do: the validated profile, models, languages and shards to make."""

    root: str  # the output root: a local path or a URL
    profile: Profile
    langs: list[str]
    unknown_langs: list[str]
    fingerprints: dict[str, str]
    new_en_shards: dict[str, list[SourceRef]]  # English shards to ingest: name -> its sources
    en_shards: list[str]  # every English shard of the run (new + already complete)
    sources: int = 0
    sources_done: int = 0
    superseded: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"{self.sources} sources, {self.sources_done} already done, "
            f"{len(self.new_en_shards)} new English shards, {len(self.en_shards)} in all, "
            f"languages: {','.join(self.langs)}"
        )


def prepare_run(
    out: str | Path,
    profile_name: str,
    langs_spec: str,
    sources_spec: str,
    *,
    pages_per_shard: int,
    build_models: bool = True,
) -> RunPlan:
    """Everything before the first shard task: validate the profile (a mistyped key stops the run
    here), list the sources (a spec naming none raises :class:`~tasks.ingest.sources.SourcesNotFound`
    before the output root is created or a model built), build and fingerprint models, import engines,
    record unknown languages and changed sources, and plan the English shards still to ingest."""
    store = open_store(out)
    profile = validate_profile(load_profile(profile_name))
    langs, unknown = languages.parse_langs(langs_spec)
    refs = scan_sources(sources_spec)
    if store.local:
        store.local_path().mkdir(parents=True, exist_ok=True)
    fps = prepare_models(profile, build_models)
    preload_engines()
    manifest = Manifest(store)
    if unknown:
        reject_unknown_langs(store, unknown)
    changed = {sid: f"changed: {uri}" for sid, uri in changed_sources(refs, manifest).items()}
    if changed:
        manifest.supersede(changed)
    source_ids = {r.source_id for r in refs}
    existing = done_en_shards(manifest, ingest_base_hash(profile, fps["layout"]), source_ids)
    done = set().union(*existing.values())
    plan = plan_en_shards(refs, pages_per_shard, done)
    planned = {r.source_id for group in plan.values() for r in group}
    covered = {u.split("@", 1)[0] for u in done}
    return RunPlan(
        root=store.url,
        profile=profile,
        langs=langs,
        unknown_langs=unknown,
        fingerprints=fps,
        new_en_shards=plan,
        en_shards=sorted(set(plan) | set(existing)),
        sources=len(refs),
        sources_done=len((covered & source_ids) - planned),
        superseded=changed,
    )
