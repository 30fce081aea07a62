"""The training loop: backbone -> embeddings -> margin / BroadFace head -> optimizer step.

    result = Trainer(load_config("configs/omniglot_tinycnn.yaml"), progress=False).fit()
    result.history[-1]["batch_loss"], result.evals[-1]["val_recall@1"], result.checkpoint

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` images. Each
micro-batch loss is divided by ``grad_accum`` (equal sizes, so the sum is the mean
over the step). BroadFace entries of a step are enqueued only after its last
micro-batch was forwarded, so no micro-batch meets its own step in the queue, and
before the optimizer moves ``W`` (W⁻_y = the rows that saw the embedding).

Checkpoints hold everything an exact resume needs (weights, head with queue,
optimizer, scheduler, scaler, RNG states, data position, step); ``train.resume``
continues bit-for-bit on CPU. A non-finite loss stops the run before the update
with :class:`TrainingDiverged`, leaving the last checkpoint untouched.

Under torchrun (``WORLD_SIZE > 1``) every rank runs this loop: DDP backbone, class-sharded
head, per-rank slices of the global batch, rank-0 logs/evaluation/checkpoints in a
world-size independent form (:mod:`broadface.train.parallel`, :mod:`broadface.train.portable`).
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from broadface.fileio import atomic_torch_save
from broadface.models.checkpoint import FORMAT, VERSION, check_model_config, load_checkpoint, model_config
from broadface.train.checkpoint import publish, warm_start
from broadface.train.config import Config, DataConfig, HeadConfig, load_config
from broadface.train.distill import build_distiller, check_mask_prob
from broadface.train.logs import Callback, IntervalMeter, TrainLogger
from broadface.train.optim import build_optimizer
from broadface.train.parallel import Parallel, build_sharded_head, micro_batch_step
from broadface.train.portable import head_state, load_head_state, load_optimizer_state, optimizer_state, warm_start_head
from broadface.train.runtime import autocast, check_amp, grad_scaler, init_runtime
from broadface.train.schedule import build_scheduler
from broadface.train.state import BatchStream, capture_rng, restore_rng, seed_everything

RECALL_KS = (1, 2, 4, 8)


class TrainingDiverged(FloatingPointError):
    """The loss (or gradient) became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: the logged records, the final checkpoint and the summary."""

    history: list[dict[str, Any]]  # one record per log interval (see broadface.train.logs)
    evals: list[dict[str, Any]]  # one record per evaluation
    checkpoint: Path | None  # the final checkpoint (None when train.output is null)
    output: Path | None
    summary: dict[str, Any] = field(default_factory=dict)

    def metric(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of one logged quantity, e.g. ``"union_loss"`` or ``"val_recall@1"``."""
        return [(r["step"], r[key]) for r in self.history + self.evals if r.get(key) is not None]


# ----------------------------------------------------------------------------- building blocks


def margin_factory(cfg: HeadConfig) -> Callable[[int, int], nn.Module]:
    """``(num_classes, embedding_size) -> MarginHead`` for ``head.loss``."""
    from broadface.heads import ArcFace, CombinedMargin, CosFace, NormSoftmax

    if cfg.loss in ("arcface", "cosface"):
        return functools.partial(ArcFace if cfg.loss == "arcface" else CosFace, scale=cfg.scale, margin=cfg.margin)
    if cfg.loss == "combined":
        m1, m2, m3 = cfg.margins
        return functools.partial(CombinedMargin, m1=m1, m2=m2, m3=m3, scale=cfg.scale)
    if cfg.loss == "softmax":
        return functools.partial(NormSoftmax, scale=cfg.scale)
    raise ValueError(f"config head.loss={cfg.loss!r}: expected arcface, cosface, combined or softmax")


