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


# ------------------------------------------------------------------ the margin family, from the papers
# Each is float64, dense (an (N, C) one-hot), and written from the paper's equations and the official code's
# constants; none imports broadface. ``loss(x, w, y, norms)`` is the mean CE; ``norms`` are each row's ‖e‖
# (with a gradient for the mini-batch of MagFace, data for the union); ``observe`` updates the batch
# statistics from a mini-batch; ``regularizer`` is the encoder-only term.


class RefArc:
    """ArcFace as the family's base case (and CurricularFace's positive)."""

    subcenters = 1

    def __init__(self, s, m=0.5):
        self.s, self.m = s, m

    def cosines(self, x, w):
        return F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()

    def target(self, cos, norms):
        return margin_target(cos, 1.0, self.m, 0.0)

    def logits(self, x, w, y, norms):
        cos = self.cosines(x, w)
        onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
        return self.s * (onehot * self.target(cos, norms[:, None]) + (1 - onehot) * self.negatives(cos, y))

    def negatives(self, cos, y):
        return cos

    def loss(self, x, w, y, norms):
        return F.cross_entropy(self.logits(x, w, y, norms), y)

    def observe(self, x, w, y):
        pass

    def regularizer(self, x):
        return torch.zeros((), dtype=torch.float64)


class RefAdaFace(RefArc):
    """Kim et al. 2022, Eq. 11-13: ẑ = ⌊(‖z‖ − μ_z)/(σ_z/h)⌉₋₁¹, g_angle = −m·ẑ, g_add = m·ẑ + m,
    f = s·(cos(θ + g_angle) − g_add); μ_z, σ_z EMAs with weight t_alpha on the new batch (norms clipped to
    [0.001, 100], the std unbiased, ε = 1e-3 as in the official code: θ from a cosine clamped to ±(1 − ε),
    θ + g_angle clipped to [ε, π − ε])."""

    def __init__(self, s, m=0.4, h=0.333, t_alpha=0.01):
        super().__init__(s, m)
        self.h, self.alpha, self.mean, self.std = h, t_alpha, 20.0, 100.0

    def observe(self, x, w, y):
        n = x.detach().norm(dim=1).clamp(0.001, 100)
        self.mean = self.alpha * n.mean().item() + (1 - self.alpha) * self.mean
        self.std = self.alpha * n.std().item() + (1 - self.alpha) * self.std

    def target(self, cos, norms):
        eps = 1e-3
        zhat = ((norms.detach().clamp(0.001, 100) - self.mean) / (self.std + eps) * self.h).clamp(-1, 1)
        theta = torch.acos(cos.clamp(-1 + eps, 1 - eps))
        return torch.cos((theta - self.m * zhat).clamp(eps, math.pi - eps)) - (self.m * zhat + self.m)


class RefMagFace(RefArc):
    """Meng et al. 2021, Eq. 4-5 with the official code's easy margin: a ∈ [l_a, u_a], m(a) linear from
    l_m to u_m, target cos(θ + m(a)) where cos θ > 0, else cos θ; L = CE + λ_g·mean(a/u_a² + 1/a)."""

    def __init__(self, s, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lam=35.0):
        super().__init__(s)
        self.l_a, self.u_a, self.l_m, self.u_m, self.lam = l_a, u_a, l_m, u_m, lam

    def target(self, cos, norms):
        a = norms.clamp(self.l_a, self.u_a)
        m = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        return torch.where(cos > 0, torch.cos(theta + m), cos)

    def regularizer(self, x):
        a = x.norm(dim=1).clamp(self.l_a, self.u_a)
        return self.lam * (a / self.u_a ** 2 + 1 / a).mean()


class RefCurricularFace(RefArc):
    """Huang et al. 2020, Eq. 7-10: N(t, cos θ_j) = cos θ_j (t + cos θ_j) where cos(θ_y + m) < cos θ_j, else cos θ_j;
    t ← α·mean(cos θ_y) + (1 − α)·t, constant in the gradient; the positive is ArcFace's."""

    def __init__(self, s, m=0.5, alpha=0.01):
        super().__init__(s, m)
        self.alpha, self.t = alpha, 0.0

    def observe(self, x, w, y):
        cos_y = self.cosines(x.detach(), w.detach())[torch.arange(len(y)), y]
        self.t = self.alpha * cos_y.mean().item() + (1 - self.alpha) * self.t

    def negatives(self, cos, y):
        cos_y = cos[torch.arange(len(y)), y].detach()
        hard = cos > torch.cos(torch.acos(cos_y.clamp(-1, 1)) + self.m)[:, None]
        return torch.where(hard, cos * (self.t + cos), cos)


