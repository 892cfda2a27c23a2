"""Production-size figures for sizing a GPU job, on random weights at the real architectures.

Each part runs in its own subprocess, so the peak RSS printed is that part's own (``VmHWM``):

- ``train-dense`` / ``train-multivector``: one LoRA training step of the retriever on the
  **Gemma-3-4B-IT** architecture (``Gemma3Config`` written out by hand from the published config:
  transformers' defaults are *not* the 4B values), batch 2 = 2 queries + 2 page images at 896 px, through
  our own code: ``training.model`` (``apply_lora`` with ``TrainConfig``'s LoRA targets, ``RetrieverModel``),
  ``training.data.PromptFormatter`` (chat prompts, ``Gemma3Processor``), ``training.trainer``
  (``RetrievalObjective``, ``build_optimizer``, ``autocast_context``). Weights are bf16 where the CPU has
  bf16 (fp32 otherwise), built with initialisation skipped and filled from a small random bank (seconds,
  not minutes); the compute is the real one. The tokenizer is ``recipe:gemma3-tiny``'s (4k pieces): the
  model's vocabulary is the real 262,208, prompts are a little longer in tokens than with Gemma's.
- ``layout``: DocLayout-YOLO at imgsz 1024 through the layout stage (``build_layout_detector``), the
  package's ``yolov10m-doclayout.yaml`` (the DocStructBench checkpoint's architecture) with random
  weights, on real pages: the R reference manual (Debian ``r-doc-pdf``, fetched like
  ``benchmarks/scale_corpus.py`` does; generated PDFs when apt is unreachable) rendered by the ingest
  stage (144 dpi).
- ``translate``: the NLLB-200-distilled-600M architecture (vocabulary 256,206, d_model 1024, 12+12
  layers) with random weights, converted by CTranslate2 (int8; ``benchmarks/translate.py``'s builder,
  cached in the model cache), run through ``tasks.translate.texts.translate_texts`` with the ``full``
  profile's ``[translate]`` options on CPU, on the text layer of the same real pages. Random weights
  never emit ``</s>``, so every chunk decodes to its cap: ``max_decoding_length`` is bounded
  (``--max-decoding-length``, default 64 = the chunker's 64-token chunks) so each output is a
  translation-sized one; tokens/s counts generated target tokens (the forced language token excluded).

Training setups (``--setups``): ``after`` (default) is the trainer's production configuration: bf16
weights (where the CPU has bf16), gradient checkpointing and GradCache (``--grad-cache-chunk``, 0: off),
through ``training.trainer.grad_cache_backward``; ``before`` is the trainer as it was: fp32 weights, every
activation kept, the whole batch at once (at 4B it passed 17.5 GiB RSS on 2 cores, stopped mid-step).
``--train-batch`` sets queries (and pages) per step: with GradCache the peak stays that of one chunk.

    nice -n 10 .venv/bin/python benchmarks/production_shapes.py --quick     # smoke test, ~1.5 min
    nice -n 10 .venv/bin/python benchmarks/production_shapes.py --quick --parts train-dense \
        --setups before,after --train-batch 4                               # the two setups side by side
    nice -n 10 .venv/bin/python benchmarks/production_shapes.py --parts train-multivector --warmup-steps 0 \
        --train-batch 4 --json out/production_shapes.json                   # ~11 min, 11.2 GiB peak
    .venv/bin/python benchmarks/production_shapes.py --parts layout,translate
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train-dense", "train-multivector", "layout", "translate")
FIRST_PAGE = 30  # the R manual's first reference pages (after title pages and contents)

# Gemma-3-4B-IT (google/gemma-3-4b-it config.json); the rest are Gemma3TextConfig defaults that equal
# the 4B values (heads 8, kv heads 4, head_dim 256, query_pre_attn_scalar 256, 5 local : 1 global).
GEMMA3_4B_TEXT: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2560,
    "intermediate_size": 10_240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "max_position_embeddings": 131_072,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
}
GEMMA3_4B_VISION: dict[str, Any] = {  # SigLIP-So400m at 896 px, no pooling head
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}
GEMMA3_4B_MM_TOKENS = 256
# --quick: same classes and code path, small widths (vocabulary kept at its real size)
QUICK_TEXT = dict(
    GEMMA3_4B_TEXT,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    query_pre_attn_scalar=128,
)
QUICK_VISION = dict(
    GEMMA3_4B_VISION, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2
)
QUICK_VISION["image_size"] = 224  # 16x16 patches, pooled to 8x8 = 64 image tokens
QUICK_MM_TOKENS = 64

QUERIES = [
    "How do I fit a linear model with weights in R?",
    "Which argument of read.table sets the field separator?",
]


# ---------------------------------------------------------------------------------------- helpers
def _load_script(name: str) -> Any:
    """Another benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _proc_status(key: str) -> float:
    """``VmHWM`` / ``VmRSS`` of this process in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def real_pages(n: int, work: Path) -> tuple[list[Any], str]:
    """``n`` pages rendered by the ingest stage (``SourcePage``: image + PDF text layer read now)."""
    from tasks.ingest.sources import iter_source_pages

    manual = _load_script("scale_corpus").refman()
    if manual is None:
        from tests.support.documents import write_pdfs

        write_pdfs(work, 1, seed=7)
        manual, start, origin = next(work.glob("*.pdf")), 0, "generated PDF (r-doc-pdf unavailable)"
    else:
        start, origin = FIRST_PAGE, f"{manual.name} pages {FIRST_PAGE}..{FIRST_PAGE + n - 1}"
    pages = []
    for page in iter_source_pages(manual, page_range=(start, start + n)):
        if isinstance(page, Exception):
            raise page
        text = page.pdf_page.get_textpage().get_text_bounded() if page.pdf_page is not None else ""
        pages.append((page.image.copy(), text))
    return pages, origin


# ---------------------------------------------------------------------------------------- parts
def fill_random_(model: Any, *, std: float = 0.02, seed: int = 0) -> None:
    """Give every parameter random-looking values cheaply: copies from one seeded normal bank of a
    prime length (a memcpy per chunk instead of an RNG call per weight); LayerNorms get (1, 0)."""
    import torch

    bank_len = 1_048_573
    bank = torch.randn(bank_len, generator=torch.Generator().manual_seed(seed)) * std
    banks: dict[torch.dtype, torch.Tensor] = {}
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            b = banks.setdefault(p.dtype, bank.to(p.dtype))
            flat = p.view(-1)
            off = (i * 7919) % bank_len
            b = torch.cat([b[off:], b[:off]])
            for s in range(0, flat.numel(), bank_len):
                n = min(bank_len, flat.numel() - s)
                flat[s : s + n].copy_(b[:n])
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


def build_gemma3(quick: bool, dtype: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(Gemma3ForConditionalGeneration with random weights, Gemma3Processor, config summary)."""
    import torch
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.initialization import no_init_weights

    from tasks.models import build_recipe
    from tasks.recipes.gemma3_tiny import BOI_TOKEN, CHAT_TEMPLATE, EOI_TOKEN, IMAGE_TOKEN

    text, vision = (QUICK_TEXT, QUICK_VISION) if quick else (GEMMA3_4B_TEXT, GEMMA3_4B_VISION)
    mm_tokens = QUICK_MM_TOKENS if quick else GEMMA3_4B_MM_TOKENS
    tokenizer = AutoTokenizer.from_pretrained(str(build_recipe("gemma3-tiny")))
    tokenizer.padding_side = "left"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN)}
    config = Gemma3Config(
        text_config=Gemma3TextConfig(
            **text,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        ),
        vision_config=SiglipVisionConfig(**vision),
        mm_tokens_per_image=mm_tokens,
        boi_token_index=ids[BOI_TOKEN],
        eoi_token_index=ids[EOI_TOKEN],
        image_token_index=ids[IMAGE_TOKEN],
    )
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():  # torch.empty parameters: no minutes of random init
            model = Gemma3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(before)
    model.tie_weights()  # skipped with the init: lm_head shares the embedding as in the checkpoint
    fill_random_(model)
    side = vision["image_size"]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(
            size={"height": side, "width": side},
            do_pan_and_scan=False,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        tokenizer=tokenizer,
        image_seq_length=mm_tokens,
        chat_template=CHAT_TEMPLATE,
    )
    summary = {
        "text": {k: v for k, v in text.items() if k != "rope_parameters"},
        "rope": text["rope_parameters"],
        "vision": vision,
        "mm_tokens_per_image": mm_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "lm_head_tied": model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
    }
    return model, processor, summary


