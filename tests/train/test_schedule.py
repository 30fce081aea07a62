"""Learning-rate schedules: warm-up, multi-step, polynomial; state_dict resume."""
from __future__ import annotations

import pytest
import torch

from broadface.train.config import ScheduleConfig
from broadface.train.schedule import build_scheduler, lr_factor


def test_warmup_then_multistep():
    cfg = ScheduleConfig(name="multistep", warmup_steps=4, milestones=[6, 8], gamma=0.1)
    got = [lr_factor(cfg, s, 10) for s in range(10)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_start_and_poly():
    cfg = ScheduleConfig(name="poly", warmup_steps=2, warmup_start=0.5, power=2.0, end_factor=0.0)
    assert lr_factor(cfg, 0, 12) == pytest.approx(0.75)
    assert lr_factor(cfg, 2, 12) == pytest.approx(1.0)
    assert lr_factor(cfg, 7, 12) == pytest.approx(0.25)  # half way: (1 - 0.5)^2
    assert lr_factor(cfg, 12, 12) == 0.0 and lr_factor(cfg, 50, 12) == 0.0


def test_scheduler_sets_group_lrs_and_resumes():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    cfg = ScheduleConfig(name="multistep", warmup_steps=2, milestones=[3])

    def make():
        opt = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 10.0}])
        return opt, build_scheduler(opt, cfg, total_steps=6)

    opt, sched = make()
    seen = []
    for _ in range(5):
        seen.append(sched.get_last_lr())
        sched.step()
    assert seen == [[0.5, 5.0], [1.0, 10.0], [1.0, 10.0], [0.1, 1.0], [0.1, 1.0]]
    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_step == 5


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="schedule.name='cosine'"):
        lr_factor(ScheduleConfig(name="cosine"), 0, 10)
