"""Margin classifiers on the unit hypersphere: ArcFace, CosFace, combined margins, normalised softmax.

All heads share one shape: a weight ``W`` of shape ``(num_classes, embedding_size)``
(as ``nn.Linear``), cosines ``cos θ_j = <e/‖e‖, W_j/‖W_j‖>``, a margin applied to the
*target* cosine only (gather → transform → scatter, never a dense N×C one-hot) and
cross-entropy on ``scale · logits`` computed in fp32, also under autocast.

The combined margin takes insightface's ``margin_list = (m1, m2, m3)`` values:
``target = cos(m1·θ + m2) − m3``. ArcFace is ``(1, m, 0)``, CosFace ``(1, 0, m)``. Same loss
values as insightface; the gradients are exact (insightface's ArcFace applies the angular margin
under ``no_grad``, so its target gradient passes straight through).

**The margin contract** (what :class:`~broadface.heads.BroadFace` and the union loss use) is ``W``,
``scale`` and the element-wise ``target(cos_y)``, widened by four optional hooks that the margins of
``broadface.heads.adaptive`` need and ArcFace / CosFace do not (their code path is unchanged):

- ``uses_norm``: ``target(cos_y, norm)`` also takes each row's raw feature norm ‖e‖ (AdaFace, MagFace);
  a queued entry keeps its ‖e⁻‖ for it (one more number per entry);
- ``negatives(cos, cos_y)``: an element-wise re-weighting of the non-target cosines given each row's
  target cosine (CurricularFace); ``uses_target_cos`` says it is there;
- ``observe(norm, cos_y)``: batch statistics (EMAs) updated from the mini-batch, once per training forward,
  before the loss uses them;
- ``regularizer(embeddings)``: a term of the encoder's loss alone (MagFace's g(a));
- ``subcenters`` K: K rows per class, ``W`` of shape (C, K, D), the cosine max-pooled over them.
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


def margin_logits(cos: Tensor, target: Tensor, margin: Callable[..., Tensor], scale: float,
                  norm: Tensor | None = None, negatives: Callable[[Tensor, Tensor], Tensor] | None = None,
                  cos_y: Tensor | None = None) -> Tensor:
    """``s·cos`` with each row's target column replaced by ``s·margin(cos_y)`` (``margin(cos_y, ‖e‖)``
    when ``norm`` is given); with ``negatives`` the other columns are ``s·negatives(cos, cos_y)`` first,
    ``cos_y`` (N,) being every row's target cosine (also for rows whose class another process holds).

    A target of −1 (the class lives in another process) leaves the row's target column as it is.
    Gather → margin → scatter: never a dense N×C one-hot, no host sync."""
    col = target.long().clamp_min(0).unsqueeze(1)
    cos_t = cos.gather(1, col)
    phi = margin(cos_t) if norm is None else margin(cos_t, norm.unsqueeze(1))
    if negatives is not None:
        cos = negatives(cos, cos_y.unsqueeze(1))
        phi = torch.where(target.unsqueeze(1) >= 0, phi, cos.gather(1, col))
    else:
        phi = torch.where(target.unsqueeze(1) >= 0, phi, cos_t)
    return cos.scatter(1, col, phi) * scale


def row_norm(embeddings: Tensor) -> Tensor:
    """The raw feature norm ‖e‖ of every row, fp32 (AdaFace's and MagFace's quality signal)."""
    return embeddings.float().norm(dim=1)


class MarginHead(nn.Module):
    """Normalised linear classifier + margin on the target logit + cross-entropy.

    Subclasses define :meth:`target`, the margin as a function of the target cosine (and the hooks of
    the module docstring where they need them). ``forward(embeddings, labels)`` returns the mean loss.
    """

    uses_norm = False  # target(cos_y, norm): needs each row's raw ‖e‖ (queued with the entry)
    uses_target_cos = False  # negatives() / observe() need every row's target cosine (all-reduced when sharded)
    negatives: Callable[[Tensor, Tensor], Tensor] | None = None  # (cos (N, C), cos_y (N, 1)) -> re-weighted cos

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0, subcenters: int = 1):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be positive, got {num_classes}, {embedding_size}")
        if subcenters < 1:
            raise ValueError(f"subcenters must be >= 1, got {subcenters}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = float(scale)
        self.subcenters = int(subcenters)
        shape = (num_classes, embedding_size) if subcenters == 1 else (num_classes, subcenters, embedding_size)
        self.weight = nn.Parameter(torch.empty(shape))
        nn.init.normal_(self.weight, std=0.01)

    def target(self, cos_t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Margin-adjusted target cosine, element-wise, fp32."""
        raise NotImplementedError

    def observe(self, norm: Tensor | None, cos_y: Tensor | None) -> None:
        """Update batch statistics from a training mini-batch (detached ‖e‖ and target cosines); default none."""

    def regularizer(self, embeddings: Tensor) -> Tensor | None:
        """Per-row loss term of the encoder alone (added to the mini-batch loss, never to the union); default none."""
        return None

    def cosine(self, embeddings: Tensor, weight: Tensor | None = None) -> Tensor:
        """(N, C) cosines in fp32, clamped to [-1, 1]. The matmul follows autocast."""
        w = self.weight if weight is None else weight
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(w, dim=1))
        return cos.float().clamp(-1.0, 1.0)

    def logits(self, embeddings: Tensor, labels: Tensor, weight: Tensor | None = None,
               row_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """(N, C) fp32 logits ``s·cos`` with the target column replaced by ``s·target(cos_y)``
        (a label of −1, a class held by another process, replaces nothing).

        For margins with batch statistics this is the mini-batch's forward: in training mode it first
        updates them from these rows (call it once per mini-batch). ``row_sum`` sums a per-row tensor
        over the processes that share the classes (the sharded head), so every one sees each row's cos_y."""
        cos = self.cosine(embeddings, weight)
        if not (self.uses_norm or self.uses_target_cos):
            return margin_logits(cos, labels, self.target, self.scale)
        norm = row_norm(embeddings) if self.uses_norm else None
        cos_y = None
        if self.uses_target_cos:
            cos_y = torch.where(labels >= 0, cos.detach().gather(1, labels.long().clamp_min(0)[:, None])[:, 0], 0.0)
            cos_y = cos_y if row_sum is None else row_sum(cos_y)
        if self.training:
            self.observe(None if norm is None else norm.detach(), cos_y)
        return margin_logits(cos, labels, self.target, self.scale, norm, self.negatives, cos_y)

    def loss(self, embeddings: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """Mean margin cross-entropy (plus the regulariser); ``weight`` overrides ``self.weight``."""
        check_labels(labels, self.num_classes, embeddings.shape[0])
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape (batch, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        loss = F.cross_entropy(self.logits(embeddings, labels, weight), labels.long())
        reg = self.regularizer(embeddings)
        return loss if reg is None else loss + reg.mean()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)

    def extra_repr(self) -> str:
        sub = f", subcenters={self.subcenters}" if self.subcenters > 1 else ""
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, scale={self.scale}{sub}"


class CombinedMargin(MarginHead):
    """``target = cos(m1·θ + m2) − m3`` (insightface's ``margin_list`` values); margins in radians.

    Where ``m1·θ + m2`` would pass π the target is no longer monotonic in θ; there the
    usual fallback ``cos θ − m3 − m2·sin(m2)`` (insightface's ``cos θ − mm``) is used.
    """

    def __init__(self, num_classes: int, embedding_size: int, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0, scale: float = 64.0, subcenters: int = 1):
        super().__init__(num_classes, embedding_size, scale, subcenters)
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


class SubCenterArcFace(CombinedMargin):
    """Sub-center ArcFace (Deng et al., ECCV 2020): K sub-centres per class, ``cos θ_j = max_k cos(e, W_jk)``,
    then ArcFace ``cos(θ_y + m)`` on the pooled target cosine. Paper defaults K = 3, m = 0.5, s = 64.

    ``W`` has shape (C, K, D): row c holds class c's sub-centres, so a class-sharded classifier splits it by
    class like any other. The max-pool sends each cosine's gradient to its dominant sub-centre only.
    (The paper's second stage, dropping non-dominant sub-centres and noisy samples, is not built.)"""

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0, margin: float = 0.5,
                 subcenters: int = 3):
        super().__init__(num_classes, embedding_size, 1.0, margin, 0.0, scale, subcenters)

    def cosine(self, embeddings: Tensor, weight: Tensor | None = None) -> Tensor:
        w = self.weight if weight is None else weight
        flat = F.normalize(w, dim=-1).reshape(-1, w.shape[-1])  # (C·K, D), class-major
        cos = F.linear(F.normalize(embeddings, dim=1), flat).float()
        return cos.view(cos.shape[0], -1, w.shape[1]).max(dim=2).values.clamp(-1.0, 1.0)
