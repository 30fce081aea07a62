"""Softmax cross-entropy over classes split across ranks (model parallelism, as in Partial FC).

Rank r holds the logits of its own classes only: ``z`` of shape (N, C_r) for the same N
rows on every rank. A row's target column lives on exactly one rank; the others pass
``target = -1`` for it. With ``m = max_r max_j z`` (all-reduce MAX) and
``S = Σ_r Σ_j exp(z − m)`` (all-reduce SUM), ``loss_i = log S_i + m_i − z_{i,y_i}``; the
target logit reaches every rank through the same SUM (zeros elsewhere). Every rank gets the
same loss value, and the gradient w.r.t. its own logits, ``softmax − onehot``, needs no
further communication. Collectives run in the same order on every rank, so all ranks
must call these functions with the same N (and the same chunk size).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from broadface.dist.collectives import all_reduce_


def _global_lse(z: Tensor, target_logit: Tensor, group) -> tuple[Tensor, Tensor]:
    """(log Σ_all exp z, target logit) per row, reduced over ranks; ``z`` (k, C_r) fp32."""
    m = all_reduce_(z.max(dim=1).values, "max", group)
    sums = torch.stack([torch.exp(z - m[:, None]).sum(dim=1), target_logit])
    all_reduce_(sums, "sum", group)
    return sums[0].log() + m, sums[1]


class _ParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group) -> Tensor:
        z = logits.detach().float()
        own = (target >= 0).nonzero().squeeze(1)
        t_own = target[own].long()
        tz = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        tz[own] = z[own, t_own]
        lse, tz = _global_lse(z, tz, group)
        ctx.save_for_backward(z, lse, own, t_own)
        return (lse - tz).mean()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, lse, own, t_own = ctx.saved_tensors
        g = torch.exp(z - lse[:, None])  # softmax over all classes, this rank's columns
        g[own, t_own] -= 1.0
        return g.mul_(grad_out / max(z.shape[0], 1)), None, None


def parallel_cross_entropy(logits: Tensor, target: Tensor, group=None) -> Tensor:
    """Mean CE of ``logits`` (N, C_r) whose classes are split across ranks; ``target`` is the
    local column of each row's label, or -1 where another rank owns it. Differentiable in ``logits``."""
    return _ParallelCE.apply(logits, target, group)


class _ParallelChunkedMarginCE(torch.autograd.Function):
    """Like :class:`broadface.heads.union.ChunkedMarginCE`, with the classes split across ranks."""

    @staticmethod
    def forward(ctx, weight_n: Tensor, feats_n: Tensor, target: Tensor, margin: Callable[[Tensor], Tensor],
                scale: float, chunk_size: int, group) -> Tensor:
        from broadface.heads.union import target_and_slope  # here: broadface.heads imports this module

        need_grad = ctx.needs_input_grad[0]
        n = feats_n.shape[0]
        with torch.autocast(device_type=weight_n.device.type, enabled=False):
            w = weight_n.detach().float()
            grad_w = torch.zeros_like(w) if need_grad else None
            total = torch.zeros((), dtype=torch.float64, device=w.device)
            for start in range(0, n, chunk_size):
                f = feats_n[start:start + chunk_size].float()
                t = target[start:start + chunk_size]
                own = (t >= 0).nonzero().squeeze(1)
                t_own = t[own].long()
                cos = torch.mm(f, w.t()).clamp_(-1.0, 1.0)           # (k, C_r)
                phi, slope = target_and_slope(margin, cos[own, t_own], need_grad)
                z = cos.mul_(scale)
                z[own, t_own] = scale * phi
                tz = torch.zeros(f.shape[0], dtype=z.dtype, device=z.device)
                tz[own] = scale * phi
                lse, tz = _global_lse(z, tz, group)
                total += (lse - tz).sum(dtype=torch.float64)
                if need_grad:  # ∂L/∂cos_j = s·p_j, target: s·(p_y − 1)·φ'(cos_y)
                    p = z.sub_(lse[:, None]).exp_()
                    p_y = p[own, t_own]
                    g = p.mul_(scale)
                    g[own, t_own] = scale * (p_y - 1.0) * slope
                    grad_w.addmm_(g.t(), f)
        ctx.n = n
        if need_grad:
            ctx.save_for_backward(grad_w)
        return (total / max(n, 1)).float()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad_w,) = ctx.saved_tensors
        return grad_w * (grad_out / max(ctx.n, 1)), None, None, None, None, None, None


def parallel_chunked_margin_ce(weight_n: Tensor, feats_n: Tensor, target: Tensor,
                               margin: Callable[[Tensor], Tensor], scale: float, chunk_size: int = 4096,
                               group=None) -> Tensor:
    """Mean margin CE of fixed normalised ``feats_n`` (M, D) against this rank's normalised
    classes ``weight_n`` (C_r, D), chunk by chunk; gradient for ``weight_n`` only.

    ``target`` (M,) is each row's local label column or -1; ``margin`` maps target cosines to
    margin-adjusted cosines (``MarginHead.target``). Every rank must pass the same M rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ParallelChunkedMarginCE.apply(weight_n, feats_n.detach(), target, margin, scale, chunk_size, group)
