"""The BroadFace loss (Kim, Park, Shin, ECCV 2020), in one process or over a class-sharded classifier.

``head = BroadFace(ArcFace(C, D), queue_size=8192)``; ``loss = head(e, y)`` returns one
scalar whose backward gives

- the encoder (``e``) the gradient of ``L(X)``, the mini-batch mean loss (Eq. 8), and
- the classifier ``W`` the gradient of ``L(X ∪ E*)``, the mean over the mini-batch and
  every queued embedding, each compensated by Eq. 7 ``e* = e⁻ + λ(W_y − W⁻_y)`` (Eq. 9).

The scalar's *value* is ``L(X)``, comparable with a plain margin loss; ``head.stats`` also
holds ``L(X ∪ E*)``. The batch joins the union detached, straight from the live forward pass,
and is enqueued after the loss with ``W⁻_y`` = the rows as they are now, before this step's
optimizer update. ``queue_size=0`` is exactly the plain margin loss.

The same class runs on any number of ranks: a :class:`~broadface.heads.partition.ClassPartition`
says which classes this process holds (all of them by default; :meth:`BroadFace.sharded` for a
contiguous shard per rank with all-gathered embeddings, all-reduced log-sum-exp and Partial FC
sampling). The margin contract is narrow: a :class:`MarginHead` gives ``W``, ``scale`` and the
element-wise ``target(cos_y)``, plus the few hooks of ``broadface.heads.margins`` that AdaFace, MagFace,
CurricularFace and sub-center ArcFace need (the feature norm, re-weighted negatives, batch statistics,
an encoder regulariser, K rows per class).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from broadface.heads.margins import MarginHead, check_labels, row_norm
from broadface.heads.partition import ClassPartition, init_rows
from broadface.heads.queue import (EmbeddingQueue, QueueEntries, compensate, entries_from_state, state_from_entries,
                                   subcenter_rows)
from broadface.heads.union import UNION_DTYPES, Scratch, chunked_margin_ce


@dataclass
class HeadStats:
    """Statistics of the last forward; tensors stay on the device until read (no host sync)."""

    batch_loss: Tensor  # L(X): the mini-batch (the global batch when sharded)
    union_loss: Tensor  # L(X ∪ E*); equals batch_loss without a queue
    queue_fill: int  # queued entries in the union (every rank's)
    union_size: int  # rows of the union
    sampled_classes: int  # classes of this rank the loss used
    compensation_norm: Tensor | None = None  # mean ‖e* − e⁻‖ = mean λ‖W_y − W⁻_y‖ (full storage only)

    def as_dict(self) -> dict[str, float | int | None]:
        """Python numbers (one host sync)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        keys = [k for k, v in out.items() if isinstance(v, Tensor)]
        values = torch.stack([out[k].detach().float() for k in keys]).tolist()
        return {**out, **dict(zip(keys, values))}


