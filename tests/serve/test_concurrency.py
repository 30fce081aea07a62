"""Concurrent writers and readers on one real server: no lost, duplicated or half-applied rows."""
from __future__ import annotations

import threading
from collections import Counter

from tests.serve.harness import files

WRITERS, REQUESTS = 4, 6


def test_concurrent_writers_and_readers(servers, tiny_ckpt, aligned, tmp_path):
    faces = [p for n in ["Abdullah_Gul", "Adrien_Brody", "Al_Gore"] for p in sorted((aligned / n).iterdir())[:3]]
    server = servers(tiny_ckpt, tmp_path / "g.db")
    acked: list[tuple[str, str, int]] = []  # (identity, upload name, image id) the server acknowledged
    errors: list[str] = []
    lock, done = threading.Lock(), threading.Event()

    def writer(w: int):
        with server.client() as c:
            for i in range(REQUESTS):
                # every writer adds to its own identity and to one they all share (created by whoever is first)
                for name in (f"writer-{w}", "shared"):
                    upload = f"w{w}-r{i}-{name}.jpg"
                    face = faces[(w + i) % len(faces)]
                    r = c.post(f"/identities/{name}/images", files=[("images", (upload, face.read_bytes()))])
                    if r.status_code != 201:
                        errors.append(r.text)
                        continue
                    with lock:
                        acked.append((name, upload, r.json()["image_ids"][0]))

    def reader():
        with server.client() as c:
            while not done.is_set():
                for r in (c.post("/search", files=files([faces[0]], "image")), c.get("/identities"),
                          c.get("/health")):
                    if r.status_code not in (200, 409):  # 409: nothing enrolled yet
                        errors.append(r.text)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads + readers:
        t.start()
    for t in threads:
        t.join(300)
    done.set()
    for t in readers:
        t.join(60)
    assert not errors, errors[:3]
    assert len(acked) == WRITERS * REQUESTS * 2

    with server.client() as c:
        stored = {}
        for ident in c.get("/identities", params={"limit": 100}).json()["identities"]:
            stored[ident["name"]] = [(im["source"], im["id"]) for im in
                                     c.get(f"/identities/{ident['name']}").json()["images"]]
        assert sorted(stored) == sorted({f"writer-{w}" for w in range(WRITERS)} | {"shared"})
        rows = [(name, src, i) for name, images in stored.items() for src, i in images]
        assert sorted(rows) == sorted(acked)  # every acknowledged row once, nothing else
        assert max(Counter(i for _, _, i in rows).values()) == 1
        assert c.get("/health").json() == {"status": "ok", "identities": WRITERS + 1, "images": len(acked),
                                           "searchable": WRITERS + 1}
        top = c.post("/search", files=files([faces[0]], "image"), data={"top_k": "10"}).json()["matches"]
        assert {m["identity"]: m["images"] for m in top} == {n: len(v) for n, v in stored.items()}