def build_head(cfg: HeadConfig, num_classes: int, embedding_size: int, world_size: int = 1,
               seed: int = 0) -> nn.Module:
    """The margin classifier wrapped in BroadFace (``queue_size=0``: exactly the plain margin loss);
    class-sharded (``ShardedBroadFace``, W rows seeded by ``seed``) when ``world_size > 1`` or ``head.sample_rate < 1``."""
    from broadface.heads import BroadFace

    if world_size > 1 or cfg.sample_rate < 1:
        return build_sharded_head(cfg, margin_factory(cfg), num_classes, embedding_size, seed)
    margin = margin_factory(cfg)(num_classes, embedding_size)
    dtype = getattr(torch, cfg.storage_dtype)
    return BroadFace(margin, queue_size=cfg.queue_size, compensate=cfg.compensate,
                     chunk_size=cfg.chunk_size, storage=cfg.storage, storage_dtype=dtype)


def build_datasets(cfg: DataConfig, input_size: int) -> tuple[Dataset, Dataset | None]:
    """(train, validation or None) with the training (flip) and evaluation transforms."""
    from broadface.data.transforms import EvalTransform, FaceTransform

    train_tf = FaceTransform(size=input_size, flip_p=0.5 if cfg.flip else 0.0, mask_prob=cfg.mask_prob)
    eval_tf = EvalTransform(size=input_size)
    if cfg.name in ("folder", "recordio"):
        from broadface.data.folder import FaceFolder
        from broadface.data.recordio import RecordIODataset

        if not cfg.root:
            raise ValueError(f"config data.root: data.name={cfg.name} needs the path of the training set "
                             "(an image folder ROOT/<identity>/*.jpg, or a RecordIO prefix / folder)")
        from broadface.data.rotations import RotatedClasses

        kind = FaceFolder if cfg.name == "folder" else RecordIODataset
        if cfg.rotations == 1:
            train = kind(cfg.root, train_tf, on_error=cfg.on_error)
            return train, (FaceFolder(cfg.val_root, eval_tf, on_error=cfg.on_error) if cfg.val_root else None)
        train = RotatedClasses(kind(cfg.root, on_error=cfg.on_error), cfg.rotations, train_tf, cfg.on_error)
        val = (RotatedClasses(FaceFolder(cfg.val_root, on_error=cfg.on_error), cfg.rotations, eval_tf, cfg.on_error)
               if cfg.val_root else None)
        return train, val
    from broadface.data import open_dataset

    kw = dict(data_root=cfg.root, on_error=cfg.on_error, rotations=cfg.rotations)
    train = open_dataset(cfg.name, cfg.train_split, transform=train_tf, **kw)
    val = open_dataset(cfg.name, cfg.val_split, transform=eval_tf, **kw) if cfg.val_split else None
    return train, val


