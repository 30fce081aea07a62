"""Distributed training on PyTorch's own engine (torch.distributed; torchrun, gloo/NCCL).

- :mod:`context`: one :class:`DistContext` per process (rank 0 of 1 without torchrun): rank, world,
  device, rank-0-only work, errors raised on every rank together, DDP;
- :mod:`collectives`: gathers (uneven lengths, with a correct backward) and metric reductions;
- :mod:`sampler`: every rank's slice of the same global batch, resumable mid-epoch.

The class-sharded classifier lives with the heads (:mod:`broadface.heads.partition`).
"""
from broadface.dist.collectives import (all_gather_tensor, all_gather_with_grad, all_reduce_, gather_to, rank_world,
                                        reduce_mean, reduce_sums, scale_grad)
from broadface.dist.context import DistContext, init_distributed, resolve_device, set_grad_sync
from broadface.dist.sampler import DistributedBatchSampler, make_distributed_loader, rank_slice

__all__ = ["DistContext", "DistributedBatchSampler", "all_gather_tensor", "all_gather_with_grad", "all_reduce_",
           "gather_to", "init_distributed", "make_distributed_loader", "rank_slice", "rank_world", "reduce_mean",
           "reduce_sums", "resolve_device", "scale_grad", "set_grad_sync"]
