"""The demo end to end: a micro configuration by default, the real ``--quick`` run as a slow test."""
import csv
import json

import numpy as np
import pytest

from broadface.cli.main import main
from broadface.demo import DemoConfig, run_demo

MICRO = dict(seeds=[0, 1], omniglot_steps=6, omniglot_queue=64, omniglot_batch=16, omniglot_classes=40,
             omniglot_test_classes=30, omniglot_width=8, omniglot_dim=16, curve_points=2, warm_steps=3, steps=3,
             queue_size=64, batch_size=16, eval_every=100, lfw_pairs=100, test_identities=12, model="tinycnn",
             input_size=28, embedding_size=32, progress=False)


def _check(summary, out):
    om = summary["omniglot"]
    assert set(om["arms"]) == {"ArcFace", "BroadFace"}
    assert om["arms"]["ArcFace"]["queue"] == 0 and om["arms"]["BroadFace"]["queue"] > 0
    seeds = [str(s) for s in om["seeds"]]
    for arm in om["arms"].values():
        assert sorted(arm["runs"]) == sorted(seeds)
        for r in arm["runs"].values():
            assert 0.0 <= r["recall@1"] <= r["recall@2"] <= r["recall@4"] <= r["recall@8"] <= 1.0
    # the paired difference is the mean over seeds of BroadFace − ArcFace (recomputed here)
    diffs = [om["arms"]["BroadFace"]["runs"][s]["recall@1"] - om["arms"]["ArcFace"]["runs"][s]["recall@1"]
             for s in seeds]
    d = om["paired_difference"]["recall@1"]
    assert d["diffs"] == pytest.approx(diffs) and d["mean"] == pytest.approx(np.mean(diffs))
    assert d["std"] == pytest.approx(np.std(diffs, ddof=1)) and d["se"] == pytest.approx(d["std"] / np.sqrt(2))
    # paired seeds: same initialisation and first batch in both arms, and an empty queue at step 1,
    # so the first mini-batch loss of a seed is the same in both arms (a different seed would change it)
    for s in seeds:
        first = [om["arms"][a]["runs"][s]["losses"][0] for a in ("ArcFace", "BroadFace")]
        assert first[0][0] == first[1][0] == 1 and first[0][1] == pytest.approx(first[1][1], rel=1e-6)
    assert len({om["arms"]["ArcFace"]["runs"][s]["losses"][0][1] for s in seeds}) == len(seeds)  # seeds differ
    fa = summary["faces"]["arms"]
    for r in fa.values():
        assert 0.0 <= r["recall@1"] <= r["recall@8"] <= 1.0
    rows = {a: next(csv.DictReader((out / "faces" / a / "train.csv").open())) for a in ("arcface", "broadface")}
    assert rows["arcface"]["step"] == rows["broadface"]["step"] == "1"
    assert float(rows["arcface"]["batch_loss"]) == pytest.approx(float(rows["broadface"]["batch_loss"]), rel=1e-5)
    saved = json.loads((out / "results.json").read_text())
    assert saved["omniglot"]["paired_difference"] == json.loads(json.dumps(om["paired_difference"]))
    for name in ("learning_curves_omniglot.png", "learning_curves_faces.png", "roc_lfw.png"):
        assert (out / name).stat().st_size > 1000


def test_demo_micro(tmp_path, root, capsys):
    summary = run_demo(DemoConfig(output=str(tmp_path), **MICRO))
    _check(summary, tmp_path)
    table = capsys.readouterr().out
    assert "paired BroadFace − ArcFace, Recall@1" in table and "Omniglot: 40 classes" in table


def test_many_class_runs_in_parallel_processes_equal_the_same_runs_one_at_a_time(tmp_path, root):
    """Two workers of one thread each give every (arm, seed) the record one-thread runs in turn give."""
    kw = {**MICRO, "faces": False, "curve_points": 0}
    par = run_demo(DemoConfig(output=str(tmp_path / "par"), threads=2, workers=2, **kw))["omniglot"]
    seq = run_demo(DemoConfig(output=str(tmp_path / "seq"), threads=1, workers=1, **kw))["omniglot"]
    for arm in ("ArcFace", "BroadFace"):
        for seed in ("0", "1"):
            a, b = par["arms"][arm]["runs"][seed], seq["arms"][arm]["runs"][seed]
            assert (a["recall@1"], a["losses"]) == (b["recall@1"], b["losses"]), (arm, seed)
    assert par["paired_difference"] == seq["paired_difference"]


def test_the_study_can_take_the_demos_runs_as_its_sweep_arms(tmp_path, root):
    """A demo arm imported into the study re-runs from its reconstructed spec to the same Recall@1."""
    from broadface.demo import study_records
    from broadface.study.runs import RunSpec, run

    summary = run_demo(DemoConfig(output=str(tmp_path), threads=1, workers=1, faces=False, **{**MICRO, "seeds": [1]}))
    records = study_records(summary, source="results.json")
    assert {(r["spec"]["queue"], r["spec"]["seed"], r["spec"]["part"]) for r in records} == {(0, 1, "sweep"),
                                                                                          (64, 1, "sweep")}
    broad = next(r for r in records if r["spec"]["queue"])
    assert broad["recall@1"] == run(RunSpec.from_dict(broad["spec"]), threads=1)["recall@1"]


def test_demo_refuses_to_overwrite_an_earlier_demo(tmp_path, root, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert main(["demo", "--quick", "--output", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "results.json" in err and "Traceback" not in err
    assert (tmp_path / "results.json").read_text() == "{}"
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--output", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_cli(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path), "--no-progress"]) == 0
    assert "paired BroadFace − ArcFace" in capsys.readouterr().out
    _check(json.loads((tmp_path / "results.json").read_text()), tmp_path)
