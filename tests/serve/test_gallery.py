"""The gallery's in-memory mirror against templates recomputed from the stored embeddings."""
from __future__ import annotations

import numpy as np
import pytest

from broadface.serve.errors import Conflict, NotFound
from broadface.serve.gallery import Gallery
from tests.serve.test_store import INFO

D = INFO["dim"]


def unit(rng, n):
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(vectors, tag):
    return [{"embedding": v, "crop": None, "source": f"{tag}{i}.jpg", "face": {}} for i, v in enumerate(vectors)]


def expected(people: dict[str, np.ndarray], q: np.ndarray) -> list[tuple[str, float]]:
    """Mean direction of each identity's unit embeddings, cosine with q, best first."""
    out = []
    for name, emb in people.items():
        mean = emb.astype(np.float64).mean(0)
        out.append((name, float(mean @ q / np.linalg.norm(mean))))
    return sorted(out, key=lambda t: -t[1])


def check(gallery, people, rng):
    for q in unit(rng, 4):
        got = gallery.search(q, len(people))
        want = expected(people, q)
        assert [m["identity"] for m in got] == [n for n, _ in want]
        np.testing.assert_allclose([m["score"] for m in got], [s for _, s in want], atol=1e-5)
        for m in got:  # the best image of each identity is its image closest to q
            assert m["image_score"] == pytest.approx(float((people[m["identity"]] @ q).max()), abs=1e-5)


def test_search_enrol_delete_and_reopen_match_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    g = Gallery.open(tmp_path / "g.db", INFO, "exact")
    with pytest.raises(Conflict, match="empty"):
        g.search(unit(rng, 1)[0], 3)
    people = {f"p{i}": unit(rng, i + 1) for i in range(5)}
    for name, emb in people.items():
        g.enrol(name, rows(emb[:1], name))
        if len(emb) > 1:
            g.enrol(name, rows(emb[1:], name + "x"))  # a second request adds to the same identity
    check(g, people, rng)

    img = g.identity("p3")["images"][1]["id"]
    assert g.delete_image(img)["images_left"] == 3
    people["p3"] = np.delete(people["p3"], 1, axis=0)
    g.delete_identity("p1")
    del people["p1"]
    check(g, people, rng)

    only = g.identity("p0")["images"][0]["id"]
    g.delete_image(only)  # an identity without images stays listed but is no longer searchable
    del people["p0"]
    assert g.counts() == {"identities": 4, "images": 3 + 3 + 5, "searchable": 3}
    check(g, people, rng)
    g.close()

    again = Gallery.open(tmp_path / "g.db", INFO, "exact")  # the mirror rebuilt from the file alone
    assert again.counts() == {"identities": 4, "images": 11, "searchable": 3}
    check(again, people, rng)


def test_unknown_names_and_ids_are_not_found(tmp_path):
    g = Gallery.open(tmp_path / "g.db", INFO, "exact")
    for call in (lambda: g.delete_identity("x"), lambda: g.delete_image(7), lambda: g.identity("x"),
                 lambda: g.set_metadata("x", {})):
        with pytest.raises(NotFound):
            call()


def test_concurrent_writes_keep_the_mirror_equal_to_the_store(tmp_path):
    """Threads enrolling into one identity and deleting at once, with thread switches forced every
    microsecond: the in-memory mirror must end exactly as a gallery rebuilt from the file."""
    import sys
    import threading

    rng = np.random.default_rng(1)
    g = Gallery.open(tmp_path / "g.db", INFO, "exact")
    g.store._query("PRAGMA synchronous=OFF")  # no fsync: writes overlap in the mirror as often as possible
    vectors = unit(rng, 8 * 150)
    g.enrol("seed", rows(vectors[:1], "s"))

    def work(t: int):
        for i in range(150):
            out = g.enrol("shared", rows(vectors[t * 150 + i:t * 150 + i + 1], f"t{t}-{i}-"))
            if i % 3 == 0:
                g.delete_image(out["image_ids"][0])

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    again = Gallery.open(tmp_path / "g.db", INFO, "exact")
    assert g.counts() == again.counts() == {"identities": 2, "images": 1 + 8 * 100, "searchable": 2}
    for q in unit(rng, 3):
        assert g.search(q, 2) == again.search(q, 2)
