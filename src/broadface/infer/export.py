"""ONNX export of embedding backbones, and a parity check against onnxruntime.

The exported graph takes ``data`` (N x 3 x S x S float32, normalised to [-1, 1],
dynamic N) and returns ``embedding`` (N x D raw embeddings; L2-normalise before
cosine scoring), as insightface's ONNX models do. BatchNorm is folded first
(:mod:`broadface.infer.fold_bn`), which removes most BN nodes at no accuracy cost.

We use the TorchScript exporter (``dynamo=False``): with torch 2.13 it is fast,
offline, emits the requested opset directly and handles every backbone here;
``dynamo=True`` selects the torch.export-based exporter instead (opset >= 18
natively, older opsets via conversion).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from broadface.data.pipeline import Preprocessing
from broadface.fileio import atomic_path
from broadface.infer.fold_bn import fold_batchnorm
from broadface.models.loader import input_size_of
from broadface.models.onnx import onnx_session

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
_MAX_BYTES = 2_000_000_000  # protobuf limit for a single-file ONNX model


def _inference_copy(model: nn.Module, fold_bn: bool) -> nn.Module:
    """float32 CPU eval copy (autocast off); BN folded if asked."""
    model = copy.deepcopy(model).float().cpu().eval()
    if getattr(model, "fp16", False):
        model.fp16 = False
    return fold_batchnorm(model) if fold_bn else model


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: int | None = None,
                fold_bn: bool = True, opset: int = 17, dynamic_batch: bool = True,
                dynamo: bool = False, preprocessing: Preprocessing | None = None) -> Path:
    """Export ``model`` to ONNX at ``path`` (written atomically) and return the path.

    ``input_size`` None means the model's own (``model.config['input_size']``). The model itself is
    not modified (export works on a float32 CPU copy). ``preprocessing`` (default: the training
    pipeline's, RGB ``(x - 127.5) / 127.5``) is recorded in the metadata.
    """
    import onnx

    path = Path(path)
    size = int(input_size) if input_size is not None else input_size_of(model)
    pre = preprocessing or Preprocessing(size=size)
    if dynamo and opset < 18:
        raise ValueError(f"opset {opset}: the dynamo exporter needs opset >= 18 (or use dynamo=False)")
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    if n_bytes > _MAX_BYTES:
        raise ValueError(f"{type(model).__name__} has {n_bytes / 1e9:.1f} GB of float32 weights; "
                         "single-file ONNX export is limited to 2 GB")
    net = _inference_copy(model, fold_bn)
    dummy = torch.zeros(2 if dynamic_batch else 1, 3, size, size)
    try:
        with torch.no_grad():
            net(dummy)
    except (ValueError, RuntimeError) as err:  # e.g. input size the FC layer was not built for
        raise ValueError(f"cannot export with input_size={size}: {err}") from None

    with atomic_path(path) as tmp:
        kwargs: dict = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                            dynamo=dynamo)
        if dynamic_batch and dynamo:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        elif dynamic_batch:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation / tracer chatter
            torch.onnx.export(net, (dummy,), tmp, **kwargs)
        proto = onnx.load(tmp)
        meta = {
            "broadface.config": json.dumps(getattr(model, "config", {"name": type(model).__name__})),
            "broadface.input": f"{INPUT_NAME}: N x 3 x {size} x {size} float32, {pre.normalization()}",
            "broadface.output": f"{OUTPUT_NAME}: N x D raw embedding; L2-normalise before cosine similarity",
            "broadface.fold_bn": str(bool(fold_bn)),
        }
        for key, value in meta.items():
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
    return path


def check_onnx_parity(model: nn.Module, path: str | os.PathLike, n: int = 8,
                      inputs: torch.Tensor | None = None, seed: int = 0) -> float:
    """Max |difference| between L2-normalised embeddings of ``model`` (PyTorch, float32,
    eval) and the ONNX file under onnxruntime CPU, on ``inputs`` or ``n`` random
    images in [-1, 1] at the ONNX model's input size."""
    session = onnx_session(path)
    if inputs is None:
        size = session.get_inputs()[0].shape[-1]
        if not isinstance(size, int):
            size = input_size_of(model)
        gen = torch.Generator().manual_seed(seed)
        inputs = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
    ref_model = _inference_copy(model, fold_bn=False)
    with torch.no_grad():
        ref = ref_model(inputs.float().cpu()).double().numpy()
    x = inputs.float().cpu().numpy()
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)  # static-batch exports run in chunks
    out = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + step]})[0]
                          for i in range(0, len(x), step)])
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        raise ValueError(f"{path}: non-finite embeddings (PyTorch or ONNX); is the model trained / "
                         "are its BatchNorm running statistics set?")
    return float(np.abs(_l2_normalise(out.astype(np.float64)) - _l2_normalise(ref)).max())


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-300)


__all__ = ["export_onnx", "check_onnx_parity", "onnx_session", "INPUT_NAME", "OUTPUT_NAME"]
