"""One optimizer step, one interface: micro-steps, the deferred enqueue, clipping, a guarded update.

``TrainStep(...)(batches, step)`` runs ``train.grad_accum`` micro-batches (``len(batches)``). Each
micro-batch loss is scaled by ``1/grad_accum`` (equal sizes, so the sum is the mean over the
step). The objective is the head's loss, plus ``λ·d(student, teacher)`` with distillation; with
``train.micro_batch`` the encoder runs that many images at a time under one whole-batch objective
(:func:`broadface.train.memory.micro_batch_backward`). The step's entries are enqueued only after
its last micro-batch was forwarded, so no micro-batch meets its own step in the queue, and before
the optimizer moves ``W`` (W⁻_y = the rows that saw the embedding).

**No host sync** in a one-process step without class sampling: statistics stay device tensors
(:class:`StepStats`) until a log line needs them, labels are checked once per step on the host
copy the loader made (before the device copy), the queue's fill is a host int. Class sampling
(``torch.unique`` of the positives), the sharded head's batch-length exchange and fp16's
GradScaler each sync once per step.

**Non-finite values** never reach the weights: :class:`UpdateGuard` decides on the device whether
every loss (and the clipped gradient norm) of this and every earlier step was finite, and writes
the optimizer's update, and the queue's new entries, only where it was. The error itself is raised
at the next host sync of the loop (:meth:`UpdateGuard.first_bad_step`, at log, evaluation and
checkpoint time), naming the first bad step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from broadface.data.pipeline import BatchNormalizer
from broadface.dist import DistContext, all_reduce_, set_grad_sync
from broadface.heads import check_labels
from broadface.train.config import Config
from broadface.train.memory import micro_batch_backward


def autocast(device: torch.device, amp: str) -> ContextManager:
    """Autocast context for the forward pass (a no-op for amp='none')."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class StepStats:
    """What one step measured; tensors stay on the device (see :meth:`record`)."""

    lr: float
    batch_loss: Tensor  # L(X), mean over the micro-batches
    union_loss: Tensor  # L(X ∪ E*)
    queue_fill: int
    compensation_norm: Tensor | None  # head.diagnostics only
    grad_norm: Tensor | None  # backbone gradient norm before clipping (optim.clip_grad only)
    distill_loss: Tensor | None
    finite: Tensor  # 0-d bool: every value above was finite

    def record(self) -> dict[str, Any]:
        """The log fields (tensors and numbers; ``IntervalMeter.flush`` turns them into numbers)."""
        out = {k: getattr(self, k) for k in ("lr", "batch_loss", "union_loss", "queue_fill", "compensation_norm",
                                              "grad_norm")}
        return out if self.distill_loss is None else {**out, "distill_loss": self.distill_loss}

    def as_dict(self) -> dict[str, Any]:
        """Python numbers (one host sync)."""
        from broadface.train.logs import IntervalMeter

        meter = IntervalMeter()
        meter.add(self.record(), 0, 0.0)
        out = meter.flush()
        out.pop("samples_per_s")
        out.pop("interval_steps")
        return out


def _update_tensors(optimizer: Any) -> list[Tensor]:
    """Every tensor an optimizer step may write: parameters with a gradient and their state."""
    parts = [optimizer.replicated, optimizer.local] if hasattr(optimizer, "replicated") else [optimizer]
    out: list[Tensor] = []
    for opt in (p for p in parts if p is not None):
        state = getattr(opt, "optim", opt).state  # ZeroRedundancyOptimizer keeps its shard's state in .optim
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    out.append(p)
                    out.extend(v for v in state.get(p, {}).values() if isinstance(v, Tensor))
    return out


class UpdateGuard:
    """Optimizer updates that apply only while every step so far was finite, decided on the device.

    ``ok`` is a 0-d bool tensor; once a step is not finite it stays False, so that step's update
    and every later one are not applied: parameters, optimizer state and the backbone's buffers
    (BatchNorm statistics, written by the forward pass) keep their values from before the first bad
    step (optimizer state the step creates is zeroed). Host-side counters (the step, the schedule,
    the data position, the queue's pointer, a CPU-resident AdamW step count) do move on.
    """

    def __init__(self, device: torch.device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, finite: Tensor, step: int) -> Tensor:
        """Record whether step ``step`` (1-based) was finite; returns ``ok`` (every step so far was)."""
        here = torch.full((), step, dtype=torch.long, device=self.first_bad.device)
        self.first_bad = torch.where(self.ok & ~finite, here, self.first_bad)
        self.ok = self.ok & finite
        return self.ok

    @torch.no_grad()
    def step(self, optimizer: Any, apply: Callable[[], None]) -> None:
        """``apply()`` (the optimizer step), then undo its writes where not ``ok``."""
        before = self.snapshot(_update_tensors(optimizer))
        apply()
        self.restore(_update_tensors(optimizer), before)

    @staticmethod
    @torch.no_grad()
    def snapshot(tensors: Any) -> dict[int, Tensor]:
        return {id(t): t.clone() for t in tensors}

    @torch.no_grad()
    def restore(self, tensors: Any, before: dict[int, Tensor]) -> None:
        """Put back the values of ``before`` where not ``ok`` (zeros for tensors created since)."""
        for t in tensors:
            old = before.get(id(t))
            t.copy_(torch.where(self.ok, t, old if old is not None else torch.zeros_like(t)))

    def first_bad_step(self) -> int | None:
        """The first step with a non-finite value, or None (a host sync)."""
        bad = int(self.first_bad)
        return None if bad < 0 else bad


