"""The training loop: ``train(config, train_shards, pages_shards, out_dir) -> TrainResult``.

Runs as one process (CPU or one GPU) or under ``torchrun`` (one process per GPU, DDP). Under DDP each
rank embeds its share of the global batch and the document embeddings of all ranks are all-gathered
(differentiably) so every query is contrasted with every positive and hard negative of the global batch.

At production size: the frozen backbone is held in bf16 on CUDA (LoRA adapters and heads in fp32),
gradient checkpointing is on there, and ``grad_cache_chunk`` turns on GradCache
(:func:`grad_cache_backward`), so the in-batch pool grows with ``batch_size`` while memory stays that
of one chunk. Batches are decoded and collated ahead of the step by DataLoader workers (pinned memory on
CUDA); a batch depends only on its micro-step, so any number of workers trains bitwise the same.

Determinism and resume: the data order of micro-step ``g`` depends only on ``(seed, g)`` (epoch plans
and negative sampling are seeded by them), each rank's torch RNG (LoRA dropout, seeded per rank) is saved
with every checkpoint, and checkpoints are taken at optimizer-step boundaries. A run killed at any point
and restarted with ``resume=True`` continues from the last complete checkpoint and follows the same loss
trajectory as an uninterrupted run; a checkpoint is resumed only by the same config on the same number of
processes. Checkpoints are written to a temporary directory and renamed (a kill mid-write leaves no half
checkpoint that looks complete); only rank 0 writes. ``torch.load`` is only ever called with
``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tasks.shards import config_hash, hash_id
from training.config import TrainConfig, TrainResult
from training.data import (
    Batch,
    Collator,
    PageStore,
    PromptFormatter,
    batch_plan,
    example_length,
    in_store,
    load_examples,
    load_text_set,
    loader_context,
    referenced_page_ids,
    text_pairs,
)
from training.losses import InfoNCELoss, MatryoshkaLoss, colbert_loss
from training.model import (
    ADAPTER_DIR,
    FINAL_DIR,
    HEADS_FILE,
    RetrieverModel,
    build_retriever,
    hidden_size_of,
    load_processor,
    retriever_meta,
    save_weights,
)

log = logging.getLogger("m3dr.training")

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
COMPLETE_MARK = ".complete"


# ------------------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group (nccl on GPU,
    gloo on CPU). Without torchrun: a single process on cuda:0 or CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank, world, local, device)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# torch 2.14 renamed all_gather_into_tensor (deprecated alias kept) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for this rank's rows.

    Not ``torch.distributed.nn.functional.all_gather``: on gloo its backward (an all-to-all) silently
    scrambles non-contiguous gradients, which MaxSim's einsum produces. Measured here: 2 ranks'
    multi-vector parameter gradients were uncorrelated with the single-process ones (pytorch#192920
    reports the same gloo flaw for scatter/broadcast/reduce). Gradients are made contiguous and
    reduced with reduce_scatter on NCCL, all_reduce + slice elsewhere.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        total = grad.clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor, width: int, info: DistInfo) -> torch.Tensor:
    """Pad ``x`` ``[n, ...]`` to ``[width, ...]`` and all-gather along dim 0 → ``[world × width, ...]``
    (differentiable: each rank's rows get the sum of every rank's gradient for them)."""
    if x.shape[0] < width:
        pad = x.new_zeros((width - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    if not info.distributed:
        return x
    return _GatherRows.apply(x)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 of ``[n, L, ...]`` to ``length`` with zeros."""
    if x.shape[1] >= length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def gather_multi(
    emb: torch.Tensor, mask: torch.Tensor, width: int, info: DistInfo
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather multi-vector documents ``[n, L, D]`` + mask ``[n, L]``, padding L to the max over ranks."""
    length = torch.tensor([emb.shape[1]], device=emb.device)
    if info.distributed:
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
    emb = _pad_tokens(emb, int(length))
    mask = _pad_tokens(mask.long(), int(length))
    return gather_rows(emb, width, info), gather_rows(mask, width, info).bool()


# ------------------------------------------------------------------------------------------ loss


class RetrievalObjective:
    """Dense (Matryoshka-wrapped InfoNCE) and/or multi-vector (ColBERT InfoNCE) loss of one batch."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.dense = MatryoshkaLoss(
            InfoNCELoss(config.temperature), config.matryoshka_dims, config.matryoshka_weights
        )

    def __call__(
        self, q: dict[str, torch.Tensor], d: dict[str, torch.Tensor], batch: Batch, info: DistInfo
    ) -> torch.Tensor:
        width = max(batch.doc_counts)
        loss = torch.zeros((), device=batch.pos.device)
        if self.config.dense:
            docs = gather_rows(d["dense"], width, info)
            loss = loss + self.dense(q["dense"], docs, batch.pos, batch.valid)
        if self.config.multivector:
            docs, dmask = gather_multi(d["multi"], d["mask"], width, info)
            loss = loss + colbert_loss(
                q["multi"],
                q["mask"],
                docs,
                dmask,
                batch.pos,
                batch.valid,
                temperature=self.config.multivector_temperature,
            )
        return loss


