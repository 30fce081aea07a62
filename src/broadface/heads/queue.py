"""The BroadFace queue: a preallocated FIFO ring of past embeddings, counted in samples.

Paper symbols: ``E`` holds past embeddings ``e⁻``; ``W⁻_y`` is the classifier row of
each entry's label when it was enqueued; ``λ = ‖e⁻‖ / ‖W⁻_y‖`` and the compensated
embedding (Eq. 7) is ``e* = e⁻ + λ (W_y − W⁻_y)``.

Storage modes:
- ``"compact"`` (default) keeps ``u = e⁻ − λ W⁻_y`` and ``λ``, so ``e* = u + λ W_y``
  exactly: D + 2 numbers per entry (u, λ, label) instead of 2·D + 2.
- ``"full"`` keeps ``e⁻`` and ``W⁻_y`` (the naïve layout). It can also return the uncompensated
  ``e⁻`` and the compensation norm ``‖e* − e⁻‖``, which diagnostics such as the paper's Fig. 5a need.
- ``track_ids`` adds each entry's sample id and the push (step) that enqueued it.
- ``keep_norms`` adds ‖e⁻‖ (for the norm-dependent margins, AdaFace and MagFace: D + 3 numbers compact);
  ``subcenters`` adds the index k of the sub-centre ``W⁻_y = W⁻_{y,k}`` the entry was compensated
  against (sub-center ArcFace: the dominant one at enqueue, fixed for the entry's life).

With ``compensate=False`` the ring stores ``u = e⁻`` and ``λ = 0``: ``e* = e⁻``.

The queue owns its state. The write pointer, fill and push counter are Python ints (reading
them never waits for a device) saved as the module's extra state; the entries live in buffers,
so ``state_dict`` round-trips exactly. Nothing outside this module writes them: others read
:meth:`EmbeddingQueue.entries` (oldest first, a copy) and write through :meth:`push` and
:meth:`load`. :func:`entries_from_state` / :func:`state_from_entries` are the same entries in
a plain state_dict, the world-independent form a checkpoint holds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

STORAGE_MODES = ("compact", "full")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COUNTERS = ("ptr", "fill", "step")


@dataclass(frozen=True)
class QueueEntries:
    """Queue entries, one row each: ``vectors`` are u (compact) or e⁻ (full), ``scales`` λ,
    ``past_weights`` W⁻_y (full storage), ``ids`` / ``steps`` (when tracked), ``norms`` ‖e⁻‖ and
    ``subcenters`` (the sub-centre of W⁻_y) where the margin needs them."""

    vectors: Tensor
    scales: Tensor
    labels: Tensor
    past_weights: Tensor | None = None
    ids: Tensor | None = None
    steps: Tensor | None = None
    norms: Tensor | None = None
    subcenters: Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def storage(self) -> str:
        return "compact" if self.past_weights is None else "full"

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are present, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> QueueEntries:
        """Apply ``fn`` to every present tensor (e.g. an index, ``.cpu()``, a collective)."""
        return QueueEntries(**{k: fn(v) for k, v in self.tensors().items()})

    @staticmethod
    def cat(parts: list[QueueEntries]) -> QueueEntries:
        keys = parts[0].tensors().keys()
        return QueueEntries(**{k: torch.cat([p.tensors()[k] for p in parts]) for k in keys})


def subcenter_rows(rows: Tensor, subcenters: Tensor | None) -> Tensor:
    """Each entry's row ``W_{y,k}`` of the sub-centre it keeps, from its class's rows (n, K, D); 2-D rows
    as they are."""
    if rows.dim() == 2:
        return rows
    return rows[torch.arange(rows.shape[0], device=rows.device), subcenters.to(rows.device)]


def compensate(entries: QueueEntries, rows_now: Tensor) -> Tensor:
    """Eq. 7, ``e* = e⁻ + λ (W_y − W⁻_y)``, fp32, given each entry's current row ``W_y`` (n × D; with
    sub-centres its class's rows (n, K, D), of which the entry's own sub-centre is taken).

    Compact storage holds ``u = e⁻ − λW⁻_y``, so ``e* = u + λW_y``; without compensation λ = 0."""
    rows_now = subcenter_rows(rows_now, entries.subcenters)
    lam = entries.scales[:, None].float()
    past = entries.vectors.float()
    if entries.past_weights is None:
        return past + lam * rows_now.float()
    return past + lam * (rows_now.float() - entries.past_weights.float())


class EmbeddingQueue(nn.Module):
    """FIFO ring buffer of ``size`` past embeddings of dimension ``dim``."""

    def __init__(self, size: int, dim: int, storage: str = "compact", dtype: torch.dtype = torch.float32,
                 compensate: bool = True, track_ids: bool = False, keep_norms: bool = False,
                 subcenters: bool = False):
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        if storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
        if dtype not in DTYPES:
            raise ValueError(f"queue dtype must be float32, bfloat16 or float16, got {dtype}")
        self.size, self.dim, self.storage = size, dim, storage
        self.compensate, self.track_ids = compensate, track_ids
        self.keep_norms, self.keep_subcenters = keep_norms, subcenters
        self.register_buffer("vectors", torch.zeros(size, dim, dtype=dtype))  # u = e⁻ − λW⁻_y, or e⁻ (full)
        self.register_buffer("scales", torch.zeros(size, dtype=torch.float32))  # λ
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        if storage == "full":
            self.register_buffer("past_weights", torch.zeros(size, dim, dtype=dtype))  # W⁻_y
        if track_ids:
            self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
            self.register_buffer("steps", torch.full((size,), -1, dtype=torch.long))
        if keep_norms:
            self.register_buffer("norms", torch.zeros(size, dtype=torch.float32))  # ‖e⁻‖
        if subcenters:
            self.register_buffer("subcenters", torch.zeros(size, dtype=torch.long))  # k of W⁻_y = W⁻_{y,k}
        self.ptr = self.fill = self.step = 0  # next slot, occupied slots, pushes so far (host ints)

    def __len__(self) -> int:
        return self.fill

    def _fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(QueueEntries) if hasattr(self, f.name)
                     and isinstance(getattr(self, f.name), Tensor))

    # ------------------------------------------------------------------ write
    @torch.no_grad()
    def push(self, embeddings: Tensor, labels: Tensor, rows: Tensor, ids: Tensor | None = None,
             keep: Tensor | None = None, subcenters: Tensor | None = None) -> None:
        """Enqueue ``embeddings`` (e⁻) with their labels and classifier rows ``rows`` (W⁻_y; with
        sub-centres the row of sub-centre ``subcenters``, which this queue then keeps).

        ``keep`` (a 0-d bool tensor) makes the write conditional on the device: where it is
        False the slots keep their old contents (the counters still move). No host sync.
        """
        if self.size == 0:
            return
        if self.keep_subcenters != (subcenters is not None):
            raise ValueError("this queue keeps the sub-centre of every entry: push needs subcenters="
                             if self.keep_subcenters else "this queue keeps no sub-centres (subcenters=True)")
        e, w, labels = embeddings.detach().float(), rows.detach().float(), labels.detach().long()
        if e.shape[0] > self.size:  # only the newest `size` entries survive a FIFO
            e, w, labels = e[-self.size:], w[-self.size:], labels[-self.size:]
            ids = None if ids is None else ids[-self.size:]
            subcenters = None if subcenters is None else subcenters[-self.size:]
        n = e.shape[0]
        e_norm = e.norm(dim=1)
        lam = e_norm / w.norm(dim=1).clamp_min(1e-12)  # λ = ‖e⁻‖/‖W⁻_y‖
        if not self.compensate:
            lam = torch.zeros_like(lam)
        new = {"scales": lam, "labels": labels}
        if self.storage == "full":
            new.update(vectors=e, past_weights=w)
        else:
            new["vectors"] = e - lam[:, None] * w  # u = e⁻ − λW⁻_y
        if self.track_ids:
            new["ids"] = torch.full_like(labels, -1) if ids is None else ids.detach().long().to(labels.device)
            new["steps"] = torch.full_like(labels, self.step)
        if self.keep_norms:
            new["norms"] = e_norm
        if self.keep_subcenters:
            new["subcenters"] = subcenters.detach().long()
        slots = (self.ptr + torch.arange(n, device=self.labels.device)) % self.size
        for name, value in new.items():
            buf = getattr(self, name)
            value = value.to(buf.dtype)
            if keep is not None:
                value = torch.where(keep, value, buf[slots])
            buf[slots] = value
        self.ptr, self.fill, self.step = (self.ptr + n) % self.size, min(self.fill + n, self.size), self.step + 1

    @torch.no_grad()
    def load(self, entries: QueueEntries | None, step: int = 0, drop_oldest: bool = False) -> None:
        """Replace the contents with ``entries`` (oldest first) and set the push counter to ``step``.

        Full-storage entries convert to compact (u = e⁻ − λW⁻_y); compact ones cannot become full
        (e⁻ is gone). More entries than slots raise unless ``drop_oldest`` (FIFO: the oldest go).
        """
        n = 0 if entries is None else len(entries)
        if n > self.size:
            if not drop_oldest:
                raise ValueError(f"the checkpoint holds {n} queued embeddings but this queue has room for "
                                 f"{self.size}; enlarge the queue or pass drop_oldest=True")
            entries, n = entries.map(lambda t: t[n - self.size:]), self.size
        for name in self._fields():
            getattr(self, name).fill_(-1 if name in ("ids", "steps") else 0)
        if n:
            for name, value in self._convert(entries).items():
                getattr(self, name)[:n] = value.to(getattr(self, name))
        self.ptr, self.fill, self.step = n % self.size if self.size else 0, n, int(step)

    def _convert(self, entries: QueueEntries) -> dict[str, Tensor]:
        """``entries`` in this queue's layout (storage, tracked fields)."""
        if entries.vectors.dim() != 2 or entries.vectors.shape[1] != self.dim:
            raise ValueError(f"queue entries have vectors of shape {tuple(entries.vectors.shape)}, "
                             f"expected (n, {self.dim})")
        out = entries.tensors()
        if self.storage == "full" and entries.storage == "compact":
            raise ValueError("the checkpoint's queue is compact (u = e⁻ − λW⁻_y, no e⁻): it loads into "
                             "storage='compact' only (head.storage=compact, head.diagnostics=false)")
        if self.storage == "compact" and entries.storage == "full":
            w = out.pop("past_weights").float()
            out["vectors"] = entries.vectors.float() - entries.scales[:, None].float() * w
        for name in ("ids", "steps"):
            if self.track_ids and name not in out:
                out[name] = torch.full_like(entries.labels, -1)
            if not self.track_ids:
                out.pop(name, None)
        for name, kept, what in (("norms", self.keep_norms, "‖e⁻‖ (AdaFace, MagFace)"),
                                 ("subcenters", self.keep_subcenters, "sub-centre indices (sub-center ArcFace)")):
            if kept and name not in out:
                raise ValueError(f"the checkpoint's queue entries hold no {what}, which this head's margin needs; "
                                 "start with an empty queue (a warm start: train.init) instead")
            if not kept:
                out.pop(name, None)
        return out

    # ------------------------------------------------------------------- read
    def valid(self) -> slice:
        """Occupied slots: the ring fills from slot 0, so they are always ``[:fill]``."""
        return slice(0, self.fill)

    def order(self) -> Tensor:
        """Occupied slot indices from oldest to newest."""
        device = self.labels.device
        if self.fill < self.size:
            return torch.arange(self.fill, device=device)
        return (self.ptr + torch.arange(self.size, device=device)) % self.size

    def live(self) -> QueueEntries:
        """The occupied entries oldest first, for the loss: views until the ring has wrapped, then one
        rotation (never write to them). The union is in FIFO order, so no loss depends on the pointer."""
        def fifo(buf: Tensor) -> Tensor:
            if self.fill < self.size or self.ptr == 0:
                return buf[:self.fill]
            return torch.cat([buf[self.ptr:], buf[:self.ptr]])
        return QueueEntries(**{name: fifo(getattr(self, name)) for name in self._fields()})

    def entries(self) -> QueueEntries:
        """The occupied entries oldest first, as a copy."""
        idx = self.order()
        return QueueEntries(**{name: getattr(self, name)[idx] for name in self._fields()})

    @torch.no_grad()
    def compensated(self, weight: Tensor) -> Tensor:
        """``e*`` of every entry oldest first, fp32, given the current classifier ``weight`` (C×D)."""
        live = self.live()
        return compensate(live, weight.detach()[live.labels])

    @torch.no_grad()
    def uncompensated(self) -> Tensor:
        """``e⁻`` of every entry oldest first (needs full storage, or compensate=False)."""
        if self.storage == "full" or not self.compensate:
            return self.live().vectors.float()
        raise RuntimeError("the compact queue does not keep e⁻; build it with storage='full' for this diagnostic")

    # ------------------------------------------------------------ state dict
    def get_extra_state(self) -> dict[str, int]:
        return {"ptr": self.ptr, "fill": self.fill, "step": self.step}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        ptr, fill, step = (int(state[k]) for k in _COUNTERS)
        if not (0 <= fill <= self.size and 0 <= ptr < max(self.size, 1)):
            raise ValueError(f"queue state ptr={ptr}, fill={fill} does not fit a queue of {self.size}")
        self.ptr, self.fill, self.step = ptr, fill, step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _upgrade_legacy(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}=True" for k, v in (("keep_norms", self.keep_norms),
                                                    ("subcenters", self.keep_subcenters)) if v)
        return (f"size={self.size}, dim={self.dim}, storage={self.storage}, dtype={self.vectors.dtype}, "
                f"compensate={self.compensate}, track_ids={self.track_ids}{extra}")


