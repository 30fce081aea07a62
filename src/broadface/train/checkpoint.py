"""Training checkpoints, one manager: save, resume, warm start, publish ``final.pt``.

A checkpoint holds everything an exact resume needs, in a form that does not depend on the
number of ranks that wrote it (the file format and safe loading are :mod:`broadface.models.checkpoint`'s):

- ``backbone`` (state_dict), ``model`` (its ``build_model`` kwargs);
- ``head``: :meth:`broadface.heads.BroadFace.checkpoint_state`, the state_dict of the one-process
  head: the whole classifier (C × D) and a queue of ``WORLD_SIZE × head.queue_size`` entries in global
  FIFO order;
- ``optimizer``: the one-process optimizer state_dict; the classifier's per-class buffers (momentum,
  AdamW moments) as whole (C, ...) tensors, ZeRO's partitions consolidated;
- ``scheduler``, ``scaler``, ``rng`` (python, numpy, torch, CUDA), ``data`` (``{epoch, batch}`` of the
  next batch), ``step``, ``config``, ``world_size``, ``global_batch``, ``distill`` (the projection),
  ``data_fingerprint`` (class count, image count, sha256 of the class list: :mod:`broadface.train.guard`).

Resuming refuses a checkpoint written under other settings (:func:`broadface.train.guard.check_resume`).

So a run resumes on any number of ranks with the same global batch, and ``train.init``,
``load_backbone`` and export read any checkpoint unchanged. Saving is a collective (every rank
gathers, rank 0 writes while the others wait on the gloo group); loading re-shards on every rank.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from broadface.dist import DistContext
from broadface.fileio import atomic_torch_save
from broadface.models.checkpoint import (FORMAT, VERSION, check_model_config, load_checkpoint, model_config,
                                         state_dict_error)
from broadface.train.config import Config
from broadface.train.guard import check_resume
from broadface.train.memory import SplitOptimizer
from broadface.train.rng import capture_rng

RESUME_KEYS = ("backbone", "head", "optimizer", "scheduler", "rng", "data", "step")


class CheckpointManager:
    """``output/checkpoints/step_N.pt`` (atomic, older ones pruned), ``final.pt``, resume and warm start."""

    def __init__(self, cfg: Config, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.output = Path(cfg.train.output) if cfg.train.output and ctx.is_main else None
        self.last: Path | None = None  # the last checkpoint written or resumed from
        self.changes: list[str] = []  # the allowed config changes of the resume (train.resume_allow)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.ctx.world_size

    # ------------------------------------------------------------------ choosing
    def resume_path(self) -> Path | None:
        """``train.resume`` (``auto``: the latest in ``output/checkpoints``), as rank 0 sees it."""
        resume, out = self.cfg.train.resume, self.cfg.train.output
        if not resume:
            return None
        if resume != "auto":
            return Path(resume)
        found = sorted((Path(out) / "checkpoints").glob("step_*.pt")) if out and self.ctx.is_main else []
        return self.ctx.broadcast(found[-1] if found else None)

    # ------------------------------------------------------------------ saving
    def state(self, parts: Any, position: dict[str, int], step: int) -> dict[str, Any]:
        """The checkpoint dict (a collective when distributed; complete on rank 0 only)."""
        return {"format": FORMAT, "version": VERSION, "model": model_config(parts.model),
                "backbone": parts.model.state_dict(), "head": parts.head.checkpoint_state(),
                "num_classes": parts.num_classes, "optimizer": optimizer_state(parts.optimizer, parts.head),
                "world_size": self.ctx.world_size, "global_batch": self.global_batch,
                "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
                "rng": capture_rng(), "data": dict(position), "step": step, "config": self.cfg.to_dict(),
                "data_fingerprint": parts.fingerprint,
                **({"distill": parts.distill.state_dict()} if parts.distill is not None else {})}

    def save(self, parts: Any, position: dict[str, int], step: int, final: bool = False) -> Path | None:
        """Write ``checkpoints/step_N.pt`` (and ``final.pt``); a collective when distributed."""
        if not self.cfg.train.output:
            return None
        state = self.state(parts, position, step)
        self.last = self.ctx.run_on_main(self._write, state, step, final)
        return self.last

    def _write(self, state: dict[str, Any], step: int, final: bool) -> Path:
        ckpt_dir = self.output / "checkpoints"
        path = atomic_torch_save(state, ckpt_dir / f"step_{step:07d}.pt")
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
        if final:
            publish(path, self.output / "final.pt")
        return path

    # ------------------------------------------------------------------ loading
    def load(self, parts: Any, path: str | os.PathLike) -> dict[str, Any]:
        """Restore model, head, optimizer, schedule and scaler from a checkpoint written by :meth:`save`;
        returns the checkpoint (its ``rng``, ``data`` and ``step`` are the caller's to apply)."""
        ckpt = load_checkpoint(path, map_location=self.ctx.device)
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"{path}: not a resumable training checkpoint (missing {missing}); "
                             "use train.init= to warm-start from it instead")
        self.changes = check_resume(ckpt, self.cfg.to_dict(), parts.fingerprint, self.cfg.train.resume_allow, path)
        check_model_config(ckpt, parts.model, path)
        self._check_shape(ckpt, path)
        try:
            parts.model.load_state_dict(ckpt["backbone"])
            parts.head.load_checkpoint_state(ckpt["head"])
            if parts.distill is not None:  # the projection (empty when dimensions match)
                parts.distill.load_state_dict(ckpt.get("distill", {}))
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"{path}: checkpoint does not match this config ({state_dict_error(err)})") from None
        try:
            load_optimizer_state(parts.optimizer, parts.head, ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError, IndexError) as err:
            raise ValueError(f"{path}: the optimizer state does not fit this run's optimizer "
                             f"(optim.name={self.cfg.optim.name}; {type(err).__name__}: {state_dict_error(err)})"
                             ) from None
        parts.scheduler.load_state_dict(ckpt["scheduler"])
        if parts.scaler.is_enabled() and ckpt.get("scaler"):
            parts.scaler.load_state_dict(ckpt["scaler"])
        self.last = Path(path)
        return ckpt

    def _check_shape(self, ckpt: dict[str, Any], path: str | os.PathLike) -> None:
        """The data position counts global batches; the queue is resumed exactly: both must be unchanged."""
        if ckpt.get("global_batch", self.global_batch) != self.global_batch:
            raise ValueError(f"{path}: written with a global batch of {ckpt['global_batch']} images "
                             f"({ckpt.get('world_size')} rank(s)) but this run's is {self.global_batch} "
                             f"(train.batch_size={self.cfg.train.batch_size} x {self.ctx.world_size} rank(s)); "
                             "the data position counts global batches: keep batch_size x WORLD_SIZE unchanged")
        labels = ckpt["head"].get("queue.labels")
        theirs, mine = (0 if labels is None else labels.shape[0]), self.cfg.head.queue_size * self.ctx.world_size
        if theirs != mine:
            raise ValueError(f"{path}: checkpoint does not match this config (its BroadFace queue holds {theirs} "
                             f"entries in all (WORLD_SIZE × head.queue_size of the run that wrote it) but this run's "
                             f"holds {mine}: set head.queue_size={theirs} on one process (per rank: that / "
                             "WORLD_SIZE))")

    def warm_start(self, parts: Any, path: str | os.PathLike, init_head: bool) -> None:
        """``train.init``: the backbone (and the classifier ``W`` if ``init_head``); optimizer and queue fresh."""
        ckpt = load_checkpoint(path, self.ctx.device)
        if "backbone" not in ckpt:
            raise ValueError(f"{path}: checkpoint holds no backbone (keys: {sorted(ckpt)})")
        check_model_config(ckpt, parts.model, path)
        try:
            parts.model.load_state_dict(ckpt["backbone"])
        except RuntimeError as err:
            raise ValueError(f"{path}: backbone does not fit this model ({state_dict_error(err)})") from None
        if not init_head:
            return
        weight = (ckpt.get("head") or {}).get("margin.weight")
        if weight is None:
            raise ValueError(f"{path}: checkpoint holds no classifier (head 'margin.weight'); "
                             "set train.init_head=false to warm-start the backbone only")
        try:
            parts.head.load_checkpoint_state({"margin.weight": weight})
        except ValueError as err:
            raise ValueError(f"{path}: {err}; train on the same identities in the same order, or set "
                             "train.init_head=false to warm-start the backbone only") from None


