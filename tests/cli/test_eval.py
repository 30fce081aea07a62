"""``broadface eval``: results that match the API and independent references, rows that keep their names,
the summary table, raw scores, IJB, and one-line errors."""
import csv
import json

import numpy as np
import pytest
import torch

from broadface.cli.main import main
from broadface.data.binfile import lfw_bin_images, write_bin
from broadface.data.pairs import read_lfw_pairs
from broadface.eval.verification import evaluate_pairs, lfw_pair_set
from broadface.metrics import map_at_r, recall_at_k
from broadface.models import build_model, recalibrate_batchnorm
from broadface.models.checkpoint import load_backbone
from tests.helpers import build_ijb_1n, reference_embeddings, save_backbone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("tinycnn", embedding_size=16, input_size=112, width=4, depth=2)
    recalibrate_batchnorm(model, [torch.rand(8, 3, 112, 112) * 2 - 1])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_backbone(model, path)
    return path


def test_eval_lfw_end_to_end(checkpoint, lfw_root, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["eval", str(checkpoint), "--pairs", str(lfw_root / "pairs.txt"), "--images",
               str(lfw_root / "aligned-112x112"), "--max-pairs", "40", "--folds", "5", "--batch-size", "32",
               "--json", str(out), "--plots", str(tmp_path / "plots")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model: tiny.pt (broadface, 16-d, sha256 ")
    assert "112x112 RGB, (x - 127.5) / 127.5" in printed.splitlines()[0]
    assert (tmp_path / "plots" / "roc.png").is_file()
    full = json.loads(out.read_text())
    report = full["results"]["pairs"]
    assert full["model"]["kind"] == "broadface" and full["model"]["preprocessing"]["size"] == [112, 112]
    # same numbers as the API on the same checkpoint and pairs
    ps = lfw_pair_set(lfw_root / "pairs.txt", lfw_root / "aligned-112x112", "pairs").subset(40)
    api = evaluate_pairs(load_backbone(checkpoint), ps, folds=5)
    for key in ("accuracy", "accuracy_std", "val", "cosine_threshold"):
        assert report[key] == api[key]
    assert report["pairs"] == 40 and report["flip"] is True and len(report["accuracies"]) == 5
    assert "scores" not in report and full["summary"][0]["set"] == "pairs"

    from broadface.cli._inference import read_threshold  # `broadface verify --threshold-from` reads it back
    value, where = read_threshold(out)
    assert value == pytest.approx(report["cosine_threshold"]) and where == "results.pairs.cosine_threshold"


@pytest.mark.parametrize("flip", [False, True])
def test_eval_retrieval_follows_the_flip_option(checkpoint, tmp_path, flip):
    folder = _small_folder(tmp_path)
    rc = main(["eval", str(checkpoint), "--retrieval", str(folder), "--flip" if flip else "--no-flip",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    (r,) = json.loads((tmp_path / "r.json").read_text())["results"].values()
    paths = sorted(folder.glob("*/*"))
    labels = np.array([p.parent.name for p in paths])
    model = load_backbone(checkpoint)
    expect = {f: reference_embeddings(model, paths, flip=f) for f in (False, True)}
    assert r["flip"] is flip
    assert r["recall@1"] == recall_at_k(expect[flip], labels, ks=(1,))[1]
    assert r["map@r"] == pytest.approx(map_at_r(expect[flip], labels), abs=1e-6)
    # the option matters on these images: the other setting's figures are different
    assert r["recall@1"] != recall_at_k(expect[not flip], labels, ks=(1,))[1]
    assert r["map@r"] != pytest.approx(map_at_r(expect[not flip], labels), abs=1e-4)


def _small_folder(tmp_path):
    from broadface.paths import data_root

    src = data_root() / "celeba299" / "aligned-112x112"
    dst = tmp_path / "faces"
    for c in sorted(p.name for p in src.iterdir())[:8]:
        (dst / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[:4]:
            (dst / c / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="module")
def lfw_bin(lfw_root, tmp_path_factory):
    """All 6,000 LFW View-2 pairs packed into an insightface .bin from the shared aligned images."""
    images, issame = lfw_bin_images(read_lfw_pairs(lfw_root / "pairs.txt"), lfw_root / "aligned-112x112")
    return write_bin(tmp_path_factory.mktemp("bin") / "lfw.bin", images, issame)


def test_bin_and_lfw_keep_their_rows_and_agree_pair_for_pair(checkpoint, lfw_bin, tmp_path, capsys):
    """``--lfw --bin lfw.bin``: two rows (``lfw``, ``lfw.bin``), the same score for every pair, one summary."""
    rc = main(["eval", str(checkpoint), "--lfw", "--bin", str(lfw_bin), "--max-pairs", "600", "--json",
               str(tmp_path / "r.json"), "--csv", str(tmp_path / "s.csv"), "--scores", str(tmp_path / "scores")])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["results"]) == ["lfw", "lfw.bin"]
    a, b = (np.loadtxt(tmp_path / "scores" / f, delimiter=",", skiprows=1) for f in ("lfw.csv", "lfw.bin.csv"))
    assert a.shape == (600, 3)
    np.testing.assert_array_equal(a, b)  # same pairs, same labels, same scores, pair for pair
    lfw, packed = report["results"]["lfw"], report["results"]["lfw.bin"]
    assert lfw["accuracy"] == packed["accuracy"] and lfw["images"] == 1168 and packed["images"] == 1200
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["set"] for r in rows] == ["lfw", "lfw.bin"] and float(rows[0]["accuracy"]) == lfw["accuracy"]
    summary = printed.split("summary\n", 1)[1].splitlines()
    assert summary[0].split()[:3] == ["set", "protocol", "accuracy"]
    assert [line.split()[0] for line in summary[1:3]] == ["lfw", "lfw.bin"] and summary[3].startswith("wrote")


@pytest.mark.slow
def test_bin_equals_lfw_on_all_6000_pairs(checkpoint, lfw_bin, tmp_path):
    assert main(["eval", str(checkpoint), "--lfw", "--bin", str(lfw_bin), "--scores", str(tmp_path)]) == 0
    a, b = (np.loadtxt(tmp_path / f, delimiter=",", skiprows=1) for f in ("lfw.csv", "lfw.bin.csv"))
    assert a.shape == (6000, 3)
    np.testing.assert_array_equal(a, b)


def test_ijb_both_protocols_share_the_features(checkpoint, lfw_root, tmp_path, capsys):
    build_ijb_1n(tmp_path / "ijb", lfw_root / "aligned-112x112", subjects=6, pairs=True)
    assert main(["eval", str(checkpoint), "--ijb", str(tmp_path / "ijb"), "--ijb-protocol", "both",
                 "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert list(results) == ["IJBC", "IJBC 1:N G1", "IJBC 1:N G2", "IJBC 1:N G1+G2"]
    from broadface.eval.ijb_search import evaluate_templates_1n
    from broadface.eval.templates import evaluate_templates

    model = load_backbone(checkpoint)
    one = evaluate_templates(model, tmp_path / "ijb", "IJBC")
    many = evaluate_templates_1n(model, tmp_path / "ijb", "IJBC")
    assert results["IJBC"]["tar_at_far"] == one["tar_at_far"]
    for g in ("G1", "G2", "G1+G2"):
        r = results[f"IJBC 1:N {g}"]
        assert r["protocol"] == "ijb-1:N" and r["rank1"] == many["searches"][g]["rank1"]
        assert r.get("tpir_at_fpir") == many["searches"][g].get("tpir_at_fpir")
    assert "IJBC 1:N G1+G2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "choose a benchmark"),
    (["--pairs", "x.txt"], "--pairs and --images go together"),
    (["--retrieval", "no_such_set"], "neither a folder nor a named data set"),
    (["--retrieval", "celeba299", "--mask-one"], "--mask-one applies to pair benchmarks"),
])
def test_eval_cli_errors(checkpoint, capsys, argv, message):
    assert main(["eval", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("broadface eval: error:") and message in err


def test_eval_missing_model(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.pt"), "--lfw"]) == 2
    assert "none.pt does not exist" in capsys.readouterr().err


def test_eval_mask_one_reports_unmasked_and_masked_rows(checkpoint, lfw_root, tmp_path, capsys):
    out = tmp_path / "masked.json"
    rc = main(["eval", str(checkpoint), "--pairs", str(lfw_root / "pairs.txt"), "--images",
               str(lfw_root / "aligned-112x112"), "--max-pairs", "20", "--folds", "2", "--batch-size", "32",
               "--mask-one", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pairs " in printed and "pairs-masked" in printed
    report = json.loads(out.read_text())["results"]
    assert report["pairs"]["masked_second_image"] is False and report["pairs-masked"]["masked_second_image"] is True
    ps = lfw_pair_set(lfw_root / "pairs.txt", lfw_root / "aligned-112x112", "pairs").subset(20)
    assert report["pairs"]["accuracy"] == evaluate_pairs(load_backbone(checkpoint), ps, folds=2)["accuracy"]


def test_unique_names():
    from broadface.cli.eval import unique_name

    assert unique_name({}, "lfw", "lfw.bin") == "lfw"
    assert unique_name({"lfw": 1}, "lfw", "lfw.bin", "/x/lfw.bin") == "lfw.bin"
    assert unique_name({"lfw": 1, "lfw.bin": 1, "/x/lfw.bin": 1}, "lfw", "lfw.bin", "/x/lfw.bin") == "/x/lfw.bin#2"
