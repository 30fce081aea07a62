"""Where training runs: device, process rank / world size, and mixed precision.

Everything device- or rank-dependent lives here so that distributed training
(torchrun / DDP) can be added in this one place. Today one process trains;
``WORLD_SIZE > 1`` is refused with a clear message instead of silently training
``WORLD_SIZE`` independent copies.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs and checkpoints."""
        return self.rank == 0


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


def init_runtime(device: str = "auto") -> Runtime:
    """The runtime of this process (single process for now)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ValueError(f"WORLD_SIZE={world}: distributed training is not supported yet; run a single process")
    return Runtime(device=resolve_device(device))


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
