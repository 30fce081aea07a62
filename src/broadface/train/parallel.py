"""The trainer's distributed glue (torchrun / DDP / class-sharded head), a pass-through in one process.

One :class:`Parallel` per trainer. It wraps the backbone in DDP, builds the class-sharded
BroadFace head (Partial FC style, :class:`broadface.heads.sharded.ShardedBroadFace`), gives
each rank its slice of the same global batch (``train.batch_size`` per rank), turns DDP's
gradient all-reduce off for all but the last micro-step of a ``grad_accum`` loop, wraps the
optimizer in ZeRO (``optim.zero``), averages log records over ranks, runs rank-0-only work
while the others wait on a gloo group (``run_on_main``), and makes errors collective
(:meth:`Parallel.agree`), so that no rank is ever left waiting for one that raised.

Checkpoints are world-independent (:mod:`broadface.train.portable`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from broadface.train.config import Config, HeadConfig, TrainConfig
from broadface.train.runtime import Runtime, autocast

T = TypeVar("T")


def build_sharded_head(cfg: HeadConfig, margin: Callable[[int, int], nn.Module], num_classes: int,
                       embedding_size: int, seed: int) -> nn.Module:
    """``ShardedBroadFace`` over this rank's classes (``queue_size`` per rank; 0: Partial FC).

    W is initialised so row c depends on (seed, c) only: the same classifier on any number of ranks.
    """
    from broadface.heads.sharded import ShardedBroadFace

    if cfg.storage != "compact":
        raise ValueError(f"config head.storage={cfg.storage!r}: the class-sharded head (distributed or "
                         "head.sample_rate < 1) stores its queue compactly; use head.storage=compact")
    return ShardedBroadFace(margin, num_classes, embedding_size, queue_size=cfg.queue_size,
                            queue_mode=cfg.queue_mode, compensate=cfg.compensate, sample_rate=cfg.sample_rate,
                            encoder_grad="ddp", chunk_size=cfg.chunk_size,
                            storage_dtype=getattr(torch, cfg.storage_dtype), init_seed=seed)


def micro_batch_step(net: nn.Module, head: nn.Module, images: torch.Tensor, labels: torch.Tensor, micro: int,
                     amp: str, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """One whole-batch step with the encoder run ``micro`` images at a time (``train.micro_batch``).

    The head sees the whole batch once and enqueues it itself (before the optimizer moves W, as
    the trainer's deferred enqueue does with ``grad_accum == 1``). Returns ``head.last_stats``.
    """
    from broadface.train.memory import micro_batch_backward

    micro_batch_backward(net, head, images, labels, micro, head_kwargs={"enqueue": True},
                         autocast=lambda: autocast(images.device, amp), scaler=scaler)
    return head.last_stats


@dataclass
class Parallel:
    """Distributed operations of one training run; each is a no-op (or plain call) in one process."""

    runtime: Runtime

    @property
    def distributed(self) -> bool:
        return self.runtime.distributed

    @property
    def world_size(self) -> int:
        return self.runtime.world_size

    def check(self, cfg: Config) -> None:
        """Config values that only make sense in (or are impossible in) a distributed run."""
        if cfg.optim.zero and not self.distributed:
            raise ValueError("config optim.zero=true: ZeRO partitions optimizer state over ranks; it needs a "
                             "torchrun job (WORLD_SIZE > 1). Set optim.zero=false for one process")
        if cfg.train.micro_batch and getattr(getattr(cfg, "distill", None), "teacher", None):
            raise ValueError("config train.micro_batch: micro-batching does not combine with distillation "
                             "(distill.teacher) yet; set train.micro_batch=null")
        if self.distributed and cfg.head.storage != "compact":
            raise ValueError(f"config head.storage={cfg.head.storage!r}: distributed training keeps the queue "
                             "compact (u = e⁻ − λW⁻_y); use head.storage=compact")

    # ------------------------------------------------------------------ model, optimizer, data
    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel over the backbone (never over the class-sharded head)."""
        if not self.distributed:
            return model
        device = self.runtime.device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def zero(self, optimizer: torch.optim.Optimizer, head: nn.Module, enabled: bool):
        """``optim.zero``: ZeRO over the replicated backbone, a plain optimizer over the head's shard."""
        if not enabled:
            return optimizer
        from broadface.train.memory import zero_redundancy

        return zero_redundancy(optimizer, local_params=list(head.parameters()))

    def loader(self, dataset: Dataset, t: TrainConfig, num_workers: int, epoch: int, start_batch: int):
        """This rank's slices of the global batches (``batch_size × world``) from ``(epoch, start_batch)``."""
        from broadface.dist import make_distributed_loader

        return make_distributed_loader(dataset, t.batch_size * self.world_size, self.runtime.rank, self.world_size,
                                       shuffle=True, seed=t.seed, num_workers=num_workers, drop_last=True,
                                       epoch=epoch, start_batch=start_batch,
                                       pin_memory=self.runtime.device.type == "cuda")

    @staticmethod
    def sync_gradients(net: nn.Module, enabled: bool) -> None:
        """``DDP.no_sync()`` for the next forward/backward unless ``enabled`` (the last micro-step)."""
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net.require_backward_grad_sync = enabled  # exactly what no_sync() toggles

    # ------------------------------------------------------------------ communication
    def reduce_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """Mean of every float of a log record over ranks (one all-reduce; ints and None kept)."""
        if not self.distributed:
            return record
        import torch.distributed as dist

        keys = [k for k, v in record.items() if isinstance(v, float)]
        values = torch.tensor([record[k] for k in keys], dtype=torch.float64, device=self.runtime.device)
        dist.all_reduce(values)
        return {**record, **{k: float(v) / self.world_size for k, v in zip(keys, values.tolist())}}

    def run_on_main(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` on rank 0 only, the others waiting on the gloo wait group; rank 0's result everywhere."""
        if not self.distributed:
            return fn(*args)
        from broadface.dist import run_on_main

        return run_on_main(self.runtime.env, fn, *args)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a small picklable object between our own processes)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.runtime.env.wait_group)
        return box[0]

    def agree(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on every rank; if it raised on any, raise on all (the failing rank's message).

        ``fn`` may call collectives only before anything in it can raise on a single rank.
        """
        if not self.distributed:
            return fn(*args)
        import torch.distributed as dist

        error: BaseException | None = None
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
        reports: list[Any] = [None] * self.world_size
        dist.all_gather_object(reports, None if error is None else (type(error).__name__, str(error)),
                               group=self.runtime.env.wait_group)
        if error is not None:
            raise error
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if failed:
            rank, (kind, message) = failed[0]
            cls = ValueError if kind in ("ValueError", "FileNotFoundError") else RuntimeError
            raise cls(f"rank {rank} failed ({kind}): {message}")
        return result

    def barrier(self) -> None:
        """Wait for every rank on the gloo wait group (long timeout)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.runtime.env.wait_group)

