"""An ONNX embedding model run by onnxruntime (CPU), behind the same call as a PyTorch backbone.

:class:`OnnxEmbedder` is an ``nn.Module`` without parameters: ``forward`` takes a float32
N x C x H x W tensor (on any device), runs the session and returns the first output as an
N x D float32 tensor on the input's device. Static-batch models are run in chunks of their
batch size. What the graph expects is read from its input: layout (NCHW only), channels,
height and width when they are fixed numbers, and the element type (float or float16).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["OnnxEmbedder", "onnx_session"]

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """onnxruntime CPU session for ``path`` (FileNotFoundError / ValueError naming the file);
    ``threads`` sets its intra-op thread count (default: onnxruntime's, one per physical core)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"{path}: not a loadable ONNX model ({type(err).__name__}: {err})") from None


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxEmbedder(nn.Module):
    """``forward(N x C x H x W float tensor) -> N x D float32 tensor`` through onnxruntime."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.path, self.threads = Path(path), threads
        self.session = onnx_session(self.path, threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: an embedding model takes one image input, this one takes "
                             f"{[i.name for i in inputs]}")
        spec = inputs[0]
        self.input_name, self.output_name, shape = spec.name, outputs[0].name, list(spec.shape)
        if spec.type not in _DTYPES:
            raise ValueError(f"{self.path}: input {spec.name} is {spec.type}; only float / float16 image "
                             "inputs are supported")
        if len(shape) != 4 or _fixed(shape[1]) not in (1, 3):
            layout = "NHWC" if len(shape) == 4 and _fixed(shape[3]) == 3 else f"shape {shape}"
            raise ValueError(f"{self.path}: input {spec.name} is {layout}; an N x 3 x H x W (NCHW) image input "
                             "is needed (re-export the model channels-first)")
        self.dtype = _DTYPES[spec.type]
        self.channels = int(shape[1])
        self.batch = _fixed(shape[0])
        h, w = _fixed(shape[2]), _fixed(shape[3])
        self.input_hw: tuple[int, int] | None = (h, w) if h and w else None
        out_shape = list(outputs[0].shape)
        self.output_dim = _fixed(out_shape[-1]) if len(out_shape) == 2 else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"{self.path.name} expects N x {self.channels} x H x W input, got {tuple(images.shape)}")
        if self.input_hw is not None and tuple(images.shape[-2:]) != self.input_hw:
            h, w = self.input_hw
            raise ValueError(f"{self.path.name} expects N x {self.channels} x {h} x {w} input, "
                             f"got {tuple(images.shape)}")
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=self.dtype)
        step = self.batch or max(1, len(x))
        outs = [self.session.run([self.output_name], {self.input_name: x[i:i + step]})[0]
                for i in range(0, len(x), step)]
        out = np.concatenate(outs) if outs else np.zeros((0, self.output_dim or 0), np.float32)
        if out.ndim != 2:
            raise ValueError(f"{self.path.name}: output {self.output_name} has shape {out.shape}; an N x D "
                             "embedding is needed")
        return torch.from_numpy(out.astype(np.float32, copy=False)).to(images.device)

    def __getstate__(self) -> dict:  # a session cannot be pickled: reopen it from the file
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = onnx_session(self.path, self.threads)
