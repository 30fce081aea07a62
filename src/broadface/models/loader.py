"""One loader for every embedding model a command is given, recognised from the file itself.

    model = load_model("r50.onnx")           # or a broadface checkpoint, or an arcface_torch backbone.pth
    model.preprocessing                      # Preprocessing(size=(112, 112), mean=127.5.., std=127.5.., bgr=False)
    emb = model(batch)                       # N x 3 x H x W prepared images -> N x D raw embeddings
    model.kind, model.dim, model.sha256      # "onnx", 512, "9a3f..."

Formats (``format="auto"`` reads the file's first bytes, then its contents):

* ``broadface`` -- a broadface checkpoint (``torch.load(weights_only=True)``, ``format='broadface'``);
  size from its model config, the training pipeline's normalisation.
* ``insightface`` -- an arcface_torch iResNet ``state_dict`` (``backbone.pth``); depth, width and
  dimension read from the tensors, 112x112 unless ``input_size`` says otherwise.
* ``onnx`` -- an ONNX embedding model run by onnxruntime on the CPU, with the common face-model
  conventions unless told otherwise: NCHW float input, size read from the graph (a symbolic
  size needs ``input_size``), RGB, ``(x - 127.5) / 127.5``.

``mean``, ``std`` and ``bgr`` override the normalisation of any kind (pixel units, in the model's
channel order). The result is a :class:`LoadedModel`, an ``nn.Module`` in eval mode, so every
evaluation and embedding function takes it like a backbone and reads its preprocessing with
:func:`preprocessing_of`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from broadface.data.pipeline import DEFAULT_MEAN, DEFAULT_STD, Preprocessing

__all__ = ["LoadedModel", "load_model", "wrap_module", "detect_format", "preprocessing_of", "input_size_of",
           "file_sha256", "FORMATS"]

FORMATS = ("broadface", "onnx", "insightface")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class LoadedModel(nn.Module):
    """An embedding model with what it needs to know about its input.

    Attributes: ``net`` (the module that runs), ``preprocessing``, ``dim`` (embedding size),
    ``kind`` (``"broadface"``, ``"onnx"``, ``"insightface"`` or ``"module"``), ``sha256`` of the
    file ("" for an in-memory module) and ``source`` (the path). ``forward`` is ``net``'s."""

    def __init__(self, net: nn.Module, preprocessing: Preprocessing, dim: int, kind: str, sha256: str = "",
                 source: str = "module"):
        super().__init__()
        self.net = net
        self.preprocessing, self.dim, self.kind = preprocessing, int(dim), kind
        self.sha256, self.source = sha256, source
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    @property
    def config(self) -> dict | None:
        """The broadface model config (``build_model`` kwargs) when there is one."""
        config = getattr(self.net, "config", None)
        return dict(config) if isinstance(config, dict) else None

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: source, kind, sha256, dim, preprocessing."""
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256, "dim": self.dim,
                "preprocessing": self.preprocessing.to_dict(), "input": self.preprocessing.describe()}

    def summary(self) -> str:
        """One line for the console: ``r50.onnx (onnx, 512-d, sha256 9a3f1c2b..): 112x112 RGB, (x - 127.5) / 127.5``."""
        sha = f", sha256 {self.sha256[:12]}" if self.sha256 else ""
        return f"{Path(self.source).name} ({self.kind}, {self.dim}-d{sha}): {self.preprocessing.describe()}"


def input_size_of(model: nn.Module) -> int:
    """The square input side of ``model``: its preprocessing, else ``model.config['input_size']``.

    ValueError naming what to pass when neither says it."""
    pre = getattr(model, "preprocessing", None)
    if isinstance(pre, Preprocessing):
        return pre.side
    config = getattr(model, "config", None)
    size = config.get("input_size") if isinstance(config, dict) else None
    if size is None:
        raise ValueError(f"{type(model).__name__} has no config['input_size'], so its input size is unknown: "
                         "pass input_size (or load it with broadface.models.loader.load_model)")
    side = Preprocessing(size=size if isinstance(size, int) else tuple(size)).side
    return side


def preprocessing_of(model: nn.Module) -> Preprocessing:
    """The model's preprocessing: a :class:`LoadedModel`'s own, else the training pipeline's at its input size."""
    pre = getattr(model, "preprocessing", None)
    return pre if isinstance(pre, Preprocessing) else Preprocessing(size=input_size_of(model))


