"""One training run of the study, described by a :class:`RunSpec` and driven through the Trainer.

A run trains ``tinycnn`` on full Omniglot (optionally a class subset or the rotation classes) with
ArcFace (or another margin) and a BroadFace queue of ``queue`` entries (0: the plain margin loss),
then measures Recall@K on the 659 unseen evaluation characters. Runs that differ only in the queue
(and compensation) are *paired*: the same seed gives the same initialisation and data order, and a
warm start (``warm_steps > 0``) is shared by every arm of a seed.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, fields, replace
from statistics import median
from typing import Any

import torch

from broadface.study.data import evaluate, omniglot

PAIR_FIELDS = ("queue", "compensate")  # what differs between the arms of a pair


@dataclass(frozen=True)
class RunSpec:
    """Everything a run depends on. ``part`` names the table/plot it belongs to."""

    part: str
    seed: int
    queue: int = 0
    compensate: bool = True
    classes: int | None = None  # None: every training class (964, or 3,856 with rotations=4)
    test_classes: int | None = None  # None: all 659 evaluation characters (fewer: fast tests)
    rotations: int = 1
    batch: int = 128
    steps: int = 1500
    lr: float = 0.1
    drop_at: float = 0.8  # lr x 0.1 at this fraction of the steps
    loss: str = "arcface"
    scale: float = 30.0
    margin: float = 0.3
    width: int = 32
    dim: int = 128
    size: int = 28
    weight_decay: float = 5e-4
    warm_steps: int = 0  # > 0: start from a shared warm start (loss without queue, lr warm_lr, constant)
    warm_lr: float = 0.1
    eval_every: int = 0  # > 0: a learning curve (Recall@1 every eval_every steps)
    error_steps: tuple[int, ...] = ()  # Fig. 5a: compensation error measured after these steps
    error_stride: int = 4  # ... on the entries of every 4th enqueue step
    head: tuple[tuple[str, Any], ...] = ()  # extra head.* config overrides, e.g. (("union_dtype", "bfloat16"),)

    def key(self) -> str:
        """Stable identity of the run (what a resumed study skips)."""
        return self._fields_json()

    def trained_key(self) -> str:
        """What the trained model depends on: the key without the part (two parts may plan the same run)."""
        return self._fields_json({"part"})

    def pair_key(self, also: tuple[str, ...] = ()) -> str:
        """Identity of the pair: every field except the queue and compensation (and the fields ``also``, e.g.
        ``("head",)`` to pair arms that differ in their head settings, such as the union's dtype)."""
        return self._fields_json(set(PAIR_FIELDS) | {"eval_every", "error_steps"} | set(also))

    def _fields_json(self, skip: set[str] = frozenset()) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k not in skip}, sort_keys=True)

    def warm(self) -> RunSpec | None:
        """The warm-start run this arm starts from (None: from scratch)."""
        if not self.warm_steps:
            return None
        return replace(self, part="warmstart", queue=0, compensate=True, steps=self.warm_steps, lr=self.warm_lr,
                       drop_at=1.0, warm_steps=0, eval_every=0, error_steps=(), head=())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["error_steps"] = tuple(d.get("error_steps", ()))
        d["head"] = tuple(tuple(x) for x in d.get("head", ()))
        return cls(**d)


def train_config(spec: RunSpec, init: str | None):
    """The :class:`broadface.train.Config` of a run (``broadface train`` with these keys trains the same)."""
    from broadface.train.config import Config

    cfg = Config()
    cfg.model.name, cfg.model.embedding_size, cfg.model.input_size = "tinycnn", spec.dim, spec.size
    cfg.model.kwargs = {"width": spec.width}
    cfg.data.name, cfg.data.flip, cfg.data.rotations, cfg.data.val_split = "omniglot", False, spec.rotations, None
    cfg.head.loss, cfg.head.scale, cfg.head.margin = spec.loss, spec.scale, spec.margin
    cfg.head.queue_size, cfg.head.compensate = spec.queue, spec.compensate
    cfg.head.storage = "full" if spec.error_steps and spec.queue else "compact"
    cfg.head.diagnostics = bool(spec.error_steps and spec.queue)  # the queue keeps sample ids (Fig. 5a)
    for key, value in spec.head:  # "union_dtype", or dotted into a section: "magface.l_a"
        *path, last = key.split(".")
        section = cfg.head
        for name in path:
            section = getattr(section, name)
        setattr(section, last, value)
    cfg.optim.lr, cfg.optim.weight_decay = spec.lr, spec.weight_decay
    cfg.schedule.name = "multistep"
    cfg.schedule.milestones = [int(spec.drop_at * spec.steps)] if spec.drop_at < 1 else []
    cfg.train.steps, cfg.train.batch_size, cfg.train.seed = spec.steps, spec.batch, spec.seed
    cfg.train.output, cfg.train.tensorboard, cfg.train.device, cfg.train.init = None, False, "cpu", init
    return cfg


