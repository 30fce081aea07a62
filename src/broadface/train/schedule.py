"""Learning-rate schedules: linear warm-up, then multi-step, polynomial or constant.

The learning rate of every parameter group is ``base_lr * factor(step)`` where
``step`` counts optimizer steps already taken (0 for the first one). The factor
is a pure function of the step, so resuming only needs the step counter.

    sched = build_scheduler(optimizer, cfg.schedule, total_steps=cfg.train.steps)
    for ...: optimizer.step(); sched.step()
"""
from __future__ import annotations

import bisect
from typing import Any

import torch

from broadface.train.config import ScheduleConfig


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at (0-based) optimizer step ``step``."""
    w = cfg.warmup_steps
    if step < w:  # linear from warmup_start to 1; the first step already moves
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * (step + 1) / w
    if cfg.name == "multistep":
        return cfg.gamma ** bisect.bisect_right(cfg.milestones, step)
    if cfg.name == "poly":
        span = max(1, total_steps - w)
        progress = min(1.0, (step - w) / span)
        return cfg.end_factor + (1.0 - cfg.end_factor) * (1.0 - progress) ** cfg.power
    if cfg.name == "constant":
        return 1.0
    raise ValueError(f"config schedule.name={cfg.name!r}: expected multistep, poly or constant")


class WarmupScheduler:
    """LambdaLR-like scheduler: sets each group's lr to ``base_lr * lr_factor(step)``.

    ``state_dict`` holds the step and base learning rates only (plain numbers).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        return lr_factor(self.cfg, self.last_step if step is None else step, self.total_steps)

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        """Advance one optimizer step."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> WarmupScheduler:
    lr_factor(cfg, 0, total_steps)  # validates the name early
    return WarmupScheduler(optimizer, cfg, total_steps)
