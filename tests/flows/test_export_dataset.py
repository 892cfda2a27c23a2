"""`m3dr export-dataset`: a synthesize run (tiny profile, the demo's sample documents) as a Hugging Face
dataset repository that `datasets` loads (locally and from an S3 API server), whose card's numbers are the
data's, whose files stay under the size asked for, and that colpali-engine's own dataset, collator and
trainer train on unmodified."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES

pytestmark = pytest.mark.slow

# splits are a hash of the content: with these fractions slides and table_page are training documents
# (table_page's table gives composed queries), manual_page is the dev document, the rest are held out
FILES = (
    "slides.pdf",
    "table_page.pdf",
    "manual_page.pdf",
    "title_page.pdf",
    "contents_page.pdf",
    "list_page.pdf",
)
FRACTIONS = {"train": 0.45, "dev": 0.1, "benchmark": 0.45}
LANGS = "hi,zh"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models, prefect_harness) -> dict[str, Path]:
    """The synthesize output of the sample documents and its export with the default options."""
    from eval.dataset_export import export_dataset
    from flows.synthesize import SynthesizeParams, synthesize

    tmp = tmp_path_factory.mktemp("export")
    src = tmp / "src"
    src.mkdir()
    for name in FILES:
        shutil.copy(SAMPLES / name, src / name)
    synthesize(
        SynthesizeParams(sources=str(src), langs=LANGS, out=str(tmp / "data"), split_fractions=FRACTIONS)
    )
    export_dataset(tmp / "data", tmp / "hf")
    return {"tmp": tmp, "data": tmp / "data", "hf": tmp / "hf"}


@pytest.fixture(scope="module")
def netra(run, tmp_path_factory) -> Path:
    """A short m3dr train-netra run on the synthesize output, exported for colpali-engine (BiGemma3)."""
    from training.colpali import export_colpali
    from training.config import TrainConfig
    from training.launch import training_inputs
    from training.trainer import train

    tmp = tmp_path_factory.mktemp("netra")
    cfg = TrainConfig(retriever="dense", max_steps=2, batch_size=4, warmup_steps=1, num_threads=2)
    train(cfg, *training_inputs(run["data"]), tmp / "run")
    return export_colpali(tmp / "run", tmp / "netra")


def _load(path: Path | str, config: str, split: str):
    import datasets

    return datasets.load_dataset(str(path), config, split=split)


def _suite_sets(hf: Path) -> list[dict]:
    import json

    return json.loads((hf / "benchmark" / "suite.json").read_text())["sets"]


def test_every_config_loads_with_datasets_and_every_id_resolves(run) -> None:
    from PIL import Image

    from tasks.shards import Manifest
    from tasks.splits import assign_split

    hf = run["hf"]
    corpus = _load(hf, "corpus", "train")
    train, dev = _load(hf, "train", "train"), _load(hf, "dev", "dev")
    assert len(corpus) and len(train) and len(dev)
    assert isinstance(corpus[0]["image"], Image.Image) and corpus[0]["image"].size[0] > 100
    group = dict(zip(corpus["corpus-id"], corpus["source_page_id"], strict=True))
    assert len(group) == len(corpus)  # one row per page
    assert set(corpus["split"]) == {"train", "dev"} and set(corpus["lang"]) == {"en", "hi", "zh"}
    for rows, split in ((train, "train"), (dev, "dev")):
        kinds = Counter(rows["kind"])
        assert rows.column_names[:3] == ["query_id", "query", "query_image"]
        for r in rows:
            assert r["pos_target"] and all(p in group for p in r["pos_target"] + r["neg_target"])
            assert group[r["pos_target"][0]] == r["source_page_id"]  # the exact page is first
            # a translation of the positive is never a negative
            assert all(group[n] != r["source_page_id"] for n in r["neg_target"])
            assert len(r["neg_scores"]) == len(r["neg_target"])
            assert (r["query_image"] is not None) == (r["kind"] == "composed")
        assert sum(kinds.values()) == len(rows)
        assert {assign_split(d, FRACTIONS) for d in rows["doc-id"]} == {split}
    assert "composed" in Counter(train["kind"])  # table_page's table: a crop + a question
    assert any(r["query_lang"] != r["target_lang"] for r in train)  # cross-lingual rows are kept

    # the export holds every live train row of the run, in the run's order
    live = list(Manifest(run["data"]).live_rows("train", ["query_id", "split"]))
    assert [r["query_id"] for r in live if r["split"] == "train"] == train["query_id"]
    assert [r["query_id"] for r in live if r["split"] == "dev"] == dev["query_id"]
    # the held-out suite: the published Nayana-IR layout, one config per set table, split test
    sets = _suite_sets(hf)
    assert [s["name"] for s in sets][:1] == ["crossbench"] and any(s["kind"] == "mono" for s in sets)
    bench_docs = set()
    for s in sets:
        c, q, r = (_load(hf, f"{s['name']}-{cfg}", "test") for cfg in ("corpus", "queries", "qrels"))
        assert (len(c), len(q), len(r)) == (s["corpus"], s["queries"], s["qrels"])
        assert {"corpus-id", "doc-id", "image"} <= set(c.column_names)
        assert {"query-id", "query", "language"} <= set(q.column_names)
        assert r.column_names == ["query-id", "corpus-id", "score"] and set(r["score"]) <= {1, 2}
        bench_docs |= set(c["doc-id"])
        # the set dir is the published layout on its own too
        assert len(_load(hf / "benchmark" / s["path"], "corpus", "test")) == s["corpus"]
    assert bench_docs and not bench_docs & set(corpus["doc-id"])  # nothing held out is trained on


def _markdown_table(text: str, heading: str) -> list[list[str]]:
    """The first markdown table after ``heading``: rows of cells (header and separator dropped)."""
    after = text.split(heading, 1)[1]
    block = []
    started = False
    for line in after.splitlines():
        if line.startswith("|"):
            started = True
            block.append(line)
        elif started:
            break
    assert block, heading
    return [[c.strip() for c in row.strip("|").split("|")] for row in block[2:]]


def test_the_card_parses_and_every_number_comes_from_the_data(run) -> None:
    from huggingface_hub import DatasetCard

    from tasks.run.summary import render_qa_per_lang
    from tasks.shards import Manifest, read_rejects

    hf = run["hf"]
    card = DatasetCard.load(hf / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "unknown" and data["task_categories"] == ["visual-document-retrieval"]
    assert data["language"] == ["en", "hi", "zh"] and data["multilinguality"] == "multilingual"
    names = [c["config_name"] for c in data["configs"]]
    assert names[:3] == ["train", "dev", "corpus"]
    assert names[3:] == [
        f"{s['name']}-{cfg}" for s in _suite_sets(hf) for cfg in ("corpus", "queries", "qrels")
    ]
    for c in data["configs"]:  # every pattern names files that exist
        (spec,) = c["data_files"]
        assert list(hf.glob(spec["path"])), spec
    corpus, train, dev = _load(hf, "corpus", "train"), _load(hf, "train", "train"), _load(hf, "dev", "dev")
    n_train = len(train) + len(dev)
    assert data["size_categories"] == ("n<1K" if n_train < 1000 else "1K<n<10K")

    text = card.text
    pages = {row[0]: row[1:] for row in _markdown_table(text, "### Pages per language")}
    split_of = Counter(zip(corpus["lang"], corpus["split"], strict=True))
    cross = next(s for s in _suite_sets(hf) if s["name"] == "crossbench")
    bench_pages = Counter(_load(hf, "crossbench-corpus", "test")["language"])
    for lang in ("en", "hi", "zh"):
        assert pages[lang] == [
            str(split_of[lang, "train"]),
            str(split_of[lang, "dev"]),
            str(bench_pages[lang]),
        ]
    per_split = Counter(corpus["split"])
    assert pages["**all**"] == [str(per_split["train"]), str(per_split["dev"]), str(cross["corpus"])]
    rows = {row[0]: row[1:] for row in _markdown_table(text, "### Train and dev rows")}
    for lang in ("en", "hi", "zh"):
        assert rows[lang] == [str(Counter(train["query_lang"])[lang]), str(Counter(dev["query_lang"])[lang])]
    kinds = Counter(train["kind"]) + Counter(dev["kind"])
    assert "Rows by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) in text
    negs = Counter(len(x) for x in [*train["neg_target"], *dev["neg_target"]])
    assert "Negatives per row: " + ", ".join(f"{k}: {v} rows" for k, v in sorted(negs.items())) in text
    # rejects by stage and reason, and render CER per language, as the run recorded them
    rejects = read_rejects(run["data"]).to_pylist()
    table = dict(_markdown_table(text, "Rejects (bad input")) if rejects else {}
    assert table == {k: str(v) for k, v in Counter(f"{r['stage']}/{r['reason']}" for r in rejects).items()}
    qa = render_qa_per_lang(Manifest(run["data"]).shards("pages"))
    assert qa and set(qa) == {"hi", "zh"}
    cer = {row[0]: row[2] for row in _markdown_table(text, "### Quality")}
    assert cer == {lang: f"{q['cer']:.1%}" for lang, q in qa.items()}
    queries = {row[0]: row[1:] for row in _markdown_table(text, "### Queries")}
    mono = Counter(
        r["query_lang"] for r in Manifest(run["data"]).live_rows("queries", ["query_lang", "cross_lingual"])
        if not r["cross_lingual"]
    )  # fmt: skip
    assert {lang: sum(int(x) for x in v) for lang, v in queries.items()} == dict(mono)
    used = {r["translation_model"] for r in Manifest(run["data"]).live_rows("pages", ["translation_model"])}
    assert used - {""} and all(f"`{m}`" in text for m in used - {""})  # the models, from the pages
    assert (hf / "assets" / "pages_per_language.png").read_bytes()[:4] == b"\x89PNG"
    # the markdown renders: every table is a table, every plot an image that exists
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark").enable("table").render(text)
    assert html.count("<table>") == text.count("\n| --- |") >= 6
    plots = re.findall(r'<img src="([^"]+)"', html)
    assert len(plots) == 2 and all((hf / p).is_file() for p in plots)


def test_files_stay_under_the_size_asked_for_and_reruns_keep_or_replace_the_export(run, tmp_path) -> None:
    from eval.dataset_export import ExportError, export_dataset

    small = tmp_path / "small"
    limit = 400_000
    result = export_dataset(run["data"], small, max_file_bytes=limit)
    corpus_files = sorted((small / "data" / "corpus").glob("*.parquet"))
    assert len(corpus_files) > 2 and all(p.stat().st_size <= limit for p in corpus_files)
    assert all(p.stat().st_size <= limit for p in (small / "benchmark").rglob("corpus/*.parquet"))
    assert len(list((small / "benchmark" / "crossbench" / "corpus").glob("*.parquet"))) > 1
    # the same rows, in the same order, as the one-file export
    for cfg, split in (("corpus", "train"), ("train", "train"), ("crossbench-corpus", "test")):
        a, b = _load(small, cfg, split), _load(run["hf"], cfg, split)
        key = "corpus-id" if "corpus" in cfg else "query_id"
        assert a[key] == b[key] and a.features == b.features
    # the same inputs and options: nothing rewritten
    stamp = {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()}
    again = export_dataset(run["data"], small, max_file_bytes=limit)
    assert again.reused and again.fingerprint == result.fingerprint
    assert stamp == {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()}
    # other options: refused without overwrite; with it, the files it no longer writes are gone
    with pytest.raises(ExportError, match="not empty"):
        export_dataset(run["data"], small)
    before = _load(small, "train", "train")  # (datasets caches it under the folder's name)
    export_dataset(run["data"], small, overwrite=True)
    assert len(list((small / "data" / "corpus").glob("*.parquet"))) == 1
    assert {p.relative_to(small) for p in small.rglob("*") if p.is_file()} == {
        p.relative_to(run["hf"]) for p in run["hf"].rglob("*") if p.is_file()
    }
    assert (small / "README.md").read_bytes() == (run["hf"] / "README.md").read_bytes()
    # a changed export in the same folder is what `datasets` reads next, never its cache of the old one
    # (file names and YAML patterns carry the export's fingerprint)
    export_dataset(run["data"], small, positives="parallel", overwrite=True)
    after = _load(small, "train", "train")
    assert before["query_id"] == after["query_id"]
    assert all(len(p) == 1 for p in before["pos_target"]) and any(len(p) > 1 for p in after["pos_target"])


def test_a_storage_fault_fails_the_export_and_a_rerun_makes_the_unfaulted_folder(
    run, tmp_path, monkeypatch
) -> None:
    """A broken world (the store fails on the 4th file) raises and leaves no card; the same command
    again, after the fault heals, writes exactly the unfaulted export (no --overwrite needed)."""
    from eval.dataset_export import export_dataset
    from tasks.storage import Store

    real = Store.write_with
    calls = {"n": 0}

    def flaky(self, rel, write, suffix=""):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(f"injected storage fault writing {rel}")
        return real(self, rel, write, suffix)

    out = tmp_path / "faulted"
    with monkeypatch.context() as m:
        m.setattr(Store, "write_with", flaky)
        with pytest.raises(OSError, match="injected storage fault"):
            export_dataset(run["data"], out)
    assert list((out / "data").rglob("*.parquet")) and not (out / "README.md").exists()
    assert not (out / "m3dr_export.json").exists()
    export_dataset(run["data"], out)
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == {p.relative_to(run["hf"]): p.read_bytes() for p in run["hf"].rglob("*") if p.is_file()}
    # a folder with something else in it is never written into without --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match=r"not empty: it holds \['notes.txt'\]"):
        export_dataset(run["data"], other)


def test_an_s3_root_exports_to_s3_and_loads_from_there(run, s3_bucket, monkeypatch) -> None:
    import datasets

    from eval.dataset_export import data_files, export_dataset
    from tasks.storage import open_store
    from tests.support.synthetic_pages import upload_root

    root = upload_root(run["data"], f"{s3_bucket}/synth/run")
    dest = f"{s3_bucket}/hf/m3dr"
    export_dataset(root, dest)
    # the tests run with HF_HUB_OFFLINE=1, under which `datasets` refuses every remote URL, s3:// included
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    opts = {
        "key": os.environ["AWS_ACCESS_KEY_ID"],
        "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
    }
    configs = [
        (c["config_name"], c["split"]) for c in open_store(dest).read_json("m3dr_export.json")["configs"]
    ]
    assert len(configs) == 3 + 3 * len(_suite_sets(run["hf"]))
    for cfg, split in configs:  # train, dev, corpus and every suite table
        files = data_files(dest, cfg)
        assert list(files) == [split] and files[split].startswith(f"{s3_bucket}/")
        remote = datasets.load_dataset("parquet", data_files=files, storage_options=opts, split=split)
        local = _load(run["hf"], cfg, split)
        assert (
            remote.to_pandas()
            .drop(columns=["image", "query_image"], errors="ignore")
            .equals(local.to_pandas().drop(columns=["image", "query_image"], errors="ignore"))
        )
    # the card went up last, with the same text as the local export's
    assert open_store(dest).read_bytes("README.md") == (run["hf"] / "README.md").read_bytes()


def test_tevatron_columns_and_the_cli(run, tmp_path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "tevatron"
    done = CliRunner().invoke(
        app, ["export-dataset", str(run["data"]), str(out), "--format", "tevatron", "--positives", "parallel"]
    )
    assert done.exit_code == 0, done.output
    assert "dataset card:" in done.output and re.search(r"train\s+train\s+\d+ rows", done.output)
    train, corpus = _load(out, "train", "train"), _load(out, "corpus", "train")
    assert {"query_id", "query_text", "query_image", "positive_document_ids", "negative_document_ids"} <= set(
        train.column_names
    )
    assert {"docid", "image", "text"} <= set(corpus.column_names)
    ref = _load(run["hf"], "train", "train")
    assert train["query_id"] == ref["query_id"] and train["negative_document_ids"] == ref["neg_target"]
    # --positives parallel: the exact page first, then its translations
    group = dict(zip(corpus["docid"], corpus["source_page_id"], strict=True))
    assert any(len(p) > 1 for p in train["positive_document_ids"])
    for pos, exact in zip(train["positive_document_ids"], ref["pos_target"], strict=True):
        assert pos[0] == exact[0] and {group[p] for p in pos} == {group[exact[0]]}
    bad = CliRunner().invoke(app, ["export-dataset", str(run["data"]), str(out), "--format", "tevatron"])
    assert bad.exit_code == 2 and "not empty" in bad.output


def test_the_export_dataset_flow_writes_the_same_folder_and_shows_the_card(run, tmp_path) -> None:
    from prefect.artifacts import Artifact

    from flows.export import export_dataset_flow
    from flows.params import ExportParams

    out = tmp_path / "flow"
    result = export_dataset_flow(ExportParams(data=str(run["data"]), out=str(out)))
    assert not result["reused"] and [c["config_name"] for c in result["configs"]][:3] == [
        "train",
        "dev",
        "corpus",
    ]
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == {p.relative_to(run["hf"]): p.read_bytes() for p in run["hf"].rglob("*") if p.is_file()}
    card = Artifact.get("export-dataset-card")
    assert (
        card is not None and "### Pages per language" in card.data and "data:image/png;base64," in card.data
    )
    table = Artifact.get("export-dataset-configs")
    assert table is not None and "crossbench-qrels" in str(table.data)
    with pytest.raises(Exception, match="not empty"):  # other options into a full folder: the run fails
        export_dataset_flow(ExportParams(data=str(run["data"]), out=str(out), positives="parallel"))


def test_colpali_engine_trains_on_the_export_unmodified(run, netra, tmp_path) -> None:
    """colpali-engine's own Corpus + ColPaliEngineDataset (with neg_target), VisualRetrieverCollator,
    BiNegativeCELoss and ContrastiveTrainer, on a BiGemma3 export of a short m3dr run: the loss over the
    whole train set (fixed batches, eval mode) falls."""
    pytest.importorskip("colpali_engine", reason="make installs colpali-engine (--no-deps)")
    import torch
    from colpali_engine.collators import VisualRetrieverCollator
    from colpali_engine.data.dataset import ColPaliEngineDataset, Corpus
    from colpali_engine.loss.bi_encoder_losses import BiNegativeCELoss
    from colpali_engine.models import BiGemma3, BiGemmaProcessor3
    from colpali_engine.trainer.contrastive_trainer import ContrastiveTrainer
    from transformers import TrainingArguments

    model_dir = netra

    from eval.dataset_export import export_dataset

    # --min-negatives 1: the rows the miner found no negative for are left out (and counted)
    result = export_dataset(run["data"], tmp_path / "hf", min_negatives=1)
    full = _load(run["hf"], "train", "train")
    train = _load(tmp_path / "hf", "train", "train")
    assert train["query_id"] == [q for q, n in zip(full["query_id"], full["neg_target"], strict=True) if n]
    assert result.stats.dropped["fewer_than_1_negatives"] == sum(
        1 for split in ("train", "dev") for n in _load(run["hf"], split, split)["neg_target"] if not n
    )
    train = train.filter(lambda kind: kind != "composed", input_columns="kind")  # colpali's collator: text
    corpus = _load(tmp_path / "hf", "corpus", "train")
    n_neg = 1
    assert len(train) >= 8
    docs = Corpus(corpus, {cid: i for i, cid in enumerate(corpus["corpus-id"])}, doc_column_name="image")
    dataset = ColPaliEngineDataset(
        train, corpus=docs, neg_target_column_name="neg_target", num_negatives=n_neg
    )
    processor = BiGemmaProcessor3.from_pretrained(model_dir)
    collator = VisualRetrieverCollator(processor)
    torch.manual_seed(0)
    random.seed(0)
    model = BiGemma3.from_pretrained(model_dir, key_mapping={}, torch_dtype=torch.float32)
    loss_fn = BiNegativeCELoss(temperature=0.02)

    # fixed evaluation batches of 4 (ColPaliEngineDataset samples negatives only beyond num_negatives)
    batches = [
        collator([dataset[j] for j in range(i, min(i + 4, len(dataset)))]) for i in range(0, len(dataset), 4)
    ]
    batches = [b for b in batches if b["query_input_ids"].shape[0] > 1]

    def set_loss() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for b in batches:
                q = model(**{k[6:]: v for k, v in b.items() if k.startswith("query_")})
                d = model(**{k[4:]: v for k, v in b.items() if k.startswith("doc_")})
                neg_inputs = {
                    k[8:]: v.view(-1, *v.shape[2:]) for k, v in b.items() if k.startswith("neg_doc_")
                }
                n = model(**neg_inputs).view(q.shape[0], n_neg, -1)
                total += float(loss_fn(q, d, n))
        return total / len(batches)

    before = set_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path / "colpali-out"),
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=5e-4,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
        remove_unused_columns=False,
    )
    trainer = ContrastiveTrainer(
        loss_func=loss_fn, is_vision_model=True, model=model, args=args, train_dataset=dataset,
        eval_dataset=None, data_collator=collator,
    )  # fmt: skip
    trainer.train()
    after = set_loss()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"\ncolpali-engine on the export: set loss {before:.4f} -> {after:.4f}; step losses {logged}")
    assert len(logged) == 12
    assert after < 0.8 * before


def test_readme_reading_the_output_runs(run, netra, tmp_path) -> None:
    """The README's "Reading the output" code, run as written against this export."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Reading the output", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README: Reading the output has no python block"
    code = "\n".join(blocks).replace('"out/demo-hf"', repr(str(run["hf"])))
    code = code.replace('"out/netra-export"', repr(str(netra)))
    script = tmp_path / "readme.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "'neg_doc_input_ids': (2, 1," in out  # colpali's collator: one negative per row, stacked
    scores = dict(re.findall(r"^(m3dr-\S+) ([0-9.]+)$", out, re.M))  # mteb: one NDCG@5 per set
    assert {f"m3dr-heldout-benchmark-{s['name']}" for s in _suite_sets(run["hf"])} == set(scores)
    assert all(0.0 <= float(v) <= 1.0 for v in scores.values())
