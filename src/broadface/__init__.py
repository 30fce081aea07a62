"""broadface: BroadFace training for face recognition and deep metric learning.

>>> from broadface import ArcFace, BroadFace
>>> head = BroadFace(ArcFace(num_classes=1000, embedding_size=512), queue_size=8192)
>>> loss = head(embeddings, labels)   # encoder: ∇L(X); classifier: ∇L(X ∪ queue)

Names are resolved lazily so ``broadface --help`` does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_HEADS = ("ArcFace", "BroadFace", "CombinedMargin", "CosFace", "EmbeddingQueue", "MarginHead", "NormSoftmax")
__all__ = [*_HEADS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _HEADS:
        return getattr(importlib.import_module("broadface.heads"), name)
    raise AttributeError(f"module 'broadface' has no attribute {name!r}")
