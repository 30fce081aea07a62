"""The BroadFace loss (Kim, Park, Shin, ECCV 2020).

``head = BroadFace(ArcFace(C, D), queue_size=8192)``; ``loss = head(e, y)`` returns one
scalar whose backward gives

- the encoder (``e``) the gradient of ``L(X)``, the mini-batch mean loss (Eq. 8), and
- the classifier ``W`` the gradient of ``L(X ∪ E)``, the mean over the mini-batch and
  every queued embedding, each compensated by Eq. 7 ``e* = e⁻ + λ(W_y − W⁻_y)`` (Eq. 9).

The scalar's *value* is ``L(X)``, comparable with a plain margin loss; ``last_stats``
also reports ``L(X ∪ E)``. The batch joins the union detached, straight from the live
forward pass, and is enqueued after the loss with ``W⁻_y`` = the rows as they are now,
before this step's optimizer update. ``queue_size=0`` is exactly the plain margin loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from broadface.heads.margins import MarginHead, check_labels
from broadface.heads.queue import EmbeddingQueue
from broadface.heads.union import chunked_margin_ce


class BroadFace(nn.Module):
    """Wraps a :class:`MarginHead` with a compensated embedding queue.

    Args:
        margin: the classifier/margin (e.g. ``ArcFace(C, D)``); its weight is ``W``.
        queue_size: entries kept in the queue, in samples (paper: 8192 per GPU).
        compensate: apply Eq. 7; ``False`` is the paper's uncompensated ablation.
        chunk_size: rows of the union whose (rows × C) logits are alive at once.
        storage: ``"compact"`` (u = e⁻ − λW⁻_y and λ: D+2 numbers per entry) or ``"full"``.
        storage_dtype: dtype of the queued vectors (float32, bfloat16 or float16).
        track_ids: also keep each entry's sample id and enqueue step (for diagnostics).
    """

    def __init__(self, margin: MarginHead, queue_size: int = 8192, compensate: bool = True,
                 chunk_size: int = 4096, storage: str = "compact", storage_dtype: torch.dtype = torch.float32,
                 track_ids: bool = False):
        super().__init__()
        if not isinstance(margin, MarginHead):
            raise ValueError(f"margin must be a MarginHead (ArcFace, CosFace, ...), got {type(margin).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.margin = margin
        self.compensate = compensate
        self.chunk_size = chunk_size
        self.queue = EmbeddingQueue(queue_size, margin.embedding_size, storage, storage_dtype,
                                    compensate=compensate, track_ids=track_ids)
        self._stats: dict[str, Tensor | int | None] = {}

    @property
    def weight(self) -> nn.Parameter:
        return self.margin.weight

    @property
    def num_classes(self) -> int:
        return self.margin.num_classes

    def forward(self, embeddings: Tensor, labels: Tensor, enqueue: bool = True,
                ids: Tensor | None = None) -> Tensor:
        check_labels(labels, self.margin.num_classes, embeddings.shape[0])
        if self.queue.size == 0:  # exactly the plain margin loss
            loss = self.margin(embeddings, labels)
            self._stats = {"batch_loss": loss.detach(), "union_loss": loss.detach(), "queue_fill": 0,
                           "union_size": embeddings.shape[0], "compensation_norm": None}
            return loss

        w = self.margin.weight
        # Eq. 8: the encoder sees the mini-batch loss only (W detached here).
        batch_loss = self.margin.loss(embeddings, labels, weight=w.detach())
        # Eq. 9: the classifier sees mini-batch ∪ queue; the queue is compensated by Eq. 7.
        past = self.queue.compensated(w)                       # e*, no gradient
        feats = torch.cat([embeddings.detach().float(), past], dim=0)
        union_labels = torch.cat([labels.long(), self.queue.labels[self.queue.valid()]], dim=0)
        union_loss = chunked_margin_ce(F.normalize(w, dim=1), F.normalize(feats, dim=1), union_labels,
                                       self.margin.target, self.margin.scale, self.chunk_size)
        self._stats = {"batch_loss": batch_loss.detach(), "union_loss": union_loss.detach(),
                       "queue_fill": int(self.queue.fill), "union_size": feats.shape[0],
                       "compensation_norm": self.queue.compensation_norm(w)}
        if enqueue and self.training:
            self.enqueue(embeddings, labels, ids)
        # value L(X); d/dW = ∇L(X∪E) (batch_loss holds no W-path), d/de = ∇L(X) (union holds no e-path)
        return batch_loss + (union_loss - union_loss.detach())

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor, ids: Tensor | None = None) -> None:
        """Push ``(e⁻, y, W⁻_y)`` with the classifier rows as they are now (before the optimizer step)."""
        check_labels(labels, self.margin.num_classes, embeddings.shape[0])
        self.queue.push(embeddings, labels, self.margin.weight.detach()[labels.long()], ids)

    @property
    def last_stats(self) -> dict[str, float | int | None]:
        """Diagnostics of the last forward: losses, queue fill, union size, mean ‖compensation‖."""
        return {k: (float(v) if isinstance(v, Tensor) else v) for k, v in self._stats.items()}

    @torch.no_grad()
    def compensation_error(self, current: Tensor, slots: Tensor | None = None) -> dict[str, Tensor]:
        """Cosine error ``1 − cos(past, current)`` per queue entry (paper Fig. 5a).

        ``current`` holds the encoder's present embeddings of the samples in ``slots``
        (default: every occupied slot, oldest first as :meth:`EmbeddingQueue.order`).
        Returns ``compensated`` (e*), ``uncompensated`` (e⁻, when the queue keeps it)
        and ``age`` in steps (when built with ``track_ids=True``).
        """
        q = self.queue
        slots = q.order() if slots is None else slots.long()
        cur = F.normalize(current.float(), dim=1)
        full = torch.zeros(q.size, q.dim, device=cur.device)
        full[q.valid()] = q.compensated(self.margin.weight)
        out = {"compensated": 1 - (F.normalize(full[slots], dim=1) * cur).sum(1)}
        if q.storage == "full" or not q.compensate:
            full[q.valid()] = q.uncompensated()
            out["uncompensated"] = 1 - (F.normalize(full[slots], dim=1) * cur).sum(1)
        if q.track_ids:
            out["age"] = (q.step - 1 - q.steps[slots]).clamp_min(0)
        return out

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
