"""Distillation teachers: a broadface checkpoint or an ONNX embedding model, behind one call.

    teacher = load_teacher("runs/r100/final.pt")        # or "r100.onnx" (run by onnxruntime)
    t = teacher(images)                                  # N x 3 x S x S in [-1, 1] -> N x D, unit rows

A teacher is frozen and deterministic (eval mode, no gradient, no RNG). Images of another
size than the teacher's input are resized (bilinear, antialiased) first. ``identity`` names
the teacher for the embedding cache's sidecar: its file's SHA-256, input size and dimension.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resize_to(images: Tensor, size: int) -> Tensor:
    """N x C x H x W -> N x C x size x size (bilinear, antialiased); unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@dataclass
class Teacher:
    """A frozen embedding function with its input size and output dimension.

    ``run`` maps a float32 CPU/device batch at ``input_size`` to raw N x D embeddings.
    """

    run: Callable[[Tensor], Tensor]
    input_size: int
    dim: int
    source: str
    kind: str  # "checkpoint" | "onnx" | "module"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """L2-normalised float32 embeddings of normalised images (resized to ``input_size`` if needed)."""
        out = self.run(resize_to(images.float(), self.input_size))
        return F.normalize(out.float(), dim=1)

    @property
    def identity(self) -> dict[str, Any]:
        path = Path(self.source)
        digest = file_sha256(path) if path.is_file() else self.source
        return {"teacher": str(path), "teacher_sha256": digest, "input_size": self.input_size, "dim": self.dim}


def module_teacher(model: nn.Module, input_size: int | None = None, source: str = "module",
                   kind: str = "module") -> Teacher:
    """A PyTorch backbone as a teacher (kept in eval mode on its own device)."""
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    size = int(input_size or (getattr(model, "config", None) or {}).get("input_size", 112))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def run(images: Tensor) -> Tensor:
        return model(images.to(device)).to(images.device)

    with torch.no_grad():
        dim = int(model(torch.zeros(1, 3, size, size, device=device)).shape[1])
    return Teacher(run, size, dim, source, kind)


def onnx_teacher(path: str | os.PathLike, fallback_size: int) -> Teacher:
    """An ONNX embedding model (input ``data`` N x 3 x S x S) run by onnxruntime on the CPU.

    S is read from the model's input shape; when it is symbolic, ``fallback_size`` is used.
    """
    import onnxruntime as ort

    path = Path(path)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"distill.teacher {path}: not a loadable ONNX model ({err})") from None
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if len(inputs) != 1:
        raise ValueError(f"distill.teacher {path}: expected one input 'data', found {names}")
    shape = inputs[0].shape
    if len(shape) != 4 or shape[1] not in (3, "3"):
        raise ValueError(f"distill.teacher {path}: input {names[0]} has shape {shape}, expected N x 3 x S x S")
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int):
        if h != w:
            raise ValueError(f"distill.teacher {path}: non-square input {h}x{w} is not supported")
        size = h
    else:
        size = fallback_size
    name = names[0]

    def run(images: Tensor) -> Tensor:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {name: x})[0]).to(images.device)

    dim = int(run(torch.zeros(1, 3, size, size)).shape[1])
    return Teacher(run, int(size), dim, str(path), "onnx")


def load_teacher(path: str | os.PathLike, device: torch.device | str = "cpu", fallback_size: int = 112) -> Teacher:
    """``*.onnx`` -> :func:`onnx_teacher`; anything else is read as a broadface checkpoint (weights only)."""
    from broadface.models.checkpoint import load_backbone

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distill.teacher {path} does not exist")
    if path.suffix.lower() == ".onnx":
        return onnx_teacher(path, fallback_size)
    model = load_backbone(path).to(device)
    return module_teacher(model, source=str(path), kind="checkpoint")
