"""Training runs of the study: one warm start per seed, then one fine-tuning run per arm.

Every arm of a seed starts from the same warm-start checkpoint (ArcFace, ``warm_steps`` steps)
and fine-tunes ``steps`` steps with the same seed, hence the same data order, schedule and
batch size; only ``head.queue_size`` and ``head.compensate`` differ. Runs are driven through
:class:`broadface.train.Trainer` (its ``train_step`` and ``head``), nothing in the trainer
is changed: queue arms get a full-storage queue with ``track_ids`` (the maths is that of the
compact queue; full storage also keeps e⁻ and W⁻_y for the compensation-error diagnostic) and
the ids of each step's batch are read off the loader's deterministic order.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from broadface.study.data import evaluate, load_omniglot, pair_protocol


@dataclass
class StudyConfig:
    """Everything a run depends on (shared by every arm)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    queues: list[int] = field(default_factory=lambda: [0, 1024, 4096, 16384, 32768])
    width: int = 32  # tinycnn width
    embedding_size: int = 128
    input_size: int = 28
    batch_size: int = 128
    scale: float = 30.0
    margin: float = 0.3
    warm_steps: int = 300  # ArcFace warm start from scratch
    warm_lr: float = 0.1
    steps: int = 400  # fine-tuning steps of every arm
    lr: float = 0.01
    lr_drop_at: float = 0.8  # x0.1 at this fraction of the steps
    weight_decay: float = 5e-4
    eval_every: int = 40  # learning curves (queue 0 and the largest queue)
    error_steps: list[int] = field(default_factory=lambda: [300, 400])  # compensation error measured here
    error_stride: int = 4  # re-embed the entries of every 4th enqueue step
    threads: int = 1
    data_root: str | None = None

    @property
    def largest(self) -> int:
        return max(self.queues)


def trainer_config(sc: StudyConfig, seed: int, queue: int, compensate: bool, *, warm: str | None):
    """The :class:`broadface.train.Config` of a warm start (``warm=None``) or of an arm."""
    from broadface.train.config import Config

    cfg = Config()
    cfg.model.name, cfg.model.embedding_size, cfg.model.input_size = "tinycnn", sc.embedding_size, sc.input_size
    cfg.model.kwargs = {"width": sc.width}
    cfg.data.name, cfg.data.flip = "omniglot", False
    cfg.head.loss, cfg.head.scale, cfg.head.margin = "arcface", sc.scale, sc.margin
    cfg.head.queue_size, cfg.head.compensate, cfg.head.storage = queue, compensate, "full"
    cfg.optim.weight_decay = sc.weight_decay
    steps = sc.warm_steps if warm is None else sc.steps
    cfg.optim.lr = sc.warm_lr if warm is None else sc.lr
    if warm is None:
        cfg.schedule.name, cfg.schedule.warmup_steps = "constant", min(30, steps)
    else:
        cfg.schedule.name, cfg.schedule.milestones = "multistep", [int(sc.lr_drop_at * steps)]
    cfg.train.steps, cfg.train.batch_size, cfg.train.seed = steps, sc.batch_size, seed
    cfg.train.output, cfg.train.tensorboard, cfg.train.device, cfg.train.init = None, False, "cpu", warm
    return cfg


def _trainer(sc: StudyConfig, train_set, seed: int, queue: int, compensate: bool, warm: str | None):
    from broadface.heads.queue import EmbeddingQueue
    from broadface.train.trainer import Trainer

    tr = Trainer(trainer_config(sc, seed, queue, compensate, warm=warm), train_set=train_set, progress=False)
    if queue:  # same maths; also keeps sample ids and enqueue steps
        tr.head.queue = EmbeddingQueue(queue, sc.embedding_size, "full", compensate=compensate, track_ids=True)
    return tr


def _record_ids(tr) -> None:
    """Write the sample ids of the batch just enqueued into the queue (read off the loader's order)."""
    from broadface.data.loader import epoch_order

    q, b = tr.head.queue, tr.cfg.train.batch_size
    if q.size == 0:
        return
    epoch, batch = tr.stream.epoch, tr.stream.batch - 1  # the batch consumed by the last step
    ids = epoch_order(len(tr.train_set), tr.cfg.train.seed, epoch)[batch * b:(batch + 1) * b]
    slots = (q.ptr - len(ids) + torch.arange(len(ids))) % q.size
    if not torch.equal(q.labels[slots], tr.train_set.labels[ids]):
        raise RuntimeError("queue labels do not match the loader order: sample ids would be wrong")
    q.ids[slots] = ids