# ------------------------------------------------------------------------------------------ checkpoints


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE_MARK).exists()
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s step-time randomness (LoRA dropout): its own per rank, so ranks do not
    drop the same units; rank 0 keeps ``seed`` (a single process is seeded as it always was)."""
    return seed if rank == 0 else int(hash_id("rank-seed", seed, rank, n=12), 16)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]  # checkpoints before per-rank states held every device's
        torch.cuda.set_rng_state(cuda[device.index or 0] if isinstance(cuda, list) else cuda, device)


def gather_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it; rank 0 saves them)."""
    mine = _rng_state(info.device)
    if not info.distributed:
        return [mine]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: RetrieverModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    rng: list[dict[str, Any]],
) -> Path:
    """Write ``checkpoints/step-N`` atomically (temp dir + rename + completion mark); prune old ones."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp, meta)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"ranks": rng}, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (final / COMPLETE_MARK).write_text("ok\n")
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights_into(model: RetrieverModel, src: Path) -> None:
    """Adapter + head weights of a checkpoint/final dir into an already built model."""
    from safetensors.torch import load_file

    adapter = src / ADAPTER_DIR / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model.backbone, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"adapter keys not in the model: {unexpected[:5]}")
    heads = src / HEADS_FILE
    if heads.exists():
        model.load_head_state(load_file(str(heads)))


def resume_from(
    ckpt: Path,
    model: RetrieverModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg_hash: str,
    info: DistInfo,
) -> dict[str, Any]:
    """Load a checkpoint into this rank; refuse one of another config or another number of processes."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state["config_hash"] != cfg_hash:
        raise RuntimeError(
            f"checkpoint {ckpt} was written by a different training config ({state['config_hash']} != "
            f"{cfg_hash}); use a new out_dir or resume=False"
        )
    saved_world = int(state.get("world_size", 1))
    if saved_world != info.world_size:
        raise RuntimeError(
            f"checkpoint {ckpt} was written by a run on {saved_world} process(es), this one has "
            f"{info.world_size}: the global batch (batch_size × processes) and with it the data order "
            f"and the learning-rate schedule would change mid-run. Resume with {saved_world} process(es) "
            "(train-netra `gpus`), or start a new out_dir (resume=False) for the new layout"
        )
    load_weights_into(model, ckpt)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    _set_rng_state(rng["ranks"][info.rank] if "ranks" in rng else rng, info.device)
    return state


# ------------------------------------------------------------------------------------------ helpers


def resolve_model_dir(source: str, info: DistInfo | None = None) -> Path:
    """A model source → local dir; ``recipe:`` sources are built on first use (rank 0 builds)."""
    from tasks.models import build_recipe, resolve_source

    if source.startswith("recipe:"):
        name = source.split(":", 1)[1]
        if info is None or info.is_main:
            build_recipe(name)
        if info is not None:
            _barrier(info)
    return resolve_source(source)