def part_train(retriever: str, args: argparse.Namespace) -> dict[str, Any]:
    """One (or ``--steps``) LoRA training step(s) of the retriever, after one untimed warm-up step."""
    import torch

    from tasks.encoders import PageView
    from training.config import TrainConfig
    from training.data import Batch, PromptFormatter
    from training.model import RetrieverModel, apply_lora, hidden_size_of
    from training.trainer import (
        DistInfo,
        RetrievalObjective,
        autocast_context,
        build_optimizer,
        grad_cache_backward,
    )

    torch.set_num_threads(args.threads)
    after = args.setup == "after"
    # before: the trainer as it was (fp32 weights, every activation kept, the whole batch at once);
    # after: bf16 weights (where the CPU has bf16; always on CUDA), gradient checkpointing, GradCache
    bf16 = after and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    t0 = time.perf_counter()
    backbone, processor, summary = build_gemma3(args.quick, dtype)
    build_s = time.perf_counter() - t0
    weights_gib = _proc_status("VmRSS")
    hidden = hidden_size_of(backbone)
    batch_size = args.train_batch
    cfg = TrainConfig(
        model="random:gemma-3-4b-it" if not args.quick else "random:gemma-3-quick",
        retriever=retriever,
        batch_size=batch_size,
        num_negatives=0,
        matryoshka_dims=[768, 1536, 2560] if not args.quick else [64, 128, 256],
        precision="bf16" if bf16 else "fp32",
        gradient_checkpointing=after or args.gradient_checkpointing,
        grad_cache_chunk=(args.grad_cache_chunk or None) if after else None,
    )
    backbone = apply_lora(backbone, cfg)
    if cfg.gradient_checkpointing:  # as training.model.build_retriever does
        base = backbone.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = RetrieverModel(
        backbone, hidden, dense=cfg.dense, multivector=cfg.multivector, multivector_dim=cfg.multivector_dim
    ).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(model, cfg)
    objective = RetrievalObjective(cfg)
    info = DistInfo(device=torch.device("cpu"))

    with tempfile.TemporaryDirectory() as tmp:
        pages, origin = real_pages(batch_size, Path(tmp))
    import io

    views = []
    for i, (image, text) in enumerate(pages):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        views.append(PageView(f"p{i}", f"p{i}", "en", text, buf.getvalue()))
    fmt = PromptFormatter(processor, cfg.prompts)
    queries = [QUERIES[i % len(QUERIES)] for i in range(batch_size)]
    batch = Batch(
        queries=fmt.query_batch(queries, dense=cfg.dense, multi=cfg.multivector),
        docs=fmt.documents(views),
        pos=torch.arange(batch_size),
        valid=torch.ones(batch_size, batch_size, dtype=torch.bool),
        doc_counts=[batch_size],
    )
    losses: list[float] = []

    def step() -> float:
        if cfg.grad_cache_chunk:
            loss = grad_cache_backward(
                model.embed,
                batch,
                objective,
                info,
                cfg.grad_cache_chunk,
                lambda: autocast_context(cfg, info.device),
            )
        else:
            with autocast_context(cfg, info.device):
                q, d = model(batch.queries, batch.docs)
            loss = objective(q, d, batch, info)
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        return losses[-1]

    first_s = None
    if args.warmup_steps:
        t = time.perf_counter()
        for _ in range(args.warmup_steps):
            step()  # warm-up: oneDNN primitives, optimizer state
        first_s = (time.perf_counter() - t) / args.warmup_steps
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_s = (time.perf_counter() - t) / args.steps
    return {
        "retriever": retriever,
        "dtype": str(dtype).replace("torch.", ""),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "setup": args.setup,
        "batch_size": batch_size,
        "grad_cache_chunk": cfg.grad_cache_chunk,
        "warmup_steps": args.warmup_steps,
        "build_s": build_s,
        "first_step_s": first_s,
        "step_s": step_s,
        "weights_rss_gib": weights_gib,
        "trainable_params": trainable,
        "query_tokens": list(batch.queries["input_ids"].shape),
        "doc_tokens": list(batch.docs["input_ids"].shape),
        "pixel_values": list(batch.docs["pixel_values"].shape),
        "losses": losses,
        "pages": origin,
        "model": summary,
    }