def num_classes_of(dataset: Dataset) -> int:
    for attr in ("num_classes", "classes"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return int(value) if isinstance(value, int) else len(value)
    raise ValueError(f"training set {type(dataset).__name__} has neither .num_classes nor .classes; "
                     "pass Trainer(..., num_classes=C)")


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds model, head, optimizer, schedule and data from a :class:`Config`; :meth:`fit` trains.

    ``train_set`` / ``val_set`` replace the configured data sets (items ``(image, label)``);
    ``model`` replaces the configured backbone (give it a ``.config`` dict for ``build_model`` so
    ``load_backbone`` can rebuild it); ``callbacks`` get ``(kind, record)`` for every train / eval record.
    """

    def __init__(self, config: Config, *, train_set: Dataset | None = None, val_set: Dataset | None = None,
                 model: nn.Module | None = None, num_classes: int | None = None, progress: bool = True,
                 callbacks: list[Callback] | None = None):
        from broadface.models import build_model

        self.cfg = cfg = config.validate()
        self.runtime = init_runtime(cfg.train.device)
        self.parallel = Parallel(self.runtime)  # torchrun: DDP, sharded head, data slices (a no-op in one process)
        self.parallel.check(cfg)
        self.device = self.runtime.device
        check_amp(self.device, cfg.train.amp)
        self.progress, self.callbacks = progress, list(callbacks or [])
        self.output = Path(cfg.train.output) if cfg.train.output and self.runtime.is_main else None
        seed_everything(cfg.train.seed)

        injected = train_set is not None
        if train_set is None:
            train_set, configured_val = build_datasets(cfg.data, cfg.model.input_size)
            val_set = configured_val if val_set is None else val_set
        self.train_set, self.val_set = train_set, val_set
        self.num_classes = num_classes or num_classes_of(train_set)
        check_mask_prob(cfg, train_set, injected)

        m = cfg.model
        if model is None:
            model = build_model(m.name, embedding_size=m.embedding_size, input_size=m.input_size, **m.kwargs)
        self.model = model.to(self.device)
        self.net = self.parallel.wrap(self.model)  # DDP when distributed: forward through it, save self.model
        self.head = build_head(cfg.head, self.num_classes, m.embedding_size, self.runtime.world_size,
                               cfg.train.seed).to(self.device)
        # Distillation (None unless distill.teacher): items become (image, label, cache key), maybe + unlabeled.
        self.distill, self.train_set = build_distiller(cfg, self.train_set, self.device)
        self.optimizer = build_optimizer(cfg.optim, self.model, self.head)
        if self.distill is not None:
            self.distill.add_param_group(self.optimizer, cfg.optim)
        self.optimizer = self.parallel.zero(self.optimizer, self.head, cfg.optim.zero)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.train.steps)
        self.scaler = grad_scaler(self.device, cfg.train.amp)
        self.stream = BatchStream(self._loader)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.parallel.agree(self._restore)  # an error on any rank is raised on every rank

    def _restore(self) -> None:
        """``train.resume`` (rank 0's choice of checkpoint) or ``train.init``; refuse to overwrite a run."""
        cfg = self.cfg
        resume = self.parallel.broadcast(self._resume_path())
        if resume is not None:
            self.load_state(resume)
        else:
            stale = sorted(self.output.glob("checkpoints/step_*.pt")) if self.output is not None else []
            if stale and cfg.train.resume != "auto":
                raise ValueError(f"train.output={self.output} already holds checkpoints ({stale[-1].name}); "
                                 "continue with train.resume=auto or choose another train.output")
            if cfg.train.init:
                self.warm_start(cfg.train.init)

    # ------------------------------------------------------------------ data
    def _loader(self, epoch: int, start_batch: int):
        from broadface.data.loader import make_loader

        t = self.cfg.train
        if self.parallel.distributed:  # this rank's slices of global batches of batch_size x world
            return self.parallel.loader(self.train_set, t, self.cfg.data.num_workers, epoch, start_batch)
        return make_loader(self.train_set, t.batch_size, shuffle=True, seed=t.seed,
                           num_workers=self.cfg.data.num_workers, drop_last=True, epoch=epoch,
                           start_batch=start_batch, pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its statistics."""
        t = self.cfg.train
        self.model.train()
        self.head.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        batch_loss = union_loss = distill_loss = 0.0
        pending = []
        for i in range(t.grad_accum):
            images, labels, *extra = next(self.stream)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            self.parallel.sync_gradients(self.net, i == t.grad_accum - 1)  # DDP no_sync but on the last
            if t.micro_batch:  # grad_accum == 1 and no distillation (validated); the head enqueues the batch
                stats = micro_batch_step(self.net, self.head, images, labels, t.micro_batch, t.amp, self.scaler)
                self._check_finite(stats["batch_loss"], stats["union_loss"])
                batch_loss, union_loss = stats["batch_loss"], stats["union_loss"]
                continue
            with autocast(self.device, t.amp):
                embeddings = self.net(images)
                if self.distill is None:
                    loss = self.head(embeddings, labels, enqueue=False)
                else:  # + λ·d(student, teacher); images labelled −1 are kept from the head and the queue
                    loss, embeddings, labels, _ = self.distill(self.head, embeddings, labels, images, extra)
            stats = self.head.last_stats if self.distill is None else self.distill.last_stats
            self._check_finite(stats["batch_loss"], stats["union_loss"])
            self.scaler.scale(loss / t.grad_accum).backward()
            pending.append((embeddings.detach(), labels))
            batch_loss += stats["batch_loss"] / t.grad_accum
            union_loss += stats["union_loss"] / t.grad_accum
            distill_loss += stats.get("distill_loss", 0.0) / t.grad_accum
        for embeddings, labels in pending:  # after the whole step was forwarded, before W moves
            self.head.enqueue(embeddings, labels)
        if self.distill is not None:
            self.distill.sync_gradients()  # the projection is outside DDP
        grad_norm = None
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad))
            if not self.scaler.is_enabled():  # fp16 skips inf steps by design
                self._check_finite(grad_norm, what="backbone gradient norm")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return {"lr": lr, "batch_loss": batch_loss, "union_loss": union_loss, "queue_fill": stats["queue_fill"],
                "compensation_norm": stats["compensation_norm"], "grad_norm": grad_norm,
                **({"distill_loss": distill_loss} if self.distill is not None else {})}

    def _check_finite(self, *values: float | None, what: str = "loss") -> None:
        if all(v is None or math.isfinite(v) for v in values):
            return
        ckpt = self.last_checkpoint or "none written yet"
        raise TrainingDiverged(
            f"step {self.step + 1}: non-finite {what} ({', '.join(str(v) for v in values)}); stopped before the "
            f"update. Last good checkpoint: {ckpt}. Lower optim.lr, set optim.clip_grad or check the data, "
            "then resume from that checkpoint (train.resume=PATH).")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Recall@K of the held-out identities (every image queries all others)."""
        from broadface.models.embed import embed_dataset
        from broadface.metrics import recall_at_k

        t = self.cfg.train
        emb, labels = embed_dataset(self.model, self.val_set, batch_size=t.eval_batch_size, flip=t.eval_flip,
                                    return_labels=True)
        recall = recall_at_k(emb, labels, ks=RECALL_KS)
        return {"step": self.step, **{f"val_recall@{k}": float(recall[k]) for k in RECALL_KS}}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        t = self.cfg.train
        start = self.step
        if start >= t.steps:  # a resumed run that already finished: nothing to do, nothing overwritten
            final = self.output / "final.pt" if self.output is not None else None
            return TrainResult([], [], final if final and final.exists() else self.last_checkpoint, self.output,
                               {"status": "completed", "step": self.step, "start_step": start})
        logger = TrainLogger(self.output, t.steps, start, self.progress and self.runtime.is_main,
                             t.tensorboard, self.callbacks)
        if self.output is not None:
            (self.output / "config.yaml").write_text(self.cfg.to_yaml())
        wall0, meter = time.perf_counter(), IntervalMeter()
        status = "interrupted"
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                stats = self.train_step()
                meter.add(stats, t.batch_size * t.grad_accum * self.runtime.world_size, time.perf_counter() - t0)
                logger.advance()
                last = self.step == t.steps
                if self.step % t.log_every == 0 or last:
                    logger.log("train", self.parallel.reduce_record({
                        "step": self.step, "epoch": self.stream.epoch, **meter.flush(),
                        "elapsed_s": time.perf_counter() - wall0}))
                if self.val_set is not None and (last or (t.eval_every and self.step % t.eval_every == 0)):
                    logger.log("eval", self.parallel.run_on_main(self.evaluate))  # others wait on gloo
                if last or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
                    self.save_checkpoint(final=last)
            status = "completed"
        except TrainingDiverged:
            status = "diverged"
            raise
        finally:
            self.stream.close()
            summary = self._summary(status, logger, start, time.perf_counter() - wall0)
            logger.close(summary)
        final = (self.output / "final.pt") if self.output is not None else None
        return TrainResult(logger.history, logger.evals, final if final and final.exists() else None,
                           self.output, summary)

    def _summary(self, status: str, logger: TrainLogger, start: int, wall: float) -> dict[str, Any]:
        steps = self.step - start
        images = steps * self.cfg.train.batch_size * self.cfg.train.grad_accum * self.runtime.world_size
        return {"status": status, "step": self.step, "start_step": start, "wall_s": round(wall, 3),
                "samples_per_s": images / wall if wall > 0 else None, "num_classes": self.num_classes,
                "num_train_images": len(self.train_set), "device": str(self.device),
                "world_size": self.runtime.world_size,
                "last": logger.history[-1] if logger.history else None,
                "eval": logger.evals[-1] if logger.evals else None,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "config": self.cfg.to_dict()}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state` needs, as tensors and plain Python values.

        Distributed: a collective (every rank calls it), complete on rank 0 only, in the
        world-size independent form of :mod:`broadface.train.portable`."""
        return {"format": FORMAT, "version": VERSION, "model": model_config(self.model),
                "backbone": self.model.state_dict(), "head": head_state(self.head, self.cfg.head),
                "num_classes": self.num_classes, "optimizer": optimizer_state(self.optimizer, self.head),
                "world_size": self.runtime.world_size, "global_batch": self._global_batch(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": capture_rng(), "data": self.stream.position, "step": self.step,
                "config": self.cfg.to_dict(),
                **({"distill": self.distill.state_dict()} if self.distill is not None else {})}

    def save_checkpoint(self, final: bool = False) -> Path | None:
        """``checkpoints/step_N.pt`` (atomic), older ones pruned; the final one also as ``final.pt``.

        Distributed: every rank gathers, rank 0 writes while the others wait on the gloo group."""
        if not self.cfg.train.output:
            return None
        state = self.state_dict()  # collective
        self.last_checkpoint = self.parallel.run_on_main(self._write_checkpoint, state, final)
        return self.last_checkpoint

    def _global_batch(self) -> int:
        return self.cfg.train.batch_size * self.runtime.world_size

    def _write_checkpoint(self, state: dict[str, Any], final: bool) -> Path:
        ckpt_dir = self.output / "checkpoints"
        path = atomic_torch_save(state, ckpt_dir / f"step_{self.step:07d}.pt")
        self.last_checkpoint = path
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
        if final:
            publish(path, self.output / "final.pt")
        return path

    def _resume_path(self) -> Path | None:
        resume = self.cfg.train.resume
        if not resume:
            return None
        if resume != "auto":
            return Path(resume)
        found = sorted((Path(self.cfg.train.output) / "checkpoints").glob("step_*.pt")) if self.cfg.train.output else []
        return found[-1] if found else None

    def load_state(self, path: str | os.PathLike) -> None:
        """Continue exactly from a checkpoint written by :meth:`save_checkpoint`."""
        ckpt = load_checkpoint(path, map_location=self.device)
        missing = [k for k in ("backbone", "head", "optimizer", "scheduler", "rng", "data", "step") if k not in ckpt]
        if missing:
            raise ValueError(f"{path}: not a resumable training checkpoint (missing {missing}); "
                             "use train.init= to warm-start from it instead")
        check_model_config(ckpt, self.model, path)
        if ckpt.get("global_batch", self._global_batch()) != self._global_batch():
            raise ValueError(f"{path}: written with a global batch of {ckpt['global_batch']} images "
                             f"({ckpt.get('world_size')} rank(s)) but this run's is {self._global_batch()} "
                             f"(train.batch_size={self.cfg.train.batch_size} x {self.runtime.world_size} rank(s)); "
                             "the data position counts global batches: keep batch_size x WORLD_SIZE unchanged")
        try:
            self.model.load_state_dict(ckpt["backbone"])
            load_head_state(self.head, ckpt["head"])
            if self.distill is not None:  # the projection (empty when dimensions match)
                self.distill.load_state_dict(ckpt.get("distill", {}))
            load_optimizer_state(self.optimizer, self.head, ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"{path}: checkpoint does not match this config "
                             f"({str(err).strip().splitlines()[0]})") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        self.stream = BatchStream(self._loader, int(ckpt["data"]["epoch"]), int(ckpt["data"]["batch"]))
        self.step = int(ckpt["step"])
        self.last_checkpoint = Path(path)

    def warm_start(self, path: str | os.PathLike) -> None:
        """Backbone (+ classifier if ``train.init_head``) from a checkpoint; fresh optimizer and queue."""
        sharded = hasattr(self.head, "load_full_state")
        warm_start(path, self.model, self.head.margin if self.cfg.train.init_head and not sharded else None, self.device)
        if sharded and self.cfg.train.init_head:
            warm_start_head(path, self.head, self.device)

    def close(self) -> None:
        """Release the data workers and the process group this trainer created (torchrun)."""
        self.stream.close()
        self.runtime.close()


def train(config: Config | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
          **kwargs: Any) -> TrainResult:
    """``Trainer(config, **kwargs).fit()``; ``config`` may be a YAML path (with ``overrides``)."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    elif overrides:
        from broadface.train.config import apply_overrides

        config = apply_overrides(config, overrides)
    return Trainer(config, **kwargs).fit()