class RefSubCenter(RefArc):
    """Deng et al. 2020, Eq. 2: cos θ_j = max_k cos(x, W_jk) over the K sub-centres, then ArcFace."""

    def __init__(self, s, m=0.5, k=3):
        super().__init__(s, m)
        self.subcenters = k

    def cosines(self, x, w):
        return torch.einsum("nd,ckd->nck", F.normalize(x, dim=1), F.normalize(w, dim=-1)).amax(dim=2)


class NaiveFamilyBroadFace:
    """Eqs. 7–9 for any reference margin: a list of (e⁻, y, W⁻_y, ‖e⁻‖, k) entries, autograd throughout.

    With K sub-centres, W⁻_y is the sub-centre k closest to e⁻ at enqueue and the compensation follows
    that sub-centre: e* = e⁻ + ‖e⁻‖/‖W⁻_yk‖ (W_yk − W⁻_yk). The batch statistics are updated from the
    mini-batch alone, before both losses; the queued rows keep ‖e⁻‖ for the norm-dependent margins."""

    def __init__(self, margin, queue_size):
        self.margin, self.q, self.entries = margin, queue_size, []

    def _row(self, w, c, k):
        return w[c] if self.margin.subcenters == 1 else w[c, k]

    def grads(self, w: torch.Tensor, e: torch.Tensor, y: torch.Tensor):
        """(L(X) incl. the regulariser, ∇_e, L(X∪E*), ∇_W); then enqueue the batch."""
        m = self.margin
        w = w.detach().double().requires_grad_(True)
        e = e.detach().double().requires_grad_(True)
        m.observe(e, w, y)
        batch = m.loss(e, w.detach(), y, e.norm(dim=1)) + m.regularizer(e)
        (ge,) = torch.autograd.grad(batch, e)
        feats, labels, norms = [e.detach()], [y], [e.detach().norm(dim=1)]
        for past, c, w_past, a, k in self.entries:
            lam = past.norm() / w_past.norm()
            feats.append((past + lam * (self._row(w.detach(), c, k) - w_past))[None])
            labels.append(torch.tensor([c]))
            norms.append(a[None])
        union = m.loss(torch.cat(feats), w, torch.cat(labels), torch.cat(norms))
        (gw,) = torch.autograd.grad(union, w)
        for i in range(e.shape[0]):
            k = 0
            if m.subcenters > 1:
                k = int((F.normalize(w.detach()[y[i]], dim=1) @ F.normalize(e[i].detach(), dim=0)).argmax())
            self.entries.append((e[i].detach().clone(), int(y[i]), self._row(w.detach(), int(y[i]), k).clone(),
                                 e[i].detach().norm(), k))
        self.entries = self.entries[-self.q:] if self.q else []
        return batch.detach(), ge, union.detach(), gw


def assert_steps_match(head, ref, batches) -> None:
    """Train ``head`` and the reference side by side over ``batches`` of (e, y), taking large SGD steps on W
    (so compensation matters): each step's mini-batch loss, union loss, ∂e and ∂W must agree."""
    import pytest

    for step, (e, y) in enumerate(batches):
        w_before = head.weight.detach().clone()
        r_batch, r_ge, r_union, r_gw = ref.grads(w_before, e, y)
        x = e.detach().clone().requires_grad_(True)
        head.zero_grad()
        loss = head(x, y)
        loss.backward()
        assert loss.item() == pytest.approx(r_batch.item(), rel=1e-5), step
        assert head.stats.union_loss.item() == pytest.approx(r_union.item(), rel=1e-5), step
        assert torch.allclose(x.grad.double(), r_ge, atol=1e-6, rtol=1e-4), step
        assert torch.allclose(head.weight.grad.double(), r_gw, atol=1e-6, rtol=1e-4), step
        with torch.no_grad():
            head.weight.sub_(2.0 * head.weight.grad)
