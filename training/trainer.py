"""The training loop: ``train(config, train_shards, pages_shards, out_dir) -> TrainResult``.

Runs as one process (CPU or one GPU) or under ``torchrun`` (one process per GPU, DDP). Under DDP each
rank embeds its share of the global batch and the document embeddings of all ranks are all-gathered
(differentiably) so every query is contrasted with every positive and hard negative of the global batch.

Determinism and resume: the data order of micro-step ``g`` depends only on ``(seed, g)`` (epoch plans
and negative sampling are seeded by them), the torch RNG (LoRA dropout) is saved with every checkpoint,
and checkpoints are taken at optimizer-step boundaries. A run killed at any point and restarted with
``resume=True`` continues from the last complete checkpoint and follows the same loss trajectory as an
uninterrupted run. Checkpoints are written to a temporary directory and renamed (a kill mid-write
leaves no half checkpoint that looks complete); only rank 0 writes. ``torch.load`` is only ever called
with ``weights_only=True``.
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

from tasks.shards import config_hash
from training.config import TrainConfig, TrainResult
from training.data import (
    Batch,
    Collator,
    PageStore,
    PromptFormatter,
    batch_plan,
    example_length,
    load_examples,
    load_text_set,
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


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: RetrieverModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoints/step-N`` atomically (temp dir + rename + completion mark); prune old ones."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp, meta)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
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
    ckpt: Path, model: RetrieverModel, optimizer: torch.optim.Optimizer, scheduler: Any, cfg_hash: str
) -> dict[str, Any]:
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state["config_hash"] != cfg_hash:
        raise RuntimeError(
            f"checkpoint {ckpt} was written by a different training config ({state['config_hash']} != "
            f"{cfg_hash}); use a new out_dir or resume=False"
        )
    load_weights_into(model, ckpt)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
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
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if use_bf16:
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

    def __init__(self, plan_for, collator: Collator, start: int, stop: int) -> None:
        self.plan_for = plan_for
        self.collator = collator
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Batch:
        g = self.start + i
        return self.collator(self.plan_for(g), g)


def _iter_batches(ds: _MicroBatches, num_workers: int) -> Iterator[Batch]:
    if num_workers <= 0:
        for i in range(len(ds)):
            yield ds[i]
        return
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=2,
        persistent_workers=False,
    )
    yield from loader


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


def train(
    config: TrainConfig, train_shards: Sequence[Path], pages_shards: Sequence[Path], out_dir: Path
) -> TrainResult:
    """Train the retriever(s) of ``config`` on train shards over pages shards; write checkpoints and the
    final adapter + heads (``out_dir/final``) and return the loss history.

    Single process on CPU / one GPU, or one process per GPU under torchrun (rank-aware: only rank 0
    writes). With ``config.resume`` a previous run in ``out_dir`` continues from its last checkpoint.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    info = init_distributed()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    cfg_hash = config_hash(config.hash_fields())

    model_dir = resolve_model_dir(config.model, info)
    processor = load_processor(model_dir)
    store = PageStore([Path(p) for p in pages_shards])
    examples, dropped = load_examples([Path(p) for p in train_shards], store, config.splits)
    if dropped:
        log.warning("%d train rows skipped: positive page not in the pages shards", dropped)
    if config.phase == "text":
        examples = phase_text_examples(config, examples, store)
    global_batch = config.batch_size * info.world_size
    length = example_length(store, config.prompts)
    plans: dict[int, list[list[int]]] = {}

    def plan_for_epoch(epoch: int) -> list[list[int]]:
        if epoch not in plans:
            plans.clear()
            plans[epoch] = batch_plan(
                examples,
                global_batch,
                seed=config.seed,
                epoch=epoch,
                bucket_batches=config.bucket_batches,
                length=length,
                replay=config.replay if config.phase == "text" else 0.0,
            )
        return plans[epoch]

    per_epoch = len(plan_for_epoch(0))
    if per_epoch == 0:
        raise ValueError(f"{len(examples)} train examples < one global batch of {global_batch}")

    def plan_for(g: int) -> list[int]:
        epoch, i = divmod(g, per_epoch)
        return plan_for_epoch(epoch)[i]

    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))

    model = build_retriever(model_dir, config).to(info.device)
    model.train()
    optimizer = build_optimizer(model, config)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, total)
    meta = retriever_meta(
        config, base_model=str(model_dir), merged=False, hidden_size=hidden_size_of(model.backbone)
    )

    if config.init_from:  # a previous phase's weights (a checkpoint of this run still wins below)
        load_weights_into(model, Path(config.init_from))
        log.info("initialised from %s", config.init_from)
    start, losses, resumed = 0, [], 0
    ckpt = latest_checkpoint(out_dir) if config.resume else None
    if ckpt is not None:
        state = resume_from(ckpt, model, optimizer, scheduler, cfg_hash)
        start, losses, resumed = int(state["step"]), list(state["losses"]), int(state["step"])
        log.info("resumed from %s (step %d)", ckpt, start)

    ddp: nn.Module = model
    if info.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    objective = RetrievalObjective(config)
    formatter = PromptFormatter(processor, config.prompts)
    collator = Collator(
        formatter,
        store,
        examples,
        num_negatives=config.num_negatives,
        seed=config.seed,
        rank=info.rank,
        world_size=info.world_size,
        dense=config.dense,
        multi=config.multivector,
    )
    batches = _iter_batches(
        _MicroBatches(plan_for, collator, start * config.grad_accum, total * config.grad_accum),
        config.num_workers,
    )
    data_s = compute_s = 0.0
    last_ckpt = ckpt
    log_path = out_dir / "train_log.jsonl"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    for step in range(start, total):
        step_loss = 0.0
        for micro in range(config.grad_accum):
            t_data = time.perf_counter()
            batch = next(batches).to(info.device)
            t_comp = time.perf_counter()
            data_s += t_comp - t_data
            sync = micro == config.grad_accum - 1 or not info.distributed
            ctx = nullcontext() if sync else ddp.no_sync()
            with ctx:
                with autocast_context(config, info.device):
                    q, d = ddp(batch.queries, batch.docs)
                loss = objective(q, d, batch, info) / config.grad_accum
                loss.backward()
            step_loss += float(loss.detach())
            compute_s += time.perf_counter() - t_comp
        t_comp = time.perf_counter()
        # the pre-clip global norm (DDP has all-reduced the gradients: every rank sees the same one)
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad],
                config.max_grad_norm if config.max_grad_norm > 0 else math.inf,
            )
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if info.distributed:
            t = torch.tensor([step_loss], device=info.device)
            dist.all_reduce(t)
            step_loss = float(t) / info.world_size
        compute_s += time.perf_counter() - t_comp
        losses.append(step_loss)
        done = step + 1
        if info.is_main:
            with log_path.open("a") as fh:
                lr_now = scheduler.get_last_lr()[0]
                row = {"step": done, "loss": step_loss, "grad_norm": grad_norm, "lr": lr_now}
                fh.write(json.dumps(row) + "\n")
            if config.log_every and done % config.log_every == 0:
                log.info("step %d/%d loss %.4f", done, total, step_loss)
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == total:
            if info.is_main:
                state = {
                    "step": done,
                    "losses": losses,
                    "config_hash": cfg_hash,
                    "world_size": info.world_size,
                }
                last_ckpt = save_checkpoint(
                    out_dir, done, model, optimizer, scheduler, state, meta, config.keep_checkpoints
                )
            _barrier(info)
    final_dir = None
    if info.is_main:
        final_dir = out_dir / FINAL_DIR
        tmp = out_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(model, tmp, meta, processor)
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.rename(final_dir)
    _barrier(info)
    result = TrainResult(
        out_dir=out_dir,
        checkpoint_dir=latest_checkpoint(out_dir) if info.is_main else last_ckpt,
        final_dir=final_dir,
        steps=total,
        losses=losses,
        resumed_from_step=resumed,
        seconds=time.perf_counter() - t0,
        world_size=info.world_size,
        data_seconds=data_s,
        compute_seconds=compute_s,
    )
    if info.is_main:
        (out_dir / "train_result.json").write_text(result.model_dump_json(indent=1) + "\n")
    return result
