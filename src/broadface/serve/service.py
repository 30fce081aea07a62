"""The face-search service without HTTP: uploads in, plain dicts out, :class:`ServeError` for bad input.

``FaceService`` ties the model (:mod:`broadface.serve.model`), the face reader
(:mod:`broadface.serve.faces`) and the gallery (:mod:`broadface.serve.gallery`) together; the
FastAPI app (:mod:`broadface.serve.app`) only maps requests onto it.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

import numpy as np

from broadface.serve.config import ServeConfig
from broadface.serve.errors import BadInput
from broadface.serve.faces import Face, FaceReader, encode_jpeg
from broadface.serve.gallery import Gallery
from broadface.serve.model import FaceModel

_NAME = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,128}$")
MAX_METADATA_BYTES = 16 << 10


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave it and its bytes."""

    name: str
    data: bytes


def check_name(name: str) -> str:
    """An identity name: 1-128 characters, no control characters or slashes, not blank."""
    if not _NAME.match(name) or not name.strip() or name in (".", ".."):
        raise BadInput(f"identity name {name!r}: expected 1-128 characters without slashes or control characters "
                       "(and not '.' or '..')")
    return name


def parse_metadata(text: str | dict | None) -> dict | None:
    """Metadata given as a JSON object (or its text); None when not given."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        if len(text.encode()) > MAX_METADATA_BYTES:
            raise BadInput(f"metadata: {len(text.encode())} bytes, over the limit of {MAX_METADATA_BYTES}")
        try:
            text = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadInput(f"metadata: malformed JSON ({err}); expected a JSON object like {{\"role\": \"staff\"}}") \
                from None
    if not isinstance(text, dict):
        raise BadInput(f"metadata: expected a JSON object, got {type(text).__name__}")
    if len(json.dumps(text).encode()) > MAX_METADATA_BYTES:
        raise BadInput(f"metadata: over the limit of {MAX_METADATA_BYTES} bytes")
    return text


class FaceService:
    """Enrol, search, verify and manage a gallery with one model."""

    def __init__(self, model: FaceModel, gallery: Gallery, config: ServeConfig):
        self.model, self.gallery, self.config = model, gallery, config
        self.reader = FaceReader(config.max_image_bytes, config.max_pixels, config.crop_size)

    @classmethod
    def open(cls, config: ServeConfig) -> FaceService:
        """Load the model, open (or create) the gallery it must match, rebuild the index."""
        model = FaceModel.load(config.model, flip=config.flip, input_size=config.input_size, bgr=config.bgr,
                               mean=config.mean, std=config.std, format=config.format, device=config.device)
        gallery = Gallery.open(config.gallery, model.describe(), config.index, config.faiss_min, config.nprobe)
        return cls(model, gallery, config)

    def close(self) -> None:
        self.gallery.close()

    def _threshold(self, threshold: float | None) -> float:
        if threshold is None:
            return self.config.threshold
        if not -1.0 <= threshold <= 1.0:
            raise BadInput(f"threshold {threshold}: expected a cosine similarity in [-1, 1]")
        return float(threshold)

    def _faces(self, uploads: list[Upload], align: str) -> tuple[list[Face], np.ndarray]:
        faces = [self.reader.read(u.data, u.name, align) for u in uploads]
        return faces, self.model.embed([f.crop for f in faces])

    def enrol(self, name: str, uploads: list[Upload], metadata: str | dict | None = None, align: str = "auto") -> dict:
        check_name(name)
        meta = parse_metadata(metadata)
        if not uploads:
            raise BadInput("no image uploaded: send one or more files in the 'images' field")
        if len(uploads) > self.config.max_files:
            raise BadInput(f"{len(uploads)} images in one request, over the limit of {self.config.max_files}")
        faces, emb = self._faces(uploads, align)
        rows = [{"embedding": e, "crop": encode_jpeg(f.crop), "source": u.name, "face": f.info()}
                for u, f, e in zip(uploads, faces, emb)]
        out = self.gallery.enrol(name, rows, meta)
        out["faces"] = [{"image_id": i, "source": u.name, **f.info()}
                        for i, u, f in zip(out["image_ids"], uploads, faces)]
        return out

    def search(self, upload: Upload, top_k: int = 5, align: str = "auto", threshold: float | None = None,
               with_crop: bool = False) -> dict:
        if not 1 <= top_k <= self.config.max_top_k:
            raise BadInput(f"top_k={top_k}: expected 1..{self.config.max_top_k}")
        thr = self._threshold(threshold)
        faces, emb = self._faces([upload], align)
        matches = self.gallery.search(emb[0], top_k)
        for m in matches:
            m["same"] = m["score"] >= thr
            m["score"], m["image_score"] = round(m["score"], 6), round(m["image_score"], 6)
        probe = {"source": upload.name, **faces[0].info()}
        if with_crop:
            probe["crop"] = "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(faces[0].crop)).decode()
        return {"probe": probe, "threshold": thr, "matches": matches, "index": self.gallery.index.describe()["kind"]}

    def verify(self, a: Upload, b: Upload, align: str = "auto", threshold: float | None = None) -> dict:
        thr = self._threshold(threshold)
        faces, emb = self._faces([a, b], align)
        score = float(emb[0] @ emb[1])
        return {"score": round(score, 6), "threshold": thr, "same": score >= thr,
                "faces": [{"source": u.name, **f.info()} for u, f in zip((a, b), faces)]}

    def info(self) -> dict:
        return {"model": self.model.describe(), "threshold": self.config.threshold,
                "threshold_source": self.config.threshold_source, "index": self.gallery.index.describe(),
                "gallery": {"file": str(self.config.gallery), **self.gallery.counts()},
                "limits": {"max_image_bytes": self.config.max_image_bytes, "max_pixels": self.config.max_pixels,
                           "max_files": self.config.max_files, "max_top_k": self.config.max_top_k},
                "crop_size": self.config.crop_size, "writes_need_api_key": self.config.api_key is not None}
