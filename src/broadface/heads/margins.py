"""Margin classifiers on the unit hypersphere: ArcFace, CosFace, combined margins, normalised softmax.

All heads share one shape: a weight ``W`` of shape ``(num_classes, embedding_size)``
(as ``nn.Linear``), cosines ``cos θ_j = <e/‖e‖, W_j/‖W_j‖>``, a margin applied to the
*target* cosine only (gather → transform → scatter, never a dense N×C one-hot) and
cross-entropy on ``scale · logits`` computed in fp32, also under autocast.

The combined margin takes insightface's ``margin_list = (m1, m2, m3)`` values:
``target = cos(m1·θ + m2) − m3``. ArcFace is ``(1, m, 0)``, CosFace ``(1, 0, m)``. Same loss
values as insightface; the gradients are exact (insightface's ArcFace applies the angular margin
under ``no_grad``, so its target gradient passes straight through).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Keep derivatives finite at cos = ±1: sin²θ is floored at _SIN2_MIN (forward error < 1e-6)
# and acos (general m1 only) sees cosines at most 1 − _EPS.
_SIN2_MIN = 1e-12
_EPS = 1e-7


def check_labels(labels: Tensor, num_classes: int, batch_size: int | None = None, *,
                 allow_unlabeled: bool = False) -> None:
    """Raise ValueError unless ``labels`` is a 1-D integer tensor with values in [0, num_classes)
    (or −1 too, with ``allow_unlabeled``). One host sync (the range test), none on the type checks."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {tuple(labels.shape)}")
    if batch_size is not None and labels.numel() != batch_size:
        raise ValueError(f"got {labels.numel()} labels for {batch_size} embeddings")
    if labels.numel() == 0:
        return
    bad = (labels < (-1 if allow_unlabeled else 0)) | (labels >= num_classes)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"label {value} is outside [0, {num_classes}) (num_classes={num_classes})")


def margin_logits(cos: Tensor, target: Tensor, margin: Callable[[Tensor], Tensor], scale: float) -> Tensor:
    """``s·cos`` with each row's target column replaced by ``s·margin(cos_y)``.

    A target of −1 (the class lives in another process) leaves the row's cosines as they are.
    Gather → margin → scatter: never a dense N×C one-hot, no host sync."""
    col = target.long().clamp_min(0).unsqueeze(1)
    cos_t = cos.gather(1, col)
    phi = torch.where(target.unsqueeze(1) >= 0, margin(cos_t), cos_t)
    return cos.scatter(1, col, phi) * scale


class MarginHead(nn.Module):
    """Normalised linear classifier + margin on the target logit + cross-entropy.

    Subclasses define :meth:`target`, the margin as a function of the target cosine.
    ``forward(embeddings, labels)`` returns the mean loss over the batch.
    """

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be positive, got {num_classes}, {embedding_size}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def target(self, cos_t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Margin-adjusted target cosine, element-wise, fp32."""
        raise NotImplementedError

    def cosine(self, embeddings: Tensor, weight: Tensor | None = None) -> Tensor:
        """(N, C) cosines in fp32, clamped to [-1, 1]. The matmul follows autocast."""
        w = self.weight if weight is None else weight
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(w, dim=1))
        return cos.float().clamp(-1.0, 1.0)

    def logits(self, embeddings: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """(N, C) fp32 logits ``s·cos`` with the target column replaced by ``s·target(cos_y)``
        (a label of −1, a class held by another process, replaces nothing)."""
        return margin_logits(self.cosine(embeddings, weight), labels, self.target, self.scale)

    def loss(self, embeddings: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """Mean margin cross-entropy; ``weight`` overrides ``self.weight`` (e.g. a detached copy)."""
        check_labels(labels, self.num_classes, embeddings.shape[0])
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape (batch, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        return F.cross_entropy(self.logits(embeddings, labels, weight), labels.long())

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, scale={self.scale}"


class CombinedMargin(MarginHead):
    """``target = cos(m1·θ + m2) − m3`` (insightface's ``margin_list`` values); margins in radians.

    Where ``m1·θ + m2`` would pass π the target is no longer monotonic in θ; there the
    usual fallback ``cos θ − m3 − m2·sin(m2)`` (insightface's ``cos θ − mm``) is used.
    """

    def __init__(self, num_classes: int, embedding_size: int, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0, scale: float = 64.0):
        super().__init__(num_classes, embedding_size, scale)
        if m1 <= 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"m2 must be in [0, π) radians, got {m2}")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        theta_max = (math.pi - self.m2) / self.m1  # beyond this, m1·θ+m2 > π
        self._cos_theta_max = math.cos(theta_max) if theta_max < math.pi else -2.0
        self._fallback = self.m2 * math.sin(self.m2)

    def target(self, cos_t: Tensor) -> Tensor:
        cos_t = cos_t.float()
        if self.m1 == 1.0 and self.m2 == 0.0:  # pure additive cosine margin: exact, no clamp
            return cos_t - self.m3
        c = cos_t
        if self.m1 == 1.0:  # cos(θ+m2) = cos θ cos m2 − sin θ sin m2, exact up to θ = 0
            sin = torch.sqrt((1.0 - c * c).clamp_min(_SIN2_MIN))  # clamped ⇒ zero slope, never inf
            phi = c * math.cos(self.m2) - sin * math.sin(self.m2)
        else:
            phi = torch.cos(self.m1 * torch.acos(c.clamp(-1.0 + _EPS, 1.0 - _EPS)) + self.m2)
        phi = torch.where(c > self._cos_theta_max, phi, c - self._fallback)
        return phi - self.m3

    def extra_repr(self) -> str:
        return super().extra_repr() + f", margins=({self.m1}, {self.m2}, {self.m3})"


class ArcFace(CombinedMargin):
    """Additive angular margin: ``target = cos(θ + m)`` (Deng et al., CVPR 2019)."""

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0, margin: float = 0.5):
        super().__init__(num_classes, embedding_size, 1.0, margin, 0.0, scale)


class CosFace(CombinedMargin):
    """Additive cosine margin: ``target = cos θ − m`` (Wang et al., CVPR 2018)."""

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0, margin: float = 0.4):
        super().__init__(num_classes, embedding_size, 1.0, 0.0, margin, scale)


class NormSoftmax(MarginHead):
    """Normalised softmax: cosine logits scaled by ``s``, no margin."""

    def target(self, cos_t: Tensor) -> Tensor:
        return cos_t.float()
