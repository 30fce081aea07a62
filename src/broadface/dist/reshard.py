"""Checkpoints of class-sharded heads that reload on any number of ranks.

**Split rule.** Classes are cut into contiguous ranges, rank order: with ``q, r =
divmod(C, world)``, rank ``k`` owns ``[k·q + min(k, r), (k+1)·q + min(k+1, r))`` — the
first ``r`` ranks hold one class more (Partial FC's rule). ``C >= world`` is required.

**World-independent form** (:func:`merge_head_states`, ``ShardedMarginHead.gather_full_state``)::

    {"format": "broadface.sharded_head", "version": 1, "num_classes": C, "embedding_size": D,
     "weight": (C, D) tensor,
     "queue": None or {"mode": "local" | "replicated", "size_per_rank": Q, "world_size": W,
                       "vectors": (n, D), "scales": (n,), "labels": (n,), "step": int}}

Queue entries are kept as stored (``u = e⁻ − λW⁻_y``, ``λ``, ``y``; compensation stays
exact after re-sharding because ``e* = u + λW_y`` only needs the new owner's ``W_y``),
in **global FIFO order**, oldest first:

- replicated mode: the (identical) queue of every rank, oldest first;
- local (per-rank) mode: entries sorted by age (position from each rank's newest entry),
  oldest first, ties broken by rank. Re-sharding deals them back out from the newest:
  global age ``a`` goes to rank ``W−1 − a mod W`` at per-rank age ``a // W``, so
  merge ∘ split is the identity and ranks receive entries of the same age.

A target rank that cannot hold its entries raises unless ``drop_oldest=True`` (FIFO:
the oldest are dropped, as the next pushes would). Nothing is ever re-initialised silently:
class count, embedding size, missing or duplicate shards are errors naming the field.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

FORMAT, VERSION = "broadface.sharded_head", 1
QUEUE_KEYS = ("vectors", "scales", "labels")


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the classes owned by ``rank`` (see the module's split rule)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if num_classes < world_size:
        raise ValueError(f"num_classes={num_classes} < world size {world_size}: every rank needs >= 1 class")
    q, r = divmod(num_classes, world_size)
    return rank * q + min(rank, r), (rank + 1) * q + min(rank + 1, r)


def merge_rows(shards: Sequence[Tensor], num_classes: int) -> Tensor:
    """Concatenate per-rank row shards (e.g. W or a momentum buffer), checking each one's size."""
    world = len(shards)
    for k, s in enumerate(shards):
        lo, hi = class_range(num_classes, world, k)
        if s.shape[0] != hi - lo:
            raise ValueError(f"shard of rank {k}/{world} has {s.shape[0]} rows, expected {hi - lo} "
                             f"(classes {lo}..{hi - 1} of {num_classes})")
    return torch.cat(list(shards))


def split_rows(full: Tensor, world_size: int, rank: int) -> Tensor:
    """This rank's rows of a (C, ...) tensor."""
    lo, hi = class_range(full.shape[0], world_size, rank)
    return full[lo:hi].clone()


