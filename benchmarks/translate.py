"""CTranslate2 int8 vs transformers ``generate``: output tokens/s of the same NLLB model, side by side.

Both engines get the same sentences, the same batches (sorted by length), the same beam size and the
same maximum output length; greedy/beam decoding without sampling. Tokens/s counts generated target
tokens (the forced language token included, padding excluded) of each engine.

    python benchmarks/translate.py                       # the tiny recipe (built if missing)
    python benchmarks/translate.py --model hf:facebook/nllb-200-distilled-600M
    python benchmarks/translate.py --config nllb-600m    # RANDOM weights, NLLB-200-distilled-600M shape
    python benchmarks/translate.py --config nllb-600m --batching   # our engine's batching modes

``--batching`` compares m3dr's own ``CT2NllbTranslator.translate_batch`` on a page-like mix of chunks
(headings of a few words, one-sentence and three-sentence paragraphs) in three modes, side by side:
calls of ``--batch-size`` sentences run one at a time (what the engine did before); calls cut by a
padded-token budget (``batch_type = "tokens"``, ``max_batch_tokens``) one at a time; and token calls
submitted asynchronously, several in flight over ``inter_threads`` replicas (the threads split between
them). Outputs must be equal across the modes (the engine's batching guarantee); tokens/s counts the
output tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SENTENCES = [
    "The European Union signed a new agreement with India in January.",
    "Results show that the proposed model improves accuracy on three benchmarks.",
    "Figure 2 compares the Japanese yen with the United States dollar over ten years.",
    "Russia and China reported lower rainfall in March and April than in the previous decade.",
    "The survey covered Brazil, Canada, Mexico and South Africa.",
    "On Monday the committee discussed the budget.",
    "We thank the reviewers for their helpful comments and suggestions.",
    "Speakers of Tamil and Hindi were recruited in Chennai and Delhi for the second study.",
    "The data were collected between June and September.",
    "Prices are given in euros.",
    "Section 4 describes how the Latin and Cyrillic scripts are rendered on each page.",
    "Germany, France and Italy joined the project on Friday after a long negotiation.",
]

NLLB_600M = {  # facebook/nllb-200-distilled-600M
    "d_model": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "vocab_size": 256206,
}


def build_random_600m(layers: int) -> Path:
    """A RANDOM-weight M2M100 with the NLLB-200-distilled-600M shape (``layers`` per side), cached.

    The tokenizer is the tiny recipe's (4k pieces + our 22 language codes); CTranslate2's converter pads
    the vocabulary to 256,206 entries with ``madeupword`` tokens, so the embedding/projection sizes are
    the real ones.
    """
    import torch
    from transformers import AutoTokenizer, M2M100Config, M2M100ForConditionalGeneration

    from tasks.models import build_recipe
    from tasks.paths import models_dir
    from tasks.translate.engine import convert_nllb_to_ct2

    out = models_dir() / f"bench-nllb-600m-random-L{layers}"
    if (out / ".complete").exists():
        return out
    tok = AutoTokenizer.from_pretrained(build_recipe("nllb-tiny") / "hf")
    cfg = dict(NLLB_600M, encoder_layers=layers, decoder_layers=layers)
    config = M2M100Config(
        **cfg,
        max_position_embeddings=1024,
        scale_embedding=True,
        activation_function="relu",
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
        tokenizer_class="NllbTokenizer",
    )
    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(config).eval()
    model.save_pretrained(out / "hf")
    tok.save_pretrained(out / "hf")
    convert_nllb_to_ct2(out / "hf", out / "ct2", quantization="int8")
    (out / ".complete").write_text("ok\n")
    return out


def locate(args: argparse.Namespace) -> tuple[Path, Path]:
    """(transformers checkpoint dir, CTranslate2 dir) for the requested model."""
    from tasks.models import build_recipe, resolve_source
    from tasks.translate.engine import _is_transformers_m2m100, ensure_ct2_model

    if args.config == "nllb-600m":
        root = build_random_600m(args.layers)
        return root / "hf", root / "ct2"
    if args.model.startswith("recipe:"):
        build_recipe(args.model.split(":", 1)[1])
    path = resolve_source(args.model)
    hf = next((c for c in (path, path / "hf") if _is_transformers_m2m100(c)), None)
    if hf is None:
        raise SystemExit(f"{args.model}: no transformers checkpoint to compare against")
    return hf, ensure_ct2_model(args.model, quantization="int8")


def bench_ct2(ct2_dir: Path, batches, tgt: str, args) -> tuple[float, int]:
    import ctranslate2

    tr = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type="int8", intra_threads=args.threads)
    opts = dict(
        beam_size=args.beam,
        max_batch_size=args.batch_size,
        max_decoding_length=args.max_length,
        min_decoding_length=args.max_length if args.fixed_length else 0,
    )
    tr.translate_batch(batches[0][0], target_prefix=[[tgt]] * len(batches[0][0]), **opts)  # warm-up
    t0, n = time.perf_counter(), 0
    for tokens, _ in batches:
        res = tr.translate_batch(tokens, target_prefix=[[tgt]] * len(tokens), **opts)
        n += sum(len(r.hypotheses[0]) for r in res)
    return time.perf_counter() - t0, n


def bench_hf(hf_dir: Path, batches, tgt_id: int, pad_id: int, args) -> tuple[float, int]:
    import torch
    from transformers import M2M100ForConditionalGeneration

    model = M2M100ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    gen = dict(
        num_beams=args.beam,
        do_sample=False,
        max_new_tokens=args.max_length,
        min_new_tokens=args.max_length if args.fixed_length else 0,
        forced_bos_token_id=tgt_id,
        early_stopping=args.beam > 1,
    )

    def run(ids: list[list[int]]) -> int:
        width = max(len(r) for r in ids)
        x = torch.tensor([r + [pad_id] * (width - len(r)) for r in ids])
        out = model.generate(input_ids=x, attention_mask=(x != pad_id).long(), **gen)
        gen_part = out[:, 1:]  # drop the decoder start token </s>
        return int((gen_part != pad_id).sum())

    with torch.inference_mode():
        run(batches[0][1])  # warm-up
        t0, n = time.perf_counter(), 0
        for _, ids in batches:
            n += run(ids)
    return time.perf_counter() - t0, n


def page_like_chunks(n: int, seed: int = 0) -> list[str]:
    """``n`` chunks like a page's regions: headings, one-sentence and three-sentence paragraphs."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            out.append(" ".join(rng.choice(SENTENCES).split()[:3]))
        elif kind < 0.7:
            out.append(rng.choice(SENTENCES))
        else:
            out.append(" ".join(rng.sample(SENTENCES, 3)))
    return out


