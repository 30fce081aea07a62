"""The gallery's source of truth: one SQLite file in WAL mode.

Tables: ``meta`` (schema version, the model's fingerprint, kind, file name, dimension and
preprocessing), ``identities`` (unique name, JSON metadata) and ``images`` (the embedding as
little-endian float32 bytes, the aligned crop as JPEG, the upload's file name, how the face was
found). Every write is one transaction committed with ``synchronous=FULL`` before it returns,
so a write the service has acknowledged survives a killed process (and a power cut). A gallery
made with one model refuses another (fingerprint or preprocessing differ) with a message saying
which model it needs.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE identities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, metadata TEXT NOT NULL,
                         created REAL NOT NULL);
CREATE TABLE images (id INTEGER PRIMARY KEY, identity_id INTEGER NOT NULL REFERENCES identities(id)
                     ON DELETE CASCADE, embedding BLOB NOT NULL, crop BLOB, source TEXT NOT NULL,
                     face TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX images_identity ON images(identity_id);
"""
_MODEL_KEYS = ("fingerprint", "kind", "file", "dim", "preprocessing")


def _short(info: dict) -> str:
    return f"'{info['file']}' ({info['kind']}, sha256 {info['fingerprint'][:12]}, {info['dim']}-d)"


class GalleryStore:
    """SQLite access for one gallery file; thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | os.PathLike, model_info: dict):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"gallery {self.path} is a directory, expected a database file (e.g. gallery.db)")
        self.dim = int(model_info["dim"])
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        except (OSError, sqlite3.Error) as err:
            raise ValueError(f"gallery {self.path}: cannot open ({err})") from None
        try:
            try:
                self._db.execute("PRAGMA journal_mode=WAL").fetchone()
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            except sqlite3.DatabaseError as err:
                raise ValueError(f"gallery {self.path}: not an SQLite database ({err})") from None
            if tables:
                self._check(tables, model_info)
            else:
                self._create(model_info)
        except BaseException:
            self._db.close()
            raise

    def _create(self, info: dict) -> None:
        with self._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            rows = [("schema_version", str(SCHEMA_VERSION)), ("created", str(time.time()))]
            rows += [(k, json.dumps(info[k])) for k in _MODEL_KEYS]
            db.executemany("INSERT INTO meta VALUES (?, ?)", rows)

    def _check(self, tables: set[str], info: dict) -> None:
        if not {"meta", "identities", "images"} <= tables:
            raise ValueError(f"gallery {self.path}: an SQLite database but not a broadface gallery "
                             f"(tables: {', '.join(sorted(tables))})")
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
            raise ValueError(f"gallery {self.path}: schema version {meta['schema_version']} is newer than this "
                             f"broadface ({SCHEMA_VERSION})")
        stored = {k: json.loads(meta[k]) for k in _MODEL_KEYS if k in meta}
        if stored.get("fingerprint") != info["fingerprint"]:
            raise ValueError(f"gallery {self.path} was built with model {_short(stored)}, not {_short(info)}: "
                             "serve it with that model, or give another --gallery file")
        if stored.get("preprocessing") != info["preprocessing"] or stored.get("dim") != info["dim"]:
            raise ValueError(f"gallery {self.path} was built with preprocessing {stored.get('preprocessing')}, "
                             f"this run uses {info['preprocessing']}: use the same options (e.g. flip)")

    def model_info(self) -> dict:
        with self._lock:
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        return {k: json.loads(meta[k]) for k in _MODEL_KEYS}

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction: committed (and synced) when the block ends, rolled back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ writes

    def add_images(self, name: str, images: list[dict], metadata: dict | None = None) -> tuple[int, bool, list[int]]:
        """Add images (dicts: embedding, crop, source, face) under ``name``, creating the identity if needed.

        ``metadata`` (if given) replaces the identity's metadata. Returns (identity id, created?, image ids)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            created = row is None
            if created:
                cur = db.execute("INSERT INTO identities (name, metadata, created) VALUES (?, ?, ?)",
                                 (name, json.dumps(metadata or {}), now))
                identity_id = int(cur.lastrowid)
            else:
                identity_id = int(row[0])
                if metadata is not None:
                    db.execute("UPDATE identities SET metadata = ? WHERE id = ?", (json.dumps(metadata), identity_id))
            ids = []
            for im in images:
                emb = np.asarray(im["embedding"], "<f4")
                if emb.shape != (self.dim,):
                    raise ValueError(f"embedding of shape {emb.shape}, the gallery holds {self.dim}-d embeddings")
                cur = db.execute("INSERT INTO images (identity_id, embedding, crop, source, face, created) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (identity_id, emb.tobytes(), im.get("crop"),
                                                               im.get("source", ""), json.dumps(im.get("face", {})),
                                                               now))
                ids.append(int(cur.lastrowid))
        return identity_id, created, ids

    def import_identities(self, items: Iterable[tuple[str, np.ndarray]]) -> int:
        """Bulk import: (new identity name, N x D embeddings) pairs in ONE transaction (no crops); returns
        the number of identities. For galleries built elsewhere (and the benchmark's synthetic ones)."""
        now, count = time.time(), 0
        with self._tx() as db:
            for name, embeddings in items:
                emb = np.asarray(embeddings, "<f4").reshape(-1, self.dim)
                try:
                    cur = db.execute("INSERT INTO identities (name, metadata, created) VALUES (?, '{}', ?)",
                                     (name, now))
                except sqlite3.IntegrityError:
                    raise ValueError(f"import: identity {name!r} already exists in {self.path}") from None
                db.executemany("INSERT INTO images (identity_id, embedding, crop, source, face, created) "
                               "VALUES (?, ?, NULL, 'import', '{\"face\": \"imported\"}', ?)",
                               [(cur.lastrowid, e.tobytes(), now) for e in emb])
                count += 1
        return count

    def set_metadata(self, name: str, metadata: dict) -> int | None:
        with self._tx() as db:
            cur = db.execute("UPDATE identities SET metadata = ? WHERE name = ?", (json.dumps(metadata), name))
            row = db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone() if cur.rowcount else None
        return None if row is None else int(row[0])

    def delete_identity(self, name: str) -> tuple[int, list[int]] | None:
        """Delete an identity and its images: (identity id, image ids), or None if unknown."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            ids = [r[0] for r in db.execute("SELECT id FROM images WHERE identity_id = ?", (row[0],))]
            db.execute("DELETE FROM images WHERE identity_id = ?", (row[0],))
            db.execute("DELETE FROM identities WHERE id = ?", (row[0],))
        return int(row[0]), ids

    def delete_image(self, image_id: int) -> int | None:
        """Delete one image: its identity id, or None if unknown."""
        with self._tx() as db:
            row = db.execute("SELECT identity_id FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is not None:
                db.execute("DELETE FROM images WHERE id = ?", (image_id,))
        return None if row is None else int(row[0])

    # ------------------------------------------------------------------ reads

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def counts(self) -> tuple[int, int]:
        (n_id,), = self._query("SELECT COUNT(*) FROM identities")
        (n_im,), = self._query("SELECT COUNT(*) FROM images")
        return int(n_id), int(n_im)

    def identity(self, name: str) -> dict | None:
        rows = self._query("SELECT id, name, metadata, created FROM identities WHERE name = ?", (name,))
        if not rows:
            return None
        out = _identity_row(rows[0])
        out["images"] = [_image_row(r) for r in self._query(
            "SELECT id, ?, source, face, created FROM images WHERE identity_id = ? ORDER BY id", (name, out["id"]))]
        return out

    def list_identities(self, offset: int, limit: int, prefix: str = "") -> tuple[int, list[dict]]:
        """(number of identities matching, one page of them by name with image counts)."""
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        (total,), = self._query("SELECT COUNT(*) FROM identities WHERE name LIKE ? ESCAPE '\\'", (like,))
        rows = self._query("SELECT i.id, i.name, i.metadata, i.created, COUNT(m.id) FROM identities i LEFT JOIN "
                           "images m ON m.identity_id = i.id WHERE i.name LIKE ? ESCAPE '\\' GROUP BY i.id "
                           "ORDER BY i.name LIMIT ? OFFSET ?", (like, limit, offset))
        return int(total), [{**_identity_row(r[:4]), "images": int(r[4])} for r in rows]

    def image(self, image_id: int) -> dict | None:
        rows = self._query("SELECT m.id, i.name, m.source, m.face, m.created FROM images m JOIN identities i "
                           "ON i.id = m.identity_id WHERE m.id = ?", (image_id,))
        return _image_row(rows[0]) if rows else None

    def crop(self, image_id: int) -> bytes | None:
        rows = self._query("SELECT crop FROM images WHERE id = ?", (image_id,))
        return rows[0][0] if rows and rows[0][0] is not None else None

    def everything(self) -> tuple[dict[int, dict], list[tuple[int, int, np.ndarray]]]:
        """All identities ({id: {name, metadata}}) and all (identity id, image id, embedding), by image id."""
        with self._lock:
            idents = {int(r[0]): {"name": r[1], "metadata": json.loads(r[2])}
                      for r in self._db.execute("SELECT id, name, metadata FROM identities")}
            images = [(int(a), int(b), np.frombuffer(e, "<f4").astype(np.float32))
                      for a, b, e in self._db.execute("SELECT identity_id, id, embedding FROM images ORDER BY id")]
        return idents, images


def _identity_row(r: tuple) -> dict[str, Any]:
    return {"id": int(r[0]), "name": r[1], "metadata": json.loads(r[2]), "created": r[3]}


def _image_row(r: tuple) -> dict[str, Any]:
    return {"id": int(r[0]), "identity": r[1], "source": r[2], **json.loads(r[3]), "created": r[4]}
