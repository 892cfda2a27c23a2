"""Checkpoints: SIGKILL mid-run → resume → same adapter and loss trajectory as an uninterrupted run;
the saved adapter loads with ``peft.PeftModel.from_pretrained`` on a fresh backbone and gives the same
embeddings as the resume path and as the merged export (loadable with plain ``from_pretrained``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.toy_corpus import build_toy_corpus
from training.config import PromptSettings, TrainConfig
from training.run import RunSpec, launch_command, write_spec

pytestmark = pytest.mark.slow  # real CPU training runs

REPO = Path(__file__).resolve().parents[2]
STEPS = 16


def _spec(tmp: Path, corpus, out: str) -> Path:
    cfg = TrainConfig(
        retriever="both",
        batch_size=8,
        num_negatives=1,
        lr=2e-3,
        warmup_steps=3,
        max_steps=STEPS,
        checkpoint_every=4,
        keep_checkpoints=2,
        prompts=PromptSettings(doc_text="region_text", max_doc_text_tokens=48),
        num_threads=1,
        seed=1,
    )
    spec = RunSpec(
        config=cfg, train_shards=[corpus.train_shard], pages_shards=[corpus.pages_shard], out_dir=tmp / out
    )
    return write_spec(spec, tmp / f"{out}.json")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from training.trainer import resolve_model_dir

    resolve_model_dir("recipe:gemma3-tiny")  # build once before the subprocesses race for it
    tmp = tmp_path_factory.mktemp("resume")
    corpus = build_toy_corpus(tmp / "data", n_pages=12, train_spans=4)
    full = _spec(tmp, corpus, "full")
    subprocess.run(launch_command(full), cwd=REPO, env=_env(), check=True, capture_output=True)
    killed = _spec(tmp, corpus, "killed")
    proc = subprocess.Popen(
        launch_command(killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    mark = tmp / "killed" / "checkpoints" / "step-00000004" / ".complete"
    deadline = time.monotonic() + 300
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp / "killed" / "final").exists()
    subprocess.run(launch_command(killed), cwd=REPO, env=_env(), check=True, capture_output=True)
    return {"full": tmp / "full", "killed": tmp / "killed", "corpus": corpus}


def test_resume_after_sigkill_matches_uninterrupted_run(runs) -> None:
    import json

    a = load_file(str(runs["full"] / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["killed"] / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    ha = load_file(str(runs["full"] / "final" / "heads.safetensors"))
    hb = load_file(str(runs["killed"] / "final" / "heads.safetensors"))
    assert all(torch.allclose(ha[k], hb[k], atol=1e-5) for k in ha)
    ra = json.loads((runs["full"] / "train_result.json").read_text())
    rb = json.loads((runs["killed"] / "train_result.json").read_text())
    assert rb["resumed_from_step"] >= 4 and ra["resumed_from_step"] == 0
    assert len(ra["losses"]) == len(rb["losses"]) == STEPS
    assert ra["losses"] == pytest.approx(rb["losses"], rel=1e-4, abs=1e-5)
    # only the newest checkpoints are kept, each complete
    ckpts = sorted(p.name for p in (runs["killed"] / "checkpoints").iterdir())
    assert ckpts == ["step-00000012", "step-00000016"]


def test_adapter_loads_with_peft_and_export_gives_same_embeddings(runs, tmp_path: Path) -> None:
    from peft import PeftModel

    from training.export import export_merged
    from training.inference import VlmRetrieverEncoder
    from training.model import build_retriever, load_backbone
    from training.trainer import load_weights_into, resolve_model_dir

    final = runs["full"] / "final"
    pages = runs["corpus"].pages[:4]
    queries = ["kenya", "the grand duchy of somewhere"]
    enc = VlmRetrieverEncoder.load(final)  # fresh backbone + PeftModel.from_pretrained
    assert isinstance(enc.model.backbone, PeftModel)
    q, p = enc.encode_queries(queries, ["en", "en"]), enc.encode_pages(pages)
    qm, _ = enc.encode_queries_multi(queries)

    # the resume path (set_peft_model_state_dict into a freshly built LoRA model) agrees
    model_dir = resolve_model_dir("recipe:gemma3-tiny")
    spec = RunSpec.model_validate_json((runs["full"].parent / "full.json").read_text())
    rebuilt = build_retriever(model_dir, spec.config)
    load_weights_into(rebuilt, runs["full"] / "checkpoints" / "step-00000016")
    enc2 = VlmRetrieverEncoder(rebuilt, enc.processor, spec.config.prompts, model_id="rebuilt")
    assert torch.allclose(
        torch.from_numpy(enc2.encode_queries(queries, ["en", "en"])), torch.from_numpy(q), atol=1e-5
    )

    # the untrained backbone differs: the adapter is not a no-op
    base = VlmRetrieverEncoder.from_backbone(model_dir, spec.config)
    assert not torch.allclose(torch.from_numpy(base.encode_pages(pages)), torch.from_numpy(p), atol=1e-3)

    # merged export: plain from_pretrained, same embeddings
    out = export_merged(final, tmp_path / "export")
    merged = load_backbone(out)
    assert not hasattr(merged, "peft_config")
    enc3 = VlmRetrieverEncoder.load(out)
    assert torch.allclose(
        torch.from_numpy(enc3.encode_queries(queries, ["en", "en"])), torch.from_numpy(q), atol=1e-4
    )
    assert torch.allclose(torch.from_numpy(enc3.encode_pages(pages)), torch.from_numpy(p), atol=1e-4)
    assert torch.allclose(enc3.encode_queries_multi(queries)[0], qm, atol=1e-4)
