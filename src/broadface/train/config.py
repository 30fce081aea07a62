"""Typed training configuration: YAML file + dotted ``key=value`` overrides.

A config is a tree of dataclasses (:class:`Config` with sections ``model``,
``data``, ``head``, ``optim``, ``schedule``, ``train``, ``distill``). Loading is strict: an
unknown key or a value of the wrong type is a ``ValueError`` that names the key
and the file (or override) it came from, so typos never silently fall back to a
default.

    cfg = load_config("configs/omniglot_tinycnn.yaml", ["optim.lr=0.05", "train.steps=200"])
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from broadface.train.typed import StrictLoader, from_dict, yaml_problem

Amp = Literal["none", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """Backbone, built by ``broadface.models.build_model(name, embedding_size=, input_size=, **kwargs)``."""

    name: str = "iresnet18"
    embedding_size: int = 512
    input_size: int = 112  # images are resized to input_size x input_size
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra build_model arguments, e.g. layers


@dataclass
class DataConfig:
    """Training / validation images: a named set (lfw, celeba299, omniglot, omniglot_small) or an image folder."""

    # folder: root/<identity>/*.jpg; recordio: insightface train.rec/.idx
    name: Literal["lfw", "celeba299", "omniglot", "omniglot_small", "folder", "recordio"] = "celeba299"
    root: str | None = None  # named sets: the data root (null: broadface.paths.data_root()); else the set's path
    train_split: str = "train"
    val_split: str | None = "test"  # held-out identities for Recall@K; null disables evaluation
    val_root: str | None = None  # folder/recordio: a validation image folder of other identities (optional)
    rotations: int = 1  # 4: every class at 0/90/180/270 degrees is its own class (Omniglot few-shot convention)
    flip: bool = True  # random horizontal flip while training
    mask_prob: float = 0.0  # synthetic face mask on this fraction of training images (BigFace: 0.35)
    num_workers: int = 0
    threads: int = 2  # threads of each loading process decoding one batch's slices at once (same batches for any)
    on_error: Literal["raise", "skip"] = "raise"  # skip: an unreadable image is replaced by the next readable one
    test_fold: int | None = None  # lfw only: the View-2 fold whose people are held out (train on the others)


@dataclass
class AdaFaceConfig:
    """AdaFace's norm-adaptive margin (paper defaults)."""

    m: float = 0.4
    h: float = 0.333  # concentration of the norm scaler
    t_alpha: float = 0.01  # momentum of the norm mean / std EMAs


@dataclass
class MagFaceConfig:
    """MagFace's magnitude range, margin range and regulariser weight (paper defaults)."""

    l_a: float = 10.0
    u_a: float = 110.0
    l_margin: float = 0.45
    u_margin: float = 0.8
    lambda_g: float = 35.0


@dataclass
class HeadConfig:
    """Margin loss and the BroadFace queue (queue_size=0 is the plain margin loss)."""

    loss: Literal["arcface", "cosface", "combined", "softmax", "adaface", "magface", "curricularface",
                  "subcenter"] = "arcface"
    scale: float = 64.0  # s
    margin: float = 0.5  # m (arcface, curricularface, subcenter: additive angle; cosface: additive cosine)
    margins: list[float] = field(default_factory=lambda: [1.0, 0.3, 0.2])  # combined: cos(m1*theta + m2) - m3
    adaface: AdaFaceConfig = field(default_factory=AdaFaceConfig)
    magface: MagFaceConfig = field(default_factory=MagFaceConfig)
    curricular_alpha: float = 0.01  # curricularface: momentum of t's EMA
    subcenters: int = 3  # subcenter: K sub-centres per class
    union_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the union's matmuls (fp32 sums)
    queue_size: int = 0  # embeddings kept from past steps (paper: 8192 per GPU)
    compensate: bool = True  # e* = e- + (|e-| / |W-_y|) (W_y - W-_y)
    chunk_size: int = 4096  # rows of the union whose (rows x classes) logits are alive at once (memory)
    storage: Literal["compact", "full"] = "compact"  # compact: D+2 numbers per entry; full: e- and W-_y
    diagnostics: bool = False  # full storage + sample ids and ages (Fig. 5a: BroadFace.diagnostics()), comp. norm
    storage_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # queue storage
    # distributed (WORLD_SIZE > 1): W split by class over ranks (ShardedBroadFace, docs/distributed.md)
    queue_mode: Literal["local", "replicated"] = "local"  # local: queue_size per rank; replicated: world x it on each
    sample_rate: float = 1.0  # Partial FC: fraction of each rank's classes per step (< 1 also on one process)


@dataclass
class OptimConfig:
    """Optimizer over two parameter groups: backbone and classifier (head)."""

    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd, lars
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    trust_coefficient: float = 0.001  # lars eta
    head_lr_mult: float = 1.0  # classifier lr = lr * head_lr_mult
    head_weight_decay: float | None = None  # None: same as weight_decay
    no_decay_bias_bn: bool = False  # sgd/adamw: no weight decay on biases and norm layers (lars: always)
    clip_grad: float | None = None  # max global L2 norm of the backbone gradient
    zero: bool = False  # distributed only: ZeRO-partition the backbone's optimizer state over ranks


