"""The study's runs, part by part (see docs/RESULTS.md for what each part answers).

* ``sweep``  -- from scratch on the 964 background characters, batch 128: queue 0 / 1k / 4k / 8k / 16k /
  32k, each with and without compensation; learning curves for queue 0 and 8k; the paper's Fig. 5a
  (compensation error against entry age) in the 32k arm, before and after the learning-rate drop.
* ``warm``   -- the same queues from a shared warm start (ArcFace, no queue) per seed, trained on at the
  warm start's learning rate (then × 0.1), so the queue has a long schedule to act in.
* ``finetune`` -- the same warm start fine-tuned at a tenth of that learning rate (the paper fine-tunes a
  converged model at a small learning rate): queue 0 vs 8k.
* ``regime`` -- the regime map: queue 0 vs 8k over the number of training classes (136, 482, 964 and
  3,856 with rotations) and the batch (32, 128, 512).
* ``drift``  -- a larger learning rate (more drift between a queued embedding and its sample now):
  queue 0 and 32k with and without compensation, and Fig. 5a there.
* ``margins`` -- the margin family from scratch, each margin without a queue and with 8k: ArcFace, CosFace,
  AdaFace, MagFace, CurricularFace, sub-center ArcFace (the family's own parameters at the papers'
  defaults; m and s as the base's where the margin takes them).
* ``union``  -- the union's speed settings against the fp32 union: bf16 at 964 classes with queue 8k; the
  sampled union (rates 0.3, 0.1) where sampling has negatives to drop, 3,856 rotation classes with
  queue 1k (a queue as long as the classes are many keeps every class: its positives).

Every part is paired by seed: the arms of a seed differ only in the queue and compensation (margins: and
the loss, each loss its own pair; union: and the head's union settings, paired with the fp32 union).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from broadface.study.runs import RunSpec

QUEUES = (0, 1024, 4096, 8192, 16384, 32768)


@dataclass
class StudyConfig:
    """Sizes of the study; :meth:`quick` is a few-minute smoke version of the same plan."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1500
    queues: tuple[int, ...] = QUEUES
    warm_steps: int = 300
    warm_arm_steps: int = 1200
    finetune_lr: float = 0.01
    finetune_queues: tuple[int, ...] = (0, 8192)
    regime_classes: tuple[int | str | None, ...] = (136, 482, None, "rot")  # None: all 964; "rot": 3,856 rotated
    regime_batches: tuple[int, ...] = (32, 128, 512)
    regime_steps: int = 1000
    regime_queue: int = 8192
    drift_lr: float = 0.3
    drift_queues: tuple[int, ...] = (0, 32768)
    margin_losses: tuple[str, ...] = ("arcface", "cosface", "adaface", "magface", "curricularface", "subcenter")
    margin_queue: int = 8192
    union_queue: int = 8192
    union_sampled_queue: int = 1024
    union_rates: tuple[float, ...] = (0.3, 0.1)
    curve_every: int = 150
    parts: tuple[str, ...] = ("sweep", "warm", "finetune", "regime", "drift", "margins", "union")
    base: RunSpec = field(default_factory=lambda: RunSpec(part="", seed=0))

    @classmethod
    def quick(cls) -> StudyConfig:
        return cls(seeds=(0,), steps=60, queues=(0, 1024, 4096), warm_steps=20, warm_arm_steps=40,
                   finetune_queues=(0, 1024),
                   regime_classes=(136, None), regime_batches=(32, 128), regime_steps=40, regime_queue=1024,
                   drift_queues=(0, 1024), margin_queue=1024, union_queue=1024, union_sampled_queue=512,
                   curve_every=20)


def _arms(base: RunSpec, queues: tuple[int, ...]) -> list[RunSpec]:
    """Queue 0 once, every other queue with and without compensation."""
    out = []
    for q in queues:
        out += [replace(base, queue=q)]
        if q:
            out += [replace(base, queue=q, compensate=False)]
    return out


def sweep(sc: StudyConfig, seed: int) -> list[RunSpec]:
    base = replace(sc.base, part="sweep", seed=seed, steps=sc.steps)
    largest = max(sc.queues)
    out = []
    for s in _arms(base, sc.queues):
        if s.compensate and s.queue in (0, 8192 if 8192 in sc.queues else largest):
            s = replace(s, eval_every=sc.curve_every)
        if s.compensate and s.queue == largest:
            s = replace(s, error_steps=(int(0.8 * sc.steps), sc.steps))
        out.append(s)
    return out


def warm(sc: StudyConfig, seed: int) -> list[RunSpec]:
    base = replace(sc.base, part="warm", seed=seed, steps=sc.warm_arm_steps, warm_steps=sc.warm_steps)
    return _arms(base, sc.queues)


def finetune(sc: StudyConfig, seed: int) -> list[RunSpec]:
    base = replace(sc.base, part="finetune", seed=seed, steps=sc.warm_arm_steps, warm_steps=sc.warm_steps,
                   lr=sc.finetune_lr)
    return [replace(base, queue=q) for q in sc.finetune_queues]


def regime(sc: StudyConfig, seed: int) -> list[RunSpec]:
    out = []
    for classes in sc.regime_classes:
        rot = classes == "rot"
        for batch in sc.regime_batches:
            base = replace(sc.base, part="regime", seed=seed, steps=sc.regime_steps, batch=batch,
                           classes=None if rot else classes, rotations=4 if rot else 1)
            out += [base, replace(base, queue=sc.regime_queue)]
    return out


def drift(sc: StudyConfig, seed: int) -> list[RunSpec]:
    base = replace(sc.base, part="drift", seed=seed, steps=sc.steps, lr=sc.drift_lr)
    largest = max(sc.drift_queues)
    return [replace(s, error_steps=(int(0.8 * sc.steps), sc.steps)) if s.compensate and s.queue == largest else s
            for s in _arms(base, sc.drift_queues)]


def margins(sc: StudyConfig, seed: int) -> list[RunSpec]:
    out = []
    for loss in sc.margin_losses:
        base = replace(sc.base, part="margins", seed=seed, steps=sc.steps, loss=loss)
        out += [base, replace(base, queue=sc.margin_queue)]
    return out


def union(sc: StudyConfig, seed: int) -> list[RunSpec]:
    """Queue 0, the fp32 union and its speed settings, paired within a group (964 classes; 3,856 rotated)."""
    dense = replace(sc.base, part="union", seed=seed, steps=sc.steps)
    out = [dense, replace(dense, queue=sc.union_queue),
           replace(dense, queue=sc.union_queue, head=(("union_dtype", "bfloat16"),))]
    rot = replace(dense, rotations=4)
    out += [rot, replace(rot, queue=sc.union_sampled_queue)]
    return out + [replace(rot, queue=sc.union_sampled_queue, head=(("sample_rate", r),)) for r in sc.union_rates]


PARTS = {"sweep": sweep, "warm": warm, "finetune": finetune, "regime": regime, "drift": drift, "margins": margins,
         "union": union}


def plan(sc: StudyConfig) -> list[RunSpec]:
    """Every run of the study, seed-major so that finished seeds complete whole pairs early."""
    return [s for seed in sc.seeds for part in sc.parts for s in PARTS[part](sc, seed)]
