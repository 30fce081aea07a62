"""Data layer: folder / zip / RecordIO datasets, splits, transforms, deterministic loaders.

Every dataset yields ``(float tensor CHW, int label)`` and exposes ``classes``, ``targets``,
``samples`` (source, label) and ``skipped`` (unreadable files substituted in ``on_error="skip"``
mode). See docs/data.md.
"""
from broadface.data.base import ImageDataset
from broadface.data.binfile import UnsafePickleError, load_bin, write_bin
from broadface.data.folder import FaceFolder
from broadface.data.images import IMG_EXTENSIONS, ImageDecodeError, decode_image
from broadface.data.loader import EpochBatchSampler, SeededDataset, epoch_order, make_loader
from broadface.data.pairs import LFWPair, read_lfw_pairs
from broadface.data.recordio import PackSummary, RecordIODataset, pack_folder
from broadface.data.seeding import derive_seed
from broadface.data.sets import DATASETS, dataset_path, open_dataset
from broadface.data.splits import celeba299_split, class_disjoint_split, lfw_pair_folds, lfw_split
from broadface.data.transforms import EvalTransform, FaceTransform, TrainTransform, flip
from broadface.data.zipfolder import ZipFolder

__all__ = [
    "DATASETS", "IMG_EXTENSIONS", "EpochBatchSampler", "EvalTransform", "FaceFolder", "FaceTransform",
    "ImageDataset", "ImageDecodeError", "LFWPair", "PackSummary", "RecordIODataset", "SeededDataset",
    "TrainTransform", "UnsafePickleError", "ZipFolder", "celeba299_split", "class_disjoint_split",
    "dataset_path", "decode_image", "derive_seed", "epoch_order", "flip", "lfw_pair_folds", "lfw_split",
    "load_bin", "make_loader", "open_dataset", "pack_folder", "read_lfw_pairs", "write_bin",
]
