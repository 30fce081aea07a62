"""The gallery: the SQLite store (truth) and its in-memory mirror (identity templates in a search index).

An identity's template is the mean of its images' L2-normalised embeddings, re-normalised (the
mean direction, as ``broadface identify`` ranks). At start every embedding is read back from the
store and the index rebuilt; after that each write is committed to the store first, then applied
to the mirror under the same lock, so a search sees a write once it has been acknowledged and
never one that was not stored.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from broadface.serve.errors import Conflict, NotFound
from broadface.serve.index import IndexMode, SearchIndex
from broadface.serve.store import GalleryStore


def template(embeddings: np.ndarray) -> np.ndarray:
    """Mean direction of unit rows (float64 sum, re-normalised), float32."""
    total = np.asarray(embeddings, np.float64).sum(0)
    return (total / max(np.linalg.norm(total), 1e-12)).astype(np.float32)


class Gallery:
    """Identities and their images; ``search`` ranks identities by cosine similarity to a query embedding."""

    def __init__(self, store: GalleryStore, index: SearchIndex):
        self.store, self.index = store, index
        self._lock = threading.Lock()
        self._idents: dict[int, dict] = {}  # id -> {"name", "metadata"}
        self._images: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # identity id -> (image ids, embeddings)
        self._load()

    @classmethod
    def open(cls, path: str | os.PathLike, model_info: dict, index: IndexMode = "auto", faiss_min: int = 20000,
             nprobe: int = 16) -> Gallery:
        index_ = SearchIndex(int(model_info["dim"]), index, faiss_min, nprobe)
        return cls(GalleryStore(path, model_info), index_)

    def _load(self) -> None:
        idents, rows = self.store.everything()
        self._idents = idents
        grouped: dict[int, list[tuple[int, np.ndarray]]] = {}
        for identity_id, image_id, emb in rows:
            grouped.setdefault(identity_id, []).append((image_id, emb))
        self._images = {k: (np.array([i for i, _ in v], np.int64), np.stack([e for _, e in v]))
                        for k, v in grouped.items()}
        keys = np.array(sorted(self._images), np.int64)
        vectors = np.stack([template(self._images[k][1]) for k in keys]) if len(keys) else np.zeros((0, 1))
        self.index.bulk(keys, vectors)

    def close(self) -> None:
        self.store.close()

    def counts(self) -> dict:
        with self._lock:
            return {"identities": len(self._idents), "images": sum(len(v[0]) for v in self._images.values()),
                    "searchable": len(self.index)}

    def _refresh(self, identity_id: int) -> None:
        """Re-derive one identity's template after its images changed (no images: out of the index)."""
        ids, emb = self._images.get(identity_id, (np.zeros(0, np.int64), None))
        if len(ids):
            self.index.upsert(identity_id, template(emb))
        else:
            self._images.pop(identity_id, None)
            self.index.remove(identity_id)

    # ------------------------------------------------------------------ writes

    def enrol(self, name: str, images: list[dict], metadata: dict | None = None) -> dict:
        """Store images (dicts with ``embedding``, ``crop``, ``source``, ``face``) under ``name``."""
        if not images:
            raise ValueError("enrol: no images given")
        with self._lock:
            identity_id, created, ids = self.store.add_images(name, images, metadata)
            entry = self._idents.setdefault(identity_id, {"name": name, "metadata": {}})
            if metadata is not None:
                entry["metadata"] = metadata
            new = np.stack([np.asarray(im["embedding"], np.float32) for im in images])
            old_ids, old_emb = self._images.get(identity_id, (np.zeros(0, np.int64), new[:0]))
            self._images[identity_id] = (np.concatenate([old_ids, ids]), np.concatenate([old_emb, new]))
            self._refresh(identity_id)
            return {"identity": name, "created": created, "image_ids": ids, "images": len(self._images[identity_id][0]),
                    "metadata": entry["metadata"]}

    def set_metadata(self, name: str, metadata: dict) -> dict:
        with self._lock:
            identity_id = self.store.set_metadata(name, metadata)
            if identity_id is None:
                raise NotFound(f"unknown identity {name!r}")
            self._idents[identity_id]["metadata"] = metadata
        return self.identity(name)

    def delete_identity(self, name: str) -> dict:
        with self._lock:
            deleted = self.store.delete_identity(name)
            if deleted is None:
                raise NotFound(f"unknown identity {name!r}")
            identity_id, image_ids = deleted
            self._idents.pop(identity_id, None)
            self._images.pop(identity_id, None)
            self.index.remove(identity_id)
        return {"deleted": name, "images": len(image_ids)}

    def delete_image(self, image_id: int) -> dict:
        with self._lock:
            identity_id = self.store.delete_image(image_id)
            if identity_id is None:
                raise NotFound(f"unknown image id {image_id}")
            ids, emb = self._images[identity_id]
            keep = ids != image_id
            self._images[identity_id] = (ids[keep], emb[keep])
            self._refresh(identity_id)
            return {"deleted": image_id, "identity": self._idents[identity_id]["name"], "images_left": int(keep.sum())}

    # ------------------------------------------------------------------ reads

    def identity(self, name: str) -> dict:
        found = self.store.identity(name)
        if found is None:
            raise NotFound(f"unknown identity {name!r}")
        return found

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        """Top ``k`` identities: score (template cosine), best image of the identity and its cosine."""
        with self._lock:
            if len(self.index) == 0:
                raise Conflict("the gallery is empty: enrol identities (POST /identities/{name}/images) first")
            keys, scores = self.index.search(query, k)
            out = []
            for rank, (key, score) in enumerate(zip(keys.tolist(), scores.tolist()), 1):
                ids, emb = self._images[key]
                per_image = emb @ query
                best = int(np.argmax(per_image))
                entry = self._idents[key]
                out.append({"rank": rank, "identity": entry["name"], "score": float(score),
                            "image_id": int(ids[best]), "image_score": float(per_image[best]), "images": len(ids),
                            "metadata": entry["metadata"]})
        return out
