"""Margins that adapt to the sample or to the batch: AdaFace, MagFace, CurricularFace.

Each is a :class:`~broadface.heads.margins.MarginHead` through the hooks of its contract (see
``broadface.heads.margins``), so it runs in one process, with the BroadFace queue and over a
class-sharded classifier like ArcFace. Defaults are the papers' (and their official code's).

What the BroadFace queue means for each (docs/training.md, "The margin family and the queue"):

- **AdaFace, MagFace**: the margin of a row depends on its raw feature norm ‖e‖. A queued entry keeps
  ‖e⁻‖, its norm when it was enqueued (compact storage: D + 3 numbers instead of D + 2); the union
  scores ``e*`` with the margin of ‖e⁻‖. AdaFace's norm statistics (μ, σ) are EMAs updated from each
  mini-batch alone, before the mini-batch and the union losses use them.
- **CurricularFace**: ``t`` is an EMA of the mini-batch's mean target cosine (never the queue's);
  every row of the union re-weights its hard negatives with that ``t`` and its own ``cos(θ_y + m)``.
  Entries store nothing extra.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from broadface.heads.margins import _SIN2_MIN, CombinedMargin, MarginHead, row_norm


class AdaFace(MarginHead):
    """AdaFace (Kim, Jain, Liu, CVPR 2022): a margin that adapts to image quality through ‖e‖.

    ``ẑ = clip(h·(‖e‖ − μ)/(σ + ε), −1, 1)`` with ``μ, σ`` EMAs (momentum ``t_alpha``) of the batch's mean
    and standard deviation of ‖e‖ (clipped to [0.001, 100]); target ``cos(clip(θ_y − m·ẑ, ε, π − ε)) −
    (m + m·ẑ)``. The norm is detached (as in the paper: ẑ only scales the margin), ε = 10⁻³, and the
    target cosine is clamped to ±(1 − ε) before acos. Paper defaults m = 0.4, h = 0.333, s = 64,
    t_alpha = 0.01; μ, σ start at 20 and 100 as in the official code.
    """

    uses_norm = True
    eps = 1e-3

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0, margin: float = 0.4,
                 h: float = 0.333, t_alpha: float = 0.01):
        super().__init__(num_classes, embedding_size, scale)
        if not 0 < t_alpha <= 1:
            raise ValueError(f"t_alpha must be in (0, 1], got {t_alpha}")
        self.m, self.h, self.t_alpha = float(margin), float(h), float(t_alpha)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @torch.no_grad()
    def observe(self, norm: Tensor | None, cos_y: Tensor | None) -> None:
        norm = norm.clamp(0.001, 100.0)
        a = self.t_alpha
        self.batch_mean.mul_(1 - a).add_(a * norm.mean())
        if norm.numel() > 1:  # the unbiased std of one row is undefined: keep the old one
            self.batch_std.mul_(1 - a).add_(a * norm.std())

    def scaler(self, norm: Tensor) -> Tensor:
        """ẑ, the margin scaler in [−1, 1] of each row's norm (detached)."""
        z = (norm.detach().float().clamp(0.001, 100.0) - self.batch_mean) / (self.batch_std + self.eps)
        return (z * self.h).clamp(-1.0, 1.0)

    def target(self, cos_t: Tensor, norm: Tensor) -> Tensor:
        z = self.scaler(norm)
        theta = torch.acos(cos_t.float().clamp(-1 + self.eps, 1 - self.eps))
        return torch.cos((theta - self.m * z).clamp(self.eps, math.pi - self.eps)) - (self.m + self.m * z)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m={self.m}, h={self.h}, t_alpha={self.t_alpha}"


class MagFace(MarginHead):
    """MagFace (Meng et al., CVPR 2021): margin ``m(a)`` rising linearly with the magnitude a = ‖e‖.

    ``a`` clamped to [l_a, u_a], ``m(a) = l_m + (u_m − l_m)(a − l_a)/(u_a − l_a)``, target ``cos(θ_y + m(a))``
    where ``cos θ_y > 0`` and ``cos θ_y`` elsewhere (the official code's easy margin); the gradient flows
    through a into the encoder. The regulariser ``λ_g·g(a)``, ``g(a) = a/u_a² + 1/a``, is the encoder's
    alone. Paper defaults l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35, s = 64.
    """

    uses_norm = True

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_margin: float = 0.45, u_margin: float = 0.8, lambda_g: float = 35.0):
        super().__init__(num_classes, embedding_size, scale)
        if not 0 < l_a < u_a:
            raise ValueError(f"MagFace needs 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if not 0 <= l_margin <= u_margin < math.pi / 2:
            raise ValueError(f"MagFace needs 0 <= l_margin <= u_margin < π/2, got {l_margin}, {u_margin}")
        self.l_a, self.u_a, self.l_margin, self.u_margin = float(l_a), float(u_a), float(l_margin), float(u_margin)
        self.lambda_g = float(lambda_g)

    def margin_of(self, norm: Tensor) -> Tensor:
        a = norm.float().clamp(self.l_a, self.u_a)
        return self.l_margin + (self.u_margin - self.l_margin) * (a - self.l_a) / (self.u_a - self.l_a)

    def target(self, cos_t: Tensor, norm: Tensor) -> Tensor:
        m = self.margin_of(norm)
        c = cos_t.float()
        sin = torch.sqrt((1.0 - c * c).clamp_min(_SIN2_MIN))
        return torch.where(c > 0, c * torch.cos(m) - sin * torch.sin(m), c)

    def regularizer(self, embeddings: Tensor) -> Tensor:
        a = row_norm(embeddings).clamp(self.l_a, self.u_a)
        return self.lambda_g * (a / self.u_a ** 2 + 1.0 / a)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", a=[{self.l_a}, {self.u_a}], m=[{self.l_margin}, {self.u_margin}], "
                f"lambda_g={self.lambda_g}")


class CurricularFace(CombinedMargin):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace's target, hard negatives re-weighted by ``t``.

    A negative j of row i is hard where ``cos θ_j > cos(θ_y + m)``; its cosine becomes ``cos θ_j (t + cos θ_j)``.
    ``t`` is an EMA (momentum ``alpha``) of the mini-batch's mean target cosine, starting at 0, and enters
    as a constant (no gradient). The target is ArcFace's ``cos(θ_y + m)`` with the usual fallback past π − m.
    Paper defaults m = 0.5, s = 64, alpha = 0.01.
    """

    uses_target_cos = True

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0, margin: float = 0.5,
                 alpha: float = 0.01):
        super().__init__(num_classes, embedding_size, 1.0, margin, 0.0, scale)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.register_buffer("t", torch.tensor(0.0))

    @torch.no_grad()
    def observe(self, norm: Tensor | None, cos_y: Tensor | None) -> None:
        self.t.mul_(1 - self.alpha).add_(self.alpha * cos_y.float().mean())

    def negatives(self, cos: Tensor, cos_y: Tensor) -> Tensor:
        c = cos_y.float()
        hard_above = c * math.cos(self.m2) - torch.sqrt((1.0 - c * c).clamp_min(0.0)) * math.sin(self.m2)
        return torch.where(cos > hard_above, cos * (self.t + cos), cos)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}"
