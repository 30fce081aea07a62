"""The training loop: backbone -> embeddings -> margin / BroadFace head -> optimizer step.

    result = Trainer(load_config("configs/omniglot_tinycnn.yaml"), progress=False).fit()
    result.history[-1]["batch_loss"], result.evals[-1]["val_recall@1"], result.checkpoint

The pieces live in their own modules: :mod:`~broadface.train.build` makes the components from the
config, :mod:`~broadface.train.step` is one optimizer step, :mod:`~broadface.train.checkpoint` saves
and restores, :class:`broadface.dist.DistContext` says where this process runs (under torchrun every
rank runs this loop: DDP backbone, class-sharded head, rank 0 logs, evaluates and writes). The loop
syncs with the device only when it writes a log line, evaluates or checkpoints; that is also where a
non-finite step is reported (:class:`TrainingDiverged`; the guarded update never applied it).

Seeding is explicit: the constructor draws the initial weights from ``train.seed`` without touching
the caller's global RNGs, and :meth:`Trainer.begin` (called by :meth:`fit` and the first
:meth:`train_step`) seeds them (fresh run) or restores them (resumed run).

The run owns ``train.output`` (:mod:`~broadface.train.outdir`: checked, locked, never mixed with
another run's results), a resume continues only the run that wrote the checkpoint
(:mod:`~broadface.train.guard`), and SIGTERM / SIGINT stop at a step boundary with a checkpoint
(:mod:`~broadface.train.signals`).
"""
from __future__ import annotations

import os
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from broadface.dist import init_distributed
from broadface.fileio import atomic_write_text
from broadface.train.build import build
from broadface.train.checkpoint import CheckpointManager, publish
from broadface.train.config import Config, load_config
from broadface.train.logs import Callback, IntervalMeter, TrainLogger, write_summary
from broadface.train.outdir import RunFolder, RunLog, claim_output
from broadface.train.rng import restore_rng
from broadface.train.signals import StopSignals
from broadface.train.step import StepStats, TrainStep
from broadface.train.stream import BatchStream

RECALL_KS = (1, 2, 4, 8)


class TrainingDiverged(FloatingPointError):
    """The loss (or gradient) became NaN/inf; the message names the step and the last good checkpoint."""


class TrainingWarning(UserWarning):
    """A run that works but is likely not what was meant (one class, a queue larger than the data, skipped images)."""


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


