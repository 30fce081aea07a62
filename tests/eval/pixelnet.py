"""A deterministic, instant "model" and insightface-style reference feature extraction."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.preprocessing import normalize
from torch import nn

from broadface.infer.embed import read_rgb, to_input


class PixelNet(nn.Module):
    """8x8 average-pooled, mean-centred pixels (192-d): weak but real face features, no training."""

    def __init__(self):
        super().__init__()
        self.config = {"name": "pixelnet", "input_size": 112}
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        f = nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return (f - f.mean(1, keepdim=True)) * self.scale


def reference_features(model, images: list[np.ndarray], flip: bool = True) -> np.ndarray:
    """insightface's test(): raw outputs of image and flipped image, summed in float64 (not normalised)."""
    x = torch.stack([to_input(im, 112) for im in images])
    with torch.no_grad():
        out = model(x).double().numpy()
        if flip:
            out = out + model(torch.flip(x, dims=[3])).double().numpy()
    return out


def reference_embeddings(model, paths, flip: bool = True) -> np.ndarray:
    return normalize(reference_features(model, [read_rgb(p) for p in paths], flip))