@dataclass(frozen=True)
class QueueDiagnostics:
    """The queue's entries oldest first (:meth:`BroadFace.diagnostics`, the paper's Fig. 5a)."""

    ids: Tensor  # sample id given at enqueue (−1: none given)
    ages: Tensor  # pushes since the entry was enqueued (0: the last push; one push per trainer step)
    labels: Tensor
    compensated: Tensor  # e* (Eq. 7 with the current W), fp32
    uncompensated: Tensor  # e⁻, fp32

    def cosine_error(self, current: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 − cos(e*, current), 1 − cos(e⁻, current))`` per entry; ``current`` holds the encoder's
        present embeddings of the same samples, in the same order."""
        cur = F.normalize(current.float(), dim=1)
        err = [1 - (F.normalize(x, dim=1) * cur).sum(1) for x in (self.compensated, self.uncompensated)]
        return err[0], err[1]


class BroadFace(nn.Module):
    """Wraps a :class:`MarginHead` with a compensated embedding queue.

    Args:
        margin: the classifier/margin (e.g. ``ArcFace(C, D)``; sharded: this rank's rows); its weight is ``W``.
        queue_size: queue entries in samples, per rank when sharded (paper: 8192 per GPU).
        compensate: apply Eq. 7; ``False`` is the paper's uncompensated ablation.
        chunk_size: rows of the union whose (rows × C) logits are alive at once; on the CPU their buffers
            stay allocated between steps in :attr:`union_buffers` (``.clear()`` frees them), since
            faulting them in afresh every step costs more than the element-wise work on them.
        storage: ``"compact"`` (u = e⁻ − λW⁻_y and λ: D+2 numbers per entry) or ``"full"`` (e⁻ and W⁻_y);
            default compact, full with ``diagnostics``.
        storage_dtype: dtype of the queued vectors (float32, bfloat16 or float16).
        union_dtype: dtype of the union's two big matmuls (logits and ∂W; float32, bfloat16 or float16), with
            fp32 log-sum-exp and fp32 sums of ∂W; the mini-batch (encoder) loss is unaffected.
        diagnostics: full storage plus each entry's sample id and push step (:meth:`diagnostics`) and the
            compensation norm in :attr:`stats`.
        partition: where the classes live (default: all in this process).
        validate_labels: check every label's range in ``forward`` (one host sync); a caller that checked
            them already (the trainer, on the host) turns it off.
    """

    def __init__(self, margin: MarginHead, queue_size: int = 8192, compensate: bool = True, chunk_size: int = 4096,
                 storage: str | None = None, storage_dtype: torch.dtype = torch.float32, diagnostics: bool = False,
                 partition: ClassPartition | None = None, validate_labels: bool = True,
                 union_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(margin, MarginHead):
            raise ValueError(f"margin must be a MarginHead (ArcFace, CosFace, ...), got {type(margin).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if union_dtype not in UNION_DTYPES:
            raise ValueError(f"union_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {union_dtype}")
        if diagnostics and storage == "compact":
            raise ValueError("diagnostics=True keeps e⁻ and W⁻_y: it needs storage='full' (or storage=None)")
        self.partition = partition or ClassPartition(margin.num_classes)
        if margin.num_classes != self.partition.num_local:
            raise ValueError(f"margin holds {margin.num_classes} classes but this rank's partition "
                             f"{self.partition.num_local} (classes {self.partition.class_start}.."
                             f"{self.partition.class_stop - 1} of {self.partition.num_classes})")
        self.margin, self.compensate, self.chunk_size = margin, compensate, chunk_size
        self.queue_size, self.validate_labels, self.union_dtype = int(queue_size), validate_labels, union_dtype
        self.queue = EmbeddingQueue(self.partition.queue_capacity(queue_size), margin.embedding_size,
                                    storage or ("full" if diagnostics else "compact"), storage_dtype,
                                    compensate=compensate, track_ids=diagnostics, keep_norms=margin.uses_norm,
                                    subcenters=margin.subcenters > 1)
        self.stats: HeadStats | None = None
        self.union_buffers = Scratch()  # the union's CPU temporaries, kept for the next step (.clear() frees)

    @classmethod
    def sharded(cls, margin: Callable[[int, int], MarginHead], num_classes: int, embedding_size: int,
                queue_size: int = 8192, *, queue_mode: str = "local", sample_rate: float = 1.0,
                encoder_grad: str = "ddp", init_seed: int | None = 0, group=None, **kwargs: Any) -> BroadFace:
        """BroadFace over this rank's classes of ``num_classes`` (``queue_size`` per rank; 0: Partial FC).

        ``margin(num_local, embedding_size)`` builds this rank's margin head, e.g.
        ``functools.partial(ArcFace, scale=64.0, margin=0.5)``. With ``init_seed`` row c of W depends
        on (seed, c) only: the same classifier on any number of ranks. No process group: one rank.
        """
        part = ClassPartition(num_classes, sample_rate, encoder_grad, queue_mode, group)
        head = margin(part.num_local, embedding_size)
        if (not isinstance(head, MarginHead) or head.weight.shape[0] != part.num_local
                or head.weight.shape[-1] != embedding_size):
            got = tuple(head.weight.shape) if isinstance(head, MarginHead) else type(head).__name__
            raise ValueError(f"margin(num_local, embedding_size) must build a MarginHead of shape "
                             f"({part.num_local}, {embedding_size}), got {got}")
        if init_seed is not None:
            init_rows(head.weight, part.class_start, init_seed)
        return cls(head, queue_size, partition=part, **kwargs)

    @property
    def weight(self) -> nn.Parameter:
        """``W``: this rank's rows ``W[class_start:class_stop]`` (all of them in one process)."""
        return self.margin.weight

    @property
    def num_classes(self) -> int:
        return self.partition.num_classes

    @property
    def embedding_size(self) -> int:
        return self.margin.embedding_size

    # ------------------------------------------------------------------ the loss
    def forward(self, embeddings: Tensor, labels: Tensor, enqueue: bool = True, ids: Tensor | None = None) -> Tensor:
        feats, y, lengths = self.partition.gather(embeddings, labels, self.embedding_size, self.validate_labels)
        n = y.shape[0]
        if self.queue.size == 0:  # the plain margin loss (Partial FC when sharded or sampled)
            weight, target = self.partition.select(self.weight, y)
            loss = self._batch_loss(feats, target, weight, lengths)
            self.stats = HeadStats(loss.detach(), loss.detach(), 0, n, weight.shape[0])
            return loss
        queue = self.partition.union_entries(self.queue.live())       # every rank's entries
        union_y = torch.cat([y, queue.labels])
        rows = self.partition.current_rows(self.weight, union_y)      # W_y now (= W⁻_y of this batch's push)
        past = compensate(queue, rows[n:])                            # Eq. 7: e*
        weight, target = self.partition.select(self.weight, union_y)
        # Eq. 8: the encoder sees the mini-batch loss L(X) only (W detached here).
        batch_loss = self._batch_loss(feats, target[:n], weight.detach(), lengths)
        # Eq. 9: the classifier sees L(X ∪ E*), the batch detached and the compensated queue.
        union = torch.cat([feats.detach().float(), past])
        union_loss = chunked_margin_ce(F.normalize(weight, dim=-1), F.normalize(union, dim=1), target,
                                       self.margin.target, self.margin.scale, self.chunk_size, self.partition.lse(),
                                       **self._union_options(feats, queue))
        self.stats = HeadStats(batch_loss.detach(), union_loss.detach(), len(queue), union.shape[0], weight.shape[0],
                               self._compensation_norm(queue, rows[n:]))
        if enqueue and self.training:
            self._push(embeddings, labels, ids, feats, y, rows[:n], lengths)
        # value L(X); d/dW = ∇L(X∪E*) (batch_loss holds no W-path), d/de = ∇L(X) (union holds no e-path)
        return batch_loss + (union_loss - union_loss.detach())

    def _batch_loss(self, feats: Tensor, target: Tensor, weight: Tensor, lengths: list[int]) -> Tensor:
        """The mini-batch loss L(X) over ``weight``'s classes (plus the margin's encoder regulariser)."""
        m, part = self.margin, self.partition
        extra = {"row_sum": part.row_sum} if m.uses_target_cos and part.sharded else {}
        loss = part.cross_entropy(m.logits(feats, target, weight, **extra), target)
        reg = m.regularizer(feats)
        if reg is None:
            return loss
        share = reg[part.own_slice(lengths)].sum() / max(feats.shape[0], 1)  # this rank's rows: their gradient
        if part.sharded:  # reaches this rank alone; the value is every rank's share
            share = share + (part.row_sum(share) - share.detach())
        return loss + share

    def _union_options(self, feats: Tensor, queue: QueueEntries) -> dict[str, Any]:
        """The union's dtype and the margin's per-row inputs (the batch's ‖e‖ and the queued ‖e⁻‖)."""
        m, opts = self.margin, {"dtype": self.union_dtype, "scratch": self.union_buffers}
        if m.uses_norm:
            opts["norm"] = torch.cat([row_norm(feats).detach(), queue.norms.float()])
        if m.negatives is not None:
            opts.update(negatives=m.negatives, row_sum=self.partition.row_sum if self.partition.sharded else None)
        return opts

    def _compensation_norm(self, queue: QueueEntries, rows_now: Tensor) -> Tensor | None:
        if queue.past_weights is None or not self.compensate or len(queue) == 0:
            return None
        rows_now = subcenter_rows(rows_now, queue.subcenters)
        return (queue.scales * (rows_now - queue.past_weights.float()).norm(dim=1)).mean()

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor, ids: Tensor | None = None,
                keep: Tensor | None = None) -> None:
        """Push ``(e⁻, y, W⁻_y)`` with the classifier rows as they are now (before the optimizer step).

        For ``forward(..., enqueue=False)``; a collective when sharded. ``ids`` are the samples' ids
        (kept with ``diagnostics``); ``keep`` (0-d bool tensor) makes the write conditional on the device.
        """
        if self.queue.size == 0:
            return
        feats, y, lengths = self.partition.gather(embeddings.detach(), labels, self.embedding_size,
                                                  self.validate_labels)
        self._push(embeddings, labels, ids, feats, y, self.partition.current_rows(self.weight, y), lengths, keep)

    def _push(self, embeddings: Tensor, labels: Tensor, ids: Tensor | None, feats: Tensor, y: Tensor, rows: Tensor,
              lengths: list[int], keep: Tensor | None = None) -> None:
        ids = ids.to(y.device) if ids is not None and self.queue.track_ids else None
        if self.partition.pushes_global:  # replicated queue (or one process): every rank pushes X_global
            ids = None if ids is None else self.partition.gather_batch(ids, lengths)
            w, sub = self._entry_rows(feats, rows)
            self.queue.push(feats, y, w, ids, keep, subcenters=sub)
        else:
            w, sub = self._entry_rows(embeddings, rows[self.partition.own_slice(lengths)])
            self.queue.push(embeddings, labels, w, ids, keep, subcenters=sub)

    @staticmethod
    def _entry_rows(e: Tensor, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """(W⁻_y, its sub-centre) per entry: with K sub-centres the one closest to e⁻, the row its max-pooled
        cosine was scored against (and the one its compensation follows for the entry's life)."""
        if rows.dim() == 2:
            return rows, None
        cos = torch.einsum("nd,nkd->nk", F.normalize(e.detach().float(), dim=1), F.normalize(rows, dim=-1))
        sub = cos.argmax(dim=1)
        return subcenter_rows(rows, sub), sub

    # ------------------------------------------------------------------ diagnostics
    @torch.no_grad()
    def diagnostics(self) -> QueueDiagnostics:
        """This rank's queue oldest first: sample ids, ages, e* and e⁻ (needs ``diagnostics=True``;
        a collective when sharded, for the current rows W_y)."""
        if not self.queue.track_ids or self.queue.storage != "full":
            raise ValueError("BroadFace.diagnostics() needs a head built with diagnostics=True (head.diagnostics)")
        ent = self.queue.entries()
        rows = self.partition.current_rows(self.weight, ent.labels)
        return QueueDiagnostics(ent.ids, self.queue.step - 1 - ent.steps, ent.labels, compensate(ent, rows),
                                ent.vectors.float())

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any] | None:
        """The world-independent state: the state_dict of the equivalent one-process head (whole W,
        every rank's queue entries in global FIFO order from slot 0). A collective when sharded:
        every rank calls it; rank 0 gets the dict (CPU tensors), the others None."""
        weight = self.partition.gather_rows(self.weight)
        entries = self.partition.merge_entries(self.queue.entries()) if self.queue.size else None
        if weight is None:
            return None
        capacity = self.queue_size * self.partition.world_size
        stats = {f"margin.{k}": v.detach().cpu().clone() for k, v in self.margin.named_buffers()}  # replicated
        return {"margin.weight": weight, **stats, "_extra_state": self._meta(world=1),
                **state_from_entries(entries, capacity, self.embedding_size, self.queue.step, self.queue.vectors.dtype)}

    @torch.no_grad()
    def load_checkpoint_state(self, state: Mapping[str, Any], drop_oldest: bool = False) -> None:
        """Take this rank's part of a state from :meth:`checkpoint_state` (or any one-process BroadFace /
        MarginHead state_dict): its rows of W and its queue entries; no communication.

        Without queue entries the queue is emptied (a warm start). Entries that do not fit raise unless
        ``drop_oldest`` (FIFO: the oldest go); a class-count or dimension mismatch is a ValueError.
        """
        weight = state.get("margin.weight", state.get("weight"))
        if weight is None:
            raise ValueError(f"not a BroadFace / margin head state (no 'margin.weight'; keys: {sorted(state)[:6]})")
        want = (self.num_classes, *self.weight.shape[1:])
        if tuple(weight.shape) != want:
            raise ValueError(f"classifier has shape {tuple(weight.shape)} (classes x dim) but this head needs "
                             f"{want}" + (" (classes x sub-centres x dim)" if len(want) == 3 else ""))
        entries, step, _ = entries_from_state(state)
        if entries is not None and len(entries):
            check_labels(entries.labels, self.num_classes)
            entries = self.partition.split_entries(entries)
        self.weight.copy_(self.partition.local_rows(weight))
        for name, buf in self.margin.named_buffers():  # batch statistics (AdaFace, CurricularFace); absent: kept
            if f"margin.{name}" in state:
                buf.copy_(state[f"margin.{name}"])
        self.queue.load(entries, step, drop_oldest)

    def _meta(self, world: int | None = None) -> dict[str, Any]:
        meta = dict(self.partition.meta(), embedding_size=self.embedding_size, queue_size=self.queue_size)
        if world == 1:
            meta.update(rank=0, world_size=1, class_start=0, class_stop=self.num_classes, queue_mode="local",
                        queue_size=self.queue_size * self.partition.world_size)
        return meta

    def get_extra_state(self) -> dict[str, Any]:
        return self._meta()

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        """Refuse the shard of another rank, world or class count before any tensor is copied."""
        mine = self._meta()
        keys = ("num_classes", "embedding_size", "rank", "world_size") + (("queue_mode",) if mine["world_size"] > 1
                                                                           else ())
        if not isinstance(state, Mapping) or any(state.get(k) != mine[k] for k in keys):
            theirs = {k: state.get(k) for k in keys} if isinstance(state, Mapping) else state
            raise ValueError(f"this state_dict is the shard {theirs} but this head is {({k: mine[k] for k in keys})}; "
                             "re-shard: head.load_checkpoint_state(merge_head_states(per-rank states))")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "_extra_state" not in state_dict and prefix + "margin.weight" in state_dict:  # broadface <= 0.1
            state_dict[prefix + "_extra_state"] = self._meta(world=1) if not self.partition.sharded else {}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        p = self.partition
        where = f", classes {p.class_start}..{p.class_stop - 1} of rank {p.rank}/{p.world_size}" if p.sharded else ""
        dtype = "" if self.union_dtype == torch.float32 else f", union_dtype={self.union_dtype}"
        return (f"queue_size={self.queue_size}, compensate={self.compensate}, chunk_size={self.chunk_size}, "
                f"sample_rate={p.sample_rate}{dtype}{where}")