class Trainer:
    """Builds everything from a :class:`Config`; :meth:`fit` trains.

    ``train_set`` / ``val_set`` replace the configured data sets (items ``(image, label)``);
    ``model`` replaces the configured backbone (give it a ``.config`` dict for ``build_model`` so
    ``load_backbone`` can rebuild it); ``callbacks`` get ``(kind, record)`` for every train / eval record.
    """

    def __init__(self, config: Config, *, train_set: Dataset | None = None, val_set: Dataset | None = None,
                 model: nn.Module | None = None, num_classes: int | None = None, progress: bool = True,
                 callbacks: list[Callback] | None = None):
        try:
            self.ctx = init_distributed(config.train.device)
        except ValueError as err:
            raise ValueError(f"config train.device={config.train.device!r}: {err}") from None
        self.cfg = cfg = config.validate(self.ctx.world_size, self.ctx.device.type)
        self.device, self.progress, self.callbacks = self.ctx.device, progress, list(callbacks or [])
        self.checkpoints = CheckpointManager(cfg, self.ctx)
        self.output = self.checkpoints.output
        self.folder = RunFolder(self.output) if self.output is not None else None
        self.log, self.notes, self.valsets, self._skipped = RunLog(None), [], None, 0
        self.ctx.agree(self._claim)  # before any work: the output folder is checked and locked (rank 0)
        if self.folder is not None:
            weakref.finalize(self, self.folder.release)
        try:
            self.parts = build(cfg, self.ctx, train_set, val_set, model, num_classes)
            self.model, self.head, self.distill = self.parts.model, self.parts.head, self.parts.distill
            self.optimizer, self.scheduler, self.scaler = self.parts.optimizer, self.parts.scheduler, self.parts.scaler
            self.train_set, self.val_set = self.parts.train_set, self.parts.val_set
            self.num_classes = self.parts.num_classes
            self.step_fn = TrainStep(cfg, self.parts, self.ctx)
            self.stream = BatchStream(self._loader, with_ids=cfg.head.diagnostics)
            self.step, self._rng, self._begun = 0, self.parts.start_rng, False
            self.ctx.agree(self._restore)  # an error on any rank is raised on every rank
        except BaseException:
            self._release()
            raise
        if self.ctx.is_main:
            self._check_data()

    def _claim(self) -> None:
        """Rank 0: check and lock ``train.output``; refuse another run's results unless resuming or overwriting."""
        if self.folder is not None:
            self.log = RunLog(self.folder.path / "train.log")
            claim_output(self.folder, self.cfg, self.log)

    def _release(self) -> None:
        if self.folder is not None:
            self.folder.release()

    def _restore(self) -> None:
        """``train.resume`` (rank 0's choice of checkpoint) or ``train.init``; open the verification sets."""
        if self.ctx.is_main and self.cfg.train.val_bins:
            from broadface.train.valsets import VerificationSets, open_pair_sets

            t, d = self.cfg.train, self.cfg.data
            fold = d.test_fold if d.name == "lfw" else None
            sets = open_pair_sets(t.val_bins, d.root if d.name == "lfw" else None, fold)
            self.valsets = VerificationSets(sets, self.cfg.model.input_size, t.eval_flip, t.eval_batch_size)
        path = self.checkpoints.resume_path()
        if path is not None:
            self.load_state(path)
            return
        if self.cfg.train.init:
            self.warm_start(self.cfg.train.init)

    def _check_data(self) -> None:
        """Warnings for runs that train but likely not as meant."""
        n, q = len(self.train_set), self.cfg.head.queue_size * self.ctx.world_size
        if self.num_classes == 1:
            self._warn("the training set has a single class: every margin loss is exactly 0 and nothing is learned")
        if q > n:
            self._warn(f"head.queue_size={self.cfg.head.queue_size} (x {self.ctx.world_size} rank(s)) exceeds the "
                       f"{n} training images: the queue holds about {q / n:.0f} stale copies of each image")

    def _warn(self, message: str) -> None:
        self.notes.append(message)
        self.log.write(f"warning: {message}")
        warnings.warn(message, TrainingWarning, stacklevel=3)

    def _report_skipped(self) -> list[str]:
        """Images skipped so far (``data.on_error=skip``); a warning when there are new ones."""
        ds = self.parts.labelled_set
        skipped = list(getattr(ds, "skipped", None) or getattr(getattr(ds, "dataset", None), "skipped", None) or [])
        if len(skipped) > self._skipped:
            new = skipped[self._skipped:]
            self.log.write(f"skipped {len(new)} unreadable image(s) (data.on_error=skip):\n" + "\n".join(new))
            shown = ", ".join(new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
            warnings.warn(f"skipped {len(new)} unreadable image(s) (data.on_error=skip; listed in train.log and "
                          f"summary.json): {shown}", TrainingWarning, stacklevel=3)
            self._skipped = len(skipped)
        return skipped

    def _loader(self, epoch: int, start_batch: int):
        """This rank's batches of epoch ``epoch`` from ``start_batch`` (the global batch is batch_size × world)."""
        from broadface.data.loader import collate_images
        from broadface.dist import make_distributed_loader

        t = self.cfg.train
        return make_distributed_loader(self.train_set, t.batch_size * self.ctx.world_size, self.ctx.rank,
                                       self.ctx.world_size, shuffle=True, seed=t.seed,
                                       num_workers=self.cfg.data.num_workers, drop_last=True, epoch=epoch,
                                       start_batch=start_batch, pin_memory=self.device.type == "cuda",
                                       collate_fn=collate_images, threads=self.cfg.data.threads)

    # ------------------------------------------------------------------ the loop
    def begin(self) -> None:
        """Seed the global RNGs from ``train.seed`` (a fresh run) or restore them (a resumed one). Once."""
        if not self._begun:
            restore_rng(self._rng)
            self._begun = True

    def train_step(self) -> StepStats:
        """One optimizer step over ``train.grad_accum`` micro-batches; statistics as device tensors."""
        self.begin()
        stats = self.step_fn([next(self.stream) for _ in range(self.cfg.train.grad_accum)], self.step + 1)
        self.step += 1
        return stats

    def fit(self) -> TrainResult:
        """Train to ``train.steps``; the lock on ``train.output`` is released at the end, however it ends."""
        try:
            return self._fit()
        finally:
            self._release()

    def _fit(self) -> TrainResult:
        t, start = self.cfg.train, self.step
        if start >= t.steps:  # a resumed run that already finished: complete its publication, overwrite nothing
            return self._finished(start)
        self.begin()
        logger = TrainLogger(self.output, t.steps, start, self.progress and self.ctx.is_main, t.tensorboard,
                             self.callbacks)
        if self.valsets:  # the best accuracy so far includes the evaluations before a resume
            for row in logger.kept_evals:
                for name in (ps.name for ps in self.valsets.sets):
                    if row.get(f"{name}_accuracy"):
                        self.valsets.observe(name, int(row["step"]), float(row[f"{name}_accuracy"]))
        if self.output is not None:
            atomic_write_text(self.output / "config.yaml", self.cfg.to_yaml())
            resumed = f"resumed from step {start} ({self.checkpoints.last})" if start else "started"
            changes = f"; allowed changes: {'; '.join(self.checkpoints.changes)}" if self.checkpoints.changes else ""
            self.log.write(f"{resumed}: {t.steps} steps, pid {os.getpid()}{changes}")
        wall0, status, stop = time.perf_counter(), "interrupted", StopSignals(self.ctx)
        try:
            with stop:
                status = self._loop(logger, stop, wall0)
        except TrainingDiverged as err:
            status = "diverged"
            self.log.write(f"diverged: {err}")
            raise
        finally:
            self.stream.close()
            summary = self._summary(status, logger, start, time.perf_counter() - wall0, stop.name)
            self.log.write(self._outcome(summary))
            logger.close(summary)
        final = (self.output / "final.pt") if self.output is not None else None
        return TrainResult(logger.history, logger.evals, final if final and final.exists() else None,
                           self.output, summary)

    def _loop(self, logger: TrainLogger, stop: StopSignals, wall0: float) -> str:
        """Steps until ``train.steps`` ("completed") or a stop signal ("interrupted", after a checkpoint)."""
        t, meter = self.cfg.train, IntervalMeter()
        while self.step < t.steps:
            t0 = time.perf_counter()
            stats = self.train_step()
            meter.add(stats.record(), t.batch_size * t.grad_accum * self.ctx.world_size, time.perf_counter() - t0)
            logger.advance()
            last, due = self.step == t.steps, lambda every: every and self.step % every == 0
            evaluate = (self.val_set is not None or bool(t.val_bins)) and (last or due(t.eval_every))
            log, save = last or due(t.log_every), last or due(t.checkpoint_every)
            if log or evaluate or save:
                self.check_finite()  # the host syncs of the loop: here and in the record below
            if log:
                logger.log("train", self.ctx.mean({"step": self.step, "epoch": self.stream.epoch, **meter.flush(),
                                                   "elapsed_s": time.perf_counter() - wall0}))
                if self.ctx.is_main:
                    self._report_skipped()
            if evaluate:
                logger.log("eval", self.ctx.run_on_main(self.evaluate))  # the others wait on gloo
            if save:
                self.save_checkpoint(final=last)
            if not last and stop.requested():  # every rank stops after the same step
                if not save:
                    self.check_finite()
                    self.save_checkpoint()
                return "interrupted"
        return "completed"

    def _finished(self, start: int) -> TrainResult:
        """A resumed run that had reached ``train.steps``: publish ``final.pt`` and ``summary.json`` if a kill
        came between its last checkpoint and them, so that a finished run always has both."""
        final = self.output / "final.pt" if self.output is not None else None
        summary = self._summary("completed", None, start, 0.0)
        if final is not None and self.checkpoints.last is not None:
            if not final.exists():
                publish(self.checkpoints.last, final)
                self.log.write(f"published {final.name} from {self.checkpoints.last} (the run had stopped before)")
            if not (self.output / "summary.json").exists():
                write_summary(self.output, summary)
                self.log.write("wrote summary.json (the run had stopped before)")
        return TrainResult([], [], final if final and final.exists() else self.checkpoints.last, self.output, summary)

    def _outcome(self, summary: dict[str, Any]) -> str:
        """The train.log line of how the run ended."""
        status, step, ckpt = summary["status"], summary["step"], summary["checkpoint"]
        if status == "interrupted" and summary.get("signal"):
            return (f"stopped by {summary['signal']} after step {step}; checkpoint {ckpt}; continue with "
                    "train.resume=auto")
        return f"{status} at step {step}; last checkpoint {ckpt}"

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a step so far had a non-finite loss or gradient norm (a host sync).

        That step's update and every later one were not applied: the weights and optimizer state are
        those from before it, the last checkpoint is untouched."""
        bad = self.step_fn.guard.first_bad_step()
        if bad is None:
            return
        ckpt = self.checkpoints.last or "none written yet"
        raise TrainingDiverged(
            f"step {bad}: non-finite loss or gradient norm; stopped before the update (the weights are those "
            f"of step {bad - 1}). Last good checkpoint: {ckpt}. Lower optim.lr, set optim.clip_grad or check the "
            "data, then resume from that checkpoint (train.resume=PATH).")

    def _summary(self, status: str, logger: TrainLogger | None, start: int, wall: float,
                 signal: str | None = None) -> dict[str, Any]:
        steps = self.step - start
        images = steps * self.cfg.train.batch_size * self.cfg.train.grad_accum * self.ctx.world_size
        skipped = self._report_skipped() if self.ctx.is_main else []
        return {"status": status, "step": self.step, "start_step": start, "wall_s": round(wall, 3),
                **({"signal": signal} if signal else {}),
                "samples_per_s": images / wall if wall > 0 else None, "num_classes": self.num_classes,
                "num_train_images": len(self.train_set), "device": str(self.device),
                "world_size": self.ctx.world_size,
                "last": logger.history[-1] if logger and logger.history else None,
                "eval": logger.evals[-1] if logger and logger.evals else None,
                "verification": self.valsets.summary() if self.valsets else None,
                "skipped_images": {"count": len(skipped), "files": skipped},
                "warnings": list(self.notes),
                "checkpoint": str(self.checkpoints.last) if self.checkpoints.last else None,
                "config": self.cfg.to_dict()}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Recall@K of the held-out identities (``val_set``; every image queries all others) and the
        accuracy of every verification set of ``train.val_bins`` (rank 0's work under torchrun)."""
        from broadface.metrics import recall_at_k
        from broadface.models.embed import embed_dataset

        t, record = self.cfg.train, {"step": self.step}
        if self.val_set is not None:
            emb, labels = embed_dataset(self.model, self.val_set, batch_size=t.eval_batch_size, flip=t.eval_flip,
                                        return_labels=True)
            recall = recall_at_k(emb, labels, ks=RECALL_KS)
            record.update({f"val_recall@{k}": float(recall[k]) for k in RECALL_KS})
        if self.valsets:
            record.update(self.valsets.evaluate(self.model, self.step))
        return record

    # ------------------------------------------------------------------ checkpoints
    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints.last

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint dict (:mod:`broadface.train.checkpoint`); a collective when distributed,
        complete on rank 0 only."""
        return self.checkpoints.state(self.parts, self.stream.position, self.step)

    def save_checkpoint(self, final: bool = False) -> Path | None:
        """``checkpoints/step_N.pt`` (atomic), older ones pruned; the final one also as ``final.pt``."""
        self.check_finite()  # never write the state of a diverged run
        return self.checkpoints.save(self.parts, self.stream.position, self.step, final)

    def load_state(self, path: str | os.PathLike) -> None:
        """Continue exactly from a checkpoint written by :meth:`save_checkpoint` (RNGs restored by :meth:`begin`)."""
        ckpt = self.checkpoints.load(self.parts, path)
        self.stream = BatchStream(self._loader, int(ckpt["data"]["epoch"]), int(ckpt["data"]["batch"]),
                                  with_ids=self.cfg.head.diagnostics)
        self.step, self._rng, self._begun = int(ckpt["step"]), ckpt["rng"], False

    def warm_start(self, path: str | os.PathLike) -> None:
        """Backbone (+ classifier if ``train.init_head``) from a checkpoint; fresh optimizer and queue."""
        self.checkpoints.warm_start(self.parts, path, self.cfg.train.init_head)

    def close(self) -> None:
        """Release the data workers, the output folder's lock and the process group this trainer created."""
        self.stream.close()
        self._release()
        self.ctx.close()


def train(config: Config | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
          **kwargs: Any) -> TrainResult:
    """``Trainer(config, **kwargs).fit()``; ``config`` may be a YAML path (with ``overrides``)."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    elif overrides:
        from broadface.train.config import apply_overrides

        config = apply_overrides(config, overrides)
    return Trainer(config, **kwargs).fit()
