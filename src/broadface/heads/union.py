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
In one process on the CPU the log-sum-exp and softmax of a chunk run a few rows at a time
(:func:`local_lse_softmax_`): the same bits as whole-chunk passes, with the (k, C) logits crossing
memory once each way instead of six times.

Options (none of them touches the float32 path above):

- ``dtype`` bfloat16 / float16: the two big matmuls (logits, ∂W) take their inputs in that dtype; the
  logits are used in fp32 (log-sum-exp, softmax, margin) and each chunk's ∂W is added to an fp32 sum. With
  the matmuls cheaper the element-wise passes weigh more, so in one process this path takes the softmax
  from the log-sum-exp's own exponentials (:func:`lse_softmax_`, one exp pass instead of two; the same
  value, not the same bits, which is why the float32 path keeps its two passes) and forms ∂Wᵀ = f̂ᵀ p
  (the (D, k) @ (k, C) product runs faster than (C, k) @ (k, D) in bf16 here);
- ``norm``: a per-row input of the margin (AdaFace, MagFace: ‖e‖, data);
- ``negatives`` (CurricularFace): the non-target cosines re-weighted given each row's target cosine,
  their slope from autograd on the chunk; ``row_sum`` makes that target cosine global when sharded;
- sub-centres: a normalised weight of shape (C, K, D) is scored max-pooled over K and each
  cosine's gradient goes to the sub-centre that won it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

UNION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def target_and_slope(target: Callable[..., Tensor], cos_t: Tensor, need_grad: bool, norm: Tensor | None = None):
    """``(φ(cos_t), φ'(cos_t))`` of an element-wise margin; the slope is None when not needed."""
    fn = target if norm is None else (lambda c: target(c, norm))
    if not need_grad:
        return fn(cos_t), None
    with torch.enable_grad():
        c = cos_t.detach().requires_grad_(True)
        phi = fn(c)
        (slope,) = torch.autograd.grad(phi.sum(), c)
    return phi.detach(), slope


LseFn = Callable[..., "tuple[Tensor, Tensor]"]  # (z, target logit, scratch buffer or None)


def _row_max(z: Tensor) -> Tensor:
    """Each row's max (k, 1), 0 where it is infinite: the shift that keeps exp in range, as torch.logsumexp's."""
    m = z.amax(dim=1, keepdim=True)
    return m.masked_fill_(m.abs() == math.inf, 0)


