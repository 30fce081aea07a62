"""Model-parallel margin heads: the classifier ``W`` split by class over ranks (Partial FC),
and BroadFace on top of it.

Each rank keeps the rows of its contiguous class range (:func:`broadface.dist.reshard.class_range`;
uneven C: the first ``C mod W`` ranks hold one class more). A forward pass

1. all-gathers the embeddings ``X_global`` (N = Σ_r b_r rows, rank order) with a backward
   that hands each rank the gradient of its own rows summed over ranks;
2. computes the logits of its own classes only, with the margin applied by the rank that
   owns each label, and a softmax cross-entropy whose max and Σexp are all-reduced
   (:mod:`broadface.dist.softmax`); every rank gets the same loss ``L(X_global)``;
3. optionally keeps only ``sample_rate`` of its classes: every positive (labels of the
   batch *and* of the queue, all ranks) plus random negatives; ``W[idx]`` is indexed with
   autograd, so the sampled rows' gradients are scattered back into ``W``.

``encoder_grad="ddp"`` (default) multiplies the embeddings' gradient by the world size:
DDP *averages* backbone gradients, so the backbone then receives exactly ``∇θ L(X_global)``.
``"global"`` returns the plain ``∂L(X_global)/∂e`` (use it without DDP, e.g. to sum grads yourself).

:class:`ShardedBroadFace` adds the queue: per-rank queues (``queue_mode="local"``, the
paper's 8192 per GPU; the union is ``X_global`` ∪ every rank's queue, gathered each step) or
one replicated queue of ``world × queue_size`` entries fed with ``X_global`` (``"replicated"``:
same union, no queue traffic). Compensation ``e* = u + λW_y`` takes ``W_y`` from the owner
of ``y`` (owners fill their rows, one all-reduce). The encoder gets ``∇L(X_global)``, the
classifier ``∇L(X_global ∪ E*)``, computed chunk by chunk as in :mod:`broadface.heads.union`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from broadface.data.seeding import derive_seed
from broadface.dist.collectives import (all_gather_tensor, all_gather_with_grad, all_reduce_, gather_lengths,
                                        gather_to, rank_world, scale_grad)
from broadface.dist.reshard import (FORMAT, QUEUE_KEYS, build_full_state, check_full_state, class_range,
                                    merge_rows, queue_entries, split_queue)
from broadface.dist.softmax import parallel_chunked_margin_ce, parallel_cross_entropy
from broadface.heads.margins import MarginHead, check_labels
from broadface.heads.queue import EmbeddingQueue

QUEUE_MODES = ("local", "replicated")
_INIT_BLOCK = 1024  # classes per seeded block of the world-size independent initialisation


@torch.no_grad()
def _init_rows(weight: Tensor, start: int, seed: int, std: float = 0.01) -> None:
    """N(0, std) rows where row c depends only on (seed, c): the same W on any number of ranks."""
    stop = start + weight.shape[0]
    for block in range(start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1):
        g = torch.Generator().manual_seed(derive_seed("classifier", seed, block))
        rows = torch.randn(_INIT_BLOCK, weight.shape[1], generator=g) * std
        lo, hi = max(start, block * _INIT_BLOCK), min(stop, (block + 1) * _INIT_BLOCK)
        weight[lo - start:hi - start] = rows[lo - block * _INIT_BLOCK:hi - block * _INIT_BLOCK].to(weight)


class ShardedMarginHead(nn.Module):
    """Partial FC: margin softmax over a class-sharded classifier.

    Args:
        margin: builds the local margin head from ``(num_local_classes, embedding_size)``,
            e.g. ``functools.partial(ArcFace, scale=64.0, margin=0.5)``; its weight is this rank's W shard.
        num_classes / embedding_size: of the whole classifier.
        sample_rate: fraction of each rank's classes used per step (positives always kept).
        encoder_grad: ``"ddp"`` (× world size, for DDP's gradient averaging) or ``"global"``.
        init_seed: initialise W so row c depends on (seed, c) only; None keeps the margin's own init.
        group: process group (default: the world; no process group = one rank).
    """

    def __init__(self, margin: Callable[[int, int], MarginHead], num_classes: int, embedding_size: int,
                 sample_rate: float = 1.0, encoder_grad: str = "ddp", chunk_size: int = 4096,
                 init_seed: int | None = 0, group=None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if encoder_grad not in ("ddp", "global"):
            raise ValueError(f"encoder_grad must be 'ddp' or 'global', got {encoder_grad!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.group = group
        self.rank, self.world_size = rank_world(group)
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.class_start, self.class_stop = class_range(self.num_classes, self.world_size, self.rank)
        self.margin = margin(self.num_local, self.embedding_size)
        if not isinstance(self.margin, MarginHead):
            raise ValueError("margin must build a MarginHead (ArcFace, CosFace, ...), "
                             f"got {type(self.margin).__name__}")
        if (self.margin.num_classes, self.margin.embedding_size) != (self.num_local, self.embedding_size):
            raise ValueError("margin(num_local, embedding_size) built a head of the wrong shape "
                             f"{tuple(self.margin.weight.shape)}, expected ({self.num_local}, {self.embedding_size})")
        if init_seed is not None:
            _init_rows(self.margin.weight, self.class_start, init_seed)
        self.sample_rate, self.encoder_grad, self.chunk_size = float(sample_rate), encoder_grad, chunk_size
        self.num_sample = min(self.num_local, math.ceil(self.sample_rate * self.num_local))
        self.last_sampled: Tensor | None = None  # global ids of the classes this rank used last
        self._stats: dict[str, Any] = {}

    @property
    def weight(self) -> nn.Parameter:
        """This rank's shard ``W[class_start:class_stop]``."""
        return self.margin.weight

    @property
    def num_local(self) -> int:
        return self.class_stop - self.class_start

    @property
    def queue_size(self) -> int:
        return 0

    # ----------------------------------------------------------------- steps
    def _gather(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """(X_global with grad, labels_global, per-rank batch sizes); bad input raises on every rank."""
        err = None
        try:
            d = self.embedding_size
            if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != d:
                shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
                raise ValueError(f"embeddings must have shape (batch, {self.embedding_size}), got {shape}")
            check_labels(labels, self.num_classes, embeddings.shape[0])
        except ValueError as e:
            err = e
        if self.world_size == 1:
            if err is not None:
                raise err
            return embeddings, labels.long(), [labels.numel()]
        device = embeddings.device if isinstance(embeddings, Tensor) else torch.device("cpu")
        # one collective carries every rank's batch size, or -1 for "my input is bad"
        lengths = gather_lengths(-1 if err is not None else embeddings.shape[0], device, self.group)
        if err is not None:
            raise err
        bad = [r for r, n in enumerate(lengths) if n < 0]
        if bad:
            raise ValueError(f"rank(s) {bad} passed invalid embeddings/labels to {type(self).__name__} "
                             "(see their error)")
        factor = float(self.world_size) if self.encoder_grad == "ddp" else 1.0
        feats = all_gather_with_grad(scale_grad(embeddings, factor), self.group, lengths)
        return feats, all_gather_tensor(labels.long(), self.group, lengths), lengths

    def _select(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(this rank's class rows to use, each label's column in them or -1); keeps every positive."""
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        if self.num_sample >= self.num_local:
            self.last_sampled = torch.arange(self.class_start, self.class_stop, device=labels.device)
            return self.weight, torch.where(owned, local, -1)
        positive = torch.unique(local[owned])
        score = torch.rand(self.num_local, device=self.weight.device)
        score[positive.to(score.device)] = 2.0  # > any uniform draw: positives always selected
        idx = score.topk(max(self.num_sample, positive.numel())).indices.sort().values.to(labels.device)
        self.last_sampled = idx + self.class_start
        column = torch.searchsorted(idx, local.clamp(0, self.num_local - 1))
        return self.weight[idx], torch.where(owned, column, -1)

    def _logits(self, feats: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        """fp32 ``s·cos`` over this rank's classes with ``s·target(cos_y)`` on the rows it owns."""
        cos = self.margin.cosine(feats, weight)
        own = (target >= 0).nonzero().squeeze(1)
        col = target[own]
        phi = self.margin.target(cos[own, col])
        return (cos * self.margin.scale).index_put((own, col), phi * self.margin.scale)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean margin loss over the global batch (same value on every rank)."""
        feats, y, _ = self._gather(embeddings, labels)
        weight, target = self._select(y)
        loss = parallel_cross_entropy(self._logits(feats, weight, target), target, self.group)
        self._stats = {"batch_loss": loss.detach(), "union_loss": loss.detach(), "queue_fill": 0,
                       "union_size": y.numel(), "sampled_classes": weight.shape[0], "compensation_norm": None}
        return loss

    @property
    def last_stats(self) -> dict[str, float | int | None]:
        """Diagnostics of the last forward (global values, identical on every rank)."""
        return {k: (float(v) if isinstance(v, Tensor) else v) for k, v in self._stats.items()}

    # ----------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return {"format": FORMAT, "num_classes": self.num_classes, "embedding_size": self.embedding_size,
                "rank": self.rank, "world_size": self.world_size, "class_start": self.class_start,
                "class_stop": self.class_stop, "queue_mode": getattr(self, "queue_mode", None),
                "queue_size": self.queue_size}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        """Refuse a shard of another rank / world / class count before any tensor is copied."""
        mine = self.get_extra_state()
        keys = ("num_classes", "embedding_size", "rank", "world_size", "queue_mode", "queue_size")
        if not isinstance(state, Mapping) or any(state.get(k) != mine[k] for k in keys):
            theirs = {k: state.get(k) for k in keys} if isinstance(state, Mapping) else state
            raise ValueError(f"this state_dict is the shard {theirs} but this head is {({k: mine[k] for k in keys})}; "
                             "re-shard it: broadface.dist.merge_head_states(per-rank states) -> "
                             "head.load_full_state(...)")

    def _local_parts(self) -> tuple[dict[str, Tensor], int]:
        return {}, 0

    def gather_full_state(self, dst: int = 0) -> dict[str, Any] | None:
        """Collective: the world-independent head state (see :mod:`broadface.dist.reshard`) on rank
        ``dst`` (CPU tensors), None on the other ranks. Every rank must call it."""
        queue, step = self._local_parts()
        weights = gather_to(self.weight.detach(), dst, self.group)
        parts = {k: gather_to(v, dst, self.group) for k, v in queue.items()}
        steps = gather_to(torch.tensor([step], device=self.weight.device), dst, self.group)
        if weights is None:
            return None
        meta = self.get_extra_state()
        metas = [dict(meta, rank=r) for r in range(self.world_size)]
        queues = [{k: parts[k][r].cpu() for k in QUEUE_KEYS} for r in range(self.world_size)] if queue else []
        return build_full_state(metas, [w.cpu() for w in weights], queues, [int(s) for s in steps])

    def gather_rows(self, t: Tensor, dst: int = 0) -> Tensor | None:
        """Collective: a per-class tensor of this shard (e.g. W's momentum buffer) as (C, ...) on ``dst``."""
        parts = gather_to(t.detach(), dst, self.group)
        return None if parts is None else merge_rows([p.cpu() for p in parts], self.num_classes)

    def local_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a (C, ...) tensor (to re-shard optimizer state on load)."""
        if full.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} rows (one per class), got {full.shape[0]}")
        return full[self.class_start:self.class_stop].clone()

    @torch.no_grad()
    def load_full_state(self, full: Mapping[str, Any], drop_oldest: bool = False) -> None:
        """Take this rank's part of a world-independent state (no communication).

        Queue entries that do not fit this rank's queue raise unless ``drop_oldest`` (FIFO order).
        """
        check_full_state(full, self.num_classes, self.embedding_size)
        self.weight.copy_(full["weight"][self.class_start:self.class_stop])
        self._load_queue(full, drop_oldest)

    def _load_queue(self, full: Mapping[str, Any], drop_oldest: bool) -> None:
        q = full.get("queue")
        if q is not None and len(q["labels"]) and not drop_oldest:
            raise ValueError(f"the checkpoint holds {len(q['labels'])} queued embeddings but this head has no queue; "
                             "pass drop_oldest=True to discard them")

    def extra_repr(self) -> str:
        return (f"classes={self.class_start}..{self.class_stop - 1} of {self.num_classes}, rank={self.rank}/"
                f"{self.world_size}, sample_rate={self.sample_rate}, encoder_grad={self.encoder_grad}")


class ShardedBroadFace(ShardedMarginHead):
    """BroadFace over a class-sharded classifier (see the module docstring).

    ``queue_size`` counts entries *per rank* in both modes, so the union always holds
    ``world × queue_size`` past embeddings. The loss value is ``L(X_global)``; ``last_stats``
    also reports ``L(X_global ∪ E*)``.
    """

    def __init__(self, margin: Callable[[int, int], MarginHead], num_classes: int, embedding_size: int,
                 queue_size: int = 8192, queue_mode: str = "local", compensate: bool = True,
                 sample_rate: float = 1.0, encoder_grad: str = "ddp", chunk_size: int = 4096,
                 storage_dtype: torch.dtype = torch.float32, init_seed: int | None = 0, group=None):
        super().__init__(margin, num_classes, embedding_size, sample_rate, encoder_grad, chunk_size, init_seed, group)
        if queue_mode not in QUEUE_MODES:
            raise ValueError(f"queue_mode must be one of {QUEUE_MODES}, got {queue_mode!r}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.queue_mode, self.compensate, self._queue_size = queue_mode, compensate, int(queue_size)
        capacity = queue_size if queue_mode == "local" else queue_size * self.world_size
        self.queue = EmbeddingQueue(capacity, embedding_size, "compact", storage_dtype, compensate=compensate,
                                    probe_rows=0)

    @property
    def queue_size(self) -> int:
        return self._queue_size

    def _union_queue(self) -> tuple[Tensor, Tensor, Tensor]:
        """(u, λ, y) of every rank's queue entries (the replicated queue is already all of them)."""
        s = self.queue.valid()
        u, lam, y = self.queue.vectors[s].float(), self.queue.scales[s], self.queue.labels[s]
        if self.queue_mode == "local" and self.world_size > 1:
            lengths = gather_lengths(y.numel(), y.device, self.group)
            u, lam, y = (all_gather_tensor(t, self.group, lengths) for t in (u, lam, y))
        return u, lam, y

    @torch.no_grad()
    def _rows(self, labels: Tensor) -> Tensor:
        """Current ``W_y`` (fp32, detached) for every label: each owner fills its rows, one all-reduce."""
        uniq, inverse = torch.unique(labels, return_inverse=True)
        local = uniq - self.class_start
        own = (local >= 0) & (local < self.num_local)
        rows = torch.zeros(uniq.numel(), self.embedding_size, device=self.weight.device)
        rows[own] = self.weight.detach().float()[local[own]]
        return all_reduce_(rows, "sum", self.group)[inverse]

    def forward(self, embeddings: Tensor, labels: Tensor, enqueue: bool = True) -> Tensor:
        if self.queue_size == 0:
            return super().forward(embeddings, labels)
        feats, y, lengths = self._gather(embeddings, labels)
        u, lam, qy = self._union_queue()
        n = y.numel()
        union_labels = torch.cat([y, qy])
        rows = self._rows(union_labels)                       # W_y now (= W⁻_y for this batch's push)
        past = u + lam[:, None] * rows[n:]                    # Eq. 7: e* = u + λW_y (all ranks' entries)
        weight, target = self._select(union_labels)
        # Eq. 8: the encoder sees L(X_global), W detached.
        batch_loss = parallel_cross_entropy(self._logits(feats, weight.detach(), target[:n]), target[:n], self.group)
        # Eq. 9: the classifier sees L(X_global ∪ E*), every rank's queue, compensated.
        union = torch.cat([feats.detach().float(), past])
        union_loss = parallel_chunked_margin_ce(F.normalize(weight, dim=1), F.normalize(union, dim=1), target,
                                                self.margin.target, self.margin.scale, self.chunk_size, self.group)
        self._stats = {"batch_loss": batch_loss.detach(), "union_loss": union_loss.detach(),
                       "queue_fill": qy.numel(), "union_size": union.shape[0], "sampled_classes": weight.shape[0],
                       "compensation_norm": None}
        if enqueue and self.training:
            self._push(embeddings, labels, feats, y, rows[:n], lengths)
        return batch_loss + (union_loss - union_loss.detach())

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Collective: push a batch with ``W⁻_y`` = the rows as they are now (for ``forward(..., enqueue=False)``)."""
        if self.queue_size == 0:
            return
        feats, y, lengths = self._gather(embeddings.detach(), labels)
        self._push(embeddings, labels, feats, y, self._rows(y), lengths)

    def _push(self, embeddings: Tensor, labels: Tensor, feats: Tensor, y: Tensor, rows: Tensor,
              lengths: list[int]) -> None:
        if self.queue_mode == "replicated":  # every rank pushes X_global: the queues stay identical
            self.queue.push(feats.detach(), y, rows)
        else:
            start = sum(lengths[:self.rank])
            self.queue.push(embeddings.detach(), labels, rows[start:start + embeddings.shape[0]])

    def _local_parts(self) -> tuple[dict[str, Tensor], int]:
        state = {k: v for k, v in self.queue.state_dict().items()}
        return (queue_entries(state, prefix="") if self.queue_size else {}), int(self.queue.step)

    def _load_queue(self, full: Mapping[str, Any], drop_oldest: bool) -> None:
        q = self.queue
        if q.size == 0:
            return super()._load_queue(full, drop_oldest)
        entries = split_queue(full, self.world_size, self.rank, self.queue_mode, q.size, drop_oldest)
        n = len(entries["labels"]) if entries else 0
        if n:
            check_labels(entries["labels"], self.num_classes)
            if entries["vectors"].shape[1] != q.dim:
                raise ValueError(f"checkpoint queue vectors have {entries['vectors'].shape[1]} columns, "
                                 f"expected {q.dim}")
        q.vectors.zero_()
        q.scales.zero_()
        q.labels.zero_()
        if n:
            q.vectors[:n] = entries["vectors"].to(q.vectors)
            q.scales[:n] = entries["scales"].to(q.scales)
            q.labels[:n] = entries["labels"].to(q.labels)
        q.ptr.fill_(n % q.size)
        q.fill.fill_(n)
        q.step.fill_(int(full["queue"]["step"]) if full.get("queue") else 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", queue_size={self.queue_size} per rank, queue_mode={self.queue_mode}"