def part_layout(args: argparse.Namespace) -> dict[str, Any]:
    """DocLayout-YOLO (yolov10m-doclayout, random weights) through the layout stage, s/page."""
    import torch

    from tasks.ingest.layout import build_layout_detector
    from tasks.models import sha256_file
    from tasks.recipes.doclayout_yolo_tiny import build_random_doclayout_yolo, doclayout_yaml

    n = 2 if args.quick else args.pages
    with tempfile.TemporaryDirectory() as tmp:
        pages, origin = real_pages(n + 1, Path(tmp))
        ckpt = build_random_doclayout_yolo(Path(tmp) / "dly", scale="n" if args.quick else "m")
        det = build_layout_detector(
            {
                "engine": "doclayout-yolo",
                "model": str(ckpt),
                "imgsz": 1024,
                "threads": args.threads,
                "sha256": sha256_file(ckpt),  # our own build, pinned like a profile would
            }
        )
        params = sum(p.numel() for p in det.model.model.parameters())
        det.detect(pages[0][0])  # warm-up
        t = time.perf_counter()
        regions = [len(det.detect(image)) for image, _ in pages[1:]]
        secs = time.perf_counter() - t
    return {
        "checkpoint": doclayout_yaml().name if not args.quick else "yolov10n scale of it",
        "parameters": params,
        "imgsz": 1024,
        "threads": torch.get_num_threads(),
        "pages": n,
        "page_size": list(pages[1][0].size),
        "s_per_page": secs / n,
        "regions_per_page": sum(regions) / n,
        "source": origin,
    }