def detect_format(path: str | os.PathLike) -> str:
    """``"torch"`` (a zip or pickle written by ``torch.save``) or ``"onnx"`` (a protobuf ModelProto), from
    the first bytes; ValueError naming the file otherwise."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if head[:1] == b"\x08":  # field 1 (ir_version, varint): how every ONNX file starts
        return "onnx"
    raise ValueError(f"{path}: not a model file broadface can read (expected a broadface checkpoint, an "
                     "insightface backbone.pth or an ONNX model; pass --format to force one)")


def _torch_model(path: Path, format: str, input_size: int | None) -> tuple[nn.Module, str]:
    from broadface.fileio import load_torch
    from broadface.models.checkpoint import backbone_from_checkpoint, check_checkpoint, is_checkpoint
    from broadface.models.insightface import is_insightface_state_dict, model_from_state_dict

    obj = load_torch(path)
    if format == "broadface" or (format == "auto" and is_checkpoint(obj)):
        return backbone_from_checkpoint(check_checkpoint(obj, path), path), "broadface"
    if format == "insightface" or is_insightface_state_dict(obj):
        return model_from_state_dict(obj, path, input_size or 112), "insightface"
    keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: a torch file, but neither a broadface checkpoint (format='broadface') nor an "
                     f"insightface iResNet state dict (conv1.weight, fc.weight); found {keys}")


def _onnx_size(net, path: Path, input_size: int | None) -> tuple[int, int]:
    if net.input_hw is None:
        if input_size is None:
            raise ValueError(f"{path}: the ONNX input {net.input_name!r} has no fixed height and width; pass "
                             "--input-size S (input_size=S) to say which square size the model takes")
        return (int(input_size), int(input_size))
    if input_size is not None and (int(input_size), int(input_size)) != net.input_hw:
        raise ValueError(f"{path}: --input-size {input_size} but the ONNX input is fixed at "
                         f"{net.input_hw[0]}x{net.input_hw[1]}")
    return net.input_hw


def _dim(net: nn.Module, size: tuple[int, int]) -> int:
    declared = getattr(net, "output_dim", None) or (getattr(net, "config", None) or {}).get("embedding_size")
    if declared:
        return int(declared)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    with torch.no_grad():
        return int(net(torch.zeros(1, 3, *size, device=device)).shape[1])


def _override(pre: Preprocessing, mean, std, bgr) -> Preprocessing:
    return Preprocessing(pre.size, pre.mean if mean is None else mean, pre.std if std is None else std,
                         pre.bgr if bgr is None else bgr)


def load_model(path: str | os.PathLike, format: str = "auto", *, input_size: int | None = None,
               mean: Sequence[float] | float | None = None, std: Sequence[float] | float | None = None,
               bgr: bool | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the embedding model in ``path`` (see module doc); ``format`` forces one of :data:`FORMATS`."""
    path = Path(path)
    if format not in ("auto", *FORMATS):
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    if path.is_dir():
        raise IsADirectoryError(f"model {path} is a directory, expected a model file")
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist")
    sniffed = detect_format(path) if format == "auto" else ("onnx" if format == "onnx" else "torch")
    if sniffed == "onnx":
        from broadface.models.onnx import OnnxEmbedder

        net: nn.Module = OnnxEmbedder(path)
        kind, size = "onnx", _onnx_size(net, path, input_size)
    else:
        net, kind = _torch_model(path, format, input_size)
        size = (input_size_of(net),) * 2
        if input_size is not None and int(input_size) != size[0]:
            raise ValueError(f"{path}: --input-size {input_size} but the {kind} model was built for {size[0]}")
        net = net.to(device)
    pre = _override(Preprocessing(size, DEFAULT_MEAN, DEFAULT_STD, False), mean, std, bgr)
    return LoadedModel(net, pre, _dim(net, size), kind, file_sha256(path), str(path))


def wrap_module(module: nn.Module, preprocessing: Preprocessing | None = None, source: str = "module",
                kind: str = "module") -> LoadedModel:
    """An in-memory backbone as a :class:`LoadedModel` (preprocessing from its config unless given)."""
    pre = preprocessing or preprocessing_of(module)
    return LoadedModel(module, pre, _dim(module, pre.size), kind, "", source)