@torch.no_grad()
def compensation_error(tr, stride: int) -> dict[str, list]:
    """Paper Fig. 5a: 1 − cos between each queued entry (e* and e⁻) and the current embedding of its sample.

    The samples of one enqueue step were one training mini-batch, so they are re-embedded together, in
    train mode (BatchNorm with that batch's statistics, as when they were enqueued) on a copy of the
    encoder (running statistics untouched). Entries of every ``stride``-th enqueue step are used.
    """
    q, head = tr.head.queue, tr.head
    order = q.order()
    steps = q.steps[order]
    picked = [s for s in torch.unique(steps).tolist() if s % stride == 0]
    model = copy.deepcopy(tr.model).train()
    slots, current = [], []
    for s in picked:
        sl = order[steps == s]
        slots.append(sl)
        current.append(model(tr.train_set.images[q.ids[sl]]))
    err = head.compensation_error(torch.cat(current), torch.cat(slots))
    return {k: [float(f"{x:.6g}") for x in v.tolist()] if v.is_floating_point() else v.tolist()
            for k, v in err.items()}


def warm_start_run(sc: StudyConfig, seed: int, path: str) -> dict[str, Any]:
    """ArcFace from scratch for ``warm_steps`` steps; saves the checkpoint every arm of ``seed`` starts from."""
    torch.set_num_threads(sc.threads)
    train, test = load_omniglot(sc.input_size, sc.data_root)
    t0 = time.perf_counter()
    tr = _trainer(sc, train, seed, 0, True, None)
    for _ in range(sc.warm_steps):
        tr.train_step()
    torch.save(tr.state_dict(), path)
    wall = time.perf_counter() - t0
    pairs = pair_protocol(test.labels.numpy())
    return {"kind": "warm", "seed": seed, "steps": sc.warm_steps, "wall_s": wall, **evaluate(tr.model, test, pairs)}


def arm_run(sc: StudyConfig, seed: int, queue: int, compensate: bool, warm: str) -> dict[str, Any]:
    """Fine-tune one arm from the seed's warm start; returns its metrics, curve and diagnostics."""
    torch.set_num_threads(sc.threads)
    train, test = load_omniglot(sc.input_size, sc.data_root)
    pairs = pair_protocol(test.labels.numpy())
    tr = _trainer(sc, train, seed, queue, compensate, warm)
    curve_arm = queue in (0, sc.largest)
    error_arm = queue == sc.largest and compensate
    curve, errors, losses = [], [], []
    train_s = 0.0
    t0 = time.perf_counter()
    if curve_arm:
        curve.append((0, evaluate(tr.model, test, None)["recall@1"]))
    for step in range(1, sc.steps + 1):
        ts = time.perf_counter()
        stats = tr.train_step()
        _record_ids(tr)
        train_s += time.perf_counter() - ts
        losses.append((step, stats["batch_loss"], stats["union_loss"], stats["queue_fill"]))
        if curve_arm and (step % sc.eval_every == 0 or step == sc.steps):
            curve.append((step, evaluate(tr.model, test, None)["recall@1"]))
        if error_arm and step in sc.error_steps:
            errors.append({"step": step, "lr": tr.optimizer.param_groups[0]["lr"],
                           **compensation_error(tr, sc.error_stride)})
    wall = time.perf_counter() - t0
    fill = int(tr.head.queue.fill) if queue else 0
    first_full = next((s for s, _, _, f in losses if queue and f >= queue), None)
    return {"kind": "arm", "seed": seed, "queue": queue, "compensate": compensate, "steps": sc.steps,
            "wall_s": wall, "train_s": train_s, "step_ms": 1000 * train_s / sc.steps, "fill": fill,
            "first_full_step": first_full, **evaluate(tr.model, test, pairs), "curve": curve,
            "errors": errors, "losses": losses[:: max(1, sc.steps // 100)]}


def config_dict(sc: StudyConfig) -> dict[str, Any]:
    return asdict(sc)


def arms(sc: StudyConfig) -> list[tuple[int, bool]]:
    """(queue, compensate) of every arm: queue 0 once, every other queue with and without compensation."""
    out: list[tuple[int, bool]] = []
    for q in sc.queues:
        out += [(q, True)] if q == 0 else [(q, True), (q, False)]
    return out


def fill_steps(sc: StudyConfig) -> dict[int, int]:
    """First step whose union holds a full queue (``batch size`` entries are pushed after each step)."""
    return {q: int(np.ceil(q / sc.batch_size)) + 1 for q in sc.queues if q}
