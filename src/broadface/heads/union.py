"""Classifier-only margin cross-entropy over a large set of fixed embeddings, in chunks.

BroadFace trains the classifier on ``L(X ∪ E)``: tens of thousands of (detached)
embeddings against all C classes. Materialising the (N, C) logits, or keeping them
for autograd, costs N·C floats; here the loss and its gradient w.r.t. the
normalised weight are computed together, ``chunk_size`` rows at a time, so the
working set is ``chunk_size × C`` whatever N is. Backward then only scales the
accumulated gradient.

For a row with logits ``z = s·cos`` (target column ``s·φ(cos_y)``) and ``p = softmax(z)``
(the scale rides on the matmul inputs and on ``addmm``'s alpha, so no extra pass over (k, C)):
``∂L/∂cos_j = s·p_j`` for ``j ≠ y`` and ``∂L/∂cos_y = s·(p_y − 1)·φ'(cos_y)``, and
``∂L/∂Ŵ = (∂L/∂cos)ᵀ ê``. ``φ'`` comes from autograd on the (N,) target vector alone.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def target_and_slope(target: Callable[[Tensor], Tensor], cos_t: Tensor, need_grad: bool):
    """``(φ(cos_t), φ'(cos_t))`` of an element-wise margin; the slope is None when not needed."""
    if not need_grad:
        return target(cos_t), None
    with torch.enable_grad():
        c = cos_t.detach().requires_grad_(True)
        phi = target(c)
        (slope,) = torch.autograd.grad(phi.sum(), c)
    return phi.detach(), slope


LseFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


def local_lse(z: Tensor, target_logit: Tensor) -> tuple[Tensor, Tensor]:
    """``(log Σ_j exp z_j, target logit)`` per row when this process holds every class."""
    return torch.logsumexp(z, dim=1), target_logit


class ChunkedMarginCE(torch.autograd.Function):
    """``mean_i CE(s·margin(ê_i·Ŵᵀ), y_i)`` with a gradient for ``Ŵ`` only.

    ``target`` holds each row's column in ``Ŵ``, or −1 where another rank owns the class;
    ``lse`` turns the chunk's logits (and target logits, zero where not owned) into the
    row-wise log-sum-exp and target logit: :func:`local_lse` in one process, all-reduced
    across ranks for a class-sharded classifier (:meth:`broadface.heads.partition.ClassPartition.lse`).
    Gathers and scatters with ``torch.where`` instead of boolean indexing: no host sync.
    """

    @staticmethod
    def forward(ctx, weight_n: Tensor, feats_n: Tensor, target: Tensor,
                margin: Callable[[Tensor], Tensor], scale: float, chunk_size: int, lse: LseFn) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        n = feats_n.shape[0]
        with torch.autocast(device_type=weight_n.device.type, enabled=False):
            w = weight_n.detach().float()
            grad_w = torch.zeros_like(w) if need_grad else None
            total = torch.zeros((), dtype=torch.float64, device=w.device)
            for start in range(0, n, chunk_size):
                f = feats_n[start:start + chunk_size].float()
                t = target[start:start + chunk_size]
                own, col = t >= 0, t.clamp_min(0).unsqueeze(1)
                z = torch.mm(f * scale, w.t())                       # s·cos, (k, C): the only big tensor
                z_t = z.gather(1, col).squeeze(1)
                phi, slope = target_and_slope(margin, (z_t / scale).clamp_(-1.0, 1.0), need_grad)
                tz = torch.where(own, scale * phi, 0.0)
                z.scatter_(1, col, torch.where(own, tz, z_t).unsqueeze(1))
                row_lse, tz = lse(z, tz)
                total += (row_lse - tz).sum(dtype=torch.float64)
                if need_grad:
                    p = z.sub_(row_lse.unsqueeze(1)).exp_()          # softmax, in place
                    p_t = p.gather(1, col).squeeze(1)
                    p.scatter_(1, col, torch.where(own, (p_t - 1.0) * slope, p_t).unsqueeze(1))  # ∂L/∂cos ÷ s
                    grad_w.addmm_(p.t(), f, alpha=scale)             # (C, k) @ (k, D)
        ctx.n = n
        if need_grad:
            ctx.save_for_backward(grad_w)
        return (total / max(n, 1)).to(weight_n.dtype if weight_n.is_floating_point() else torch.float32)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad_w,) = ctx.saved_tensors
        return grad_w * (grad_out / max(ctx.n, 1)), None, None, None, None, None, None


def chunked_margin_ce(weight_n: Tensor, feats_n: Tensor, target: Tensor, margin: Callable[[Tensor], Tensor],
                      scale: float, chunk_size: int = 4096, lse: LseFn = local_lse) -> Tensor:
    """Mean margin CE of fixed normalised ``feats_n`` against normalised ``weight_n``: the union loss.

    Gradients flow to ``weight_n`` only; ``feats_n`` and ``target`` (columns, −1: not held here) are data.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ChunkedMarginCE.apply(weight_n, feats_n.detach(), target, margin, scale, chunk_size, lse)
