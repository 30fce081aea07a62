"""The demo end to end: a micro configuration by default, the real ``--quick`` run as a slow test."""
import json

import pytest

from broadface.cli.main import main
from broadface.demo import DemoConfig, run_demo


def _check(summary, out):
    res = summary["results"]
    assert set(res) == {"ArcFace", "BroadFace"}
    assert res["ArcFace"]["queue_size"] == 0 and res["BroadFace"]["queue_size"] > 0
    for r in res.values():
        assert 0.0 <= r["recall@1"] <= r["recall@2"] <= r["recall@4"] <= r["recall@8"] <= 1.0
        assert 0.4 <= r["lfw_accuracy"] <= 1.0  # a k-fold threshold can't do much worse than chance
    assert json.loads((out / "results.json").read_text())["results"] == json.loads(json.dumps(res))
    for name in ("learning_curves.png", "roc_lfw.png"):
        assert (out / name).stat().st_size > 1000


def test_demo_micro(tmp_path):
    cfg = DemoConfig(output=str(tmp_path), warm_steps=3, steps=3, queue_size=64, batch_size=16, eval_every=100,
                     lfw_pairs=100, test_identities=12, input_size=28, embedding_size=32, progress=False)
    summary = run_demo(cfg)
    _check(summary, tmp_path)
    # both arms start from the same warm start and see the same data: identical first logged loss
    base, bf = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("arcface", "broadface"))
    assert base["config"]["train"]["init"] == bf["config"]["train"]["init"]


@pytest.mark.slow
def test_demo_quick_cli(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path), "--no-progress"]) == 0
    assert "BroadFace" in capsys.readouterr().out
    _check(json.loads((tmp_path / "results.json").read_text()), tmp_path)