def publish(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` the same file as ``src`` atomically: a hard link (a copy where links fail)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


# ----------------------------------------------------------------------------- optimizer state


def _head_indices(state: dict[str, Any]) -> list[int]:
    return [i for g in state["param_groups"] if g.get("name") == "head" for i in g["params"]]


def _merged(opt: SplitOptimizer) -> dict[str, Any]:
    """ZeRO (consolidated) + local optimizer -> one plain optimizer state_dict (same parameter order)."""
    rep = opt.replicated.state_dict()
    loc = opt.local.state_dict() if opt.local is not None else {"state": {}, "param_groups": []}
    n = sum(len(g["params"]) for g in rep["param_groups"])
    groups = [dict(g) for g in rep["param_groups"]] + [dict(g, params=[n + i for i in g["params"]])
                                                        for g in loc["param_groups"]]
    return {"state": {**rep["state"], **{n + int(i): s for i, s in loc["state"].items()}}, "param_groups": groups}


def _split(opt: SplitOptimizer, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    n_rep = len(opt.replicated.param_groups)
    rep_groups, loc_groups = state["param_groups"][:n_rep], state["param_groups"][n_rep:]
    n = sum(len(g["params"]) for g in rep_groups)
    rep = {"state": {i: s for i, s in state["state"].items() if int(i) < n}, "param_groups": rep_groups}
    loc = {"state": {int(i) - n: s for i, s in state["state"].items() if int(i) >= n},
           "param_groups": [dict(g, params=[i - n for i in g["params"]]) for g in loc_groups]}
    return rep, loc


def optimizer_state(optimizer: Any, head: Any) -> dict[str, Any] | None:
    """Collective: the one-process optimizer state_dict on rank 0 (None elsewhere)."""
    split = isinstance(optimizer, SplitOptimizer)
    if split:
        optimizer.consolidate_state_dict(to=0)
    part, rows = head.partition, {}
    if part.sharded:
        local = (optimizer.local if split else optimizer).state.get(head.weight, {})
        for key in sorted(local):  # the same keys on every rank, in the same order
            v = local[key]
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == part.num_local:
                rows[key] = part.gather_rows(v)
        if part.rank != 0:
            return None
    state = _merged(optimizer) if split else optimizer.state_dict()
    for i in _head_indices(state) if rows else []:
        state["state"][i] = {**state["state"][i], **rows}
    return state


def load_optimizer_state(optimizer: Any, head: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`: this rank's rows of the classifier's buffers, ZeRO re-partitioned."""
    part = head.partition
    if part.sharded:
        state = {**state, "state": dict(state["state"])}
        for i in _head_indices(state):
            if i in state["state"]:
                state["state"][i] = {k: part.local_rows(v) if isinstance(v, torch.Tensor) and v.dim() >= 1
                                     and v.shape[0] == part.num_classes else v for k, v in state["state"][i].items()}
    if isinstance(optimizer, SplitOptimizer):
        rep, loc = _split(optimizer, state)
        optimizer.replicated.load_state_dict(rep)
        if optimizer.local is not None:
            optimizer.local.load_state_dict(loc)
    else:
        optimizer.load_state_dict(state)
