"""Translation engines: NLLB-200 (any M2M100-layout model) through CTranslate2, behind one protocol.

Engines are looked up in ``ENGINES`` by the profile's ``[translate].engine``; the model comes from a
source string (``recipe:``, ``hf:``, path) resolved by ``tasks.models``. A transformers NLLB checkpoint
is converted once with CTranslate2's own converter into the model cache.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tasks.config import check_config
from tasks.models import fingerprint, resolve_source
from tasks.paths import models_dir


@runtime_checkable
class Translator(Protocol):
    """A batch translator over FLORES-200 codes.

    Optional: ``count_tokens(texts) -> list[int]`` (used for chunking; words are counted otherwise).
    """

    model_id: str

    def translate_batch(self, texts: list[str], src_flores: str, tgt_flores: str) -> list[str]: ...


# --------------------------------------------------------------------------------------------------
# CTranslate2 NLLB engine


def _resolve_compute_type(compute_type: str, device: str) -> str:
    if compute_type != "auto":
        return compute_type
    return "int8_float16" if device.startswith("cuda") else "int8"


class CT2NllbTranslator:
    """NLLB-200 (or any M2M100-layout model) converted to CTranslate2, with its HF tokenizer.

    Source tokens follow the NLLB convention ``[src_lang] tokens </s>``; the target language is forced
    with ``target_prefix=[[tgt_lang]]`` and stripped from the output. Inputs are sorted by token length
    and cut into batches of ``max_batch_size`` so that padding stays small; order is restored.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        compute_type: str = "auto",
        beam_size: int = 1,
        max_batch_size: int = 32,
        inter_threads: int = 1,
        intra_threads: int = 0,
        max_decoding_length: int = 256,
        no_repeat_ngram_size: int = 0,
        max_length_ratio: float = 3.0,
        device_index: int | Sequence[int] = 0,
        batch_type: str = "tokens",
        max_batch_tokens: int = 4096,
        max_in_flight: int = 0,
    ) -> None:
        import ctranslate2
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "model.bin").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a CTranslate2 model (no model.bin)")
        self.device = device
        self.compute_type = _resolve_compute_type(compute_type, device)
        self.beam_size = beam_size
        self.max_batch_size = max_batch_size
        self.max_decoding_length = max_decoding_length
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.max_length_ratio = max_length_ratio
        if batch_type not in ("examples", "tokens"):
            raise ValueError(f"batch_type must be 'examples' or 'tokens', got {batch_type!r}")
        self.batch_type, self.max_batch_tokens = batch_type, max_batch_tokens
        self.device_index = [device_index] if isinstance(device_index, int) else list(device_index)
        # batches in flight: enough to keep every replica (one per GPU and inter thread) busy while
        # this thread prepares and collects the others; bounded so a shard's inputs are not all queued
        self.max_in_flight = max_in_flight or 2 * inter_threads * len(self.device_index)
        self._ct2 = ctranslate2.Translator(
            str(self.model_dir),
            device=device,
            device_index=self.device_index,
            compute_type=self.compute_type,
            inter_threads=inter_threads,
            intra_threads=intra_threads,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self._special = set(self.tokenizer.all_special_tokens)
        self.batches_run = 0
        # Everything that changes the output goes into the id (it keys the translation cache).
        self.model_id = (
            f"ct2-nllb:{self.model_dir.name}:{fingerprint(self.model_dir)}:{self.compute_type}"
            f":beam{beam_size}:nrng{no_repeat_ngram_size}:len{max_decoding_length}x{max_length_ratio:g}"
        )

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CT2NllbTranslator:
        """Build from a profile's ``[translate]`` table (converting a transformers checkpoint once)."""
        from tasks.devices import place, worker_rank
        from tasks.translate.config import Ct2TranslateConfig

        cfg = check_config("translate", cfg, Ct2TranslateConfig)  # normalised: every key, defaults once
        device = cfg["device"]
        visible = None
        if device.startswith("cuda"):
            import ctranslate2

            visible = ctranslate2.get_cuda_device_count()
            if visible == 0:
                raise RuntimeError("translate.device is cuda but CTranslate2 sees no CUDA device")
        where = place(device, cfg["device_index"], visible=visible, rank=worker_rank())
        quant = cfg["quantization"] or ("int8_float16" if device.startswith("cuda") else "int8")
        model_dir = ensure_ct2_model(cfg["model"], quantization=quant)
        keys = (
            "compute_type",
            "beam_size",
            "max_batch_size",
            "inter_threads",
            "intra_threads",
            "max_decoding_length",
            "no_repeat_ngram_size",
            "max_length_ratio",
            "batch_type",
            "max_batch_tokens",
            "max_in_flight",
        )
        return cls(
            model_dir,
            device=where.device,
            device_index=list(where.indices),
            **{k: cfg[k] for k in keys},
        )

    # tokenisation ---------------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Subword tokens per text (without language/eos tokens)."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def tokenize_source(self, texts: Sequence[str], src_flores: str) -> list[list[str]]:
        """Token lists sent to CTranslate2: ``[src_lang] tokens </s>`` (NLLB non-legacy convention)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        eos = self.tokenizer.eos_token
        return [[src_flores, *self.tokenizer.convert_ids_to_tokens(row), eos] for row in ids]

    def detokenize(self, tokens: Sequence[str], tgt_flores: str) -> str:
        """Strip the forced language prefix and special tokens, then join subwords into text."""
        toks = list(tokens)
        if toks and toks[0] == tgt_flores:
            toks = toks[1:]
        toks = [t for t in toks if t not in self._special]
        return self.tokenizer.convert_tokens_to_string(toks).strip()

    # translation ----------------------------------------------------------------------------------

    def decoding_cap(self, n_source_tokens: int) -> int:
        """Most target tokens a source of this length may produce (the prefix language token included).

        A function of the chunk alone, never of its batch: with a cap taken from the longest source of
        a batch, a chunk that runs on (a weak model repeating itself) stopped at a length set by its
        neighbours, so its translation depended on batch composition (seen: 4 of 168 outputs differed
        between batches of 3 and 8 on the tiny NLLB)."""
        return min(self.max_decoding_length, int(self.max_length_ratio * n_source_tokens) + 8)

    def _submit(self, batch: list[list[str]], tgt_flores: str, asynchronous: bool) -> list[Any]:
        """One CTranslate2 call on pre-tokenised sources (results, or their futures when asynchronous)."""
        caps = [self.decoding_cap(len(t)) for t in batch]
        self.batches_run += 1
        return self._ct2.translate_batch(
            batch,
            target_prefix=[[tgt_flores]] * len(batch),
            beam_size=self.beam_size,
            max_batch_size=0,  # the batch is already cut by batch_plan
            max_decoding_length=max(caps),
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            return_scores=False,
            asynchronous=asynchronous,
        )

    def _hypotheses(self, batch: list[list[str]], results: list[Any]) -> list[list[str]]:
        """Each source's best hypothesis cut at its own decoding cap (waits on futures)."""
        out = []
        for src, r in zip(batch, results, strict=True):
            hyp = (r.result() if hasattr(r, "result") else r).hypotheses[0]
            out.append(hyp[: self.decoding_cap(len(src))])
        return out

    def translate_tokens(self, batch: list[list[str]], tgt_flores: str) -> list[list[str]]:
        """One CTranslate2 call on pre-tokenised sources; returns hypotheses with the prefix kept.

        Greedy decoding runs to the largest cap of the batch and cuts every hypothesis at its own
        :meth:`decoding_cap`: exactly the tokens it would produce alone (greedy steps never look
        ahead). Beam search is not prefix-stable, so :meth:`translate_batch` only gives it batches of
        one cap."""
        return self._hypotheses(batch, self._submit(batch, tgt_flores, asynchronous=False))

    def batch_plan(self, tokens: list[list[str]]) -> list[list[int]]:
        """Indices of each CTranslate2 call: sorted by source length (little padding), at most
        ``max_batch_size`` per call and, with ``batch_type = "tokens"``, at most ``max_batch_tokens``
        padded source tokens (a call's longest source × its size; a longer source goes alone); with
        beam search also one decoding cap per call."""
        order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))
        plan: list[list[int]] = []
        for i in order:
            cur = plan[-1] if plan else None
            same_cap = cur is not None and (
                self.beam_size == 1
                or self.decoding_cap(len(tokens[cur[0]])) == self.decoding_cap(len(tokens[i]))
            )
            fits = cur is not None and len(cur) < self.max_batch_size
            if fits and self.batch_type == "tokens":  # sorted: source i is the longest so far
                fits = len(tokens[i]) * (len(cur) + 1) <= self.max_batch_tokens
            if fits and same_cap:
                cur.append(i)
            else:
                plan.append([i])
        return plan

    def translate_batch(self, texts: list[str], src_flores: str, tgt_flores: str) -> list[str]:
        """Translate texts (already sentence-chunked) from one FLORES language to another.

        Calls are submitted asynchronously, up to ``max_in_flight`` at once, so several replicas (GPUs
        of ``device_index``, ``inter_threads``) decode while this thread tokenises and detokenises.

        Guarantee (tested): a text's translation depends on the text, the model and the decoding
        options only — not on the other texts of the call, their order, the batching or the thread
        count. (int8 scores of a padded batch differ from unpadded ones in their last bits; on 4,485
        padded pairs that never changed a token.)"""
        if not texts:
            return []
        tokens = self.tokenize_source(texts, src_flores)
        out: list[str] = [""] * len(texts)
        pending: deque[tuple[list[int], list[Any]]] = deque()

        def collect() -> None:
            idx, futures = pending.popleft()
            hyps = self._hypotheses([tokens[i] for i in idx], futures)
            for i, hyp in zip(idx, hyps, strict=True):
                out[i] = self.detokenize(hyp, tgt_flores)

        for idx in self.batch_plan(tokens):
            pending.append((idx, self._submit([tokens[i] for i in idx], tgt_flores, asynchronous=True)))
            if len(pending) >= self.max_in_flight:
                collect()
        while pending:
            collect()
        return out