def train_set(spec: RunSpec):
    return omniglot("train", spec.size, spec.rotations, spec.classes)


def _trainer(spec: RunSpec, init: str | None):
    from broadface.train.trainer import Trainer

    return Trainer(train_config(spec, init), train_set=train_set(spec), progress=False)


@torch.no_grad()
def compensation_error(tr, stride: int) -> dict[str, list]:
    """Paper Fig. 5a: 1 − cos between each queued entry (e* and e⁻) and the current embedding of its sample.

    The samples of one enqueue step were one training mini-batch, so they are re-embedded together, in
    train mode (BatchNorm with that batch's statistics, as when they were enqueued) on a copy of the
    encoder (running statistics untouched). Entries of every ``stride``-th enqueue step are used.
    """
    diag = tr.head.diagnostics()  # oldest first: sample ids, ages, e*, e⁻
    model = copy.deepcopy(tr.model).train()
    picked = [a for a in torch.unique(diag.ages).tolist() if a % stride == 0]
    rows = [torch.nonzero(diag.ages == a).squeeze(1) for a in picked]
    current = torch.cat([model(tr.train_set.images[diag.ids[r]]) for r in rows])
    order = torch.cat(rows)
    sub = replace(diag, ids=diag.ids[order], ages=diag.ages[order], labels=diag.labels[order],
                  compensated=diag.compensated[order], uncompensated=diag.uncompensated[order])
    comp, unc = sub.cosine_error(current)
    return {"age": sub.ages.tolist(), "compensated": [round(float(x), 6) for x in comp.tolist()],
            "uncompensated": [round(float(x), 6) for x in unc.tolist()]}


def run(spec: RunSpec, init: str | None = None, save: str | None = None, threads: int = 1) -> dict[str, Any]:
    """Train ``spec`` (from ``init``, the warm-start checkpoint, if any) and evaluate it.

    Returns a JSON-ready record: the spec, Recall@K, train seconds and ms per step (the training step
    only; mean and median, the median robust to a pause or a burst of load), the thread count, the queue
    fill, the learning curve and the Fig. 5a errors. ``save`` writes the final state (a warm start's
    checkpoint for its arms)."""
    torch.set_num_threads(threads)
    test = omniglot("test", spec.size, 1, spec.test_classes)
    tr = _trainer(spec, init)
    track = bool(spec.error_steps and spec.queue)
    curve, errors, losses = [], [], []
    step_s, t0 = [], time.perf_counter()
    if spec.eval_every:
        curve.append((0, evaluate(tr.model, test)["recall@1"]))
    for step in range(1, spec.steps + 1):
        ts = time.perf_counter()
        stats = tr.train_step()
        step_s.append(time.perf_counter() - ts)
        if step % max(1, spec.steps // 50) == 0 or step == spec.steps:  # a host sync, every 2 % of the run
            tr.check_finite()
            s = stats.as_dict()
            losses.append((step, s["batch_loss"], s["union_loss"]))
        if spec.eval_every and step % spec.eval_every == 0 and step < spec.steps:
            curve.append((step, evaluate(tr.model, test)["recall@1"]))
        if track and step in spec.error_steps:
            errors.append({"step": step, "lr": tr.optimizer.param_groups[0]["lr"],
                           **compensation_error(tr, spec.error_stride)})
    if save:
        from broadface.fileio import atomic_torch_save

        atomic_torch_save(tr.state_dict(), save)
    train_s = sum(step_s)
    final = evaluate(tr.model, test)
    if spec.eval_every:
        curve.append((spec.steps, final["recall@1"]))  # the curve's last point is the final evaluation
    return {"spec": asdict(spec), "key": spec.key(), **final, "train_s": round(train_s, 2),
            "step_ms": round(1000 * train_s / spec.steps, 2), "step_ms_median": round(1000 * median(step_s), 2),
            "threads": threads, "wall_s": round(time.perf_counter() - t0, 2),
            "fill": int(tr.head.queue.fill) if spec.queue else 0, "num_classes": tr.num_classes,
            "curve": curve, "errors": errors, "losses": losses}

