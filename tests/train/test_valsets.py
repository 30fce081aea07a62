"""Verification sets while training (``train.val_bins``, issue 12 item 3) and ``data.test_fold``: evaluated
every ``eval_every`` steps on the model of that step, logged to eval.csv / TensorBoard / the progress line,
best and last accuracy in the summary (kept across a resume)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from broadface.data.binfile import lfw_bin_images, write_bin
from broadface.data.pairs import read_lfw_pairs
from broadface.eval.verification import bin_pair_set, evaluate_pairs
from broadface.models.checkpoint import load_backbone
from broadface.train.trainer import Trainer, train
from broadface.train.valsets import fold_subset, open_pair_sets
from tests.helpers import lfw_pairs_bin

PAIRS = 60  # pairs per .bin (tests.helpers.lfw_pairs_bin)


@pytest.fixture(scope="module")
def bins(tmp_path_factory, lfw_root) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bins")
    (tmp / "other").mkdir()
    return lfw_pairs_bin(lfw_root, tmp / "tiny.bin"), lfw_pairs_bin(lfw_root, tmp / "other" / "tiny.bin", first=100)


def reference_accuracy(checkpoint: Path, bin_path: Path) -> float:
    """The accuracy of the checkpoint's backbone, evaluated outside the trainer."""
    return evaluate_pairs(load_backbone(checkpoint), bin_pair_set(bin_path), flip=True)["accuracy"]


