"""World-size independent checkpoint parts: a distributed run saves what one process would.

A run on W ranks (class-sharded head, ``queue_size`` Q per rank) writes

- ``head``: the state_dict of the one-process ``BroadFace`` with the whole classifier (C × D)
  and a compact queue of W·Q entries holding every rank's entries in global FIFO order
  (:mod:`broadface.dist.reshard`'s rules: local queues merged by age, ties by rank);
- ``optimizer``: the one-process optimizer state_dict; the classifier's per-class buffers
  (SGD/LARS momentum, AdamW moments) as whole (C, ...) tensors; ZeRO's partitions consolidated.

So a checkpoint resumes on any number of ranks (1 included: set ``head.queue_size`` to W·Q
there), and ``warm_start``, ``load_backbone`` and export read it unchanged. Loading re-shards
(``load_full_state``, ``local_rows``); a queue that does not fit, a class-count or shape
mismatch is a ``ValueError``, never a silently re-initialised shard.

The collective functions (:func:`head_state`, :func:`optimizer_state`) must be called on every
rank; they return the state on rank 0 and None elsewhere.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from broadface.train.config import HeadConfig
from broadface.train.memory import SplitOptimizer


def _sharded(head: nn.Module) -> bool:
    from broadface.heads.sharded import ShardedMarginHead

    return isinstance(head, ShardedMarginHead)


# ----------------------------------------------------------------------------- head


def head_state(head: nn.Module, cfg: HeadConfig) -> dict[str, Any] | None:
    """Collective for a sharded head: the one-process BroadFace state_dict (rank 0; None elsewhere)."""
    if not _sharded(head):
        return head.state_dict()
    full = head.gather_full_state(dst=0)
    if full is None:
        return None
    return broadface_state(full, cfg, head.queue_size * head.world_size)


@torch.no_grad()
def broadface_state(full: dict[str, Any], cfg: HeadConfig, capacity: int) -> dict[str, Any]:
    """A world-independent sharded-head state (:mod:`broadface.dist.reshard`) as the state_dict of the
    one-process ``BroadFace`` of ``cfg`` with a queue of ``capacity`` entries.

    The past rows W⁻_y of the compensation-norm probe slots are not part of the sharded form: they
    are set to the current rows, so ``compensation_norm`` under-reports until those slots turn over.
    """
    from broadface.train.trainer import build_head

    c, d = full["num_classes"], full["embedding_size"]
    with torch.random.fork_rng(devices=[]):  # building the template must not move the training RNG
        plain = build_head(dataclasses.replace(cfg, queue_size=capacity, storage="compact", sample_rate=1.0), c, d)
    plain.margin.weight.copy_(full["weight"])
    q, entries = plain.queue, full.get("queue")
    n = len(entries["labels"]) if entries else 0
    if n > capacity:
        raise ValueError(f"the sharded head holds {n} queued embeddings for a queue of {capacity}")
    if n:
        q.vectors[:n] = entries["vectors"].to(q.vectors)
        q.scales[:n] = entries["scales"].to(q.scales)
        q.labels[:n] = entries["labels"].to(q.labels)
        if q.probe_stride:
            slots = torch.arange(0, n, q.probe_stride)
            q.probe_weights[slots // q.probe_stride] = full["weight"][q.labels[slots]].float()
        q.ptr.fill_(n % capacity)
        q.fill.fill_(n)
        q.step.fill_(int(entries["step"]))
    return plain.state_dict()


def load_head_state(head: nn.Module, state: dict[str, Any]) -> None:
    """Load a checkpoint's ``head`` into this run's head, re-sharding it for a sharded head."""
    if _sharded(head):
        from broadface.dist import full_state_from_broadface

        head.load_full_state(full_state_from_broadface(state))
        return
    theirs, mine = state.get("queue.labels"), head.state_dict().get("queue.labels")
    if theirs is not None and mine is not None and theirs.shape != mine.shape:
        raise ValueError(f"its BroadFace queue holds {theirs.shape[0]} entries in all (WORLD_SIZE × head.queue_size "
                         f"of the run that wrote it) but this run's holds {mine.shape[0]}: set "
                         f"head.queue_size={theirs.shape[0]} on one process (per rank: that / WORLD_SIZE)")
    head.load_state_dict(state)


def warm_start_head(path: str | os.PathLike, head: nn.Module, map_location: torch.device | str = "cpu") -> None:
    """``train.init`` for a sharded head: this rank's rows of the checkpoint's classifier (fresh queue)."""
    from broadface.dist import full_state_from_broadface
    from broadface.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location)
    weight = (ckpt.get("head") or {}).get("margin.weight")
    if weight is None:
        raise ValueError(f"{path}: checkpoint holds no classifier (head 'margin.weight'); "
                         "set train.init_head=false to warm-start the backbone only")
    if tuple(weight.shape) != (head.num_classes, head.embedding_size):
        raise ValueError(f"{path}: classifier has shape {tuple(weight.shape)} (classes x dim) but this run needs "
                         f"{(head.num_classes, head.embedding_size)}; train on the same identities in the same "
                         "order, or set train.init_head=false to warm-start the backbone only")
    head.load_full_state(full_state_from_broadface({"margin.weight": weight}))


# ----------------------------------------------------------------------------- optimizer


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


def optimizer_state(optimizer: Any, head: nn.Module) -> dict[str, Any] | None:
    """Collective: the one-process optimizer state_dict on rank 0 (None elsewhere)."""
    split = isinstance(optimizer, SplitOptimizer)
    if split:
        optimizer.consolidate_state_dict(to=0)
    rows: dict[str, torch.Tensor | None] = {}
    if _sharded(head):
        local = (optimizer.local if split else optimizer).state.get(head.weight, {})
        for key in sorted(local):  # the same keys on every rank, in the same order
            v = local[key]
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == head.num_local:
                rows[key] = head.gather_rows(v)
        if head.rank != 0:
            return None
    state = _merged(optimizer) if split else optimizer.state_dict()
    for i in _head_indices(state) if rows else []:
        state["state"][i] = {**state["state"][i], **rows}
    return state


def load_optimizer_state(optimizer: Any, head: nn.Module, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`: this rank's rows of the classifier's buffers, ZeRO re-partitioned."""
    if _sharded(head):
        state = {**state, "state": dict(state["state"])}
        for i in _head_indices(state):
            if i in state["state"]:
                state["state"][i] = {k: head.local_rows(v) if isinstance(v, torch.Tensor) and v.dim() >= 1
                                     and v.shape[0] == head.num_classes else v for k, v in state["state"][i].items()}
    if isinstance(optimizer, SplitOptimizer):
        rep, loc = _split(optimizer, state)
        optimizer.replicated.load_state_dict(rep)
        if optimizer.local is not None:
            optimizer.local.load_state_dict(loc)
    else:
        optimizer.load_state_dict(state)
