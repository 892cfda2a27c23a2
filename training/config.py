"""Training configuration (pydantic, so the Prefect UI renders it as a form) and the training result."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.schema import TASKS

# Attention + MLP projections of the *language model* only (the SigLIP tower's modules are named
# q_proj/k_proj/... too, hence the ``language_model`` anchor). peft full-matches a string as a regex.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class LoraSettings(BaseModel):
    """LoRA on the backbone (peft). The projection head(s) are always trained in full."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    r: int = 32
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = DEFAULT_LORA_TARGETS


class PromptSettings(BaseModel):
    """How queries and pages become model inputs.

    ``style = "chat"`` (default) is NetraEmbed / ColNetraEmbed's convention, what colpali-engine's
    ``BiGemmaProcessor3`` / ``ColGemmaProcessor3`` do: both sides go through the tokenizer's chat
    template as one user turn — documents ``[image, "Describe this image"]``, queries ``"Query: …"`` —
    and the dense query ends with ``query_augmentation_dense`` ``<eos>`` tokens (``process_queries``
    appends 10; the multi-vector processor appends none). A checkpoint trained this way exports to
    colpali-engine unchanged (``m3dr export --format colpali``) and can continue from the published
    weights. ``style = "plain"`` is m3dr's shorter template with no chat turn and one ``<eos>`` pooled
    token: fewer tokens per input, for backbones without a chat template.

    In ``document``, ``{image}`` marks where the image goes and ``{text}`` the page text (empty unless
    ``doc_text = region_text``, an m3dr extension colpali's processors cannot feed); ``{query}`` in
    ``query`` is the query text. Unset fields take the style's defaults.
    """

    model_config = ConfigDict(extra="forbid")

    style: Literal["chat", "plain"] = "chat"
    query: str = "Query: {query}"
    # chat: "{image}Describe this image\n{text}"; plain: "{image}Document: {text}"
    document: str | None = None
    # ``none``: the document is its image only (production NetraEmbed/ColNetraEmbed behaviour).
    # ``region_text``: the page's region text (OCR / PDF layer / translation) is appended to the
    # prompt. Useful for the tiny profile, whose random vision tower at 64 px cannot read a page, and
    # as an ablation ("image + text" documents) at production size.
    doc_text: Literal["none", "region_text"] = "none"
    instructions: dict[str, str] = Field(
        default_factory=lambda: {
            "text-page": "",
            "composed-page": "Find the document page that shows this image and answers the question.",
            "text-text": "Find the passage that answers the query.",
        }
    )
    instruction_template: str = "Instruct: {instruction}\n"
    text_document: str = "Document: {text}"
    max_query_tokens: int = 64
    max_doc_text_tokens: int = 256
    append_eos: bool | None = None  # plain: True (the pooled last token is ``<eos>``); chat: False
    query_augmentation_dense: int | None = Field(None, ge=0)  # chat: 10 <eos> (BiGemmaProcessor3); plain: 0
    query_augmentation_multi: int | None = Field(None, ge=0)  # 0 (ColGemmaProcessor3 appends none)

    @model_validator(mode="after")
    def _style_defaults(self) -> PromptSettings:
        chat = self.style == "chat"
        if self.document is None:
            self.document = "{image}Describe this image\n{text}" if chat else "{image}Document: {text}"
        if self.append_eos is None:
            self.append_eos = not chat
        if self.query_augmentation_dense is None:
            self.query_augmentation_dense = 10 if chat else 0
        if self.query_augmentation_multi is None:
            self.query_augmentation_multi = 0
        if "{image}" not in self.document:
            raise ValueError("prompts.document must contain {image}")
        if "{text}" not in self.text_document:
            raise ValueError("prompts.text_document must contain {text}")
        unknown = sorted(set(self.instructions) - set(TASKS))
        if unknown:
            raise ValueError(f"prompts.instructions: unknown task(s) {unknown}; tasks are {list(TASKS)}")
        self.instructions = {t: self.instructions.get(t, "") for t in TASKS}
        return self

    def instruction(self, task: str) -> str:
        """The prefix a query of ``task`` gets (empty when the task has no instruction)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {list(TASKS)}")
        text = self.instructions.get(task, "")
        return self.instruction_template.format(instruction=text) if text else ""


PHASES = ("multimodal", "text")


class TrainConfig(BaseModel):
    """Everything that determines a training run (hashed into the checkpoint for resume checks)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "recipe:gemma3-tiny"  # model source: recipe:<name> | hf:<repo> | local dir
    # adapter + heads to start from (a previous phase's ``final/``); None: fresh LoRA and heads
    init_from: str | None = None
    # multimodal: train rows' queries against page images. text (MM-Embed's continual text fine-tuning):
    # batches of text → text pairs (each train row's query against its page's region text, plus the
    # ``text_sets``), with ``replay`` of the batches multimodal pairs as before.
    phase: Literal["multimodal", "text"] = "multimodal"
    replay: float = Field(0.25, ge=0.0, lt=1.0)
    text_sets: list[str] = Field(default_factory=list)  # BEIR dirs (corpus.jsonl, queries.jsonl, qrels/)
    text_from_pages: bool = True  # text phase: train rows against their page's region text
    retriever: Literal["dense", "multivector", "both"] = "dense"
    # dense (NetraEmbed-style): last-token pooled hidden state, Matryoshka prefixes of it.
    matryoshka_dims: list[int] = Field(default_factory=lambda: [16, 32, 64])  # production 768/1536/2560
    matryoshka_weights: list[float] | None = None  # one per dim; default all 1
    temperature: float = 0.02
    # multi-vector (ColNetraEmbed-style): per-token linear head.
    multivector_dim: int = 128
    multivector_temperature: float = 0.02
    # data
    batch_size: int = 8  # queries per device per micro-batch
    num_negatives: int = 1  # mined hard negatives per query (0: in-batch only)
    splits: list[str] = Field(default_factory=lambda: ["train"])  # train-shard rows to learn from
    bucket_batches: int = 8  # length bucketing: sort within windows of this many batches
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    # index: positions from column 0, padding included (transformers / NetraEmbed); mask: from each
    # row's first real token (bitwise padding-invariant rows). Same function under RoPE (training.model).
    positions: Literal["index", "mask"] = "index"
    # optimisation
    lr: float = 2e-4
    head_lr: float | None = None  # default: lr
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int | None = Field(100, ge=0)  # optimizer steps; None or 0: run ``epochs`` epochs
    epochs: float = 1.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    lora: LoraSettings = Field(default_factory=LoraSettings)
    # recompute activations in backward: memory for time (~30 %); None: on with CUDA, off on CPU
    gradient_checkpointing: bool | None = None
    # auto: on CUDA the frozen backbone's weights are bf16 and the step runs under bf16 autocast (LoRA
    # adapters and heads stay fp32: peft upcasts adapters, the heads are built fp32); fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # GradCache (Gao et al. 2021, Tevatron / sentence-transformers' CachedMNRL): embed the micro-batch
    # without a graph in chunks of this many inputs, take the loss and its gradient w.r.t. the
    # embeddings, then re-run each chunk with a graph and back-propagate that gradient. Same loss and
    # gradients as the whole batch (tests/training/test_grad_cache.py); memory set by the chunk, so the
    # in-batch pool (ranks × batch_size × (1 + num_negatives)) can grow. None: off.
    grad_cache_chunk: int | None = Field(None, ge=1)
    seed: int = 0
    # checkpoints
    checkpoint_every: int = 50  # optimizer steps; 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the last complete checkpoint in out_dir if there is one
    num_threads: int | None = None  # torch CPU threads (None: torch default)
    num_workers: int = 0  # DataLoader worker processes decoding/collating batches ahead of the step
    prefetch_factor: int = Field(2, ge=1)  # batches each worker keeps ready
    log_every: int = 10

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError("matryoshka_weights needs one weight per matryoshka dim")
        if sorted(set(self.matryoshka_dims)) != list(self.matryoshka_dims) or not self.matryoshka_dims:
            raise ValueError("matryoshka_dims must be strictly increasing and non-empty")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        return self

    @property
    def dense(self) -> bool:
        return self.retriever in ("dense", "both")

    @property
    def multivector(self) -> bool:
        return self.retriever in ("multivector", "both")

    def bf16(self, device_type: str) -> bool:
        """Whether the frozen backbone is held in bf16 and the step runs under bf16 autocast on
        ``device_type`` (see ``precision``)."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")

    def checkpointing(self, device_type: str) -> bool:
        """Whether gradient checkpointing is on for ``device_type`` (None: on CUDA only)."""
        if self.gradient_checkpointing is None:
            return device_type == "cuda"
        return self.gradient_checkpointing

    def hash_fields(self) -> dict:
        """The fields that must match for a checkpoint to be resumed (not logging/resume knobs)."""
        skip = {
            "resume",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "num_threads",
            "num_workers",
            "prefetch_factor",
            "grad_cache_chunk",  # same loss and gradients in any chunking: a memory knob
        }
        return self.model_dump(mode="json", exclude=skip)


class PhaseSettings(BaseModel):
    """One phase of a multi-phase ``train-netra`` run (``phases: [multimodal, text]``): its data mix and
    steps; unset fields keep the run's ``TrainConfig``. Phase ``i`` starts from phase ``i-1``'s weights."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["multimodal", "text"]
    max_steps: int | None = None
    lr: float | None = None  # default: the run's lr; a text phase after another phase: a quarter of it
    replay: float | None = Field(None, ge=0.0, lt=1.0)
    text_sets: list[str] | None = None
    warmup_steps: int | None = None

    def config_for(self, base: TrainConfig, init_from: str | None) -> TrainConfig:
        """The TrainConfig of this phase, continuing from ``init_from`` (None: the base model)."""
        update: dict = {"phase": self.name, "init_from": init_from}
        lr = self.lr
        if lr is None and self.name == "text" and init_from is not None:
            lr = base.lr / 4
        for key, value in (
            ("max_steps", self.max_steps),
            ("lr", lr),
            ("replay", self.replay),
            ("text_sets", self.text_sets),
            ("warmup_steps", self.warmup_steps),
        ):
            if value is not None:
                update[key] = value
        return TrainConfig.model_validate({**base.model_dump(), **update})


class TrainResult(BaseModel):
    """What ``train`` hands back: where things are and how the loss went."""

    out_dir: Path
    checkpoint_dir: Path | None  # last complete checkpoint (adapter + heads + optimizer state)
    final_dir: Path | None  # adapter + heads of the final step (rank 0)
    steps: int
    losses: list[float]  # one per optimizer step (mean over micro-batches and ranks)
    resumed_from_step: int = 0
    seconds: float = 0.0
    world_size: int = 1
    data_seconds: float = 0.0  # time waiting for batches (input pipeline), this process
    compute_seconds: float = 0.0  # forward/backward/optimizer time, this process
