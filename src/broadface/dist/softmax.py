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

from functools import partial
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


def parallel_chunked_margin_ce(weight_n: Tensor, feats_n: Tensor, target: Tensor,
                               margin: Callable[[Tensor], Tensor], scale: float, chunk_size: int = 4096,
                               group=None) -> Tensor:
    """Mean margin CE of fixed normalised ``feats_n`` (M, D) against this rank's normalised
    classes ``weight_n`` (C_r, D), chunk by chunk; gradient for ``weight_n`` only.

    ``target`` (M,) is each row's local label column or -1; ``margin`` maps target cosines to
    margin-adjusted cosines (``MarginHead.target``). Every rank must pass the same M rows.
    """
    from broadface.heads.union import ChunkedMarginCE  # here: broadface.heads imports this module

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lse = partial(_global_lse, group=group)  # the one chunk loop, with max and Σexp all-reduced
    return ChunkedMarginCE.apply(weight_n, feats_n.detach(), target, margin, scale, chunk_size, lse)
