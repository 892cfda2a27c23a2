"""Contrastive losses for the dense and the multi-vector retriever.

Conventions (shared by every loss here):

- ``q``: query embeddings of this device, ``[B, d]`` (dense) or ``[B, Lq, D]`` + mask ``[B, Lq]``.
- ``docs``: every candidate document the queries are contrasted with, ``[N, d]`` or ``[N, Ld, D]`` +
  mask ``[N, Ld]``: the positives of the (possibly all-gathered) batch, then mined hard negatives.
- ``pos``: ``[B]`` long, index of each query's positive in ``docs``.
- ``valid``: optional ``[B, N]`` bool, False where a document must not count as a negative (another
  page of the query's parallel group, the same page twice in a batch, padding from an uneven gather).
  The positive itself is always kept.

InfoNCE is cross-entropy over ``scores / temperature`` with the positive as target (in-batch negatives
come for free from the other queries' positives). Matryoshka wraps any dense loss and sums it over
prefix truncations of the embeddings. The ColBERT loss scores with MaxSim normalised by query length so
scores stay in [-1, 1] and one temperature fits queries of any length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

DenseLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or kept as is when wider (fp64 runs: the GradCache tests compare in fp64, where
    summation order cannot hide a wrong gradient)."""
    return x if x.dtype == torch.float64 else x.float()


def _masked_ce(scores: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of ``scores`` [B, N] against ``pos`` [B], with invalid candidates removed."""
    if valid is not None:
        keep = valid.clone()
        keep[torch.arange(len(pos), device=pos.device), pos] = True
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return F.cross_entropy(scores, pos)


def info_nce(
    q: torch.Tensor,
    docs: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    temperature: float = 0.02,
) -> torch.Tensor:
    """InfoNCE over unit vectors. q ``[B, d]``, docs ``[N, d]``, pos ``[B]`` → scalar.

    Inputs are (re-)normalised here so the loss is a cosine loss whatever the caller passes.
    """
    q = F.normalize(at_least_fp32(q), dim=-1)
    docs = F.normalize(at_least_fp32(docs), dim=-1)
    return _masked_ce(q @ docs.T / temperature, pos, valid)


class InfoNCELoss:
    """:func:`info_nce` with a fixed temperature, as a callable usable inside :class:`MatryoshkaLoss`."""

    def __init__(self, temperature: float = 0.02) -> None:
        self.temperature = temperature

    def __call__(
        self, q: torch.Tensor, docs: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return info_nce(q, docs, pos, valid, temperature=self.temperature)


class MatryoshkaLoss:
    """Wrap a dense loss: weighted sum of it over the leading ``dims`` of the embeddings.

    Each truncation ``x[..., :d]`` is re-normalised by the wrapped loss, which is what inference does
    when it truncates: one training run serves every listed dimension. q ``[B, D]``, docs ``[N, D]``
    with ``D >= max(dims)``.
    """

    def __init__(self, loss: DenseLoss, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        if not dims:
            raise ValueError("MatryoshkaLoss needs at least one dim")
        self.loss = loss
        self.dims = list(dims)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.dims)
        if len(self.weights) != len(self.dims):
            raise ValueError("one weight per dim")

    def __call__(
        self, q: torch.Tensor, docs: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        if q.shape[-1] < max(self.dims):
            raise ValueError(f"embeddings have {q.shape[-1]} dims < matryoshka dim {max(self.dims)}")
        total = q.new_zeros((), dtype=torch.float32)
        for dim, weight in zip(self.dims, self.weights, strict=True):
            total = total + weight * self.loss(q[..., :dim], docs[..., :dim], pos, valid)
        return total

    def per_dim(
        self, q: torch.Tensor, docs: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None = None
    ) -> dict[int, float]:
        """Unweighted loss per dimension (for logging)."""
        with torch.no_grad():
            return {d: float(self.loss(q[..., :d], docs[..., :d], pos, valid)) for d in self.dims}


def maxsim(q: torch.Tensor, q_mask: torch.Tensor, docs: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """Late-interaction scores. q ``[B, Lq, D]``, q_mask ``[B, Lq]``, docs ``[N, Ld, D]``, d_mask
    ``[N, Ld]`` → ``[B, N]``: Σ over valid query tokens of the max over valid document tokens of the dot.
    """
    sim = torch.einsum("bqd,nkd->bnqk", at_least_fp32(q), at_least_fp32(docs))  # [B, N, Lq, Ld]
    sim = sim.masked_fill(~d_mask.bool()[None, :, None, :], torch.finfo(sim.dtype).min)
    best = sim.max(dim=-1).values  # [B, N, Lq]
    best = best.masked_fill(~q_mask.bool()[:, None, :], 0.0)
    return best.sum(dim=-1)


def colbert_loss(
    q: torch.Tensor,
    q_mask: torch.Tensor,
    docs: torch.Tensor,
    d_mask: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    temperature: float = 0.02,
) -> torch.Tensor:
    """ColBERT InfoNCE: MaxSim scores divided by each query's token count, over ``temperature``.

    q ``[B, Lq, D]`` (unit rows), q_mask ``[B, Lq]``, docs ``[N, Ld, D]``, d_mask ``[N, Ld]``,
    pos ``[B]`` → scalar.
    """
    scores = maxsim(q, q_mask, docs, d_mask)
    lengths = q_mask.sum(dim=1).clamp(min=1).to(scores.dtype)[:, None]
    return _masked_ce(scores / lengths / temperature, pos, valid)
