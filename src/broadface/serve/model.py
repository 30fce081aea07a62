"""The service's one door to a model: any embedding model the project reads, embedding RGB crops.

Everything the service knows about the model goes through :class:`FaceModel`: ``embed`` (aligned
RGB uint8 crops -> N x D float32, L2-normalised), ``dim``, ``kind``, ``fingerprint`` (sha256 of
the model file) and ``preprocessing`` (what a gallery must agree on). The file is read by the
shared loader (:func:`broadface.models.loader.load_model`: a broadface checkpoint, an ONNX model
or an insightface arcface_torch state dict, recognised from the file), images are prepared by the
one image pipeline (:class:`broadface.data.pipeline.Preprocessing`) and embedded by
:func:`broadface.models.embed.embed_tensors` (image + flip summed, L2-normalised): the same
convention as training and every evaluation.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from broadface.models.loader import LoadedModel, load_model


class FaceModel:
    """A loaded model with its preprocessing: ``embed(crops) -> (N, D)`` float32, rows of unit norm."""

    def __init__(self, model: LoadedModel, flip: bool = True):
        self.model, self.flip = model, bool(flip)
        self.kind, self.path, self.dim = model.kind, Path(model.source), model.dim
        self.fingerprint = model.sha256

    @classmethod
    def load(cls, path: str | os.PathLike, flip: bool = True, input_size: int | None = None, bgr: bool = False,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             format: str = "auto", device: str = "cpu") -> FaceModel:
        """Load a model file; ``input_size``, ``mean``, ``std``, ``bgr`` only where the file does not say them."""
        model = load_model(path, format, input_size=input_size, mean=mean, std=std, bgr=bgr or None, device=device)
        return cls(model, flip)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.preprocessing.size

    @property
    def preprocessing(self) -> dict:
        """What a gallery built with this model depends on, besides its weights."""
        return {**self.model.preprocessing.to_dict(), "flip": self.flip}

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Aligned RGB uint8 crops (any size: resized by the pipeline) -> N x D float32, L2-normalised."""
        from broadface.models.embed import embed_tensors

        if len(crops) == 0:
            raise ValueError("no images to embed")
        batch = torch.stack([self.model.preprocessing(c) for c in crops])
        emb = embed_tensors(self.model, batch, flip=self.flip).numpy()
        if not np.isfinite(emb).all():
            raise ValueError(f"{self.path}: the model returned non-finite embeddings")
        return np.ascontiguousarray(emb, dtype=np.float32)

    def describe(self) -> dict:
        return {"kind": self.kind, "file": self.path.name, "fingerprint": self.fingerprint, "dim": self.dim,
                "preprocessing": self.preprocessing}
