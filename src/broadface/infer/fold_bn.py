"""Fold inference-mode BatchNorm into neighbouring linear layers (for export/serving).

In eval mode BN is a per-channel affine map y = a * x + d with
a = gamma / sqrt(running_var + eps), d = beta - a * running_mean, so it can be
absorbed exactly where it is the *only* consumer of a linear layer's output or
the *only* producer of a Linear's input:

* Conv2d -> BN2d          W' = a * W,          b' = a * (b - mean) + beta
* Linear -> BN1d          same, per output feature
* BN2d -> flatten -> [Dropout] -> Linear (iResNet ``bn2 -> fc``):
                          W' = W * a_flat,     b' = b + W @ d_flat

A BN *before* a zero-padded conv (iResNet's block ``bn1 -> conv1``) cannot be
folded exactly: the padding zeros would be shifted by d at the borders, so it is
left alone. Pairs are found on a torch.fx trace, which sees every consumer of a
tensor; if a model cannot be traced, only adjacent Conv/Linear -> BN pairs inside
``nn.Sequential`` containers are folded (those have a single consumer by construction).
"""
from __future__ import annotations

import collections
import copy
import warnings

import torch
from torch import fx, nn

_BN = nn.modules.batchnorm._BatchNorm


def _bn_affine(bn: _BN) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, d) of the eval-mode BN as float64 tensors."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    a = torch.rsqrt(var + bn.eps)
    d = -mean * a
    if bn.affine:
        a, d = a * bn.weight.double(), d * bn.weight.double() + bn.bias.double()
    return a, d


def _set_weight_bias(layer: nn.Conv2d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(dtype))


def fold_into_previous(layer: nn.Conv2d | nn.Linear, bn: _BN) -> None:
    """Absorb ``bn`` (applied to ``layer``'s output) into ``layer``."""
    a, d = _bn_affine(bn)
    w = layer.weight.double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(a)
    shape = (-1,) + (1,) * (w.dim() - 1)
    _set_weight_bias(layer, w * a.reshape(shape), b * a + d)


def fold_into_next(bn: _BN, linear: nn.Linear) -> None:
    """Absorb ``bn`` (C channels, flattened to C*k features) into the ``linear`` that reads it."""
    a, d = _bn_affine(bn)
    repeat = linear.in_features // a.numel()
    a, d = a.repeat_interleave(repeat), d.repeat_interleave(repeat)  # NCHW flatten is channel-major
    w = linear.weight.double()
    b = linear.bias.double() if linear.bias is not None else torch.zeros(linear.out_features, dtype=w.dtype)
    _set_weight_bias(linear, w * a, b + w @ d)


def _foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None


def _is_flatten1(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.target is torch.flatten or (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _is_identity_in_eval(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], (nn.Dropout, nn.Identity))


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str, str]]:
    """(kind, a, b) module-name pairs: kind 'prev' folds BN b into a, 'next' folds BN a into b."""
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_bn(modules[node.target]) or calls[node.target] != 1:
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and calls[src.target] == 1
                and isinstance(modules[src.target], (nn.Conv2d, nn.Linear))
                and len(node.args) == 1 and not node.kwargs):
            conv_like = modules[src.target]
            if isinstance(conv_like, nn.Conv2d) == isinstance(modules[node.target], nn.BatchNorm2d):
                pairs.append(("prev", src.target, node.target))
                continue
        # BN2d -> flatten(1) -> [dropout/identity]* -> Linear, each step the sole consumer
        if isinstance(modules[node.target], nn.BatchNorm2d) and len(node.users) == 1:
            nxt = next(iter(node.users))
            if not _is_flatten1(nxt, modules):
                continue
            while len(nxt.users) == 1 and _is_identity_in_eval(next(iter(nxt.users)), modules):
                nxt = next(iter(nxt.users))
            if len(nxt.users) == 1:
                user = next(iter(nxt.users))
                if (user.op == "call_module" and isinstance(modules[user.target], nn.Linear)
                        and calls[user.target] == 1 and user.args[0] is nxt
                        and modules[user.target].in_features % modules[node.target].num_features == 0):
                    pairs.append(("next", node.target, user.target))
    return pairs


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str, str]]:
    pairs = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            children = list(m.named_children())
            for (na, a), (nb, b) in zip(children, children[1:]):
                if _foldable_bn(b) and ((isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d))
                                        or (isinstance(a, nn.Linear) and isinstance(b, nn.BatchNorm1d))):
                    prefix = f"{name}." if name else ""
                    pairs.append(("prev", prefix + na, prefix + nb))
    return pairs


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every foldable BatchNorm folded away.

    Folded BNs become ``nn.Identity``; outputs match the original in eval mode
    (float32 round-off, ~1e-6). The input model is not modified.
    """
    model = copy.deepcopy(model).eval()
    if getattr(model, "fp16", False):
        model.fp16 = False  # folding/export is float32
    try:
        pairs = _pairs_from_graph(model)
    except Exception as err:  # untraceable control flow in a foreign model
        warnings.warn(f"fold_batchnorm: torch.fx could not trace {type(model).__name__} ({err}); "
                      "folding only Conv/Linear->BN pairs inside nn.Sequential", stacklevel=2)
        pairs = _pairs_from_sequentials(model)
    with torch.no_grad():
        for kind, a, b in pairs:
            if kind == "prev":
                fold_into_previous(model.get_submodule(a), model.get_submodule(b))
                _replace(model, b, nn.Identity())
            else:
                fold_into_next(model.get_submodule(a), model.get_submodule(b))
                _replace(model, a, nn.Identity())
    return model


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm modules left in ``model``."""
    return sum(isinstance(m, _BN) for m in model.modules())


__all__ = ["fold_batchnorm", "fold_into_previous", "fold_into_next", "count_batchnorm"]
