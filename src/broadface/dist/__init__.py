"""Distributed training on PyTorch's own engine (torch.distributed; torchrun, gloo/NCCL).

- :mod:`runtime`: process group from torchrun's environment, rank helpers, rank-0-only work;
- :mod:`collectives`: gathers (uneven lengths, with a correct backward) and metric reductions;
- :mod:`softmax`: cross-entropy over classes split across ranks (model-parallel classifier);
- :mod:`sampler`: every rank's slice of the same global batch, resumable mid-epoch;
- :mod:`reshard`: class-sharded head checkpoints that reload on another number of ranks.
"""
from broadface.dist.collectives import (all_gather_tensor, all_gather_with_grad, all_reduce_, gather_to, rank_world,
                                        reduce_mean, reduce_sums, scale_grad)
from broadface.dist.reshard import class_range, full_state_from_broadface, merge_head_states, merge_rows, split_rows
from broadface.dist.runtime import (DistEnv, barrier, destroy_distributed, get_rank, get_world_size, init_distributed,
                                    is_main, run_on_main)
from broadface.dist.sampler import DistributedBatchSampler, make_distributed_loader, rank_slice
from broadface.dist.softmax import parallel_chunked_margin_ce, parallel_cross_entropy

__all__ = ["DistEnv", "DistributedBatchSampler", "all_gather_tensor", "all_gather_with_grad", "all_reduce_", "barrier",
           "class_range", "destroy_distributed", "full_state_from_broadface", "gather_to", "get_rank", "get_world_size",
           "init_distributed", "is_main", "make_distributed_loader", "merge_head_states", "merge_rows",
           "parallel_chunked_margin_ce", "parallel_cross_entropy", "rank_slice", "rank_world", "reduce_mean",
           "reduce_sums", "run_on_main", "scale_grad", "split_rows"]