def part_translate(args: argparse.Namespace) -> dict[str, Any]:
    """NLLB-600M shape (random weights, CTranslate2 int8) through translate_texts, tokens/s."""
    from tasks.models import load_profile
    from tasks.translate.engine import build_translator
    from tasks.translate.texts import TranslateStats, translate_texts

    layers = 1 if args.quick else 12
    root = _load_script("translate").build_random_600m(layers)  # built by the translate-build part
    cfg = dict(load_profile("full")["translate"])
    cfg.update(
        model=str(root / "ct2"),
        device="cpu",
        compute_type="auto",
        intra_threads=args.threads,
        max_decoding_length=args.max_decoding_length,
    )
    translator = build_translator(cfg)
    counts = {"src": 0, "tgt": 0, "chunks": 0}
    inner = translator.translate_tokens

    def counting(batch: list[list[str]], tgt: str) -> list[list[str]]:
        hyps = inner(batch, tgt)
        counts["src"] += sum(len(b) for b in batch)
        counts["tgt"] += sum(max(0, len(h) - 1) for h in hyps)  # minus the forced language token
        counts["chunks"] += len(batch)
        return hyps

    translator.translate_tokens = counting  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        pages, origin = real_pages(1 if args.quick else args.translate_pages, Path(tmp))
    texts = [p for _, text in pages for p in text.split("\n\n") if p.strip()]
    translate_texts(translator, ["Prices are given in euros."], "en", args.tgt)  # warm-up
    counts.update(src=0, tgt=0, chunks=0)
    stats = TranslateStats()
    t = time.perf_counter()
    translate_texts(translator, texts, "en", args.tgt, stats=stats)
    secs = time.perf_counter() - t
    return {
        "model": f"NLLB-200-distilled-600M shape, random weights, {layers}+{layers} layers, CTranslate2",
        "compute_type": translator.compute_type,
        "beam_size": translator.beam_size,
        "max_batch_size": translator.max_batch_size,
        "max_decoding_length": translator.max_decoding_length,
        "max_length_ratio": translator.max_length_ratio,
        "threads": args.threads,
        "texts": len(texts),
        "chunks": counts["chunks"],
        "source_tokens": counts["src"],
        "generated_tokens": counts["tgt"],
        "seconds": secs,
        "generated_tokens_per_s": counts["tgt"] / secs,
        "source_tokens_per_s": counts["src"] / secs,
        "target": args.tgt,
        "source": origin,
    }


def child(part: str, args: argparse.Namespace) -> None:
    """Run one part in this process; print its figures (+ this process's peak RSS) as a JSON line."""
    if part == "translate-build":  # its own process: the build's memory is not the translator's
        t = time.perf_counter()
        _load_script("translate").build_random_600m(1 if args.quick else 12)
        res: dict[str, Any] = {"build_s": time.perf_counter() - t}
    elif part.startswith("train-"):
        res = part_train(part.split("-", 1)[1], args)
    elif part == "layout":
        res = part_layout(args)
    else:
        res = part_translate(args)
    res["peak_rss_gib"] = _proc_status("VmHWM")
    print("RESULT " + json.dumps(res), flush=True)


