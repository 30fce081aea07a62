import json

import pytest

from broadface.cli.main import main
from broadface.eval.verification import evaluate_pairs, lfw_pair_set
from broadface.models import build_model
from broadface.models.checkpoint import load_backbone
from tests.helpers import save_backbone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = build_model("tinycnn", embedding_size=16, input_size=112, width=4, depth=2)
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
    assert "pairs" in printed and "accuracy" in printed and (tmp_path / "plots" / "roc.png").is_file()
    report = json.loads(out.read_text())["pairs"]
    # same numbers as the API on the same checkpoint and pairs
    ps = lfw_pair_set(lfw_root / "pairs.txt", lfw_root / "aligned-112x112", "pairs").subset(40)
    api = evaluate_pairs(load_backbone(checkpoint), ps, folds=5)
    for key in ("accuracy", "accuracy_std", "val", "cosine_threshold"):
        assert report[key] == api[key]
    assert report["pairs"] == 40 and report["flip"] is True and len(report["accuracies"]) == 5
    assert "scores" not in report

    from broadface.cli._inference import read_threshold  # `broadface verify --threshold-from` reads it back
    assert read_threshold(out)[0] == pytest.approx(report["cosine_threshold"])


def test_eval_retrieval_folder_no_flip(checkpoint, tmp_path, capsys):
    rc = main(["eval", str(checkpoint), "--retrieval", str(_small_folder(tmp_path)), "--no-flip",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    (key,) = [k for k in r if k.startswith("retrieval:")]
    assert r[key]["flip"] is False and 0 <= r[key]["recall@1"] <= r[key]["recall@8"] <= 1


def _small_folder(tmp_path):
    from broadface.paths import data_root

    src = data_root() / "celeba299" / "aligned-112x112"
    dst = tmp_path / "faces"
    for c in sorted(p.name for p in src.iterdir())[:4]:
        (dst / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[:3]:
            (dst / c / f.name).symlink_to(f)
    return dst


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


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.pt"), "--lfw"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_mask_one_reports_unmasked_and_masked_rows(checkpoint, lfw_root, tmp_path, capsys):
    out = tmp_path / "masked.json"
    rc = main(["eval", str(checkpoint), "--pairs", str(lfw_root / "pairs.txt"), "--images",
               str(lfw_root / "aligned-112x112"), "--max-pairs", "20", "--folds", "2", "--batch-size", "32",
               "--mask-one", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pairs " in printed and "pairs-masked" in printed
    report = json.loads(out.read_text())
    assert report["pairs"]["masked_second_image"] is False and report["pairs-masked"]["masked_second_image"] is True
    ps = lfw_pair_set(lfw_root / "pairs.txt", lfw_root / "aligned-112x112", "pairs").subset(20)
    assert report["pairs"]["accuracy"] == evaluate_pairs(load_backbone(checkpoint), ps, folds=2)["accuracy"]