def autocast_context(config: TrainConfig, device: torch.device):
    """bf16 autocast where ``config`` trains in bf16 on ``device`` (see ``TrainConfig.precision``)."""
    if config.bf16(device.type):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_optimizer(model: RetrieverModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: trainable backbone params (LoRA) at ``lr``, the head(s) at ``head_lr``."""
    head_ids = {id(p) for p in model.multi_head.parameters()} if model.multi_head is not None else set()
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    heads = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    groups = [{"params": backbone, "lr": config.lr}]
    if heads:
        groups.append({"params": heads, "lr": config.head_lr or config.lr})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


class _MicroBatches(torch.utils.data.Dataset):
    """Map-style view ``i → collated micro-batch start + i`` (lets a DataLoader prefetch in workers)."""

    def __init__(self, plan_for: Any, collator: Collator, start: int, stop: int) -> None:
        self.plan_for = plan_for
        self.collator = collator
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Batch:
        g = self.start + i
        return self.collator(self.plan_for(g), g)


def _iter_batches(
    ds: _MicroBatches, num_workers: int, *, prefetch_factor: int = 2, pin_memory: bool = False
) -> Iterator[Batch]:
    """Micro-batches in order: in this process (``num_workers = 0``) or from worker processes that decode
    and collate ahead of the step (one loader for the whole run, so its workers live as long as it;
    pinned host memory for non-blocking copies to the GPU). A batch depends only on its micro-step, so
    the two give identical batches (tests/training/test_train_pipeline.py)."""
    if num_workers <= 0:
        for i in range(len(ds)):
            yield ds[i]
        return
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        persistent_workers=True,
        pin_memory=pin_memory,
        multiprocessing_context=loader_context(),
        # its own generator: a loader otherwise draws its workers' base seed from the global RNG, which
        # would shift the dropout masks of every step after it (found by the 0-vs-2-workers test)
        generator=torch.Generator().manual_seed(0),
    )
    yield from loader


# ------------------------------------------------------------------------------------------ GradCache


def _rows(inputs: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in inputs.items()}


def _spans(inputs: dict[str, torch.Tensor], chunk: int) -> list[tuple[int, int]]:
    """Row spans of ``chunk`` inputs; every tensor of a batch must be batch-first (one image per row)."""
    sizes = {v.shape[0] for v in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"GradCache splits batch-first inputs; these have row counts {sorted(sizes)}")
    n = sizes.pop()
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


class _RandomState:
    """The torch RNG state (CPU + this device's CUDA generator) before a chunk's first pass, restored
    before its second so dropout draws the same masks both times."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state = _rng_state(device)

    def restore(self) -> None:
        _set_rng_state(self.state, self.device)


def grad_cache_backward(
    embed: Any,
    batch: Batch,
    objective: RetrievalObjective,
    info: DistInfo,
    chunk: int,
    autocast: Any,
    divisor: int = 1,
) -> torch.Tensor:
    """GradCache (Gao et al. 2021): the loss of the whole micro-batch and its parameter gradients,
    accumulated into ``.grad``, with the activations of only ``chunk`` inputs alive at a time.

    1. Embed queries and documents in chunks with no graph (each chunk's RNG state kept).
    2. Loss over the detached embeddings (all-gathered across ranks as usual) and its gradient w.r.t.
       each embedding: the only place the whole batch meets, and it is small (``[B, d]`` / ``[N, L, D]``).
    3. Re-embed each chunk with a graph under its saved RNG state and back-propagate that gradient.

    ``embed(inputs) -> {name: tensor}`` is :meth:`RetrieverModel.embed`; ``autocast()`` a fresh autocast
    context; the loss is divided by ``divisor`` (gradient accumulation). Returns the detached loss.
    """
    sides = (batch.queries, batch.docs)
    reps: list[dict[str, torch.Tensor]] = []
    states: list[list[_RandomState]] = []
    with torch.no_grad():
        for inputs in sides:
            parts, rngs = [], []
            for a, b in _spans(inputs, chunk):
                rngs.append(_RandomState(info.device))
                with autocast():
                    parts.append(embed(_rows(inputs, a, b)))
            reps.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
            states.append(rngs)
    end = _RandomState(info.device)
    leaves = [{k: v.detach().requires_grad_(v.is_floating_point()) for k, v in r.items()} for r in reps]
    loss = objective(leaves[0], leaves[1], batch, info) / divisor
    loss.backward()
    for inputs, leaf, rngs in zip(sides, leaves, states, strict=True):
        for (a, b), rng in zip(_spans(inputs, chunk), rngs, strict=True):
            rng.restore()
            with autocast():
                out = embed(_rows(inputs, a, b))
            pairs = [(out[k], leaf[k].grad[a:b]) for k in out if leaf[k].grad is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    end.restore()
    return loss.detach()


def average_gradients(params: Sequence[nn.Parameter], info: DistInfo) -> None:
    """Mean of every rank's gradients in one all-reduce (what DDP does, for the GradCache path, which
    runs without the DDP wrapper: its chunked forwards would each look like an iteration to DDP)."""
    if not info.distributed:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def phase_text_examples(config: TrainConfig, examples: list, store: PageStore) -> list:
    """A text phase's examples: text → text pairs (our pages' region text, the ``text_sets``) and, for
    the ``replay`` share of batches, the multimodal examples."""
    text = text_pairs(examples, store) if config.text_from_pages else []
    for root in config.text_sets:
        docs, pairs = load_text_set(root)
        store.add_text_docs(docs)
        text += pairs
        log.info("text set %s: %d documents, %d pairs", root, len(docs), len(pairs))
    if not text:
        raise ValueError("phase 'text' has no text pairs: no page has region text and no text_sets given")
    return text + (examples if config.replay > 0 else [])


# ------------------------------------------------------------------------------------------ train


class EpochPlan:
    """Micro-step ``g`` → example indices of its global batch: epoch ``g // per_epoch``'s plan (one epoch's
    plan cached at a time), deterministic in (seed, epoch). A picklable object: it goes to the
    DataLoader's worker processes."""

    def __init__(self, config: TrainConfig, examples: list, global_batch: int, length: Any) -> None:
        self.config, self.examples, self.global_batch, self.length = config, examples, global_batch, length
        self._plans: dict[int, list[list[int]]] = {}
        self.per_epoch = len(self.epoch(0))

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            c = self.config
            self._plans = {
                epoch: batch_plan(
                    self.examples,
                    self.global_batch,
                    seed=c.seed,
                    epoch=epoch,
                    bucket_batches=c.bucket_batches,
                    length=self.length,
                    replay=c.replay if c.phase == "text" else 0.0,
                )
            }
        return self._plans[epoch]

    def __call__(self, g: int) -> list[int]:
        epoch, i = divmod(g, self.per_epoch)
        return self.epoch(epoch)[i]


@dataclass
class TrainData:
    """What the steps read: the page store, the examples and the deterministic plan of micro-batches."""

    store: PageStore
    examples: list
    global_batch: int
    plan_for: EpochPlan  # micro-step g → example indices of its global batch

    @property
    def per_epoch(self) -> int:
        """Global batches in one epoch."""
        return self.plan_for.per_epoch


def load_train_data(
    config: TrainConfig, train_shards: Sequence[str | Path], pages_shards: Sequence[str | Path], world: int
) -> TrainData:
    """Examples over a lazily read page store, and the epoch plans."""
    examples, _ = load_examples(list(train_shards), None, config.splits)  # the train shards, read once
    # index only the pages a train row can reach (positives and negatives of the splits trained on)
    store = PageStore(list(pages_shards), keep=referenced_page_ids(examples))
    examples, dropped = in_store(examples, store)
    if dropped:
        log.warning("%d train rows skipped: positive page not in the pages shards", dropped)
    if config.phase == "text":
        examples = phase_text_examples(config, examples, store)
    global_batch = config.batch_size * world
    plan = EpochPlan(config, examples, global_batch, example_length(store, config.prompts))
    if plan.per_epoch == 0:
        raise ValueError(f"{len(examples)} train examples < one global batch of {global_batch}")
    return TrainData(store, examples, global_batch, plan)


class Trainer:
    """One training run in the units a reader looks for: setup (data, model, optimizer, resume),
    :meth:`micro_step`, :meth:`optimizer_step`, :meth:`log_step`, :meth:`checkpoint`, :meth:`finish`;
    :meth:`run` strings them together."""

    def __init__(
        self,
        config: TrainConfig,
        train_shards: Sequence[str | Path],
        pages_shards: Sequence[str | Path],
        out_dir: Path,
    ) -> None:
        self.t0 = time.perf_counter()
        self.config = config
        self.out_dir = Path(out_dir)
        self.info = info = init_distributed()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)  # the model's initial weights: the same on every rank
        self.cfg_hash = config_hash(config.hash_fields())
        model_dir = resolve_model_dir(config.model, info)
        self.processor = load_processor(model_dir)
        self.data = load_train_data(config, train_shards, pages_shards, info.world_size)
        self.total = config.max_steps or max(
            1, math.ceil(config.epochs * self.data.per_epoch / config.grad_accum)
        )
        self.model = build_retriever(model_dir, config, device_type=info.device.type).to(info.device)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config)
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, config.warmup_steps, self.total)
        self.meta = retriever_meta(
            config, base_model=str(model_dir), merged=False, hidden_size=hidden_size_of(self.model.backbone)
        )
        if config.init_from:  # a previous phase's weights (a checkpoint of this run still wins below)
            load_weights_into(self.model, Path(config.init_from))
            log.info("initialised from %s", config.init_from)
        torch.manual_seed(rank_seed(config.seed, info.rank))  # dropout: each rank its own masks
        self.start, self.losses = 0, []
        self.last_ckpt = latest_checkpoint(self.out_dir) if config.resume else None
        if self.last_ckpt is not None:
            state = resume_from(
                self.last_ckpt, self.model, self.optimizer, self.scheduler, self.cfg_hash, info
            )
            self.start, self.losses = int(state["step"]), list(state["losses"])
            log.info("resumed from %s (step %d)", self.last_ckpt, self.start)
        self.resumed = self.start
        # GradCache re-runs chunks of a batch: DDP would count each as an iteration, so that path
        # averages gradients itself (average_gradients) and runs the bare model.
        self.ddp: nn.Module = self.model
        if info.distributed and not config.grad_cache_chunk:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None
            )
        self.objective = RetrievalObjective(config)
        self.data_s = self.compute_s = 0.0
        self.log_path = self.out_dir / "train_log.jsonl"

    # -- the units ------------------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """This rank's micro-batches from the resume point on (decoded ahead in workers if asked)."""
        c, info = self.config, self.info
        collator = Collator(
            PromptFormatter(self.processor, c.prompts),
            self.data.store,
            self.data.examples,
            num_negatives=c.num_negatives,
            seed=c.seed,
            rank=info.rank,
            world_size=info.world_size,
            dense=c.dense,
            multi=c.multivector,
        )
        ds = _MicroBatches(self.data.plan_for, collator, self.start * c.grad_accum, self.total * c.grad_accum)
        cuda = info.device.type == "cuda"
        return _iter_batches(ds, c.num_workers, prefetch_factor=c.prefetch_factor, pin_memory=cuda)

    def micro_step(self, batch: Batch, sync: bool) -> float:
        """Forward + backward of one micro-batch (gradients accumulate); returns its share of the loss."""
        c, info = self.config, self.info
        if c.grad_cache_chunk:
            loss = grad_cache_backward(
                self.model.embed,
                batch,
                self.objective,
                info,
                c.grad_cache_chunk,
                lambda: autocast_context(c, info.device),
                c.grad_accum,
            )
            return float(loss)
        with nullcontext() if sync else self.ddp.no_sync():
            with autocast_context(c, info.device):
                q, d = self.ddp(batch.queries, batch.docs)
            loss = self.objective(q, d, batch, info) / c.grad_accum
            loss.backward()
        return float(loss.detach())

    def optimizer_step(self) -> float:
        """Clip, step, schedule; returns the pre-clip global gradient norm (the same on every rank)."""
        if self.config.grad_cache_chunk:
            average_gradients(self.trainable, self.info)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def mean_over_ranks(self, value: float) -> float:
        if not self.info.distributed:
            return value
        t = torch.tensor([value], device=self.info.device)
        dist.all_reduce(t)
        return float(t) / self.info.world_size

    def log_step(self, done: int, loss: float, grad_norm: float) -> None:
        if not self.info.is_main:
            return
        with self.log_path.open("a") as fh:
            row = {"step": done, "loss": loss, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}
            fh.write(json.dumps(row) + "\n")
        if self.config.log_every and done % self.config.log_every == 0:
            log.info("step %d/%d loss %.4f", done, self.total, loss)

    def checkpoint(self, done: int) -> None:
        """At ``checkpoint_every`` steps and the last: every rank's RNG state, rank 0 writes."""
        every = self.config.checkpoint_every
        if not ((every and done % every == 0) or done == self.total):
            return
        rng = gather_rng_states(self.info)
        if self.info.is_main:
            state = {
                "step": done,
                "losses": self.losses,
                "config_hash": self.cfg_hash,
                "world_size": self.info.world_size,
            }
            self.last_ckpt = save_checkpoint(
                self.out_dir,
                done,
                self.model,
                self.optimizer,
                self.scheduler,
                state,
                self.meta,
                self.config.keep_checkpoints,
                rng,
            )
        _barrier(self.info)

    def finish(self) -> TrainResult:
        """The final adapter + heads (rank 0, temp dir + rename) and the result."""
        info = self.info
        final_dir = None
        if info.is_main:
            final_dir = self.out_dir / FINAL_DIR
            tmp = self.out_dir / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            save_weights(self.model, tmp, self.meta, self.processor)
            shutil.rmtree(final_dir, ignore_errors=True)
            tmp.rename(final_dir)
        _barrier(info)
        result = TrainResult(
            out_dir=self.out_dir,
            checkpoint_dir=latest_checkpoint(self.out_dir) if info.is_main else self.last_ckpt,
            final_dir=final_dir,
            steps=self.total,
            losses=self.losses,
            resumed_from_step=self.resumed,
            seconds=time.perf_counter() - self.t0,
            world_size=info.world_size,
            data_seconds=self.data_s,
            compute_seconds=self.compute_s,
        )
        if info.is_main:
            (self.out_dir / "train_result.json").write_text(result.model_dump_json(indent=1) + "\n")
        return result

    def run(self) -> TrainResult:
        c, info = self.config, self.info
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        batches = self.batches()
        for step in range(self.start, self.total):
            step_loss = 0.0
            for micro in range(c.grad_accum):
                t_data = time.perf_counter()
                batch = next(batches).to(info.device, non_blocking=info.device.type == "cuda")
                t_comp = time.perf_counter()
                self.data_s += t_comp - t_data
                sync = micro == c.grad_accum - 1 or not info.distributed
                step_loss += self.micro_step(batch, sync)
                self.compute_s += time.perf_counter() - t_comp
            t_comp = time.perf_counter()
            grad_norm = self.optimizer_step()
            step_loss = self.mean_over_ranks(step_loss)
            self.compute_s += time.perf_counter() - t_comp
            self.losses.append(step_loss)
            self.log_step(step + 1, step_loss, grad_norm)
            self.checkpoint(step + 1)
        return self.finish()


def train(
    config: TrainConfig,
    train_shards: Sequence[str | Path],
    pages_shards: Sequence[str | Path],
    out_dir: Path,
) -> TrainResult:
    """Train the retriever(s) of ``config`` on train shards over pages shards (local paths or URLs);
    write checkpoints and the final adapter + heads (``out_dir/final``) and return the loss history.

    Single process on CPU / one GPU, or one process per GPU under torchrun (rank-aware: only rank 0
    writes). With ``config.resume`` a previous run in ``out_dir`` continues from its last checkpoint.
    """
    return Trainer(config, train_shards, pages_shards, out_dir).run()