def run_part(part: str, argv: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--_child", part, *argv], env=env, capture_output=True, text=True
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"{part} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
        )
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced configs: a smoke test of every part")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="timed training steps (after the warm-up)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed training steps first")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="gradient checkpointing in the 'before' setup too ('after' always has it)",
    )
    ap.add_argument(
        "--setups",
        default="after",
        help="training setups to run, comma-separated: before (fp32 weights, whole batch, every "
        "activation kept: the trainer before GradCache) and/or after (bf16 weights, gradient "
        "checkpointing, GradCache)",
    )
    ap.add_argument("--train-batch", type=int, default=2, help="queries (and pages) per training step")
    ap.add_argument("--grad-cache-chunk", type=int, default=1, help="'after' GradCache chunk (0: off)")
    ap.add_argument("--setup", default="after", help=argparse.SUPPRESS)  # one child's setup
    ap.add_argument("--pages", type=int, default=16, help="layout: timed pages (after one warm-up page)")
    ap.add_argument("--translate-pages", type=int, default=1, help="translate: pages of text")
    ap.add_argument("--max-decoding-length", type=int, default=64)
    ap.add_argument("--tgt", default="hi", help="translate: target ISO code")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        sys.path.insert(0, str(REPO))
        child(args._child, args)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    passthrough = ["--threads", str(args.threads), "--steps", str(args.steps), "--pages", str(args.pages)]
    passthrough += ["--warmup-steps", str(args.warmup_steps)]
    passthrough += ["--gradient-checkpointing"] * args.gradient_checkpointing
    passthrough += ["--translate-pages", str(args.translate_pages), "--tgt", args.tgt]
    passthrough += ["--max-decoding-length", str(args.max_decoding_length)] + (["--quick"] * args.quick)
    passthrough += ["--train-batch", str(args.train_batch), "--grad-cache-chunk", str(args.grad_cache_chunk)]
    setups = [x.strip() for x in args.setups.split(",") if x.strip()]
    if not setups or set(setups) - {"before", "after"}:
        raise SystemExit("--setups takes before and/or after")
    results: dict[str, dict[str, Any]] = {}
    for part in parts:
        for setup in setups if part.startswith("train-") else [""]:
            t = time.perf_counter()
            build = run_part("translate-build", passthrough)["build_s"] if part == "translate" else None
            key = f"{part}:{setup}" if setup else part
            results[key] = run_part(part, [*passthrough, "--setup", setup or "after"])
            if build is not None:
                results[key]["build_s"] = build
            print(f"{key}: done in {time.perf_counter() - t:.0f} s", flush=True)

    size = "QUICK (reduced configs)" if args.quick else "production shapes"
    print(f"\n## {size}, random weights, CPU, {args.threads} threads\n")
    print(f"| {'part':<24} | {'figure':<56} | {'peak RSS GiB':>12} |")
    print(f"|{'-' * 26}|{'-' * 58}|{'-' * 13}:|")
    for part, r in results.items():
        if part.startswith("train-"):
            ckpt = ", ckpt" if r["gradient_checkpointing"] else ""
            cache = f", GradCache {r['grad_cache_chunk']}" if r["grad_cache_chunk"] else ""
            fig = f"{r['step_s']:.1f} s/step (batch {r['batch_size']}, {r['dtype']}{ckpt}{cache})"
        elif part == "layout":
            fig = f"{r['s_per_page']:.2f} s/page ({r['pages']} pages {r['page_size'][0]}x{r['page_size'][1]})"
        else:
            fig = f"{r['generated_tokens_per_s']:.1f} generated tok/s (beam {r['beam_size']})"
        print(f"| {part:<24} | {fig:<56} | {r['peak_rss_gib']:>12.2f} |")
    trains = [r for k, r in results.items() if k.startswith("train-")]
    if trains:
        r = trains[-1]
        print(
            f"\ntrain: {r['model']['parameters'] / 1e9:.2f} B parameters ({r['dtype']}, weights "
            f"{r['weights_rss_gib']:.1f} GiB RSS), LoRA r=32 trainable {r['trainable_params'] / 1e6:.1f} M; "
            f"queries {r['query_tokens']}, documents {r['doc_tokens']} tokens + pixels {r['pixel_values']}"
        )
    if "translate" in results:
        r = results["translate"]
        print(
            f"translate: {r['texts']} texts → {r['chunks']} chunks, {r['source_tokens']} source tokens "
            f"(tiny recipe tokenizer), {r['generated_tokens']} generated in {r['seconds']:.1f} s; "
            f"max_decoding_length {r['max_decoding_length']} (random weights decode to the cap)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"quick": args.quick, "results": results}, indent=2) + "\n")
        print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
