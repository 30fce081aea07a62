"""Batched fetch: a whole training batch decoded straight into one uint8 N x C x H x W tensor.

The per-sample path (``SeededDataset[i]`` -> ``ImageDataset.getitem`` -> ``FaceTransform``, then the collate)
spends tens of microseconds per image in Python and copies around a ≈ 100 µs JPEG decode: the item's own
generator, the transform's checks, a C x H x W tensor per image, then the stack into the batch. Here one
loop over the batch reads each sample's encoded bytes, lets libjpeg-turbo decode them into a reused
H x W x 3 scratch array, flips it (``cv2.flip``) when the sample's draw says so and de-interleaves it
(``cv2.split``) into the batch's own planes; no per-image tensor, no collate copy.

The batch is the per-sample path's bit for bit: each sample's randomness is the same
:meth:`~broadface.data.transforms.FaceTransform.draw` from a generator seeded the same way, and the pixels are
:func:`~broadface.data.images.decode_pixels`'. Any sample the direct path cannot take -- not a plain YCbCr/gray
JPEG already at the output size, a decoder error, a face its mask draw covers, a sample already flagged
unreadable (skip mode) -- goes through the per-sample path (with a fresh generator of the same seed) into its
slot, so errors, skips and substitutes are the per-sample path's too. The float form (``pixels=False``) is the
uint8 batch normalised by :class:`~broadface.data.pipeline.BatchNormalizer` (the same bits as per-image
:func:`normalize`).
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from broadface.data.base import ImageDataset, call_transform
from broadface.data.images import ImageDecodeError, decode_direct, direct_jpeg_size
from broadface.data.masks import mask_applies
from broadface.data.pipeline import BatchNormalizer
from broadface.data.transforms import FaceTransform


@dataclass
class Batch:
    """A batch already collated by :func:`fetch_batch`: ``images`` (N x C x H x W), ``labels`` (int64 N)."""

    images: torch.Tensor
    labels: torch.Tensor


def can_fetch_batch(dataset: object) -> bool:
    """Whether :func:`fetch_batch` serves ``dataset``: an :class:`ImageDataset` that hands out encoded bytes
    (:meth:`~broadface.data.base.ImageDataset.encoded`), with a 3-channel :class:`FaceTransform` of fixed size."""
    tf = getattr(dataset, "transform", None)
    return (isinstance(dataset, ImageDataset) and type(dataset).encoded is not ImageDataset.encoded
            and isinstance(tf, FaceTransform) and tf.channels == 3 and tf.size is not None)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _direct(dataset: ImageDataset, index: int, hw: tuple[int, int], scratch: np.ndarray
            ) -> tuple[int | None, tuple[bytes, int] | None]:
    """Decode sample ``index`` into ``scratch``: ``(its label, None)``; where the per-sample path must do it,
    ``(None, the encoded pair if it was read)``, so that path decodes those bytes instead of reading them again."""
    if dataset.on_error == "skip" and dataset._bad[index]:
        return None, None  # flagged unreadable: the per-sample path substitutes it
    try:
        found = dataset.encoded(index)
    except ImageDecodeError:
        return None, None  # the per-sample path raises naming the source, or skips it
    if found is None or direct_jpeg_size(found[0]) != hw or decode_direct(found[0], scratch) is None:
        return None, found
    return found[1], None


def fetch_batch(dataset: ImageDataset, indices: Sequence[int], seeds: Sequence[int],
                normalizer: BatchNormalizer | None = None, pool: Executor | None = None, slices: int = 1) -> Batch:
    """Samples ``indices`` of ``dataset`` (:func:`can_fetch_batch`), sample ``k``'s randomness drawn from a
    generator seeded with ``seeds[k]``, as one :class:`Batch`: uint8 for a ``pixels=True`` transform, else
    float32 normalised by ``normalizer`` (a default :class:`BatchNormalizer` when None).

    ``slices > 1`` cuts the batch into that many contiguous slices, the first filled by the calling thread and
    the others by ``pool``'s threads at the same time (reading, decoding, flipping and splitting release the
    GIL); the batch is the same bytes. An error is raised for the first failing slice, after all have ended."""
    tf = dataset.transform
    assert isinstance(tf, FaceTransform)
    h, w = tf._out_hw  # type: ignore[attr-defined]
    pixel_tf = tf if tf.pixels else dataclasses.replace(tf, pixels=True)  # the same draws, uint8 out
    images = torch.empty((len(indices), 3, h, w), dtype=torch.uint8)
    if get_worker_info() is not None:
        images.share_memory_()  # a worker's batch crosses to the main process without another copy
    planes, labels = images.numpy(), [0] * len(indices)

    def fill(lo: int, hi: int) -> None:
        scratch = np.empty((2, h, w, 3), np.uint8)  # the decoded face, and its mirror image
        for k in range(lo, hi):
            index, seed = int(indices[k]), seeds[k]
            mask_seed, flipped = tf.draw(_generator(seed))
            masked = mask_seed is not None and mask_applies(tf.mask_prob, np.random.default_rng(mask_seed))
            label, found = (None, None) if masked else _direct(dataset, index, (h, w), scratch[0])
            if label is None:  # the per-sample path, from the same draws
                img, label = dataset._decoded(index, found)
                images[k] = call_transform(pixel_tf, img, _generator(seed))
            else:
                face = cv2.flip(scratch[0], 1, dst=scratch[1]) if flipped else scratch[0]
                cv2.split(face, [planes[k, 0], planes[k, 1], planes[k, 2]])
            labels[k] = label

    parts = max(1, min(slices if pool is not None else 1, len(indices)))
    bounds = np.linspace(0, len(indices), parts + 1).astype(int).tolist()
    others = [pool.submit(fill, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])] if pool is not None else []
    try:
        fill(bounds[0], bounds[1])
    finally:
        wait(others)
    for f in others:
        f.result()  # re-raises a slice's error
    if not tf.pixels:
        images = (normalizer or BatchNormalizer())(images)
    return Batch(images, torch.tensor(labels, dtype=torch.int64))
