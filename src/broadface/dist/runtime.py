"""Process-group setup from torchrun's environment, rank helpers and rank-0-only work.

``torchrun --nproc_per_node=N train.py`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them, picks NCCL on
CUDA and gloo on CPU, and returns a :class:`DistEnv`. Without ``WORLD_SIZE`` (or with
``WORLD_SIZE=1``) nothing is initialised and every helper degrades to a single process.

Rank-0-only work (evaluation, writing files) must not leave the other ranks blocked in
an NCCL collective whose watchdog fires after ``timeout``: :func:`run_on_main` makes them
wait in a *gloo* collective of a separate group with its own, long timeout
(``wait_timeout_s``), then hands rank 0's result (or its exception) to every rank.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits. ``wait_group`` is a gloo group with a long timeout (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    wait_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, env: dict[str, str], lo: int, hi: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        raise ValueError(f"environment variable {name} is not set; launch with torchrun (which sets {', '.join(_ENV)})")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < lo or (hi is not None and value >= hi):
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"environment variable {name}={value} is outside {bound}")
    return value


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0,
                     wait_timeout_s: float = 4 * 3600.0, env: dict[str, str] | None = None) -> DistEnv:
    """Initialise the default process group from torchrun's variables (``env`` defaults to ``os.environ``).

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; on CUDA this process uses
    ``cuda:LOCAL_RANK``. ``backend`` defaults to ``nccl`` on CUDA and ``gloo`` on CPU.
    ``timeout_s`` bounds every collective of the default group (NCCL watchdog, gloo);
    ``wait_timeout_s`` bounds the wait for rank-0-only work in :func:`run_on_main`.
    """
    env = dict(os.environ) if env is None else dict(env)
    world = _env_int("WORLD_SIZE", env, 1) if "WORLD_SIZE" in env else 1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"init_distributed: device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("init_distributed: device='cuda' but CUDA is not available")
    if world == 1:
        return DistEnv(device=torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"))
    rank = _env_int("RANK", env, 0, world)
    local_rank = _env_int("LOCAL_RANK", env, 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise ValueError(f"environment variable {name} is not set; launch with torchrun "
                             f"(or set {', '.join(_ENV)})")
    _env_int("MASTER_PORT", env, 1, 65536)
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible; "
                             "use --nproc_per_node <= the number of GPUs")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        raise RuntimeError("init_distributed: the default process group is already initialised")
    addr = env["MASTER_ADDR"]
    addr = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr  # IPv6 literal
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{env['MASTER_PORT']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s))
    return DistEnv(rank, world, local_rank, dev, backend, wait_group)


def destroy_distributed() -> None:
    """Tear down every process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier(group=None, timeout_s: float | None = None) -> None:
    """Wait for every rank of ``group``. With ``timeout_s`` (gloo groups only) a
    ``monitored_barrier`` names the ranks that did not arrive instead of hanging."""
    if get_world_size(group) == 1:
        return
    if timeout_s is not None:
        dist.monitored_barrier(group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    elif dist.get_backend(group) == "nccl":
        dist.barrier(group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group)


def run_on_main(env: DistEnv, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result (which must be picklable).

    The other ranks wait in a gloo broadcast on ``env.wait_group`` (timeout
    ``wait_timeout_s``), never in an NCCL collective. If ``fn`` raises on rank 0 the
    others raise a RuntimeError carrying its traceback, so no rank is left waiting.
    """
    if not env.distributed:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if env.is_main:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except BaseException as err:  # tell the others before re-raising
            box[0] = ("error", traceback.format_exc())
            dist.broadcast_object_list(box, src=0, group=env.wait_group)
            raise err
    dist.broadcast_object_list(box, src=0, group=env.wait_group)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed in {getattr(fn, '__name__', fn)!r}:\n{value}")
    return value