def merge_head_states(states: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-rank ``state_dict()``s of a sharded head (any order, e.g. one file per rank) -> the
    world-independent state of :meth:`BroadFace.checkpoint_state`."""
    from broadface.heads.partition import class_range, merge_fifo

    if not states:
        raise ValueError("merge_head_states: no shard states given")
    metas = [s.get("_extra_state") for s in states]
    if any(not isinstance(m, Mapping) or "world_size" not in m for m in metas):
        raise ValueError("merge_head_states: every state must be a BroadFace state_dict (with '_extra_state')")
    for key in ("num_classes", "embedding_size", "world_size", "queue_mode", "queue_size"):
        if len({repr(m.get(key)) for m in metas}) > 1:
            raise ValueError(f"shard states disagree on {key}: {sorted({repr(m.get(key)) for m in metas})}")
    world, c, d = metas[0]["world_size"], metas[0]["num_classes"], metas[0]["embedding_size"]
    ranks = sorted(m["rank"] for m in metas)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        dup = sorted({r for r in ranks if ranks.count(r) > 1})
        raise ValueError(f"shard states of a {world}-rank head: missing rank(s) {missing}, duplicate rank(s) {dup}")
    by_rank = sorted(states, key=lambda s: s["_extra_state"]["rank"])
    for k, s in enumerate(by_rank):
        lo, hi = class_range(c, world, k)
        if s["margin.weight"].shape[0] != hi - lo:
            raise ValueError(f"shard of rank {k}/{world} has {s['margin.weight'].shape[0]} rows, expected {hi - lo}")
    per_rank = [entries_from_state(s) for s in by_rank]
    entries = None
    if per_rank[0][0] is not None:
        parts = [e for e, _, _ in per_rank]
        entries = parts[0] if metas[0]["queue_mode"] == "replicated" else merge_fifo(parts)
    capacity = metas[0]["queue_size"] * world
    dtype = by_rank[0].get("queue.vectors", torch.zeros(0)).dtype
    meta = dict(metas[0], rank=0, world_size=1, class_start=0, class_stop=c, queue_mode="local", queue_size=capacity)
    stats = {k: v for k, v in by_rank[0].items() if k.startswith("margin.") and k != "margin.weight"}
    return {"margin.weight": torch.cat([s["margin.weight"] for s in by_rank]), **stats, "_extra_state": meta,
            **state_from_entries(entries, capacity, d, max((s for _, s, _ in per_rank), default=0), dtype)}
