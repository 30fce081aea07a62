"""Independent float64 references written straight from the formulas (no code shared with broadface.heads)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def margin_target(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """cos(m1·θ + m2) − m3 with insightface's fallback cos θ − m2·sin m2 − m3 where m1·θ + m2 > π."""
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    phi = torch.cos(m1 * theta + m2)
    ok = m1 * theta + m2 <= math.pi
    return torch.where(ok, phi, cos - m2 * math.sin(m2)) - m3


def dense_margin_loss(x, w, y, s, m1, m2, m3, reduction="mean"):
    """Margin CE with a dense one-hot, as the official BroadFace code does it."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    onehot = F.one_hot(y, w.shape[0]).to(cos.dtype)
    logits = s * (onehot * margin_target(cos, m1, m2, m3) + (1 - onehot) * cos)
    return F.cross_entropy(logits, y, reduction=reduction)


class NaiveBroadFace:
    """Eqs. 7–9 literally: a Python list of (e⁻, y, W⁻_y), the union concatenated, autograd throughout."""

    def __init__(self, queue_size, s, m1, m2, m3, compensate=True):
        self.q, self.s, self.m = queue_size, s, (m1, m2, m3)
        self.compensate = compensate
        self.entries: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def grads(self, w: torch.Tensor, e: torch.Tensor, y: torch.Tensor):
        """Return (loss L(X), ∇_e L(X), L(X∪E*), ∇_W L(X∪E*)) and enqueue the batch."""
        w = w.detach().double().requires_grad_(True)
        e = e.detach().double().requires_grad_(True)
        batch = dense_margin_loss(e, w.detach(), y, self.s, *self.m)
        (ge,) = torch.autograd.grad(batch, e)
        feats, labels = [e.detach()], [y]
        if self.entries:
            past = torch.stack([p for p, _, _ in self.entries])
            ys = torch.tensor([c for _, c, _ in self.entries])
            w_past = torch.stack([r for _, _, r in self.entries])
            if self.compensate:  # Eq. 7
                lam = past.norm(dim=1, keepdim=True) / w_past.norm(dim=1, keepdim=True)
                past = past + lam * (w.detach()[ys] - w_past)
            feats.append(past)
            labels.append(ys)
        union = dense_margin_loss(torch.cat(feats), w, torch.cat(labels), self.s, *self.m)
        (gw,) = torch.autograd.grad(union, w)
        for i in range(e.shape[0]):
            self.entries.append((e[i].detach().clone(), int(y[i]), w.detach()[y[i]].clone()))
        self.entries = self.entries[-self.q:] if self.q else []
        return batch.detach(), ge, union.detach(), gw
