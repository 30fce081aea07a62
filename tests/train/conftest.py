"""Shared fixtures: a handful of real CelebA faces at 28x28 and a tiny, fast config."""
from __future__ import annotations

from pathlib import Path

import pytest

from broadface.data.folder import FaceFolder, list_classes, list_images
from broadface.data.transforms import EvalTransform, FaceTransform
from broadface.paths import data_root
from broadface.train.config import Config, apply_overrides

TINY = ["model.name=tinycnn", "model.embedding_size=16", "model.input_size=28", "model.kwargs={width: 16}",
        "head.scale=16.0", "head.margin=0.2", "optim.lr=0.05", "train.batch_size=8", "train.steps=6",
        "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=0", "train.tensorboard=false",
        "data.val_split=null"]


def celeba_faces(first: int, ids: int, per_id: int, flip: bool, size: int = 28) -> FaceFolder:
    """``ids`` CelebA identities with at least ``per_id`` images (from the ``first``-th, numeric order),
    ``per_id`` images each."""
    root = data_root() / "celeba299" / "aligned-112x112"
    files = {c: list_images(root / c) for c in sorted(list_classes(root), key=int)[first:first + 4 * ids]}
    classes = [c for c, f in files.items() if len(f) >= per_id][:ids]
    samples = [(str(root / c / f), i) for i, c in enumerate(classes) for f in files[c][:per_id]]
    tf = FaceTransform(size=size, flip_p=0.5) if flip else EvalTransform(size=size)
    return FaceFolder.from_samples(samples, classes, transform=tf)


@pytest.fixture(scope="session")
def faces() -> FaceFolder:
    """8 identities x 6 real images, 28x28, random flip: 6 batches of 8 per epoch."""
    return celeba_faces(0, 8, 6, flip=True)


@pytest.fixture(scope="session")
def val_faces() -> FaceFolder:
    """6 other identities x 4 images, no augmentation."""
    return celeba_faces(200, 6, 4, flip=False)


def tiny_config(output: Path | str | None, *overrides: str) -> Config:
    out = "null" if output is None else str(output)
    return apply_overrides(Config(), [*TINY, f"train.output={out}", *overrides])


@pytest.fixture
def make_config():
    """``make_config(output_dir_or_None, "key=value", ...)`` -> a tiny tinycnn Config."""
    return tiny_config


@pytest.fixture
def make_faces():
    """``make_faces(first, ids, per_id, flip)`` -> a small real FaceFolder."""
    return celeba_faces
