"""Knowledge distillation (BigFace-Distill): L = margin loss + λ · d(student, teacher).

With ``head.loss=cosface, head.margin=0.4, head.scale=64`` and ``distill.weight=9`` this is
BigFace's recipe. ``d`` compares L2-normalised embeddings ŝ (student, through a learnable
linear projection when its dimension differs from the teacher's) and t̂ (teacher):

* ``kind="cosine"``: ``1 − ŝ·t̂``
* ``kind="l2"``:     ``‖ŝ − t̂‖²`` (= 2 − 2 ŝ·t̂ for unit vectors)

averaged over the micro-batch. Teacher targets come from a memory-mapped cache
(:mod:`broadface.train.teacher_cache`, one teacher pass over the data) or, without a cache,
from the teacher run on the very augmented batch the student sees.

Images with label −1 (e.g. ``distill.unlabeled_root``) contribute only the distillation term:
they are removed before the margin / BroadFace head, which never sees them, and are never
enqueued. The projection is part of the checkpoint (``"distill"``) and of the optimizer
(group ``"distill"``), so a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from broadface.train.config import Config, DistillConfig, OptimConfig
from broadface.train.teacher import Teacher


def distill_loss(student: Tensor, teacher: Tensor, kind: str = "cosine") -> Tensor:
    """Mean angular distance between the rows of ``student`` and ``teacher`` (both normalised here)."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    if kind == "cosine":
        return (1.0 - (s * t).sum(1)).mean()
    if kind == "l2":
        return (s - t).pow(2).sum(1).mean()
    raise ValueError(f"config distill.kind={kind!r}: expected cosine or l2")


class Distiller(nn.Module):
    """The distillation term and the label −1 filter in front of the head (see module doc).

    Registered sub-modules are only the projection, so ``state_dict()`` is exactly what the
    checkpoint needs; the teacher and the cache are plain attributes.
    """

    def __init__(self, teacher: Teacher, student_dim: int, weight: float = 9.0, kind: str = "cosine",
                 cache: np.ndarray | None = None, unlabeled: bool = False):
        super().__init__()
        if kind not in ("cosine", "l2"):
            raise ValueError(f"config distill.kind={kind!r}: expected cosine or l2")
        self.teacher, self.cache, self.weight, self.kind = teacher, cache, float(weight), kind
        self.unlabeled = unlabeled  # batches may hold label −1 images (filtering them needs a host sync)
        # Student -> teacher space when the dimensions differ (the student's own embedding is what is evaluated).
        self.projection: nn.Module = (nn.Linear(student_dim, teacher.dim, bias=False)
                                      if student_dim != teacher.dim else nn.Identity())

    def targets(self, images: Tensor, keys: Tensor | None) -> Tensor:
        """Teacher unit embeddings for the batch: cache rows by key, else the teacher on ``images``."""
        if self.cache is None:
            return self.teacher(images)
        if keys is None:
            raise ValueError("distill.cache needs items (image, label, key); train through DistillDataset")
        k = keys.cpu().numpy()
        rows = np.asarray(self.cache[k // 2, k % 2], dtype=np.float32)
        return torch.from_numpy(rows).to(images.device)

    def term(self, embeddings: Tensor, images: Tensor, keys: Tensor | None = None) -> Tensor:
        """d(P(student), teacher) over the whole micro-batch (labelled and unlabeled)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return distill_loss(self.projection(embeddings.float()), self.targets(images, keys), self.kind)

    def forward(self, head: nn.Module, embeddings: Tensor, labels: Tensor, images: Tensor,
                extra: list[Tensor] | tuple = ()) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(loss, labelled embeddings, their labels, distillation term)``: the middle two feed the enqueue.

        loss = head(labelled) + weight · term(all). A micro-batch with no labelled image has no
        head loss (the queue still holds what it held). All values stay tensors (no host sync
        unless ``unlabeled``: selecting the labelled rows needs their count).
        """
        keys = extra[0] if len(extra) else None
        d = self.term(embeddings, images, keys)
        emb, lab = embeddings, labels
        if self.unlabeled:
            keep = labels >= 0
            emb, lab = embeddings[keep], labels[keep]
        if lab.numel():
            return head(emb, lab, enqueue=False) + self.weight * d, emb, lab, d.detach()
        return self.weight * d, emb, lab, d.detach()

    def sync_gradients(self) -> None:
        """torchrun: average the projection's gradient over ranks (it lives outside DDP); a no-op otherwise."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for p in self.projection.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(dist.get_world_size())

    def add_param_group(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
        """Put the projection (if any) in the optimizer as group ``"distill"`` (backbone lr and decay)."""
        params = [p for p in self.projection.parameters() if p.requires_grad]
        if params:
            group: dict[str, Any] = dict(name="distill", params=params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            if cfg.name == "lars":
                group["lars_adapt"] = True
            optimizer.add_param_group(group)


def build_distiller(cfg: Config, train_set: Dataset, device: torch.device) -> tuple[Distiller | None, Dataset]:
    """``(Distiller or None, the training set to load from)`` for ``cfg.distill`` (teacher null: no change)."""
    d: DistillConfig = cfg.distill
    if not d.teacher:  # distill.cache / unlabeled_root without a teacher: refused by Config.validate
        return None, train_set
    from broadface.train.distill_data import DistillDataset, UnlabeledImages, fingerprint
    from broadface.train.teacher import load_teacher
    from broadface.train.teacher_cache import open_or_build

    teacher = load_teacher(d.teacher, device, fallback_size=cfg.model.input_size)
    unlabeled = None
    if d.unlabeled_root:
        unlabeled = UnlabeledImages(d.unlabeled_root, getattr(train_set, "transform", None), cfg.data.on_error)
    data = DistillDataset(train_set, unlabeled)
    cache = None
    if d.cache:
        if not (data.supports_generator and all(hasattr(getattr(p, "transform", None), "draw") for p in data.parts)):
            raise ValueError("config distill.cache: the training images must come from broadface data sets with a "
                             "FaceTransform (the cache is keyed by index and flip); run without distill.cache")
        identity = {**teacher.identity, "dataset": fingerprint(data.parts)}
        cache = open_or_build(d.cache, teacher, data.parts, identity, d.batch_size, d.cache_dtype)
    distiller = Distiller(teacher, cfg.model.embedding_size, d.weight, d.kind, cache, unlabeled=bool(unlabeled))
    distiller = distiller.to(device)
    return distiller, data