class TrainStep:
    """The step of one run, built from its :class:`~broadface.train.build.Components` (see the module doc)."""

    def __init__(self, cfg: Config, parts: Any, ctx: DistContext):
        self.cfg, self.parts, self.ctx = cfg, parts, ctx
        self.guard = UpdateGuard(ctx.device)
        self.normalize = BatchNormalizer()  # uint8 batches -> floats; its constants stay on the device

    def __call__(self, batches: list[Any], step: int) -> StepStats:
        p, t, dev = self.parts, self.cfg.train, self.ctx.device
        p.model.train()
        p.head.train()
        p.optimizer.zero_grad(set_to_none=True)
        lr = p.optimizer.param_groups[0]["lr"]
        buffers = self.guard.snapshot(p.model.buffers())  # BatchNorm statistics move in the forward pass
        items = [self._unpack(b) for b in batches]
        if not self.ctx.distributed:  # sharded heads check their labels collectively, in the head
            unlabeled = p.distill is not None and p.distill.unlabeled
            check_labels(torch.cat([y for _, y, _, _ in items]), p.num_classes, allow_unlabeled=unlabeled)
        sums: dict[str, Tensor] = {}
        pending = []
        for i, (images, labels, extra, ids) in enumerate(items):
            set_grad_sync(p.net, i == len(items) - 1)  # DDP: all-reduce on the last micro-step only
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            if images.dtype == torch.uint8:  # the configured data sets give pixels (FaceTransform(pixels=True))
                images = self.normalize(images)
            parts, emb, kept = self._forward_backward(images, labels, extra, 1.0 / len(items))
            pending.append((emb, labels[kept] if kept is not None else labels,
                            None if ids is None else (ids[kept.cpu()] if kept is not None else ids)))
            for k, v in parts.items():
                sums[k] = v / len(items) + sums.get(k, 0.0)
        if p.distill is not None:
            p.distill.sync_gradients()  # the projection is outside DDP
        grad_norm = self._clip()
        finite = torch.isfinite(torch.stack(list(sums.values()))).all()
        if grad_norm is not None and not p.scaler.is_enabled():  # fp16 skips inf steps by design
            finite = finite & torch.isfinite(grad_norm)
        if self.ctx.distributed:  # the distillation term is per rank: every rank must decide alike
            finite = all_reduce_(finite.to(torch.int32), "min").bool()
        ok = self.guard.observe(finite, step)
        emb, labels, ids = (torch.cat(x) if x[0] is not None else None for x in zip(*pending))
        p.head.enqueue(emb, labels, ids, keep=ok)  # after the whole step was forwarded, before W moves
        self.guard.step(p.optimizer, lambda: (p.scaler.step(p.optimizer), p.scaler.update()))
        self.guard.restore(p.model.buffers(), buffers)
        p.scheduler.step()
        stats = p.head.stats
        return StepStats(lr, sums["batch_loss"], sums["union_loss"], stats.queue_fill, stats.compensation_norm,
                         grad_norm, sums.get("distill_loss"), finite)

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None]:
        """(images, labels, extra items, sample ids or None) of one loader batch."""
        ids = None
        if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], (list, tuple)):
            batch, ids = batch  # BatchStream(with_ids=True)
        images, labels, *extra = batch
        return images, labels, extra, ids

    def _forward_backward(self, images: Tensor, labels: Tensor, extra: list[Tensor], scale: float
                          ) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        """Backward of one micro-batch's objective × ``scale``; returns its losses, the embeddings to
        enqueue and (distillation with unlabeled images) the mask of the labelled ones."""
        p, t = self.parts, self.cfg.train
        out: dict[str, Any] = {}

        def objective(emb: Tensor) -> Tensor:
            if p.distill is None:
                loss = p.head(emb, labels, enqueue=False)
                out.update(emb=emb, kept=None, used_head=True)
            else:  # images labelled −1 are kept from the head and the queue
                loss, kept_emb, kept_labels, d = p.distill(p.head, emb, labels, images, extra)
                out.update(emb=kept_emb, kept=labels >= 0 if p.distill.unlabeled else None, distill=d,
                           used_head=kept_labels.shape[0] > 0)
            return loss * scale

        if t.micro_batch:
            micro_batch_backward(p.net, objective, images, t.micro_batch,
                                 autocast=lambda: autocast(images.device, t.amp), scaler=p.scaler)
        else:
            with autocast(images.device, t.amp):
                loss = objective(p.net(images))
            p.scaler.scale(loss).backward()
        zero = torch.zeros((), device=images.device)
        losses = ({"batch_loss": p.head.stats.batch_loss, "union_loss": p.head.stats.union_loss}
                  if out["used_head"] else {"batch_loss": zero, "union_loss": zero})
        if "distill" in out:
            losses["distill_loss"] = out["distill"]
        return losses, out["emb"].detach(), out["kept"]

    def _clip(self) -> Tensor | None:
        clip = self.cfg.optim.clip_grad
        if clip is None:
            return None
        self.parts.scaler.unscale_(self.parts.optimizer)
        return nn.utils.clip_grad_norm_(self.parts.model.parameters(), clip)