def _upgrade_legacy(state: dict[str, Any], prefix: str) -> None:
    """Checkpoints of broadface <= 0.1 kept ptr/fill/step as tensors (and compact probe rows): convert in place."""
    if prefix + "fill" in state and prefix + "_extra_state" not in state:
        state[prefix + "_extra_state"] = {k: int(state.pop(prefix + k)) for k in _COUNTERS}
    state.pop(prefix + "probe_weights", None)


def entries_from_state(state: Mapping[str, Any], prefix: str = "queue.") -> tuple[QueueEntries | None, int, int]:
    """``(entries oldest first, push counter, capacity)`` of a queue inside a state_dict (None: no queue)."""
    if prefix + "labels" not in state:
        return None, 0, 0
    state = dict(state)
    _upgrade_legacy(state, prefix)
    counters = state[prefix + "_extra_state"]
    size, fill, ptr = state[prefix + "labels"].shape[0], int(counters["fill"]), int(counters["ptr"])
    idx = torch.arange(fill) if fill < size else (ptr + torch.arange(size)) % max(size, 1)
    names = [f.name for f in dataclasses.fields(QueueEntries) if prefix + f.name in state]
    return QueueEntries(**{k: state[prefix + k][idx] for k in names}), int(counters["step"]), size


def state_from_entries(entries: QueueEntries | None, capacity: int, dim: int, step: int, dtype: torch.dtype,
                       prefix: str = "queue.") -> dict[str, Any]:
    """The state_dict part of a ``capacity``-slot queue holding ``entries`` (oldest first) from slot 0."""
    storage = "compact" if entries is None else entries.storage
    has = {k: entries is not None and getattr(entries, k) is not None for k in ("ids", "norms", "subcenters")}
    q = EmbeddingQueue(capacity, dim, storage, dtype, track_ids=has["ids"], keep_norms=has["norms"],
                       subcenters=has["subcenters"])
    q.load(entries, step)
    return {prefix + k: v for k, v in q.state_dict().items()}