def bench_batching(ct2_dir: Path, args) -> dict:
    """Sentence-count vs token batching vs asynchronous token batching of our engine, side by side."""
    from tasks.languages import get
    from tasks.translate.engine import CT2NllbTranslator

    texts = page_like_chunks(args.sentences)
    tgt = get(args.tgt).flores
    common = dict(max_decoding_length=args.max_length, compute_type="int8")
    modes = {
        f"sentences x{args.batch_size}, sync": dict(
            batch_type="examples",
            max_batch_size=args.batch_size,
            max_in_flight=1,
            intra_threads=args.threads,
        ),
        f"tokens <= {args.max_batch_tokens}, sync": dict(
            batch_type="tokens",
            max_batch_size=256,
            max_batch_tokens=args.max_batch_tokens,
            max_in_flight=1,
            intra_threads=args.threads,
        ),
        f"tokens <= {args.max_batch_tokens}, async x{args.threads}": dict(
            batch_type="tokens",
            max_batch_size=256,
            max_batch_tokens=args.max_batch_tokens,
            inter_threads=args.threads,
            intra_threads=1,
        ),
    }
    results, outputs = {}, {}
    for name, kw in modes.items():
        tr = CT2NllbTranslator(ct2_dir, **common, **kw)
        generated = [0]  # target tokens kept per hypothesis (random weights detokenise to little text)

        def counted(batch, results, _inner=tr._hypotheses, _n=generated):
            hyps = _inner(batch, results)
            _n[0] += sum(len(h) for h in hyps)
            return hyps

        tr._hypotheses = counted
        tr.translate_batch(texts[:8], "eng_Latn", tgt)  # warm-up
        best = float("inf")
        for _ in range(args.repeat):
            t0, n0 = time.perf_counter(), generated[0]
            outputs[name] = tr.translate_batch(texts, "eng_Latn", tgt)
            best = min(best, time.perf_counter() - t0)
            n_out = generated[0] - n0
        results[name] = {"seconds": best, "tokens": n_out, "tokens_per_s": n_out / best}
    same = len({tuple(o) for o in outputs.values()}) == 1
    base = next(iter(results.values()))["tokens_per_s"]
    print(f"{len(texts)} page-like chunks, {args.threads} threads, target {tgt}; outputs equal: {same}")
    print(f"{'mode':<34}{'seconds':>9}{'tokens/s':>11}{'x':>7}")
    for name, r in results.items():
        print(f"{name:<34}{r['seconds']:>9.2f}{r['tokens_per_s']:>11.1f}{r['tokens_per_s'] / base:>7.2f}")
    if not same:
        raise SystemExit("outputs differ between batching modes: the batching guarantee is broken")
    return {"modes": results, "outputs_equal": same}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="recipe:nllb-tiny", help="model source (recipe:, hf:, path)")
    ap.add_argument("--config", choices=["nllb-600m"], help="build a RANDOM-weight model of this shape")
    ap.add_argument("--layers", type=int, default=12, help="encoder=decoder layers for --config nllb-600m")
    ap.add_argument("-n", "--sentences", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64, help="max output tokens (both engines)")
    ap.add_argument("--fixed-length", action="store_true", help="force every output to --max-length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tgt", default="hi", help="target ISO code")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--batching", action="store_true", help="compare our engine's batching modes")
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    if args.batching:
        _, ct2_dir = locate(args)
        figures = bench_batching(ct2_dir, args)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return

    import torch
    from transformers import AutoTokenizer

    from tasks.languages import get

    torch.set_num_threads(args.threads)
    hf_dir, ct2_dir = locate(args)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.src_lang = "eng_Latn"
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(args.sentences)]
    ids = [tok(t)["input_ids"] for t in texts]  # [eng_Latn] ... </s>
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = []
    for s in range(0, len(order), args.batch_size):
        rows = [ids[i] for i in order[s : s + args.batch_size]]
        batches.append(([tok.convert_ids_to_tokens(r) for r in rows], rows))
    tgt = get(args.tgt).flores

    ct2_s, ct2_n = bench_ct2(ct2_dir, batches, tgt, args)
    hf_s, hf_n = bench_hf(hf_dir, batches, tok.convert_tokens_to_ids(tgt), tok.pad_token_id, args)
    ct2_tps, hf_tps = ct2_n / ct2_s, hf_n / hf_s
    src_tokens = sum(len(r) for r in ids)
    print(
        f"model: {args.config or args.model} (hf: {hf_dir}, ct2: {ct2_dir})\n"
        f"{args.sentences} sentences, {src_tokens} source tokens, batch {args.batch_size}, beam {args.beam}, "
        f"max length {args.max_length}{' (forced)' if args.fixed_length else ''}, {args.threads} threads, "
        f"target {tgt}\n"
    )
    print(f"{'engine':<28}{'seconds':>10}{'out tokens':>12}{'tokens/s':>12}")
    print(f"{'ctranslate2 int8':<28}{ct2_s:>10.2f}{ct2_n:>12d}{ct2_tps:>12.1f}")
    print(f"{'transformers generate fp32':<28}{hf_s:>10.2f}{hf_n:>12d}{hf_tps:>12.1f}")
    print(f"\nratio ctranslate2 / transformers (tokens/s): {ct2_tps / hf_tps:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.config or args.model,
                    "ct2": {"seconds": ct2_s, "tokens": ct2_n, "tokens_per_s": ct2_tps},
                    "hf": {"seconds": hf_s, "tokens": hf_n, "tokens_per_s": hf_tps},
                    "ratio": ct2_tps / hf_tps,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
