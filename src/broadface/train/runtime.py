"""Where training runs: device, process rank / world size, and mixed precision.

Everything device- or rank-dependent lives here. One process (no ``WORLD_SIZE`` or
``WORLD_SIZE=1``) trains on ``train.device``. Under torchrun (``WORLD_SIZE > 1``) the
process group is initialised by :func:`broadface.dist.init_distributed` (NCCL on CUDA,
gloo on CPU; this process uses ``cuda:LOCAL_RANK``), or an already initialised default
group is joined (tests, notebooks); see :mod:`broadface.train.parallel` for the rest.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, ContextManager

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    env: Any = None  # broadface.dist.DistEnv when distributed (its wait_group serves rank-0-only work)
    owns_group: bool = False  # this runtime initialised the process group and destroys it in close()

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        """Tear down the process group if this runtime created it."""
        if self.owns_group:
            from broadface.dist import destroy_distributed

            destroy_distributed()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"config train.device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"config train.device={name!r}: CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"config train.device={name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"config train.device={name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def init_runtime(device: str = "auto", timeout_s: float = 1800.0) -> Runtime:
    """The runtime of this process: single process, or one rank of a torchrun job (``WORLD_SIZE > 1``)."""
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not joined and int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1:
        return Runtime(device=resolve_device(device))
    kind = resolve_device(device).type if device != "auto" else "auto"  # cuda:N -> cuda:LOCAL_RANK under torchrun
    if joined:
        env = _join_group(kind)
    else:
        from broadface.dist import init_distributed

        env = init_distributed(kind, timeout_s=timeout_s)
    return Runtime(env.device, env.rank, env.world_size, env.local_rank, env, owns_group=not joined)


def _join_group(kind: str):
    """A DistEnv for a default group initialised by the caller (plus its own gloo wait group)."""
    from datetime import timedelta

    import torch.distributed as dist
    from broadface.dist import DistEnv

    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = dist.get_backend() == "nccl" or kind == "cuda"  # a gloo group trains on the CPU unless told otherwise
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    wait = dist.new_group(backend="gloo", timeout=timedelta(hours=4))
    return DistEnv(rank, world, local, dev, dist.get_backend(), wait)


def check_amp(device: torch.device, amp: str) -> None:
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"config train.amp={amp!r}: expected none, bf16 or fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("config train.amp=fp16 needs a CUDA device; use train.amp=bf16 on CPU")


def autocast(device: torch.device, amp: str) -> ContextManager:
    """Autocast context for the forward pass (a no-op for amp='none')."""
    check_amp(device, amp)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 has fp32's range and needs none)."""
    check_amp(device, amp)
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