ENGINES: dict[str, type] = {"ctranslate2": CT2NllbTranslator}


def _is_transformers_m2m100(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    import json

    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        return False
    return data.get("model_type") == "m2m_100" or "M2M100ForConditionalGeneration" in data.get(
        "architectures", []
    )


def ensure_ct2_model(source: str, quantization: str = "int8") -> Path:
    """A CTranslate2 directory for a model source.

    A CT2 dir (``model.bin``) or a recipe dir with ``ct2/`` is used as is; a transformers NLLB checkpoint
    (e.g. ``hf:facebook/nllb-200-distilled-600M``) is converted once into the model cache, under a file
    lock so concurrent workers convert it only once.
    """
    path = resolve_source(source)
    for cand in (path, path / "ct2"):
        if (cand / "model.bin").is_file():
            return cand
    hf = next((c for c in (path, path / "hf") if _is_transformers_m2m100(c)), None)
    if hf is None:
        raise ValueError(
            f"{source!r} ({path}) is neither a CTranslate2 model nor a transformers NLLB checkpoint"
        )
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")
    out = models_dir() / "ct2-converted" / f"{safe}-{quantization}"
    done = out / ".complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            convert_nllb_to_ct2(hf, out, quantization=quantization)
            done.write_text("ok\n")
    return out


def build_translator(cfg: dict[str, Any]) -> Translator:
    """The translator named by a profile's ``[translate]`` table (``engine`` → ``ENGINES``)."""
    from tasks.translate.config import DEFAULT_ENGINE

    engine = dict(cfg).get("engine", DEFAULT_ENGINE)
    if engine not in ENGINES:
        raise ValueError(f"unknown translate engine {engine!r}; known: {', '.join(sorted(ENGINES))}")
    return ENGINES[engine].from_config(cfg)  # validates and normalises its table


def convert_nllb_to_ct2(hf_dir: Path, out_dir: Path, quantization: str = "int8") -> Path:
    """Convert an NLLB/M2M100 transformers checkpoint to CTranslate2 with CT2's own converter.

    The tokenizer is saved beside the CT2 weights so one directory serves both.
    """
    import ctranslate2
    from transformers import AutoTokenizer

    converter = ctranslate2.converters.TransformersConverter(str(hf_dir))
    converter.convert(str(out_dir), quantization=quantization, force=True)
    AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(out_dir))
    (out_dir / "m3dr_conversion.json").write_text(
        json.dumps({"from": str(hf_dir), "quantization": quantization}, indent=2)
    )
    return out_dir
