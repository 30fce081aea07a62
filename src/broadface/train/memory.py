"""Memory tools: micro-batched encoder passes under a whole-batch head, and ZeRO optimizer state.

**Micro-batching** (:func:`micro_batch_backward`). The BroadFace head must see the whole
batch at once (one softmax over the global batch, one queue push), but the encoder's
activations for the whole batch may not fit. So:

1. forward every micro-batch under ``no_grad`` (activations freed at once), recording the
   RNG state before each one, and concatenate the embeddings ``e``;
2. run the head once on the whole batch and backward it: the classifier gets its gradient
   and ``e`` gets ``∂L/∂e``;
3. forward each micro-batch again *with* grad, RNG replayed (same dropout masks), and
   backward it with its slice of ``∂L/∂e``.

The encoder gradient is then exactly the full-batch gradient for any encoder whose output
for a sample does not depend on the other samples of the micro-batch: no BatchNorm, or
BatchNorm in eval mode (frozen statistics). **BatchNorm caveat:** in train mode each
micro-batch is normalised with its own statistics (as with gradient accumulation), so the
result is exact for the micro-batched network, not for full-batch BN. Pass 1 does not
touch running statistics (buffers are restored), so they are updated once per micro-batch,
as in an ordinary micro-batched step. Cost: one extra forward pass without activations.

**ZeRO** (:func:`zero_redundancy`). ``torch.distributed.optim.ZeroRedundancyOptimizer``
partitions optimizer state of *replicated* parameters across ranks and broadcasts the
updated values. A class-sharded classifier (``BroadFace.sharded(...).weight``) holds different
values on each rank and must stay out of it: pass it as ``local_params``; it gets a plain
optimizer of the same class.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import Tensor, nn


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def micro_batch_backward(encoder: nn.Module, loss_fn: Callable[[Tensor], Tensor], images: Tensor, micro_batch: int,
                         *, autocast: Callable[[], ContextManager] | None = None,
                         scaler: torch.amp.GradScaler | None = None) -> tuple[Tensor, Tensor]:
    """``loss_fn(encoder(images)).backward()`` with the encoder run ``micro_batch`` images at a time.

    ``loss_fn`` maps the whole batch's embeddings to the scalar loss (e.g. ``lambda e: head(e, y)``);
    it runs once. Returns the detached loss and embeddings. Gradients accumulate into ``.grad`` as an
    ordinary backward would (call ``zero_grad`` first). ``scaler`` scales the loss (fp16); ``autocast``
    is a context factory for the forward passes. With DDP, pass the DDP-wrapped encoder: every
    micro-batch but the last runs under ``no_sync``; all ranks must have the same number of
    micro-batches (equal local batch sizes).
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    amp = autocast or contextlib.nullcontext
    chunks = images.split(micro_batch)
    buffers = dict(encoder.named_buffers())
    saved = {k: b.detach().clone() for k, b in buffers.items()}
    states, outs = [], []
    with torch.no_grad():                                     # pass 1: embeddings only
        for x in chunks:
            states.append(_rng_state(x.device))
            with amp():
                outs.append(encoder(x))
    with torch.no_grad():  # pass 2 is the one that updates BN running statistics
        for k, v in saved.items():
            buffers[k].copy_(v)
    emb = torch.cat(outs).detach().requires_grad_(True)
    with amp():
        loss = loss_fn(emb)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    end_state = _rng_state(images.device)  # after the loss's own draws (e.g. class sampling)
    grads = emb.grad.split(micro_batch)
    no_sync = getattr(encoder, "no_sync", None)
    for i, (x, g) in enumerate(zip(chunks, grads)):          # pass 2: recompute with grad, backward slice
        _set_rng_state(states[i], x.device)
        last = i == len(chunks) - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with amp():
                out = encoder(x)
            out.backward(g.to(out.dtype))
    _set_rng_state(end_state, images.device)
    return loss.detach(), emb.detach()


@dataclass
class SplitOptimizer:
    """ZeRO over replicated parameters plus a plain optimizer over rank-local ones.

    ``param_groups`` lists both (ZeRO's groups first), so a scheduler that sets ``lr`` per
    group drives both. ``state_dict`` needs :meth:`consolidate_state_dict` on every rank first.
    """

    replicated: Any  # ZeroRedundancyOptimizer
    local: torch.optim.Optimizer | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return list(self.replicated.param_groups) + (list(self.local.param_groups) if self.local else [])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.replicated.zero_grad(set_to_none=set_to_none)
        if self.local is not None:
            self.local.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable | None = None) -> None:
        self.replicated.step()
        if self.local is not None:
            self.local.step()

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective: gather ZeRO's partitioned state onto rank ``to``."""
        self.replicated.consolidate_state_dict(to=to)

    def state_dict(self) -> dict[str, Any]:
        """On the rank given to :meth:`consolidate_state_dict`: {"replicated": ..., "local": ...}.
        The local part is this rank's shard only (see broadface.dist.merge_rows to re-shard)."""
        return {"replicated": self.replicated.state_dict(),
                "local": self.local.state_dict() if self.local is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replicated.load_state_dict(state["replicated"])
        if self.local is not None and state.get("local") is not None:
            self.local.load_state_dict(state["local"])


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's defaults that its constructor accepts (e.g. LARS's lars_adapt is a group key only)."""
    accepted = set(inspect.signature(type(optimizer).__init__).parameters) - {"self", "params"}
    return {k: v for k, v in optimizer.defaults.items() if k in accepted}


def zero_redundancy(optimizer: torch.optim.Optimizer, local_params: Iterable[Tensor] = (), group=None,
                    parameters_as_bucket_view: bool = False) -> SplitOptimizer:
    """Rebuild ``optimizer`` (same class, groups and hyper-parameters; no state yet) as ZeRO over
    its replicated parameters and a plain optimizer over ``local_params``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if any(optimizer.state.values()):
        raise ValueError("zero_redundancy: wrap the optimizer before its first step (it already holds state)")
    local_ids = {id(p) for p in local_params}
    replicated, local = [], []
    for g in optimizer.param_groups:
        opts = {k: v for k, v in g.items() if k != "params"}
        rep = [p for p in g["params"] if id(p) not in local_ids]
        loc = [p for p in g["params"] if id(p) in local_ids]
        if rep:
            replicated.append({"params": rep, **opts})
        if loc:
            local.append({"params": loc, **opts})
    if not replicated:
        raise ValueError("zero_redundancy: every parameter is local; nothing to partition")
    found = sum(len(g["params"]) for g in local)
    if found != len(local_ids):
        raise ValueError(f"zero_redundancy: {len(local_ids) - found} of local_params are not in the optimizer")
    cls, defaults = type(optimizer), _constructor_defaults(optimizer)
    zero = ZeroRedundancyOptimizer(replicated, optimizer_class=cls, process_group=group,
                                   parameters_as_bucket_view=parameters_as_bucket_view, **defaults)
    return SplitOptimizer(zero, cls(local, **defaults) if local else None)
