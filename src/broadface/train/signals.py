"""SIGTERM and SIGINT stop a run at the next step boundary, with a checkpoint, instead of killing it mid-step.

Inside ``with StopSignals() as stop:`` the first SIGTERM / SIGINT only records itself; the loop asks
:meth:`StopSignals.requested` after each step and stops cleanly. A second one acts as usual (SIGINT:
``KeyboardInterrupt``, SIGTERM: the default exit), so an impatient user is never stuck. Handlers are
installed from the main thread only (elsewhere Python cannot) and restored on exit.

Under torchrun the ranks must stop after the same step: :meth:`requested` takes the maximum over
ranks, one small all-reduce of a CPU tensor on the gloo wait group per step (no device sync).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records the first SIGTERM / SIGINT; ``signum`` is the one received (None: none)."""

    def __init__(self, ctx: Any = None):
        self.ctx, self.signum = ctx, None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            return
        self.__exit__()  # a second signal: the usual behaviour
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def requested(self) -> bool:
        """True once a stop signal arrived (on any rank: every rank answers alike)."""
        ctx = self.ctx
        if ctx is None or not ctx.distributed:
            return self.signum is not None
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.wait_group)
        self.signum = int(flag) or None
        return self.signum is not None
