"""Run a function in N gloo processes (torch.multiprocessing.spawn) that can never hang a test run."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo  # noqa: F401  DDP and optimizers import it lazily (seconds): once here, before forking
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, init: str, args: tuple) -> None:
    torch.set_num_threads(1)
    if init == "file":  # the test's tmp dir holds the rendezvous file
        path = Path(args[0]) / "rendezvous"
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=30))
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, world: int, tmp: Path, *args: Any, init: str = "file", timeout: float = 90.0,
          start_method: str | None = None) -> None:
    """``fn(rank, world, tmp, *args)`` in ``world`` processes; with ``init="file"`` the default gloo
    group is initialised (and destroyed) around it, with ``init="none"`` fn does it itself.
    Raises if a process fails and kills them all after ``timeout`` seconds.

    The start method defaults to ``fork`` where available: a spawned child re-imports torch,
    which takes seconds on a loaded machine (PyTorch resets its thread pools in forked children).
    ``BROADFACE_TEST_START_METHOD=spawn`` runs the same tests with fresh interpreters."""
    start_method = start_method or os.environ.get("BROADFACE_TEST_START_METHOD") or (
        "fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ctx = mp.start_processes(_entry, args=(fn, world, init, (Path(tmp), *args)), nprocs=world, join=False,
                             start_method=start_method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {timeout}s")


def env_for(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's variables for one process on this machine."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def rendezvous(tmp: Path, rank: int, world: int, name: str = "ready", timeout: float = 60.0) -> None:
    """Wait until every rank has reached this point (files), so later timeouts start together."""
    Path(tmp, f"{name}.{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(tmp, f"{name}.{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the other ranks never reached {name!r}")
        time.sleep(0.01)
