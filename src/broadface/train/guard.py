"""The resume guard: a checkpoint continues only the run that wrote it.

Every config key falls in one of three kinds:

- **bookkeeping** (:data:`IGNORED`): where files go, how often to log / evaluate / checkpoint,
  memory knobs that leave the arithmetic alone, and ``train.batch_size`` / ``head.queue_size``, which
  are per rank (their totals over ranks are checked by :class:`~broadface.train.checkpoint.CheckpointManager`);
- **adjustable** (:data:`ADJUSTABLE`): a user may change them on resume (a longer run, a lower
  learning rate), but only by naming them in ``train.resume_allow``;
- everything else **defines the run** (data set, seed, model, loss and margins, queue, optimizer, ...):
  a difference is refused. A key added later is guarded by default.

The training data are compared by a fingerprint of the class list (:func:`data_fingerprint`), so
other identities of the same count are caught too.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

IGNORED = frozenset({
    "train.output", "train.resume", "train.resume_allow", "train.overwrite", "train.init", "train.init_head",
    "train.device", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "train.eval_batch_size", "train.eval_flip", "train.val_bins", "train.tensorboard", "train.micro_batch",
    "train.batch_size", "head.queue_size", "head.queue_mode", "head.chunk_size", "optim.zero",
    "data.root", "data.val_split", "data.val_root", "data.num_workers", "data.threads",
    "distill.cache", "distill.cache_dtype", "distill.batch_size",
})
ADJUSTABLE = frozenset({
    "train.steps", "train.grad_accum", "train.amp", "data.on_error", "data.num_images",
    "optim.lr", "optim.weight_decay", "optim.momentum", "optim.nesterov", "optim.betas", "optim.eps",
    "optim.trust_coefficient", "optim.head_lr_mult", "optim.head_weight_decay", "optim.clip_grad",
    "schedule.name", "schedule.warmup_steps", "schedule.warmup_start", "schedule.milestones", "schedule.gamma",
    "schedule.power", "schedule.end_factor", "distill.weight",
})


def check_allow_list(keys: Iterable[str]) -> None:
    """``train.resume_allow`` names adjustable keys only (ValueError listing them otherwise)."""
    wrong = [k for k in keys if k not in ADJUSTABLE]
    if wrong:
        raise ValueError(f"config train.resume_allow={list(keys)!r}: {', '.join(map(repr, wrong))} cannot be "
                         f"allowed to change on resume; allowed: {', '.join(sorted(ADJUSTABLE))}")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` over the config's sections (mapping values such as
    ``model.kwargs`` stay whole)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and not prefix:
            out.update(flatten(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def data_fingerprint(dataset: Any) -> dict[str, Any] | None:
    """Class count, image count and a sha256 of the class names in label order; None when the data set
    has no list of class names."""
    classes = getattr(dataset, "classes", None)
    if not isinstance(classes, (list, tuple)):
        return None
    digest = hashlib.sha256("\n".join(map(str, classes)).encode()).hexdigest()
    return {"num_classes": len(classes), "num_images": len(dataset), "classes_sha256": digest}


def config_changes(theirs: dict[str, Any], ours: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, this run's value)`` for every compared key that differs."""
    a, b = flatten(theirs), flatten(ours)
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in IGNORED]
    return [(k, a.get(k, "(unset)"), b.get(k, "(unset)")) for k in keys if a.get(k, "(unset)") != b.get(k, "(unset)")]


def fingerprint_changes(theirs: dict[str, Any] | None, ours: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    if not theirs or not ours:
        return []
    out = []
    if theirs.get("classes_sha256") != ours.get("classes_sha256"):
        what = ("other identities of the same count" if theirs.get("num_classes") == ours.get("num_classes")
                else f"{theirs.get('num_classes')} -> {ours.get('num_classes')} classes")
        out.append(("data.classes", f"sha256 {str(theirs.get('classes_sha256'))[:12]}",
                    f"sha256 {str(ours.get('classes_sha256'))[:12]} ({what})"))
    if theirs.get("num_images") != ours.get("num_images"):
        out.append(("data.num_images", theirs.get("num_images"), ours.get("num_images")))
    return out


def check_resume(ckpt: dict[str, Any], config: dict[str, Any], fingerprint: dict[str, Any] | None,
                 allow: Iterable[str], path: Any) -> list[str]:
    """Refuse to resume ``ckpt`` (read from ``path``) under another run's settings; returns the allowed
    changes as ``"key: old -> new"`` lines (for the run's log)."""
    changes = fingerprint_changes(ckpt.get("data_fingerprint"), fingerprint)
    changes += config_changes(ckpt.get("config") or {}, config) if ckpt.get("config") else []
    allow = set(allow)
    fixed = [c for c in changes if c[0] not in ADJUSTABLE]
    adjust = [c for c in changes if c[0] in ADJUSTABLE and c[0] not in allow]
    if fixed or adjust:
        parts = []
        if fixed:
            parts.append("these define the run and cannot change (start a new run, e.g. a warm start with "
                         "train.init=PATH): " + "; ".join(_line(c) for c in fixed))
        if adjust:
            keys = ",".join(k for k, _, _ in adjust)
            parts.append(f"these may change if you say so (train.resume_allow=[{keys}]): "
                         + "; ".join(_line(c) for c in adjust))
        raise ValueError(f"{path}: this run's settings differ from the checkpoint's: " + ". ".join(parts))
    return [_line(c) for c in changes]


def _line(change: tuple[str, Any, Any]) -> str:
    key, old, new = change
    return f"{key} {old!r} -> {new!r}"
