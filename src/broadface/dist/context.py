"""Where this process runs: one :class:`DistContext` for a single process (rank 0 of 1) or a torchrun rank.

``torchrun --nproc_per_node=N ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them, picks NCCL on CUDA and gloo on CPU and returns the
context. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and every operation
of the context is the plain single-process one. A default group that the caller initialised already
(tests, notebooks) is joined instead.

Rank-0-only work (evaluation, writing files) must not leave the other ranks blocked in an NCCL
collective whose watchdog fires after ``timeout``: :meth:`DistContext.run_on_main` makes them wait in
a *gloo* collective of a separate group with its own, long timeout (``wait_timeout_s``), then hands
rank 0's result (or its exception) to every rank. :meth:`DistContext.agree` turns an error raised on
one rank into an error on all of them, so no rank is ever left waiting for one that raised.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This process's rank, world, device and wait group; ``DistContext()`` is one CPU process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    wait_group: Any = None  # a gloo group with a long timeout (None: one process)
    owns_group: bool = False  # this context initialised the default group and destroys it in close()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def run_on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on rank 0 only; every rank returns its result (which must be picklable).

        The other ranks wait in a gloo broadcast on ``wait_group``. If ``fn`` raises on rank 0 the
        others raise a RuntimeError carrying its traceback."""
        if not self.distributed:
            return fn(*args, **kwargs)
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn(*args, **kwargs))
            except BaseException as err:  # tell the others before re-raising
                box[0] = ("error", traceback.format_exc())
                dist.broadcast_object_list(box, src=0, group=self.wait_group)
                raise err
        dist.broadcast_object_list(box, src=0, group=self.wait_group)
        status, value = box[0]
        if status == "error":
            raise RuntimeError(f"rank 0 failed in {getattr(fn, '__name__', fn)!r}:\n{value}")
        return value

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a small picklable object between our own processes)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.wait_group)
        return box[0]

    def agree(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on every rank; if it raised on any, raise on all (the failing rank's message).

        ``fn`` may call collectives only before anything in it can raise on a single rank."""
        if not self.distributed:
            return fn(*args)
        error: BaseException | None = None
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
        reports: list[Any] = [None] * self.world_size
        dist.all_gather_object(reports, None if error is None else (type(error).__name__, str(error)),
                               group=self.wait_group)
        if error is not None:
            raise error
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if failed:
            rank, (kind, message) = failed[0]
            cls = ValueError if kind in ("ValueError", "FileNotFoundError") else RuntimeError
            raise cls(f"rank {rank} failed ({kind}): {message}")
        return result

    def mean(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Mean of every float of a record over ranks (one all-reduce; ints, strings and None kept)."""
        if not self.distributed:
            return dict(record)
        keys = [k for k, v in record.items() if isinstance(v, float)]
        values = torch.tensor([record[k] for k in keys], dtype=torch.float64,
                              device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(values)
        return {**record, **{k: float(v) / self.world_size for k, v in zip(keys, values.tolist())}}

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel over a replicated module (the backbone); the module itself in one process."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        """Tear down the process groups if this context created them."""
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def set_grad_sync(net: nn.Module, enabled: bool) -> None:
    """``DDP.no_sync()`` for the next forward/backward unless ``enabled`` (a no-op without DDP)."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        net.require_backward_grad_sync = enabled  # exactly what no_sync() toggles


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def _env_int(name: str, env: Mapping[str, str], lo: int, hi: int | None = None) -> int:
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
                     wait_timeout_s: float = 4 * 3600.0, env: Mapping[str, str] | None = None) -> DistContext:
    """The context of this process: one process, a rank of a torchrun job, or of a group already initialised.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a rank uses
    ``cuda:LOCAL_RANK``. ``backend`` defaults to ``nccl`` on CUDA and ``gloo`` on CPU. ``timeout_s``
    bounds every collective of the default group; ``wait_timeout_s`` the wait for rank-0-only work.
    """
    env = dict(os.environ) if env is None else dict(env)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _join(device, env, wait_timeout_s)
    world = _env_int("WORLD_SIZE", env, 1) if "WORLD_SIZE" in env else 1
    if world == 1:
        return DistContext(device=resolve_device(device))
    kind = "auto" if device == "auto" else resolve_device(device).type  # cuda:N -> cuda:LOCAL_RANK
    rank, local_rank = _env_int("RANK", env, 0, world), _env_int("LOCAL_RANK", env, 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise ValueError(f"environment variable {name} is not set; launch with torchrun (or set {', '.join(_ENV)})")
    _env_int("MASTER_PORT", env, 1, 65536)
    dev = _rank_device(kind, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    addr = env["MASTER_ADDR"]
    addr = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr  # IPv6 literal
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{env['MASTER_PORT']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), device_id=dev if dev.type == "cuda" else None)
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s))
    return DistContext(rank, world, local_rank, dev, backend, wait_group, owns_group=True)


def _rank_device(kind: str, local_rank: int) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind != "cuda":
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible; "
                         "use --nproc_per_node <= the number of GPUs")
    dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    return dev


def _join(device: str, env: Mapping[str, str], wait_timeout_s: float) -> DistContext:
    """A context for a default group initialised by the caller (plus its own gloo wait group)."""
    rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    local = int(env.get("LOCAL_RANK", rank))
    kind = "cuda" if backend == "nccl" else ("cpu" if device == "auto" else resolve_device(device).type)
    dev = _rank_device(kind, local)  # a gloo group trains on the CPU unless told otherwise
    wait = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s))
    return DistContext(rank, world, local, dev, backend, wait, owns_group=False)
