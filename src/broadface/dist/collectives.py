"""Collectives that the sharded head and the trainer need, each a no-op in a single process.

Every function takes an optional ``group`` (default: the world) and works without an
initialised process group (then ``world == 1`` and nothing is communicated), so code
written for N processes runs unchanged in one.

Tensors of different lengths per rank (an uneven last batch, queues of different fill)
are gathered by padding to the longest and trimming; the lengths travel first.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import Tensor


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_(t: Tensor, op: str = "sum", group=None) -> Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``min``); returns ``t``."""
    if rank_world(group)[1] > 1:
        dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op],
                        group=group)
    return t


def gather_lengths(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's ``n`` (e.g. its batch size), in rank order."""
    _, world = rank_world(group)
    if world == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [int(x) for x in out]


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))]).contiguous()


def all_gather_tensor(t: Tensor, group=None, lengths: list[int] | None = None) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order (no autograd). Lengths may differ."""
    _, world = rank_world(group)
    if world == 1:
        return t
    lengths = gather_lengths(t.shape[0], t.device, group) if lengths is None else lengths
    longest = max(max(lengths), 1)  # no zero-size collectives
    parts = [t.new_empty((longest, *t.shape[1:])) for _ in range(world)]
    dist.all_gather(parts, _pad_rows(t, longest), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, lengths)])


def gather_to(t: Tensor, dst: int = 0, group=None) -> list[Tensor] | None:
    """Every rank's ``t`` (lengths may differ) as a list on rank ``dst``; ``None`` elsewhere."""
    rank, world = rank_world(group)
    if world == 1:
        return [t]
    lengths = gather_lengths(t.shape[0], t.device, group)
    longest = max(max(lengths), 1)
    parts = [t.new_empty((longest, *t.shape[1:])) for _ in range(world)] if rank == dst else None
    dist.gather(_pad_rows(t, longest), parts, group=group, group_dst=dst)
    return None if parts is None else [p[:n] for p, n in zip(parts, lengths)]


class _AllGatherGrad(torch.autograd.Function):
    """Forward: concatenation of all ranks' rows. Backward: this rank's rows of the summed gradient."""

    @staticmethod
    def forward(ctx, t: Tensor, group, lengths: list[int]) -> Tensor:
        rank, _ = rank_world(group)
        ctx.group, ctx.lengths, ctx.rank = group, lengths, rank
        return all_gather_tensor(t, group, lengths)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank holds a gradient for *all* rows (its own loss terms); the total for
        # this rank's rows is the sum over ranks. An all-reduce works on every backend (gloo
        # has no reduce-scatter); the gradient is N×D, small next to the N×C logits.
        grad = all_reduce_(grad.contiguous().clone(), "sum", ctx.group)
        start = sum(ctx.lengths[:ctx.rank])
        return grad[start:start + ctx.lengths[ctx.rank]], None, None


def all_gather_with_grad(t: Tensor, group=None, lengths: list[int] | None = None) -> Tensor:
    """All-gather along dim 0 whose backward gives each rank the gradient of its own rows summed over ranks."""
    _, world = rank_world(group)
    if world == 1:
        return t
    lengths = gather_lengths(t.shape[0], t.device, group) if lengths is None else lengths
    return _AllGatherGrad.apply(t, group, lengths)


def scale_grad(t: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass."""
    if factor == 1.0 or not t.requires_grad:
        return t
    return t.detach() + (t - t.detach()) * factor


def reduce_mean(value: float | Tensor, group=None) -> float | Tensor:
    """Mean of ``value`` over ranks (a Python number stays a number; a tensor stays a tensor)."""
    _, world = rank_world(group)
    if isinstance(value, Tensor):
        if world == 1:
            return value
        out = value.detach().clone().float()
        return all_reduce_(out, "sum", group) / world
    if world == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(group))
    return float(all_reduce_(t, "sum", group)) / world


def reduce_sums(values: Mapping[str, float], group=None) -> dict[str, float]:
    """Sum each named number over ranks in one collective (e.g. correct counts and totals for a metric)."""
    keys = sorted(values)
    _, world = rank_world(group)
    if world == 1 or not keys:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(group))
    all_reduce_(t, "sum", group)
    return dict(zip(keys, t.tolist()))


def _comm_device(group=None) -> torch.device:
    """NCCL collectives need CUDA tensors; every other backend takes CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
