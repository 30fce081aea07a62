"""The SQLite gallery file: created once, tied to its model, every write durable and exact."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from broadface.serve.store import GalleryStore

INFO = {"fingerprint": "ab" * 32, "kind": "checkpoint", "file": "m.pt", "dim": 4,
        "preprocessing": {"input_size": [56, 56], "mean": 127.5, "std": 127.5, "bgr": False, "flip": True}}


def image(v, source="a.jpg"):
    return {"embedding": np.asarray(v, np.float32), "crop": b"jpeg", "source": source, "face": {"face": "given"}}


def test_writes_survive_reopening_and_the_file_is_wal_with_full_sync(tmp_path):
    path = tmp_path / "sub" / "g.db"
    store = GalleryStore(path, INFO)
    ident, created, ids = store.add_images("Ada", [image([1, 0, 0, 0]), image([0, 1, 0, 0], "b.jpg")], {"k": 1})
    assert created and len(ids) == 2
    assert store.add_images("Ada", [image([0, 0, 1, 0], "c.jpg")])[1] is False
    store.close()
    store = GalleryStore(path, INFO)
    assert store.model_info() == INFO
    assert store._query("PRAGMA journal_mode")[0][0] == "wal"
    assert store._query("PRAGMA synchronous")[0][0] == 2  # FULL
    got = store.identity("Ada")
    assert got["metadata"] == {"k": 1} and [i["source"] for i in got["images"]] == ["a.jpg", "b.jpg", "c.jpg"]
    idents, rows = store.everything()
    assert idents == {ident: {"name": "Ada", "metadata": {"k": 1}}}
    np.testing.assert_array_equal(np.stack([r[2] for r in rows]), np.eye(4, dtype=np.float32)[:3])
    assert store.crop(ids[0]) == b"jpeg" and store.counts() == (1, 3)


def test_another_model_or_preprocessing_is_refused_with_the_model_it_needs(tmp_path):
    path = tmp_path / "g.db"
    GalleryStore(path, INFO).close()
    with pytest.raises(ValueError, match=r"was built with model 'm.pt' \(checkpoint, sha256 abababababab, 4-d\)"):
        GalleryStore(path, {**INFO, "fingerprint": "cd" * 32, "file": "other.onnx"})
    with pytest.raises(ValueError, match="preprocessing .* flip"):
        GalleryStore(path, {**INFO, "preprocessing": {**INFO["preprocessing"], "flip": False}})


def test_files_that_are_not_galleries_are_refused_and_left_alone(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("my notes " * 100)
    with pytest.raises(ValueError, match="notes.txt: not an SQLite database"):
        GalleryStore(junk, INFO)
    assert junk.read_text() == "my notes " * 100
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(ValueError, match="not a broadface gallery \\(tables: users\\)"):
        GalleryStore(other, INFO)
    with pytest.raises(ValueError, match="is a directory"):
        GalleryStore(tmp_path, INFO)


def test_a_failed_write_is_rolled_back_whole(tmp_path):
    store = GalleryStore(tmp_path / "g.db", INFO)
    with pytest.raises(ValueError, match="4-d"):
        store.add_images("Ada", [image([1, 0, 0, 0]), image([1, 0, 0])])  # second embedding has the wrong size
    assert store.counts() == (0, 0) and store.identity("Ada") is None


def test_deletes_listing_and_prefix_paging(tmp_path):
    store = GalleryStore(tmp_path / "g.db", INFO)
    for name in ["b_1", "b%2", "bx3", "a", "c"]:
        store.add_images(name, [image([1, 0, 0, 0])])
    total, page = store.list_identities(0, 2)
    assert total == 5 and [p["name"] for p in page] == ["a", "b%2"]
    assert [p["name"] for p in store.list_identities(2, 10)[1]] == ["b_1", "bx3", "c"]
    assert [p["name"] for p in store.list_identities(0, 10, "b_")[1]] == ["b_1"]  # _ and % are literal
    assert [p["name"] for p in store.list_identities(0, 10, "b%")[1]] == ["b%2"]
    _, ids = store.delete_identity("a")
    assert len(ids) == 1 and store.delete_identity("a") is None and store.image(ids[0]) is None
    (_, _, (img,)) = store.add_images("c", [image([0, 1, 0, 0])])
    assert store.delete_image(img) is not None and store.delete_image(img) is None
    assert store.counts() == (4, 4)


def test_bulk_import_is_one_transaction(tmp_path):
    store = GalleryStore(tmp_path / "g.db", INFO)
    vectors = np.eye(4, dtype=np.float32)
    assert store.import_identities([("a", vectors[:2]), ("b", vectors[2])]) == 2
    idents, rows = store.everything()
    assert sorted(v["name"] for v in idents.values()) == ["a", "b"]
    np.testing.assert_array_equal(np.stack([r[2] for r in rows]), vectors[:3])
    with pytest.raises(ValueError, match="identity 'a' already exists"):  # aborts the whole import
        store.import_identities([("c", vectors[0]), ("a", vectors[1])])
    assert store.counts() == (2, 3)