def merge_fifo(per_rank: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per-rank FIFO sequences (oldest first) -> one sequence by age (oldest first), ties by rank."""
    world = len(per_rank)
    ages = [torch.arange(len(p["labels"]) - 1, -1, -1) for p in per_rank]
    age = torch.cat(ages)
    rank = torch.cat([torch.full((len(a),), k) for k, a in enumerate(ages)])
    order = torch.argsort(-(age * world + (world - 1 - rank)), stable=True)  # age desc, then rank asc
    return {k: torch.cat([p[k] for p in per_rank])[order] for k in QUEUE_KEYS}


def split_fifo(entries: Mapping[str, Tensor], world_size: int) -> list[dict[str, Tensor]]:
    """Inverse of :func:`merge_fifo`: global age ``a`` -> rank ``W−1 − a mod W``; each list oldest first."""
    n = len(entries["labels"])
    age = torch.arange(n - 1, -1, -1)
    owner = world_size - 1 - age % world_size
    return [{k: entries[k][owner == r] for k in QUEUE_KEYS} for r in range(world_size)]


def queue_entries(state: Mapping[str, Any], prefix: str = "queue.") -> dict[str, Tensor]:
    """Occupied entries of an ``EmbeddingQueue`` state_dict, oldest first."""
    size, fill, ptr = state[prefix + "labels"].shape[0], int(state[prefix + "fill"]), int(state[prefix + "ptr"])
    order = torch.arange(fill) if fill < size else (ptr + torch.arange(size)) % size
    return {k: state[prefix + k][order] for k in QUEUE_KEYS}


def _meta(state: Mapping[str, Any], i: int) -> dict[str, Any]:
    meta = state.get("_extra_state")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"state {i} is not the state_dict of a ShardedMarginHead/ShardedBroadFace "
                         f"(no '_extra_state' with format {FORMAT!r}; keys: {sorted(state)[:6]}...)")
    return meta


def _agree(metas: Sequence[Mapping[str, Any]]) -> None:
    for field in ("num_classes", "embedding_size", "world_size", "queue_mode", "queue_size"):
        values = {repr(m.get(field)) for m in metas}
        if len(values) > 1:
            raise ValueError(f"shard states disagree on {field}: {sorted(values)}")


def build_full_state(metas: Sequence[Mapping[str, Any]], weights: Sequence[Tensor],
                     queues: Sequence[Mapping[str, Tensor]], steps: Sequence[int]) -> dict[str, Any]:
    """The world-independent form from every rank's metadata, W shard, queue entries (oldest first)
    and queue step, all in rank order."""
    world = len(metas)
    _agree(metas)
    if metas[0]["world_size"] != world:
        raise ValueError(f"got {world} shard(s) of a {metas[0]['world_size']}-rank head")
    c, d = metas[0]["num_classes"], metas[0]["embedding_size"]
    weight = merge_rows(weights, c)
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"shard weights have shape {tuple(weight.shape)}, expected ({c}, {d})")
    full: dict[str, Any] = {"format": FORMAT, "version": VERSION, "num_classes": c, "embedding_size": d,
                            "weight": weight, "queue": None}
    mode = metas[0]["queue_mode"]
    if metas[0]["queue_size"]:
        if mode == "replicated":
            for k in range(1, world):
                if any(not torch.equal(queues[0][x], queues[k][x]) for x in QUEUE_KEYS):
                    raise ValueError(f"replicated queues of rank 0 and rank {k} differ: not one training run?")
            entries = dict(queues[0])
        else:
            entries = merge_fifo(queues)
        full["queue"] = {"mode": mode, "size_per_rank": metas[0]["queue_size"], "world_size": world,
                         "step": max(int(s) for s in steps), **entries}
    return full


def merge_head_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-rank ``state_dict()``s of a sharded head (any order, e.g. one file per rank) -> the
    world-independent form."""
    if not states:
        raise ValueError("merge_head_states: no shard states given")
    metas = [_meta(s, i) for i, s in enumerate(states)]
    _agree(metas)
    world = metas[0]["world_size"]
    ranks = sorted(m["rank"] for m in metas)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        dup = sorted({r for r in ranks if ranks.count(r) > 1})
        raise ValueError(f"shard states of a {world}-rank head: missing rank(s) {missing}, duplicate rank(s) {dup}")
    order = sorted(range(len(states)), key=lambda i: metas[i]["rank"])
    by_rank = [states[i] for i in order]
    has_queue = bool(metas[0]["queue_size"])
    return build_full_state([metas[i] for i in order], [s["margin.weight"] for s in by_rank],
                            [queue_entries(s) for s in by_rank] if has_queue else [],
                            [int(s["queue.step"]) for s in by_rank] if has_queue else [])


def check_full_state(full: Mapping[str, Any], num_classes: int, embedding_size: int) -> None:
    """Raise ValueError unless ``full`` is a world-independent head state for (C, D)."""
    if not isinstance(full, Mapping) or full.get("format") != FORMAT:
        raise ValueError(f"not a world-independent sharded-head state (expected format={FORMAT!r}); "
                         "build it with merge_head_states or ShardedMarginHead.gather_full_state")
    if int(full.get("version", 0)) > VERSION:
        raise ValueError(f"sharded-head state version {full['version']} is newer than this broadface ({VERSION})")
    if full["num_classes"] != num_classes:
        raise ValueError(f"checkpoint head has num_classes={full['num_classes']}, this head {num_classes}")
    if full["embedding_size"] != embedding_size:
        raise ValueError(f"checkpoint head has embedding_size={full['embedding_size']}, this head {embedding_size}")
    if tuple(full["weight"].shape) != (num_classes, embedding_size):
        raise ValueError(f"checkpoint weight has shape {tuple(full['weight'].shape)}, "
                         f"expected ({num_classes}, {embedding_size})")


def split_queue(full: Mapping[str, Any], world_size: int, rank: int, mode: str, capacity: int,
                drop_oldest: bool = False) -> dict[str, Tensor]:
    """This rank's queue entries (oldest first) for a head in ``mode`` holding ``capacity`` entries."""
    q = full.get("queue")
    if q is None:
        return {}
    entries = {k: q[k] for k in QUEUE_KEYS}
    if mode == "local":
        entries = split_fifo(entries, world_size)[rank]
    n = len(entries["labels"])
    if n > capacity:
        if not drop_oldest:
            raise ValueError(f"rank {rank}: the checkpoint queue holds {n} entries for it but the queue has room "
                             f"for {capacity} (mode={mode}); raise queue_size or pass drop_oldest=True")
        entries = {k: v[n - capacity:] for k, v in entries.items()}
    return entries


def full_state_from_broadface(state: Mapping[str, Any]) -> dict[str, Any]:
    """The world-independent form of a single-process ``BroadFace`` (or ``MarginHead``) state_dict,
    e.g. the ``head`` of a one-process checkpoint, to continue on N ranks (queue: compact storage only)."""
    key = "margin.weight" if "margin.weight" in state else "weight"
    if key not in state:
        raise ValueError("not a BroadFace/MarginHead state_dict (no 'margin.weight' or 'weight'; "
                         f"keys: {sorted(state)[:6]})")
    weight = state[key]
    full: dict[str, Any] = {"format": FORMAT, "version": VERSION, "num_classes": weight.shape[0],
                            "embedding_size": weight.shape[1], "weight": weight, "queue": None}
    if "queue.vectors" in state and int(state["queue.fill"]):
        if "queue.past_weights" in state:
            raise ValueError("the BroadFace queue uses storage='full'; only compact queues convert "
                             "(u = e⁻ − λW⁻_y is what a sharded head stores)")
        full["queue"] = {"mode": "replicated", "size_per_rank": int(state["queue.labels"].shape[0]), "world_size": 1,
                         "step": int(state["queue.step"]), **queue_entries(state)}
    return full
