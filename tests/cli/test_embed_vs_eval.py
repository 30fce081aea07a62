"""The Omniglot gap of issue 11, closed: a 28-px model embedded through ``broadface embed`` and evaluated
through ``broadface eval --retrieval`` sees the same images, so both give the same Recall@1 and MAP@R.

Before the one pipeline, ``embed`` resized with OpenCV's INTER_LINEAR (no antialiasing) and ``eval
--retrieval`` with Pillow's antialiased bilinear; on 105-px Omniglot strokes shrunk to 28 px that changed
Recall@1 of a trained model from 0.496 to 0.437. The old route is re-created here to show the setting
still tells the two apart."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from broadface.cli.main import main
from broadface.data.images import read_rgb
from broadface.data.sets import open_dataset
from broadface.metrics import map_at_r, recall_at_k
from broadface.models import build_model, recalibrate_batchnorm
from tests.helpers import reference_embeddings, save_backbone

CLASSES, PER_CLASS = 20, 10


@pytest.fixture(scope="module")
def omniglot_folder(root, tmp_path_factory):
    """20 unseen Omniglot characters x 10 drawings, written as the PNG files of the zip (folder per class)."""
    ds = open_dataset("omniglot_small", "test", data_root=root)
    out = tmp_path_factory.mktemp("omniglot")
    counts: dict[int, int] = {}
    for (zip_path, member, label) in ds.members:
        if label >= CLASSES or counts.get(label, 0) >= PER_CLASS:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = out / ds.classes[label].replace("/", "__")
        folder.mkdir(exist_ok=True)
        (folder / member.rsplit("/", 1)[1]).write_bytes(ds._zip(zip_path).read(member))
    return out


@pytest.fixture(scope="module")
def model_28(omniglot_folder, tmp_path_factory):
    from broadface.data.pipeline import Preprocessing, load_images

    torch.manual_seed(0)
    model = build_model("tinycnn", embedding_size=32, input_size=28, width=16)
    files = sorted(omniglot_folder.glob("*/*.png"))
    recalibrate_batchnorm(model, [load_images(files[i::4], Preprocessing(28)) for i in range(4)])
    path = tmp_path_factory.mktemp("ckpt") / "omniglot28.pt"
    save_backbone(model.eval(), path)
    return model, path


def _old_route(model, paths):
    """The removed evaluation / CLI path: OpenCV INTER_LINEAR resize without antialiasing."""
    x = np.stack([cv2.resize(read_rgb(p), (28, 28), interpolation=cv2.INTER_LINEAR) for p in paths])
    x = torch.from_numpy((x.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        e = model(x).double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_embed_and_eval_retrieval_agree_at_28px(omniglot_folder, model_28, tmp_path):
    model, ckpt = model_28
    assert main(["embed", str(ckpt), str(omniglot_folder), "--out", str(tmp_path / "e.npy"), "--no-flip"]) == 0
    emb = np.load(tmp_path / "e.npy")
    with open(tmp_path / "e.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([r["identity"] for r in rows])
    paths = [omniglot_folder / r["path"] for r in rows]
    assert emb.shape == (CLASSES * PER_CLASS, 32)
    np.testing.assert_allclose(emb, reference_embeddings(model, paths, flip=False, size=28), atol=1e-5)

    assert main(["eval", str(ckpt), "--retrieval", str(omniglot_folder), "--no-flip",
                 "--json", str(tmp_path / "r.json")]) == 0
    (r,) = json.loads((tmp_path / "r.json").read_text())["results"].values()
    recall = recall_at_k(emb, labels, ks=(1,))[1]
    assert r["recall@1"] == recall and r["map@r"] == pytest.approx(map_at_r(emb, labels), abs=1e-6)
    assert r["queries"] == CLASSES * PER_CLASS

    old = _old_route(model, paths)
    assert np.abs(old - emb).max() > 0.05  # the two resizes do give different embeddings here
    assert recall_at_k(old, labels, ks=(1,))[1] != recall or map_at_r(old, labels) != pytest.approx(r["map@r"])