def local_lse(z: Tensor, target_logit: Tensor, scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(log Σ_j exp z_j, target logit)`` per row when this process holds every class.

    With ``scratch`` (a buffer of z's shape) the steps of ``torch.logsumexp`` run in it instead of a
    fresh (k, C) temporary: the same result bit for bit (tests/heads/test_union.py pins it)."""
    return _logsumexp(z, scratch), target_logit


def _logsumexp(z: Tensor, scratch: Tensor | None) -> Tensor:
    """``torch.logsumexp(z, dim=1)``, its steps run in ``scratch`` when given."""
    if scratch is None:
        return torch.logsumexp(z, dim=1)
    m = _row_max(z)
    total = torch.sub(z, m, out=scratch).exp_().sum(dim=1)
    return total.log_().add_(m.squeeze(1))


def lse_softmax_(z: Tensor, need_softmax: bool) -> Tensor:
    """Row-wise log-sum-exp of ``z``, turning ``z`` in place into ``softmax(z)`` (when ``need_softmax``;
    else into exp(z − max)): the exponentials are computed once."""
    m = _row_max(z)
    total = z.sub_(m).exp_().sum(dim=1, keepdim=True)
    if need_softmax:
        z.mul_(total.reciprocal())
    return total.log_().add_(m).squeeze(1)


class Scratch:
    """Named buffers for the union's (rows, cols) temporaries, reused by every chunk and, kept by the head,
    by every step: on the CPU a fresh tensor of that size costs a pass of page faults as it is first
    written (a 1.4 GB logit chunk: over a second, more than the element-wise work on it). Each buffer
    grows to the largest request and is viewed at the size asked for. :meth:`clear` frees them."""

    def __init__(self):
        self.bufs: dict[str, Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> Tensor | None:
        """A (rows, cols) view of buffer ``name``; None on CUDA, whose caching allocator makes this moot."""
        device = torch.device(device)
        if device.type == "cuda":
            return None
        buf, size = self.bufs.get(name), rows * cols
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != device:
            self.bufs.pop(name, None)  # free the old one first: never two at once
            buf = self.bufs[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:size].view(rows, cols)

    def clear(self) -> None:
        self.bufs.clear()

    def __deepcopy__(self, memo) -> "Scratch":
        return Scratch()  # temporaries, not state: a copied head starts with none

    def __getstate__(self) -> dict:
        return {"bufs": {}}

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs.values())


BLOCK_BYTES = 1 << 20  # a block of logit rows and its scratch: a core's L2 cache holds both


def row_blocks(rows: int, cols: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of about BLOCK_BYTES of fp32 each (one range on CUDA). A lone last row joins
    the block before it: torch splits a one-row reduction across threads (other bits), a longer one by rows."""
    if device.type == "cuda":
        return [(0, rows)]
    starts = list(range(0, rows, max(2, BLOCK_BYTES // (4 * max(cols, 1)))))
    if len(starts) > 1 and rows - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [rows]))


def local_lse_softmax_(z: Tensor, need_softmax: bool, one_exp: bool, scratch: Scratch) -> Tensor:
    """Row-wise log-sum-exp of ``z`` (k, C) when this process holds every class, turning ``z`` in place
    into ``softmax(z)`` when ``need_softmax``; ``one_exp``: by :func:`lse_softmax_`, else by
    :func:`local_lse` and ``exp(z − lse)``.

    A block of rows at a time (:func:`row_blocks`), so each block's passes (max, shift, exp, sum, exp)
    run in cache and ``z`` crosses memory once each way instead of in six (k, C) passes. Every step is
    per element or per row, so the result is that of the whole-chunk passes bit for bit
    (tests/heads/test_union.py compares them)."""
    blocks = row_blocks(*z.shape, z.device)
    if len(blocks) == 1 and one_exp:
        return lse_softmax_(z, need_softmax)
    out = z.new_empty(z.shape[0])
    buf = scratch.get("block", max(b - a for a, b in blocks), z.shape[1], device=z.device)
    for a, b in blocks:
        zb = z[a:b]
        if one_exp:
            out[a:b] = lse_softmax_(zb, need_softmax)
            continue
        lse_b = _logsumexp(zb, None if buf is None else buf[:b - a])
        if need_softmax:
            zb.sub_(lse_b.unsqueeze(1)).exp_()
        out[a:b] = lse_b
    return out


@dataclass(frozen=True)
class UnionOptions:
    """What the union needs beyond ArcFace's (module docstring); the defaults are the float32 path."""

    dtype: torch.dtype = torch.float32
    norm: Tensor | None = None  # (N,) per-row margin input
    negatives: Callable[[Tensor, Tensor], Tensor] | None = None
    row_sum: Callable[[Tensor], Tensor] | None = None  # sums a per-row tensor over ranks (None: one process)
    scratch: Scratch | None = None  # buffers kept by the caller across calls (None: this call's own)

    @property
    def low_precision(self) -> bool:
        return self.dtype != torch.float32


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of low-precision inputs as fp32 (accumulated in fp32; CUDA writes fp32 directly)."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a build without out_dtype: the rounded product, upcast
            pass
    return torch.mm(a, b).float()


def _negatives(fn, z: Tensor, scale: float, cos_y: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``s·fn(z/s, cos_y)`` and its slope ∂fn/∂cos (None without grad), element-wise over the chunk."""
    c = z / scale
    if not need_grad:
        return fn(c, cos_y[:, None]).mul_(scale), None
    with torch.enable_grad():
        c.requires_grad_(True)
        out = fn(c, cos_y[:, None])
        (slope,) = torch.autograd.grad(out.sum(), c)
    return out.detach().mul_(scale), slope


class ChunkedMarginCE(torch.autograd.Function):
    """``mean_i CE(s·margin(ê_i·Ŵᵀ), y_i)`` with a gradient for ``Ŵ`` only.

    ``target`` holds each row's column in ``Ŵ``, or −1 where another rank owns the class;
    ``lse`` turns the chunk's logits (and target logits, zero where not owned) into the
    row-wise log-sum-exp and target logit: :func:`local_lse` in one process, all-reduced
    across ranks for a class-sharded classifier (:meth:`broadface.heads.partition.ClassPartition.lse`).
    Gathers and scatters with ``torch.where`` instead of boolean indexing: no host sync.
    """

    @staticmethod
    def forward(ctx, weight_n: Tensor, feats_n: Tensor, target: Tensor, margin: Callable[..., Tensor],
                scale: float, chunk_size: int, lse: LseFn, opts: UnionOptions) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        n = feats_n.shape[0]
        with torch.autocast(device_type=weight_n.device.type, enabled=False):
            w = weight_n.detach().float()
            grad_w = torch.zeros_like(w) if need_grad else None
            subs = w.shape[1] if w.dim() == 3 else 1
            w_mm = w if subs == 1 else w.reshape(-1, w.shape[-1])         # (C·K, D), class-major
            w_lp = w_mm.to(opts.dtype) if opts.low_precision else w_mm
            total = torch.zeros((), dtype=torch.float64, device=w.device)
            scratch = opts.scratch or Scratch()
            local = lse is local_lse
            for start in range(0, n, chunk_size):
                f = feats_n[start:start + chunk_size].float()
                t = target[start:start + chunk_size]
                own, col = t >= 0, t.clamp_min(0).unsqueeze(1)
                z = _logits(f, w_mm, w_lp, scale, opts, scratch)                  # s·cos, (k, C·K)
                arg = None
                if subs > 1:
                    z, arg = z.view(z.shape[0], -1, subs).max(dim=2)         # max-pooled over the sub-centres
                z_t = z.gather(1, col).squeeze(1)
                norm = None if opts.norm is None else opts.norm[start:start + chunk_size]
                cos_t = (z_t / scale).clamp_(-1.0, 1.0)
                phi, slope = target_and_slope(margin, cos_t, need_grad, norm)
                neg_slope = None
                if opts.negatives is not None:
                    cos_y = torch.where(own, cos_t, 0.0)
                    cos_y = cos_y if opts.row_sum is None else opts.row_sum(cos_y)
                    z, neg_slope = _negatives(opts.negatives, z, scale, cos_y, need_grad)
                    z_t = z.gather(1, col).squeeze(1)                         # rows of another rank's class
                tz = torch.where(own, scale * phi, 0.0)
                z.scatter_(1, col, torch.where(own, tz, z_t).unsqueeze(1))
                if local:                                            # z is now the softmax (with grad)
                    row_lse = local_lse_softmax_(z, need_grad, opts.low_precision, scratch)
                else:
                    row_lse, tz = lse(z, tz, scratch.get("lse", *z.shape, device=z.device))
                total += (row_lse - tz).sum(dtype=torch.float64)
                if need_grad:
                    p = z if local else z.sub_(row_lse.unsqueeze(1)).exp_()          # softmax, in place
                    p_t = p.gather(1, col).squeeze(1)
                    keep = p_t
                    if neg_slope is not None:
                        keep = p.mul_(neg_slope).gather(1, col).squeeze(1)
                    p.scatter_(1, col, torch.where(own, (p_t - 1.0) * slope, keep).unsqueeze(1))  # ∂L/∂cos ÷ s
                    _accumulate(grad_w, p, f, scale, arg, subs, opts, scratch)
        ctx.n = n
        if need_grad:
            ctx.save_for_backward(grad_w)
        return (total / max(n, 1)).to(weight_n.dtype if weight_n.is_floating_point() else torch.float32)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad_w,) = ctx.saved_tensors
        return grad_w * (grad_out / max(ctx.n, 1)), None, None, None, None, None, None, None


def _logits(f: Tensor, w_mm: Tensor, w_lp: Tensor, scale: float, opts: UnionOptions, scratch: Scratch) -> Tensor:
    """The chunk's ``s·cos`` (k, C·K) in fp32, written into the scratch buffers."""
    z = scratch.get("z", f.shape[0], w_mm.shape[0], device=f.device)
    if not opts.low_precision:
        return torch.mm(f * scale, w_mm.t(), out=z) if z is not None else torch.mm(f * scale, w_mm.t())
    f_lp = (f * scale).to(opts.dtype)
    low = scratch.get("low", f.shape[0], w_mm.shape[0], opts.dtype, f.device)
    if low is None:
        return _mm(f_lp, w_lp.t())
    return z.copy_(torch.mm(f_lp, w_lp.t(), out=low))


def _accumulate(grad_w: Tensor, p: Tensor, f: Tensor, scale: float, arg: Tensor | None, subs: int,
                opts: UnionOptions, scratch: Scratch) -> None:
    """``grad_w += s · pᵀ f``: (C, k) @ (k, D), routed to the winning sub-centres, fp32 sum."""
    if subs > 1:  # ∂L/∂cos_j goes to W_{j, arg}: spread p over (k, C, K), zeros elsewhere
        p = torch.zeros(*p.shape, subs, dtype=p.dtype, device=p.device).scatter_(2, arg.unsqueeze(2),
                                                                                p.unsqueeze(2)).view(p.shape[0], -1)
    g = grad_w if subs == 1 else grad_w.view(-1, grad_w.shape[-1])
    if opts.low_precision:
        low = scratch.get("low", *p.shape, dtype=opts.dtype, device=p.device)
        p_lp = p.to(opts.dtype) if low is None else low.copy_(p)
        g.t().add_(_mm(f.to(opts.dtype).t(), p_lp), alpha=scale)  # ∂Wᵀ: (D, k) @ (k, C)
    else:
        g.addmm_(p.t(), f, alpha=scale)                              # (C, k) @ (k, D)


def chunked_margin_ce(weight_n: Tensor, feats_n: Tensor, target: Tensor, margin: Callable[..., Tensor],
                      scale: float, chunk_size: int = 4096, lse: LseFn = local_lse, *,
                      dtype: torch.dtype = torch.float32, norm: Tensor | None = None,
                      negatives: Callable[[Tensor, Tensor], Tensor] | None = None,
                      row_sum: Callable[[Tensor], Tensor] | None = None, scratch: Scratch | None = None) -> Tensor:
    """Mean margin CE of fixed normalised ``feats_n`` against normalised ``weight_n``: the union loss.

    Gradients flow to ``weight_n`` only; ``feats_n`` and ``target`` (columns, −1: not held here) are data.
    ``weight_n`` of shape (C, K, D) holds K sub-centres per class. ``dtype``, ``norm``, ``negatives``
    and ``row_sum``: the options of the module docstring; ``scratch``: buffers to reuse (:class:`Scratch`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if dtype not in UNION_DTYPES:
        raise ValueError(f"union dtype must be float32, bfloat16 or float16, got {dtype}")
    opts = UnionOptions(dtype, None if norm is None else norm.detach().float(), negatives, row_sum, scratch)
    return ChunkedMarginCE.apply(weight_n, feats_n.detach(), target, margin, scale, chunk_size, lse, opts)
