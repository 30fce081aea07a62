"""The service's one door to a model: load any embedding model this project reads, embed RGB crops.

Everything the service knows about the model goes through :class:`FaceModel`: ``embed`` (aligned
RGB uint8 crops -> N x D float32, L2-normalised), ``dim``, ``kind``, ``fingerprint`` (sha256 of
the model file) and ``preprocessing`` (what the gallery must agree on). Three kinds of file:

- a broadface checkpoint (``models.checkpoint.load_backbone``),
- an ONNX model (onnxruntime CPU, input N x 3 x H x W in [-1, 1], as ``broadface export onnx`` writes),
- an insightface arcface_torch ``backbone.pth`` state dict (``models.insightface``).

Images become model input through ``data.transforms.to_input`` (RGB, ``(x/255 - 0.5)/0.5``) and
embeddings through ``models.embed.embed_tensors`` (image + flip summed, L2-normalised), the same
convention as training and every evaluation.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

KINDS = ("checkpoint", "onnx", "insightface")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (the model's fingerprint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _OnnxNet(nn.Module):
    """An onnxruntime session as a module: N x 3 x H x W tensor -> N x D tensor (static batches padded)."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, session.get_outputs()[0].name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.hw = tuple(inp.shape[2:4]) if all(isinstance(s, int) for s in inp.shape[2:4]) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().astype(np.float32)
        step = self.batch or len(arr)
        outs = []
        for i in range(0, len(arr), step):
            chunk = arr[i:i + step]
            pad = step - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            outs.append(out.reshape(step, -1)[:step - pad])
        return torch.from_numpy(np.concatenate(outs))


def detect_kind(path: Path) -> str:
    """'onnx' by suffix; for torch files 'checkpoint' (format='broadface') or 'insightface' (a state dict)."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    from broadface.fileio import load_torch

    obj = load_torch(path)
    if isinstance(obj, dict) and obj.get("format") == "broadface":
        return "checkpoint"
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return "insightface"
    raise ValueError(f"{path}: neither a broadface checkpoint, an ONNX model (.onnx) nor an insightface "
                     "state dict of tensors")


def _square(size, path: Path) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"{path}: input size must be positive, got {size}")
    return int(h), int(w)


def _load_net(path: Path, kind: str, input_size: int | None) -> tuple[nn.Module, tuple[int, int]]:
    if kind == "checkpoint":
        from broadface.models.checkpoint import load_backbone

        net = load_backbone(path)
        return net, _square(net.config.get("input_size", 112), path)
    if kind == "insightface":
        from broadface.models.insightface import load_insightface

        net = load_insightface(path, input_size or 112)
        return net, _square(input_size or 112, path)
    from broadface.infer.export import onnx_session

    net = _OnnxNet(onnx_session(path))
    if net.hw is None and input_size is None:
        raise ValueError(f"{path}: the ONNX input has no fixed height/width; give the input size")
    return net, net.hw or _square(input_size, path)


class FaceModel:
    """An embedding model with its preprocessing: ``embed(crops) -> (N, D)`` float32, rows of unit norm."""

    def __init__(self, net: nn.Module, kind: str, path: Path, input_size: tuple[int, int], flip: bool = True,
                 bgr: bool = False, fingerprint: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")
        self.net, self.kind, self.path = net.eval(), kind, Path(path)
        self.input_size, self.flip, self.bgr = input_size, bool(flip), bool(bgr)
        self.fingerprint = fingerprint or file_sha256(path)
        probe = np.zeros((*input_size, 3), np.uint8)
        try:
            self.dim = int(self.embed([probe]).shape[1])
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{path}: model does not run on a 3 x {input_size[0]} x {input_size[1]} input "
                             f"({type(err).__name__}: {str(err).splitlines()[0]})") from None

    @classmethod
    def load(cls, path: str | os.PathLike, flip: bool = True, input_size: int | None = None,
             bgr: bool = False) -> FaceModel:
        """Load a checkpoint / ONNX / insightface file; ``input_size`` only where the file does not say it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model {path} does not exist")
        kind = detect_kind(path)
        net, size = _load_net(path, kind, input_size)
        return cls(net, kind, path, size, flip=flip, bgr=bgr)

    @property
    def preprocessing(self) -> dict:
        """What a gallery built with this model depends on, besides its weights."""
        return {"input_size": list(self.input_size), "mean": 127.5, "std": 127.5, "bgr": self.bgr,
                "flip": self.flip}

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Aligned RGB uint8 crops (any size: resized to the input size) -> N x D float32, L2-normalised."""
        from broadface.data.transforms import to_input
        from broadface.models.embed import embed_tensors

        if len(crops) == 0:
            raise ValueError("no images to embed")
        batch = torch.stack([to_input(c, self.input_size) for c in crops])
        if self.bgr:
            batch = batch.flip(1)
        emb = embed_tensors(self.net, batch, flip=self.flip).numpy()
        if not np.isfinite(emb).all():
            raise ValueError(f"{self.path}: the model returned non-finite embeddings")
        return np.ascontiguousarray(emb, dtype=np.float32)

    def describe(self) -> dict:
        return {"kind": self.kind, "file": self.path.name, "fingerprint": self.fingerprint, "dim": self.dim,
                "preprocessing": self.preprocessing}