@dataclass
class ScheduleConfig:
    """Learning-rate factor per step: linear warm-up, then multi-step, polynomial or constant."""

    name: Literal["multistep", "poly", "constant"] = "multistep"
    warmup_steps: int = 0
    warmup_start: float = 0.0  # factor at step 0 of the warm-up (rises linearly to 1)
    milestones: list[int] = field(default_factory=list)  # multistep: multiply by gamma at each
    gamma: float = 0.1
    power: float = 2.0  # poly: (1 - progress) ** power
    end_factor: float = 0.0  # poly: factor reached at the last step


@dataclass
class TrainConfig:
    """Loop length, batch, precision, seeding, output and intervals."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 128  # images per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    micro_batch: int | None = None  # run the encoder this many images at a time under a whole-batch head (memory)
    amp: Amp = "none"  # bf16 autocast (CPU/CUDA) or fp16 autocast + GradScaler (CUDA)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output: str | None = "runs/broadface"  # null: keep everything in memory, write no file
    log_every: int = 50
    checkpoint_every: int = 1000  # 0: final checkpoint only
    keep_checkpoints: int = 3  # periodic checkpoints kept (0: keep all)
    eval_every: int = 0  # 0: evaluate once, at the end (if data.val_split is set)
    eval_batch_size: int = 256
    eval_flip: bool = True  # add the embedding of the flipped image at evaluation
    init: str | None = None  # warm start: backbone + classifier from this checkpoint
    init_head: bool = True  # also copy the classifier W from train.init (same classes, same order)
    resume: str | None = None  # continue exactly from this checkpoint ("auto": latest in output)
    resume_allow: list[str] = field(default_factory=list)  # keys that may differ from the checkpoint's, e.g. steps
    overwrite: bool = False  # a fresh run replaces the results of an earlier run in output (else refused)
    val_bins: list[str] = field(default_factory=list)  # verification sets (.bin, lfw, LFW folder) every eval_every
    tensorboard: bool = True


@dataclass
class DistillConfig:
    """Knowledge distillation (BigFace-Distill): loss += weight * d(student, teacher), see docs/distillation.md."""

    teacher: str | None = None  # broadface checkpoint (.pt) or ONNX embedding model (.onnx); null: off
    weight: float = 9.0  # lambda
    kind: Literal["cosine", "l2"] = "cosine"  # 1 - cos, or |s/|s| - t/|t||^2 (= 2 - 2 cos)
    cache: str | None = None  # .npy of teacher embeddings (N x 2 x D: plain, flipped); built when missing
    cache_dtype: Literal["float16", "float32"] = "float16"
    unlabeled_root: str | None = None  # folder of extra images without labels: distillation term only
    batch_size: int = 128  # teacher batch when building the cache


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint friendly)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, world_size: int | None = None, device: str | None = None) -> Config:
        """Check what types alone cannot, for a run on ``world_size`` ranks on ``device`` ("cpu", "cuda";
        None: not known yet, e.g. ``--print-config``); raise ValueError naming the field. Every config
        check lives here (the trainer calls it with its process's world and device)."""
        t, o, s, h = self.train, self.optim, self.schedule, self.head
        positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                    "train.log_every": t.log_every, "train.eval_batch_size": t.eval_batch_size,
                    "data.threads": self.data.threads,
                    "model.embedding_size": self.model.embedding_size, "model.input_size": self.model.input_size}
        nonneg = {"train.checkpoint_every": t.checkpoint_every, "train.keep_checkpoints": t.keep_checkpoints,
                  "train.eval_every": t.eval_every, "head.queue_size": h.queue_size,
                  "schedule.warmup_steps": s.warmup_steps, "data.num_workers": self.data.num_workers,
                  "optim.weight_decay": o.weight_decay}
        for key, v in positive.items():
            _check(v > 0, key, v, "a positive number")
        for key, v in nonneg.items():
            _check(v >= 0, key, v, "a number >= 0")
        _check(o.lr > 0, "optim.lr", o.lr, "a positive learning rate")
        _check(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", o.clip_grad, "null or > 0")
        _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "two values in [0, 1)")
        _check(self.data.rotations in (1, 2, 4), "data.rotations", self.data.rotations, "1 (off), 2 or 4")
        _check(0 <= self.data.mask_prob <= 1, "data.mask_prob", self.data.mask_prob, "a probability in [0, 1]")
        _check(self.distill.weight >= 0, "distill.weight", self.distill.weight, "a number >= 0")
        _check(self.distill.batch_size > 0, "distill.batch_size", self.distill.batch_size, "a positive number")
        _check(self.distill.teacher is not None or not (self.distill.unlabeled_root or self.distill.cache),
               "distill.teacher", self.distill.teacher, "a teacher file when distill.unlabeled_root / distill.cache "
               "is set (they need distill.teacher)")
        _validate_head(h)
        _check(t.micro_batch is None or t.micro_batch > 0, "train.micro_batch", t.micro_batch, "null or > 0")
        _check(t.micro_batch is None or t.grad_accum == 1, "train.micro_batch", t.micro_batch,
               "null when train.grad_accum > 1 (use one or the other)")
        _check(list(s.milestones) == sorted(set(s.milestones)) and all(m > 0 for m in s.milestones),
               "schedule.milestones", s.milestones, "strictly increasing positive steps")
        _check(0 <= s.warmup_start <= 1, "schedule.warmup_start", s.warmup_start, "a factor in [0, 1]")
        _check(t.init is None or t.resume is None, "train.init", t.init,
               "null when train.resume is set (a resumed run already holds its weights)")
        _check(not t.overwrite or t.resume is None, "train.overwrite", t.overwrite,
               "false when train.resume is set (a resumed run continues its results, it does not replace them)")
        _check(self.data.test_fold is None or (self.data.name == "lfw" and self.data.test_fold >= 0),
               "data.test_fold", self.data.test_fold, "null, or a View-2 fold 0..9 with data.name=lfw")
        from broadface.train.guard import check_allow_list

        check_allow_list(t.resume_allow)
        _check(t.amp != "fp16" or device in (None, "cuda"), "train.amp", t.amp,
               "bf16 or none on CPU (fp16 autocast and its GradScaler need a CUDA device)")
        _check(not o.zero or world_size is None or world_size > 1, "optim.zero", o.zero, "false in one process "
               "(ZeRO partitions optimizer state over ranks; it needs a torchrun job, WORLD_SIZE > 1)")
        _check(world_size in (None, 1) or not self.distill.unlabeled_root, "distill.unlabeled_root",
               self.distill.unlabeled_root, "null under torchrun (unlabeled images are supported in one process only)")
        return self


