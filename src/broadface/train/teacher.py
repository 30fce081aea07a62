"""Distillation teachers: any model :func:`broadface.models.loader.load_model` reads, behind one call.

    teacher = load_teacher("runs/r100/final.pt")        # or "r100.onnx" (onnxruntime), or a backbone.pth
    t = teacher(images)                                  # student batch (N x 3 x S x S in [-1, 1]) -> N x D, unit rows

A teacher is frozen and deterministic (eval mode, no gradient, no RNG). A student batch is
re-prepared for the teacher through the one image pipeline when the teacher takes another size
or normalisation (:func:`broadface.data.pipeline.resize_batch`: back to 8-bit pixels, then the
teacher's resize and normalisation), so the teacher sees what the pipeline gives it from the
same pixels. ``identity`` names the teacher for the embedding cache's sidecar: its file's
SHA-256, input size and dimension.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from broadface.data.pipeline import Preprocessing, resize_batch
from broadface.models.loader import LoadedModel, load_model, wrap_module

#: what a student batch is prepared with: the training pipeline's normalisation (its size is the batch's own)
STUDENT = Preprocessing()


@dataclass
class Teacher:
    """A frozen embedding model and how to feed it.

    ``model`` maps a batch prepared with ``preprocessing`` to raw N x D embeddings."""

    model: LoadedModel
    preprocessing: Preprocessing
    dim: int
    source: str
    kind: str  # "broadface" | "onnx" | "insightface" | "module"
    sha256: str = ""

    @property
    def input_size(self) -> int:
        return self.preprocessing.side

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """L2-normalised float32 embeddings of a student batch (re-prepared for the teacher if needed)."""
        h, w = images.shape[-2:]
        source = Preprocessing((int(h), int(w)), STUDENT.mean, STUDENT.std, STUDENT.bgr)
        return self.embed_prepared(resize_batch(images.float(), source, self.preprocessing))

    @torch.no_grad()
    def embed_prepared(self, images: Tensor) -> Tensor:
        """L2-normalised float32 embeddings of images already prepared with ``self.preprocessing``."""
        device = next((p.device for p in self.model.parameters()), images.device)
        return F.normalize(self.model(images.float().to(device)).float(), dim=1).to(images.device)

    @property
    def identity(self) -> dict[str, Any]:
        return {"teacher": self.source, "teacher_sha256": self.sha256 or self.source, "input_size": self.input_size,
                "dim": self.dim}


def _teacher(model: LoadedModel) -> Teacher:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, model.preprocessing, model.dim, model.source, model.kind, model.sha256)


def module_teacher(model: nn.Module, input_size: int | None = None, source: str = "module",
                   kind: str = "module") -> Teacher:
    """A PyTorch backbone as a teacher (kept in eval mode on its own device)."""
    pre = Preprocessing(size=input_size) if input_size else None
    return _teacher(wrap_module(model, pre, source, kind))


def onnx_teacher(path: str | os.PathLike, fallback_size: int) -> Teacher:
    """An ONNX embedding model run by onnxruntime on the CPU (its size from the graph, else ``fallback_size``)."""
    return load_teacher(path, fallback_size=fallback_size, format="onnx")


def load_teacher(path: str | os.PathLike, device: torch.device | str = "cpu", fallback_size: int = 112,
                 format: str = "auto") -> Teacher:
    """The teacher in ``path`` (format from the file); an ONNX graph without a fixed size uses ``fallback_size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distill.teacher {path} does not exist")
    try:
        model = load_model(path, format, device=device)
    except ValueError as err:
        if "no fixed height and width" not in str(err):
            raise ValueError(f"distill.teacher {err}") from None
        model = load_model(path, format, device=device, input_size=fallback_size)
    return _teacher(model)
