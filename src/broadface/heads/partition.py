"""Where the classes live: all of them in one process, or a contiguous shard per rank (Partial FC).

One :class:`ClassPartition` per head. In one process (no process group, or a group of one) it
holds every class and each operation is the plain one. With ``world > 1`` rank ``k`` holds the
rows of its class range (:func:`class_range`; uneven C: the first ``C mod W`` ranks hold one
more) and the head's loss becomes model-parallel:

1. :meth:`~ClassPartition.gather` all-gathers the embeddings ``X_global`` (rank order) with a
   backward that hands each rank the gradient of its own rows summed over ranks, times the world
   size with ``encoder_grad="ddp"`` (DDP *averages* backbone gradients, so the backbone then
   receives exactly ``∇θ L(X_global)``);
2. logits are computed for the rank's own classes only, the margin applied where the rank owns
   the label (other rows carry target −1), and the softmax's max and Σexp all-reduced
   (:meth:`~ClassPartition.lse`): every rank gets the same loss;
3. with ``sample_rate < 1`` (also in one process) :meth:`~ClassPartition.select` keeps every
   positive of batch and queue plus random negatives; ``W[idx]`` is indexed with autograd, so
   the sampled rows' gradients land in their rows of ``W``.

``queue_mode`` says where the BroadFace queue lives: ``"local"`` (each rank its own entries,
gathered each step for the union) or ``"replicated"`` (every rank all ``world × queue_size``
entries, fed with ``X_global``). Checkpoints are world-independent: :meth:`gather_rows` /
:meth:`local_rows` for per-class tensors, :meth:`merge_entries` / :meth:`split_entries` for queue
entries in global FIFO order (local queues merged by age, ties by rank; global age ``a`` goes back
to rank ``W−1 − a mod W``, so merge ∘ split is the identity).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from broadface.data.seeding import derive_seed
from broadface.dist.collectives import (all_gather_tensor, all_gather_with_grad, all_reduce_, gather_lengths,
                                        gather_to, rank_world, scale_grad)
from broadface.heads.margins import check_labels
from broadface.heads.queue import QueueEntries
from broadface.heads.union import local_lse

QUEUE_MODES = ("local", "replicated")
ENCODER_GRADS = ("ddp", "global")
_INIT_BLOCK = 1024  # classes per seeded block of the world-independent initialisation


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the classes owned by ``rank``: contiguous, rank order, sizes differ by ≤ 1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if num_classes < world_size:
        raise ValueError(f"num_classes={num_classes} < world size {world_size}: every rank needs >= 1 class")
    q, r = divmod(num_classes, world_size)
    return rank * q + min(rank, r), (rank + 1) * q + min(rank + 1, r)


@torch.no_grad()
def init_rows(weight: Tensor, start: int, seed: int, std: float = 0.01) -> None:
    """N(0, std) rows for classes ``start, start+1, ...`` where row c depends only on (seed, c):
    the same classifier on any number of ranks (a row may be (K, D): a class's sub-centres)."""
    stop = start + weight.shape[0]
    for block in range(start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1):
        g = torch.Generator().manual_seed(derive_seed("classifier", seed, block))
        rows = torch.randn(_INIT_BLOCK, *weight.shape[1:], generator=g) * std
        lo, hi = max(start, block * _INIT_BLOCK), min(stop, (block + 1) * _INIT_BLOCK)
        weight[lo - start:hi - start] = rows[lo - block * _INIT_BLOCK:hi - block * _INIT_BLOCK].to(weight)


def _global_lse(z: Tensor, target_logit: Tensor, scratch: Tensor | None = None, *, group) -> tuple[Tensor, Tensor]:
    """(log Σ_all exp z, target logit) per row, reduced over ranks; ``z`` (k, C_r) fp32 (``scratch``: a buffer
    of z's shape for the exponentials)."""
    m = all_reduce_(z.max(dim=1).values, "max", group)
    e = torch.exp(z - m[:, None]) if scratch is None else torch.sub(z, m[:, None], out=scratch).exp_()
    sums = torch.stack([e.sum(dim=1), target_logit])
    all_reduce_(sums, "sum", group)
    return sums[0].log() + m, sums[1]


class _ShardedCE(torch.autograd.Function):
    """Mean CE of logits whose classes are split over ranks (target −1: another rank's class)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group) -> Tensor:
        z = logits.detach().float()
        own = (target >= 0).unsqueeze(1)
        col = target.clamp_min(0).unsqueeze(1)
        tz = torch.where(own, z.gather(1, col), 0.0).squeeze(1)
        lse, tz = _global_lse(z, tz, group=group)
        ctx.save_for_backward(z, lse, own, col)
        return (lse - tz).mean()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, lse, own, col = ctx.saved_tensors
        g = torch.exp(z - lse[:, None])  # softmax over all classes, this rank's columns
        g.scatter_add_(1, col, -own.to(g.dtype))
        return g.mul_(grad_out / max(z.shape[0], 1)), None, None


class ClassPartition:
    """This process's share of the C classes, and the collectives that make a loss over all of them."""

    def __init__(self, num_classes: int, sample_rate: float = 1.0, encoder_grad: str = "ddp",
                 queue_mode: str = "local", group=None):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if encoder_grad not in ENCODER_GRADS:
            raise ValueError(f"encoder_grad must be one of {ENCODER_GRADS}, got {encoder_grad!r}")
        if queue_mode not in QUEUE_MODES:
            raise ValueError(f"queue_mode must be one of {QUEUE_MODES}, got {queue_mode!r}")
        self.group = group
        self.rank, self.world_size = rank_world(group)
        self.num_classes = int(num_classes)
        self.class_start, self.class_stop = class_range(self.num_classes, self.world_size, self.rank)
        self.sample_rate, self.encoder_grad, self.queue_mode = float(sample_rate), encoder_grad, queue_mode
        self.num_sample = min(self.num_local, math.ceil(self.sample_rate * self.num_local))
        self.last_sampled: Tensor | None = None  # global ids of the classes used last (with sampling)

    @property
    def num_local(self) -> int:
        return self.class_stop - self.class_start

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def sampled(self) -> bool:
        return self.num_sample < self.num_local

    def queue_capacity(self, queue_size: int) -> int:
        """Entries this rank stores for ``queue_size`` per rank (replicated: every rank's)."""
        return queue_size * (self.world_size if self.queue_mode == "replicated" else 1)

    def meta(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "rank": self.rank, "world_size": self.world_size,
                "class_start": self.class_start, "class_stop": self.class_stop, "queue_mode": self.queue_mode}

    # ------------------------------------------------------------------ the loss
    def gather(self, embeddings: Tensor, labels: Tensor, dim: int, check: bool = True
               ) -> tuple[Tensor, Tensor, list[int]]:
        """(X_global with grad, its labels, per-rank batch sizes); bad input raises on every rank."""
        err = None
        try:
            if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != dim:
                shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
                raise ValueError(f"embeddings must have shape (batch, {dim}), got {shape}")
            if check:
                check_labels(labels, self.num_classes, embeddings.shape[0])
        except ValueError as e:
            err = e
        if not self.sharded:
            if err is not None:
                raise err
            return embeddings, labels.long(), [labels.shape[0]]
        device = embeddings.device if isinstance(embeddings, Tensor) else torch.device("cpu")
        # one collective carries every rank's batch size, or -1 for "my input is bad"
        lengths = gather_lengths(-1 if err is not None else embeddings.shape[0], device, self.group)
        if err is not None:
            raise err
        bad = [r for r, n in enumerate(lengths) if n < 0]
        if bad:
            raise ValueError(f"rank(s) {bad} passed invalid embeddings/labels to the sharded head (see their error)")
        factor = float(self.world_size) if self.encoder_grad == "ddp" else 1.0
        feats = all_gather_with_grad(scale_grad(embeddings, factor), self.group, lengths)
        return feats, all_gather_tensor(labels.long(), self.group, lengths), lengths

    def select(self, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(this rank's class rows to use, each label's column in them or −1); keeps every positive."""
        if not self.sharded and not self.sampled:
            return weight, labels
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        if not self.sampled:
            return weight, torch.where(owned, local, -1)
        positive = torch.unique(local[owned])
        score = torch.rand(self.num_local, device=weight.device)
        score[positive.to(score.device)] = 2.0  # > any uniform draw: positives always selected
        idx = score.topk(max(self.num_sample, positive.numel())).indices.sort().values.to(labels.device)
        self.last_sampled = idx + self.class_start
        column = torch.searchsorted(idx, local.clamp(0, self.num_local - 1))
        return weight[idx], torch.where(owned, column, -1)

    def row_sum(self, x: Tensor) -> Tensor:
        """A per-row tensor summed over ranks (each row's owner holds the value, the others 0); no autograd."""
        return all_reduce_(x.detach().clone(), "sum", self.group) if self.sharded else x

    def lse(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Row-wise (log-sum-exp over all classes, target logit) from this rank's logits."""
        return partial(_global_lse, group=self.group) if self.sharded else local_lse

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean CE over all classes of ``logits`` (N, this rank's selected classes), differentiable."""
        if not self.sharded:
            return F.cross_entropy(logits, target)
        return _ShardedCE.apply(logits, target, self.group)

    @torch.no_grad()
    def current_rows(self, weight: Tensor, labels: Tensor) -> Tensor:
        """Current ``W_y`` (fp32, detached) for every label: each owner fills its rows, one all-reduce
        (with sub-centres: the class's (K, D) rows)."""
        if not self.sharded:
            return weight.detach().float()[labels]
        uniq, inverse = torch.unique(labels, return_inverse=True)
        local = uniq - self.class_start
        own = (local >= 0) & (local < self.num_local)
        rows = torch.zeros(uniq.numel(), *weight.shape[1:], device=weight.device)
        rows[own] = weight.detach().float()[local[own]]
        return all_reduce_(rows, "sum", self.group)[inverse]

    def union_entries(self, live: QueueEntries) -> QueueEntries:
        """Every rank's queue entries for the union (a replicated queue already holds them all)."""
        if not self.sharded or self.queue_mode == "replicated":
            return live
        lengths = gather_lengths(len(live), live.labels.device, self.group)
        return live.map(lambda t: all_gather_tensor(t.float() if t.is_floating_point() else t, self.group, lengths))

    @property
    def pushes_global(self) -> bool:
        """Whether this rank enqueues the whole gathered batch (replicated queue, or one process)."""
        return not self.sharded or self.queue_mode == "replicated"

    def own_slice(self, lengths: list[int]) -> slice:
        """This rank's rows of a gathered batch."""
        start = sum(lengths[:self.rank])
        return slice(start, start + lengths[self.rank])

    def gather_batch(self, t: Tensor, lengths: list[int]) -> Tensor:
        """Every rank's rows of a per-sample tensor (e.g. sample ids), rank order; no autograd."""
        return all_gather_tensor(t, self.group, lengths) if self.sharded else t

    # ------------------------------------------------------------ checkpoints
    def gather_rows(self, t: Tensor, dst: int = 0) -> Tensor | None:
        """Collective: a per-class tensor of this shard (W, its momentum, ...) as (C, ...) on ``dst``."""
        parts = gather_to(t.detach(), dst, self.group)
        return None if parts is None else torch.cat([p.cpu() for p in parts])

    def local_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a (C, ...) tensor."""
        if full.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} rows (one per class), got {full.shape[0]}")
        return full[self.class_start:self.class_stop].clone()

    def merge_entries(self, entries: QueueEntries, dst: int = 0) -> QueueEntries | None:
        """Collective: every rank's queue entries (oldest first) as one global FIFO on ``dst``."""
        if not self.sharded:
            return entries
        parts = {k: gather_to(v, dst, self.group) for k, v in entries.tensors().items()}
        if self.rank != dst:
            return None
        per_rank = [QueueEntries(**{k: v[r].cpu() for k, v in parts.items()}) for r in range(self.world_size)]
        if self.queue_mode == "replicated":
            return per_rank[0]
        return merge_fifo(per_rank)

    def split_entries(self, entries: QueueEntries) -> QueueEntries:
        """This rank's part of a global FIFO (replicated: all of it)."""
        if not self.sharded or self.queue_mode == "replicated":
            return entries
        return split_fifo(entries, self.world_size)[self.rank]


def merge_fifo(per_rank: list[QueueEntries]) -> QueueEntries:
    """Per-rank FIFO sequences (oldest first) -> one sequence by age (oldest first), ties by rank."""
    world = len(per_rank)
    ages = [torch.arange(len(p) - 1, -1, -1) for p in per_rank]
    age, rank = torch.cat(ages), torch.cat([torch.full((len(a),), k) for k, a in enumerate(ages)])
    order = torch.argsort(-(age * world + (world - 1 - rank)), stable=True)  # age desc, then rank asc
    return QueueEntries.cat(per_rank).map(lambda t: t[order])


def split_fifo(entries: QueueEntries, world_size: int) -> list[QueueEntries]:
    """Inverse of :func:`merge_fifo`: global age ``a`` -> rank ``W−1 − a mod W``; each part oldest first."""
    age = torch.arange(len(entries) - 1, -1, -1)
    owner = world_size - 1 - age % world_size
    return [entries.map(lambda t, r=r: t[owner == r]) for r in range(world_size)]