def _validate_head(h: HeadConfig) -> None:
    """The head's checks (margins, union, queue storage)."""
    _check(h.scale > 0, "head.scale", h.scale, "> 0")
    _check(len(h.margins) == 3, "head.margins", h.margins, "three values [m1, m2, m3]")
    _check(h.chunk_size > 0, "head.chunk_size", h.chunk_size, "> 0")
    _check(h.subcenters >= 1, "head.subcenters", h.subcenters, ">= 1")
    _check(0 < h.curricular_alpha <= 1, "head.curricular_alpha", h.curricular_alpha, "a momentum in (0, 1]")
    _check(0 < h.adaface.t_alpha <= 1, "head.adaface.t_alpha", h.adaface.t_alpha, "a momentum in (0, 1]")
    _check(0 < h.magface.l_a < h.magface.u_a, "head.magface.l_a", h.magface.l_a,
           f"0 < l_a < head.magface.u_a={h.magface.u_a}")
    _check(0 <= h.magface.l_margin <= h.magface.u_margin < 1.5707963, "head.magface.l_margin",
           h.magface.l_margin, f"0 <= l_margin <= head.magface.u_margin={h.magface.u_margin} < π/2")
    _check(0 < h.sample_rate <= 1, "head.sample_rate", h.sample_rate, "a fraction in (0, 1]")
    _check(not h.diagnostics or h.storage == "full", "head.storage", h.storage,
           "full when head.diagnostics=true (the diagnostics need e- and W-_y)")
    _check(h.loss not in ("arcface", "cosface") or h.margin >= 0, "head.margin", h.margin,
           f"a margin >= 0 for head.loss={h.loss}")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"config {key}={value!r}: expected {expected}")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults when path is None) and apply ``a.b=value`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        source = str(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader) or {}
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                             "save the config as UTF-8") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML ({yaml_problem(err)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections (model, data, head, ...), "
                             f"got {type(data).__name__}")
    cfg = from_dict(Config, data, source)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Return a new Config with each ``section.key=value`` applied (value parsed as YAML)."""
    data = cfg.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=0.1")
        parts = key.strip().split(".")
        node, free = data, False  # free: inside a mapping-valued key (model.kwargs), where any key is valid
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or (part not in node and not free):
                raise ValueError(f"override {item!r}: unknown config key '{'.'.join(parts[:depth + 1])}'")
            free = free or _is_mapping_field(parts[:depth + 1])
            node = node.setdefault(part, {}) if free else node[part]
        if not isinstance(node, dict) or (parts[-1] not in node and not free):
            valid = ", ".join(node) if isinstance(node, dict) else ""
            raise ValueError(f"override {item!r}: unknown config key '{key.strip()}' (valid here: {valid})")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            node[parts[-1]] = raw
        cfg = from_dict(Config, data, f"override {item!r}")  # type-check this override now
    return cfg


def _is_mapping_field(parts: list[str]) -> bool:
    """True when ``a.b`` names a free-form mapping field of :class:`Config` (``model.kwargs``)."""
    tp: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return typing.get_origin(tp) is dict
