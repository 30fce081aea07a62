"""Rotation classes: every class at 0/90/180/270° becomes a class of its own.

The few-shot literature's Omniglot augmentation (Santoro et al. 2016; Vinyals et al. 2016):
964 background characters × 4 rotations = 3,856 training classes. Sample ``j`` of the
rotated set is base sample ``j // k`` rotated by ``(j % k) · 360/k`` degrees counter-clockwise,
label ``k · base_label + j % k``, class name ``"<base class>@<degrees>"``. Rotations are exact
pixel permutations (``Image.transpose``), never resampled.
"""
from __future__ import annotations

from PIL import Image

from broadface.data.base import ImageDataset, Transform

ROTATIONS = (1, 2, 4)
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def rotate(img: Image.Image, degrees: int) -> Image.Image:
    """``img`` rotated counter-clockwise by a multiple of 90 degrees, exactly."""
    degrees %= 360
    if degrees == 0:
        return img.copy()
    if degrees not in _TRANSPOSE:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {degrees}")
    return img.transpose(_TRANSPOSE[degrees])


class RotatedClasses(ImageDataset):
    """``base`` with each class repeated at ``rotations`` angles (1, 2 or 4), each a new class.

    The base set's transform is not used: pass the transform here (it sees the rotated image).
    """

    def __init__(self, base: ImageDataset, rotations: int = 4, transform: Transform | None = None,
                 on_error: str = "raise"):
        if rotations not in ROTATIONS:
            raise ValueError(f"rotations must be one of {ROTATIONS}, got {rotations!r}")
        self.base, self.rotations = base, int(rotations)
        super().__init__(len(base) * self.rotations, transform, on_error)
        step = 360 // self.rotations
        self.degrees = [k * step for k in range(self.rotations)]
        self.classes = [f"{c}@{d}" for c in base.classes for d in self.degrees]
        self._targets = [self.rotations * y + k for y in base.targets for k in range(self.rotations)]
        self.origin = f"{getattr(base, 'origin', type(base).__name__)} ×{self.rotations} rotations"

    @property
    def targets(self) -> list[int]:
        return self._targets

    def __len__(self) -> int:
        return len(self.base) * self.rotations

    def source(self, index: int) -> str:
        i, k = divmod(index, self.rotations)
        return f"{self.base.source(i)}@{self.degrees[k]}"

    def _read(self, index: int) -> tuple[Image.Image, int]:
        i, k = divmod(index, self.rotations)
        img, label = self.base._read(i)
        return rotate(img, self.degrees[k]), self.rotations * label + k
