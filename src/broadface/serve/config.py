"""``ServeConfig``: everything ``broadface serve`` is started with, checked when it is built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from broadface.serve.index import IndexMode

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """Model, gallery, network, decision threshold, limits and index of one service."""

    model: str
    gallery: str
    host: str = "127.0.0.1"  # loopback only unless asked
    port: int = 8000
    threshold: float = 0.3  # cosine similarity: score >= threshold means "same person"
    threshold_source: str = "generic default; calibrate with `broadface eval --json`"
    api_key: str | None = None  # when set, every write needs the header X-API-Key
    index: IndexMode = "auto"
    faiss_min: int = 20000  # auto: faiss from this many identities on (when installed)
    nprobe: int = 16  # faiss IVF cells searched per query
    max_image_bytes: int = 8 << 20  # per uploaded file
    max_pixels: int = 40_000_000  # per decoded image (width x height)
    max_files: int = 16  # images per enrol request
    max_top_k: int = 100
    crop_size: int = 112  # aligned crop side (the ArcFace template); square uploads of this size are crops
    flip: bool = True  # embed image + horizontal flip
    input_size: int | None = None  # only for models whose file does not say it (insightface, some ONNX)
    bgr: bool = False  # the model wants BGR channel order
    mean: Sequence[float] | None = None  # normalisation overrides (pixel units), None: what the model says
    std: Sequence[float] | None = None
    format: str = "auto"  # model file format: auto, broadface, onnx or insightface
    device: str = "cpu"
    threads: int = 1  # intra-op threads of torch / faiss per request; requests themselves run in parallel

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} is not a cosine similarity in [-1, 1]")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 0..65535")
        for name in ("faiss_min", "nprobe", "max_image_bytes", "max_pixels", "max_files", "max_top_k", "crop_size",
                     "threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.index not in ("auto", "exact", "faiss"):
            raise ValueError(f"index must be auto, exact or faiss, got {self.index!r}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("the API key must be at least 8 characters")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK or self.host.startswith("127.")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted: a full enrol request plus room for the form fields."""
        return self.max_files * self.max_image_bytes + (1 << 20)