def test_val_bins_are_evaluated_on_the_model_of_each_step_and_logged_everywhere(tmp_path, faces, make_config,
                                                                                 bins, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    entries = f"train.val_bins=[{bins[0]}, {bins[1]}]"
    result = train(make_config(out, "train.steps=4", "train.eval_every=2", "train.tensorboard=true", entries),
                   train_set=faces, progress=True)
    names = ["tiny", str(bins[1])]  # a second set of the same name is named by its path
    assert [e["step"] for e in result.evals] == [2, 4]
    for record in result.evals:
        ckpt = out / "checkpoints" / f"step_{record['step']:07d}.pt"
        for name, path in zip(names, bins):
            assert record[f"{name}_accuracy"] == pytest.approx(reference_accuracy(ckpt, path), abs=1e-12)
            assert 0 <= record[f"{name}_accuracy_std"] < 1
    rows = list(csv.DictReader((out / "eval.csv").open()))
    assert [float(r["tiny_accuracy"]) for r in rows] == pytest.approx([e["tiny_accuracy"] for e in result.evals],
                                                                      rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())["verification"]
    for name in names:
        accs = {e["step"]: e[f"{name}_accuracy"] for e in result.evals}
        best = max(accs, key=lambda s: (accs[s], -s))  # the first step of the highest accuracy
        assert summary[name] == {"pairs": PAIRS, "best": {"step": best, "accuracy": accs[best]},
                                 "last": {"step": 4, "accuracy": accs[4]}}
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/tiny_accuracy")] == [2, 4]
    printed = capsys.readouterr().out
    assert "step 2: tiny_accuracy " in printed and "step 4: tiny_accuracy " in printed


def test_the_best_accuracy_survives_a_resume(tmp_path, faces, make_config, bins):
    out = tmp_path / "run"
    opts = ["train.eval_every=1", "train.checkpoint_every=1", f"train.val_bins=[{bins[0]}]"]
    first = train(make_config(out, "train.steps=3", *opts), train_set=faces, progress=False)
    accs = {e["step"]: e["tiny_accuracy"] for e in first.evals}
    resumed = train(make_config(out, "train.steps=4", *opts, "train.resume=auto", "train.resume_allow=[train.steps]"),
                    train_set=faces, progress=False)
    assert [e["step"] for e in resumed.evals] == [4]
    accs[4] = resumed.evals[0]["tiny_accuracy"]
    best = max(accs, key=lambda s: (accs[s], -s))
    verification = resumed.summary["verification"]["tiny"]
    assert verification["best"] == {"step": best, "accuracy": pytest.approx(accs[best], rel=1e-5)}
    assert verification["last"] == {"step": 4, "accuracy": accs[4]}


def test_val_bins_alone_need_no_validation_split(faces, make_config, bins):
    """A run with no Recall@K set still evaluates its verification sets, at the end when eval_every=0."""
    result = train(make_config(None, "train.steps=2", f"train.val_bins=[{bins[0]}]"), train_set=faces,
                   progress=False)
    assert [sorted(e) for e in result.evals] == [["step", "tiny_accuracy", "tiny_accuracy_std"]]


def test_bad_val_bins_entries_are_named(tmp_path, faces, make_config, lfw_root):
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match=rf"config train.val_bins: {missing} does not exist"):
        Trainer(make_config(None, f"train.val_bins=[{missing}]"), train_set=faces, progress=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is neither a .bin file nor an LFW-layout folder"):
        Trainer(make_config(None, f"train.val_bins=[{tmp_path / 'notes.txt'}]"), train_set=faces, progress=False)
    pairs = read_lfw_pairs(lfw_root / "pairs.txt")[:4]
    small = write_bin(tmp_path / "small.bin", *lfw_bin_images(pairs, lfw_root / "aligned-112x112"))
    with pytest.raises(ValueError, match=r"small.bin has 4 pairs, fewer than the 10 folds"):
        Trainer(make_config(None, f"train.val_bins=[{small}]"), train_set=faces, progress=False)


def test_an_lfw_layout_folder_is_a_verification_set(tmp_path, lfw_root):
    folder = tmp_path / "mylfw"
    pairs = read_lfw_pairs(lfw_root / "pairs.txt")[:300:15] + read_lfw_pairs(lfw_root / "pairs.txt")[300:600:15]
    (folder / "aligned-112x112").mkdir(parents=True)
    lines = ["1\t20"]
    for p in pairs:
        for rel in (p.path1, p.path2):
            (folder / "aligned-112x112" / rel).parent.mkdir(exist_ok=True)
            shutil.copy(lfw_root / "aligned-112x112" / rel, folder / "aligned-112x112" / rel)
        lines.append(f"{p.name1}\t{p.num1}\t{p.num2}" if p.same else f"{p.name1}\t{p.num1}\t{p.name2}\t{p.num2}")
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    (ps,) = open_pair_sets([str(folder)])
    assert ps.name == "mylfw" and len(ps) == 40 and ps.issame.sum() == 20


def test_test_fold_trains_on_the_other_folds_and_verifies_on_fold_k(lfw_root, make_config):
    """``data.name=lfw data.test_fold=3 train.val_bins=[lfw]``: the 600 pairs of fold 3, none of whose people
    is trained on."""
    cfg = make_config(None, "data.name=lfw", "data.test_fold=3", "data.val_split=null", "train.val_bins=[lfw]")
    trainer = Trainer(cfg, progress=False)
    (ps,) = trainer.valsets.sets
    assert ps.name == "lfw_fold3" and len(ps) == 600 and ps.issame.sum() == 300
    fold3 = {n for p in read_lfw_pairs(lfw_root / "pairs.txt") if p.fold == 3 for n in (p.name1, p.name2)}
    in_pairs = {Path(ps.sources[i]).parent.name for i in np.r_[ps.left, ps.right]}
    assert in_pairs == fold3 and not fold3 & set(trainer.train_set.classes)
    assert len(trainer.train_set.classes) == 5749 - len(fold3)


def test_fold_subset_interleaves_so_every_protocol_fold_has_both_kinds(lfw_root):
    (full,) = open_pair_sets(["lfw"], str(lfw_root.parent))
    sub = fold_subset(full, lfw_root / "pairs.txt", 7)
    assert len(sub) == 600 and sub.issame[0::2].all() and not sub.issame[1::2].any()
    for chunk in np.array_split(sub.issame, 10):
        assert chunk.sum() == 30
    with pytest.raises(ValueError, match=r"config data.test_fold=10: .*pairs.txt has folds 0..9"):
        fold_subset(full, lfw_root / "pairs.txt", 10)
