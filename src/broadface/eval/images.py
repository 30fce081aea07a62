"""A dataset over a list of images (files or encoded bytes) for evaluation embedding.

Items are ``(tensor, index)``, prepared by the one image pipeline
(:class:`broadface.data.pipeline.Preprocessing`: the model's size and normalisation). An
optional ``image_hook(uint8 RGB array, rng) -> array`` (e.g.
``broadface.data.masks.apply_mask``) alters the decoded image first; its
generator is seeded from ``(seed, index)`` so the altered set is identical on every
run and with any number of loader workers. An optional ``prepare(array, index)``
(e.g. 5-point alignment) runs before the hook.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from broadface.data.images import read_rgb
from broadface.data.pipeline import Preprocessing

ImageHook = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class EvalImages(Dataset):
    """``sources[i]`` -> ``(normalised tensor, i)``; ``hook`` applies where ``hook_mask[i]``."""

    def __init__(self, sources: Sequence[str | os.PathLike | bytes], preprocessing: Preprocessing | int = 112,
                 hook: ImageHook | None = None, hook_mask: Sequence[bool] | None = None, seed: int = 0,
                 prepare: Callable[[np.ndarray, int], np.ndarray] | None = None, names: Sequence[str] | None = None):
        self.sources = list(sources)
        self.preprocessing = (preprocessing if isinstance(preprocessing, Preprocessing)
                              else Preprocessing(size=preprocessing))
        self.hook = hook
        self.hook_mask = np.ones(len(self.sources), bool) if hook_mask is None else np.asarray(hook_mask, bool)
        if self.hook_mask.shape != (len(self.sources),):
            raise ValueError(f"hook_mask must have one flag per image ({len(self.sources)}), "
                             f"got {self.hook_mask.shape}")
        self.seed = int(seed)
        self.prepare = prepare
        self.names = list(names) if names is not None else None

    def __len__(self) -> int:
        return len(self.sources)

    def name(self, i: int) -> str:
        if self.names is not None:
            return self.names[i]
        src = self.sources[i]
        return f"image {i}" if isinstance(src, (bytes, bytearray)) else os.fspath(src)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = read_rgb(self.sources[i], self.name(i))
        if self.prepare is not None:
            img = self.prepare(img, i)
        if self.hook is not None and self.hook_mask[i]:
            img = np.asarray(self.hook(img, np.random.default_rng([self.seed, i])))
            if img.dtype != np.uint8 or img.ndim != 3:
                raise ValueError(f"image_hook must return an H x W x 3 uint8 array, got {img.dtype} {img.shape}")
        return self.preprocessing(img), i
