"""Everything a run is built from, in one place: data, model, head, distiller, optimizer, schedule, scaler.

:func:`build` turns a validated :class:`Config` and the process's :class:`DistContext` into the
:class:`Components` of a run. Initial weights follow from ``train.seed`` alone: they are drawn
inside :func:`broadface.train.rng.forked_rngs` (the caller's global RNG state is left as it was),
and the state the RNGs have after building is returned as ``start_rng`` for the training loop to
start from (:meth:`broadface.train.Trainer.begin`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from broadface.dist import DistContext
from broadface.heads import (AdaFace, ArcFace, BroadFace, CombinedMargin, CosFace, CurricularFace, MagFace, MarginHead,
                             NormSoftmax, SubCenterArcFace)
from broadface.train.config import Config, DataConfig, HeadConfig
from broadface.train.distill import Distiller, build_distiller
from broadface.train.guard import data_fingerprint
from broadface.train.memory import zero_redundancy
from broadface.train.optim import build_optimizer
from broadface.train.rng import capture_rng, forked_rngs, seed_everything
from broadface.train.schedule import WarmupScheduler, build_scheduler


@dataclass
class Components:
    """The parts of one training run (see :func:`build`)."""

    model: nn.Module  # the backbone, as saved and evaluated
    net: nn.Module  # what the step runs: the backbone, or its DDP wrapper
    head: BroadFace
    distill: Distiller | None
    train_set: Dataset
    val_set: Dataset | None
    num_classes: int
    optimizer: Any  # torch.optim.Optimizer, or SplitOptimizer with ZeRO
    scheduler: WarmupScheduler
    scaler: torch.amp.GradScaler
    start_rng: dict[str, Any]  # the global RNG states a fresh run starts from
    fingerprint: dict[str, Any] | None = None  # the labelled training set's class list (the resume guard)
    labelled_set: Dataset | None = None  # the labelled training set (before distillation wraps it)


def margin_factory(cfg: HeadConfig) -> Callable[[int, int], MarginHead]:
    """``(num_classes, embedding_size) -> MarginHead`` for ``head.loss``."""
    if cfg.loss in ("arcface", "cosface"):
        return functools.partial(ArcFace if cfg.loss == "arcface" else CosFace, scale=cfg.scale, margin=cfg.margin)
    if cfg.loss == "combined":
        m1, m2, m3 = cfg.margins
        return functools.partial(CombinedMargin, m1=m1, m2=m2, m3=m3, scale=cfg.scale)
    if cfg.loss == "softmax":
        return functools.partial(NormSoftmax, scale=cfg.scale)
    if cfg.loss == "adaface":
        a = cfg.adaface
        return functools.partial(AdaFace, scale=cfg.scale, margin=a.m, h=a.h, t_alpha=a.t_alpha)
    if cfg.loss == "magface":
        g = cfg.magface
        return functools.partial(MagFace, scale=cfg.scale, l_a=g.l_a, u_a=g.u_a, l_margin=g.l_margin,
                                 u_margin=g.u_margin, lambda_g=g.lambda_g)
    if cfg.loss == "curricularface":
        return functools.partial(CurricularFace, scale=cfg.scale, margin=cfg.margin, alpha=cfg.curricular_alpha)
    if cfg.loss == "subcenter":
        return functools.partial(SubCenterArcFace, scale=cfg.scale, margin=cfg.margin, subcenters=cfg.subcenters)
    raise ValueError(f"config head.loss={cfg.loss!r}: expected arcface, cosface, combined, softmax, adaface, "
                     "magface, curricularface or subcenter")


def build_head(cfg: HeadConfig, num_classes: int, embedding_size: int, world_size: int = 1,
               seed: int = 0) -> BroadFace:
    """The margin classifier wrapped in BroadFace (``queue_size=0``: exactly the plain margin loss).

    Class-sharded over the default group when ``world_size > 1``; there W is initialised so row c depends on
    (seed, c) only. In one process (also with ``head.sample_rate < 1``) W is drawn as the plain head's, so a
    sampled run and an unsampled one start from the same classifier (a paired comparison). In one process
    the trainer checks labels on the host; sharded, the head checks them itself (an error on one rank is
    raised on every rank)."""
    kw = dict(queue_size=cfg.queue_size, compensate=cfg.compensate, chunk_size=cfg.chunk_size, storage=cfg.storage,
              storage_dtype=getattr(torch, cfg.storage_dtype), diagnostics=cfg.diagnostics,
              validate_labels=world_size > 1, union_dtype=getattr(torch, cfg.union_dtype))
    return BroadFace.sharded(margin_factory(cfg), num_classes, embedding_size, queue_mode=cfg.queue_mode,
                             sample_rate=cfg.sample_rate, encoder_grad="ddp",
                             init_seed=seed if world_size > 1 else None, **kw)


def build_datasets(cfg: DataConfig, input_size: int) -> tuple[Dataset, Dataset | None]:
    """(train, validation or None) with the training (flip) and evaluation transforms."""
    from broadface.data.transforms import EvalTransform, FaceTransform

    train_tf = FaceTransform(size=input_size, flip_p=0.5 if cfg.flip else 0.0, mask_prob=cfg.mask_prob,
                             pixels=True)  # uint8 batches: the step normalises them on its device
    eval_tf = EvalTransform(size=input_size)
    if cfg.name in ("folder", "recordio"):
        from broadface.data.folder import FaceFolder
        from broadface.data.recordio import RecordIODataset
        from broadface.data.rotations import RotatedClasses

        if not cfg.root:
            raise ValueError(f"config data.root: data.name={cfg.name} needs the path of the training set "
                             "(an image folder ROOT/<identity>/*.jpg, or a RecordIO prefix / folder)")
        kind = FaceFolder if cfg.name == "folder" else RecordIODataset
        if cfg.rotations == 1:
            train = kind(cfg.root, train_tf, on_error=cfg.on_error)
            return train, (FaceFolder(cfg.val_root, eval_tf, on_error=cfg.on_error) if cfg.val_root else None)
        train = RotatedClasses(kind(cfg.root, on_error=cfg.on_error), cfg.rotations, train_tf, cfg.on_error)
        val = (RotatedClasses(FaceFolder(cfg.val_root, on_error=cfg.on_error), cfg.rotations, eval_tf, cfg.on_error)
               if cfg.val_root else None)
        return train, val
    from broadface.data import open_dataset

    kw = dict(data_root=cfg.root, on_error=cfg.on_error, rotations=cfg.rotations, test_fold=cfg.test_fold)
    try:
        train = open_dataset(cfg.name, cfg.train_split, transform=train_tf, **kw)
    except ValueError as err:
        if "test_fold" in str(err):
            raise ValueError(f"config data.test_fold={cfg.test_fold}: {err}") from None
        raise
    val = open_dataset(cfg.name, cfg.val_split, transform=eval_tf, **kw) if cfg.val_split else None
    return train, val


def num_classes_of(dataset: Dataset) -> int:
    for attr in ("num_classes", "classes"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return int(value) if isinstance(value, int) else len(value)
    raise ValueError(f"training set {type(dataset).__name__} has neither .num_classes nor .classes; "
                     "pass Trainer(..., num_classes=C)")


def check_mask_prob(cfg: Config, train_set: Dataset, injected: bool) -> None:
    """``data.mask_prob`` applies to the configured data; an injected set must carry it in its own transform."""
    want = cfg.data.mask_prob
    if injected and want > 0 and getattr(getattr(train_set, "transform", None), "mask_prob", None) != want:
        raise ValueError(f"config data.mask_prob={want}: the train_set passed to Trainer builds its own images; "
                         f"give it FaceTransform(..., mask_prob={want}) (or leave data.mask_prob at 0)")


def build(cfg: Config, ctx: DistContext, train_set: Dataset | None = None, val_set: Dataset | None = None,
          model: nn.Module | None = None, num_classes: int | None = None) -> Components:
    """The components of a run of ``cfg`` (validated for ``ctx``) on this process.

    ``train_set`` / ``val_set`` / ``model`` replace the configured ones (an injected model is used as given)."""
    from broadface.models import build_model

    injected = train_set is not None
    if train_set is None:
        train_set, configured_val = build_datasets(cfg.data, cfg.model.input_size)
        val_set = configured_val if val_set is None else val_set
    num_classes = num_classes or num_classes_of(train_set)
    check_mask_prob(cfg, train_set, injected)
    labelled, fingerprint = train_set, data_fingerprint(train_set)
    m = cfg.model
    with forked_rngs():  # initial weights from train.seed; the caller's RNG state is untouched
        seed_everything(cfg.train.seed)
        if model is None:
            model = build_model(m.name, embedding_size=m.embedding_size, input_size=m.input_size, **m.kwargs)
        head = build_head(cfg.head, num_classes, m.embedding_size, ctx.world_size, cfg.train.seed)
        model, head = model.to(ctx.device), head.to(ctx.device)
        # Distillation (None unless distill.teacher): items become (image, label, cache key), maybe + unlabeled.
        distill, train_set = build_distiller(cfg, train_set, ctx.device)
        start_rng = capture_rng()
    optimizer = build_optimizer(cfg.optim, model, head)
    if distill is not None:
        distill.add_param_group(optimizer, cfg.optim)
    if cfg.optim.zero:  # ZeRO over the replicated backbone, a plain optimizer over the head's shard
        optimizer = zero_redundancy(optimizer, local_params=list(head.parameters()))
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.amp == "fp16")
    return Components(model, ctx.wrap(model), head, distill, train_set, val_set, num_classes, optimizer, scheduler,
                      scaler, start_rng, fingerprint=fingerprint, labelled_set=labelled)
