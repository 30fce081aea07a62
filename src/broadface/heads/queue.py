"""The BroadFace queue: a preallocated FIFO ring of past embeddings, counted in samples.

Paper symbols: ``E`` holds past embeddings ``e⁻``; ``W⁻_y`` is the classifier row of
each entry's label when it was enqueued; ``λ = ‖e⁻‖ / ‖W⁻_y‖`` and the compensated
embedding (Eq. 7) is ``e* = e⁻ + λ (W_y − W⁻_y)``.

Storage modes:
- ``"compact"`` (default) keeps ``u = e⁻ − λ W⁻_y`` and ``λ``, so ``e* = u + λ W_y``
  exactly: D + 2 numbers per entry (u, λ, label) instead of 2·D.
- ``"full"`` keeps ``e⁻`` and ``W⁻_y`` (the naïve layout); it can also return the
  uncompensated ``e⁻``, which diagnostics such as the paper's Fig. 5a need.

With ``compensate=False`` the compact ring stores ``u = e⁻`` and ``λ = 0``: ``e* = e⁻``.

A small fixed set of probe slots (at most ``probe_rows``, independent of the queue
size) also keeps ``W⁻_y`` in compact mode so the mean compensation norm can be logged.
All state (contents, write pointer, fill, step counter) lives in buffers, so it is
part of ``state_dict`` and a save/load round trip restores the queue exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

STORAGE_MODES = ("compact", "full")


class EmbeddingQueue(nn.Module):
    """FIFO ring buffer of ``size`` past embeddings of dimension ``dim``."""

    def __init__(self, size: int, dim: int, storage: str = "compact", dtype: torch.dtype = torch.float32,
                 compensate: bool = True, track_ids: bool = False, probe_rows: int = 256):
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        if storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"queue dtype must be float32, bfloat16 or float16, got {dtype}")
        self.size, self.dim, self.storage = size, dim, storage
        self.compensate, self.track_ids = compensate, track_ids
        # u = e⁻ − λW⁻_y (compact) or e⁻ itself (full / no compensation)
        self.register_buffer("vectors", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("scales", torch.zeros(size, dtype=torch.float32))  # λ
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        if storage == "full":
            self.register_buffer("past_weights", torch.zeros(size, dim, dtype=dtype))  # W⁻_y
        self.probe_stride = max(1, -(-size // probe_rows)) if size and probe_rows else 0
        if storage == "compact" and self.probe_stride:
            n_probe = -(-size // self.probe_stride)
            self.register_buffer("probe_weights", torch.zeros(n_probe, dim, dtype=torch.float32))
        if track_ids:
            self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
            self.register_buffer("steps", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("fill", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # pushes so far

    def __len__(self) -> int:
        return int(self.fill)

    # ------------------------------------------------------------------ write
    @torch.no_grad()
    def push(self, embeddings: Tensor, labels: Tensor, rows: Tensor, ids: Tensor | None = None) -> None:
        """Enqueue ``embeddings`` (e⁻) with their labels and classifier rows ``rows`` (W⁻_y)."""
        if self.size == 0:
            return
        e, w = embeddings.detach().float(), rows.detach().float()
        labels = labels.detach().long()
        if e.shape[0] > self.size:  # only the newest `size` entries survive a FIFO
            e, w, labels = e[-self.size:], w[-self.size:], labels[-self.size:]
            ids = None if ids is None else ids[-self.size:]
        n = e.shape[0]
        slots = (self.ptr + torch.arange(n, device=e.device)) % self.size
        if self.storage == "full":
            self.vectors[slots] = e.to(self.vectors.dtype)
            self.past_weights[slots] = w.to(self.past_weights.dtype)
            self.scales[slots] = e.norm(dim=1) / w.norm(dim=1).clamp_min(1e-12)
        else:
            lam = e.norm(dim=1) / w.norm(dim=1).clamp_min(1e-12)  # λ = ‖e⁻‖/‖W⁻_y‖
            if not self.compensate:
                lam = torch.zeros_like(lam)
            self.vectors[slots] = (e - lam[:, None] * w).to(self.vectors.dtype)  # u = e⁻ − λW⁻_y
            self.scales[slots] = lam
            if self.probe_stride:
                probe = slots % self.probe_stride == 0
                self.probe_weights[slots[probe] // self.probe_stride] = w[probe]
        self.labels[slots] = labels
        if self.track_ids:
            self.ids[slots] = -1 if ids is None else ids.detach().long().to(self.ids.device)
            self.steps[slots] = self.step
        self.ptr.copy_((self.ptr + n) % self.size)
        self.fill.copy_(torch.clamp(self.fill + n, max=self.size))
        self.step.add_(1)

    # ------------------------------------------------------------------- read
    def valid(self) -> slice:
        """Occupied slots: the ring fills from slot 0, so they are always ``[:fill]``."""
        return slice(0, int(self.fill))

    def order(self) -> Tensor:
        """Occupied slot indices from oldest to newest."""
        n = int(self.fill)
        if n < self.size:
            return torch.arange(n, device=self.ptr.device)
        return (self.ptr + torch.arange(self.size, device=self.ptr.device)) % self.size

    @torch.no_grad()
    def compensated(self, weight: Tensor) -> Tensor:
        """``e*`` for every occupied slot, fp32, given the current classifier ``weight`` (C×D)."""
        return self.compensated_from_rows(weight.detach().float()[self.labels[self.valid()]])

    @torch.no_grad()
    def compensated_from_rows(self, w_now: Tensor) -> Tensor:
        """``e*`` for every occupied slot given each entry's current row ``W_y`` (fill × D).

        For a model-parallel classifier, where the rows come from the ranks that own them.
        """
        s = self.valid()
        w_now = w_now.detach().float()
        lam = self.scales[s, None]
        if self.storage == "full":
            e_past = self.vectors[s].float()
            if not self.compensate:
                return e_past
            return e_past + lam * (w_now - self.past_weights[s].float())  # Eq. 7
        return self.vectors[s].float() + lam * w_now  # e* = u + λW_y

    @torch.no_grad()
    def uncompensated(self) -> Tensor:
        """``e⁻`` for every occupied slot (needs full storage, or compensate=False)."""
        s = self.valid()
        if self.storage == "full" or not self.compensate:
            return self.vectors[s].float()
        raise RuntimeError("the compact queue does not keep e⁻; build it with storage='full' for this diagnostic")

    @torch.no_grad()
    def compensation_norm(self, weight: Tensor) -> Tensor | None:
        """Mean ‖e* − e⁻‖ = mean λ‖W_y − W⁻_y‖ over the queue (compact: over the probe slots)."""
        n = int(self.fill)
        if n == 0 or not self.compensate:
            return None
        w = weight.detach().float()
        if self.storage == "full":
            s = self.valid()
            delta = w[self.labels[s]] - self.past_weights[s].float()
            return (self.scales[s] * delta.norm(dim=1)).mean()
        if not self.probe_stride:
            return None
        slots = torch.arange(0, n, self.probe_stride, device=w.device)
        delta = w[self.labels[slots]] - self.probe_weights[slots // self.probe_stride]
        return (self.scales[slots] * delta.norm(dim=1)).mean()

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, storage={self.storage}, dtype={self.vectors.dtype}, "
                f"compensate={self.compensate}")
