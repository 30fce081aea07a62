"""Smoke test of the reproduction study's machinery (bench/study.py) on the real Omniglot zips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from broadface.paths import data_root
from broadface.study import markdown, report
from broadface.study.data import pair_protocol
from broadface.study.runs import StudyConfig, arm_run, arms, warm_start_run



def _has_omniglot() -> bool:
    try:
        return (data_root() / "omniglot").is_dir()
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _has_omniglot(), reason="needs the shared Omniglot data")


def test_pair_protocol_is_deterministic_and_class_disjoint():
    labels = np.repeat(np.arange(106), 20)
    p = pair_protocol(labels)
    assert len(p) == 6000 and p.issame.sum() == 3000
    again = pair_protocol(labels)
    assert np.array_equal(p.first, again.first) and np.array_equal(p.second, again.second)
    fold_classes = [set(labels[p.first[k * 600:(k + 1) * 600]]) | set(labels[p.second[k * 600:(k + 1) * 600]])
                    for k in range(10)]
    assert all(not (a & b) for i, a in enumerate(fold_classes) for b in fold_classes[i + 1:])
    for k in range(10):  # 300 same then 300 different, no pair twice
        s = slice(k * 600, (k + 1) * 600)
        assert p.issame[s][:300].all() and not p.issame[s][300:].any()
        assert len(set(zip(p.first[s], p.second[s]))) == 600
    assert np.array_equal(labels[p.first] == labels[p.second], p.issame)


@needs_data
def test_tiny_study_end_to_end(tmp_path):
    torch.manual_seed(0)
    sc = StudyConfig(seeds=[0], queues=[0, 96], width=8, embedding_size=16, batch_size=32, warm_steps=3,
                     steps=5, eval_every=2, error_steps=[5], error_stride=1)
    assert arms(sc) == [(0, True), (96, True), (96, False)]
    warm = warm_start_run(sc, 0, str(tmp_path / "warm.pt"))
    runs = [warm] + [arm_run(sc, 0, q, c, str(tmp_path / "warm.pt")) for q, c in arms(sc)]
    base, comp, plain = runs[1:]
    assert base["fill"] == 0 and comp["fill"] == 96 and comp["first_full_step"] == 4
    assert [s for s, _ in comp["curve"]] == [0, 2, 4, 5] == [s for s, _ in base["curve"]]
    err = comp["errors"][0]
    assert err["step"] == 5 and len(err["age"]) == 96 == len(err["compensated"]) == len(err["uncompensated"])
    assert sorted(set(err["age"])) == [0, 1, 2]  # 3 enqueue steps of 32 in a queue of 96
    assert not plain["errors"]
    for r in runs:
        assert 0 <= r["recall@1"] <= 1 and 0.4 <= r["pair_acc"] <= 1
    data = {"command": "test", "config": sc.__dict__, "machine": markdown.machine(), "started": "now",
            "runs": runs, "complete": True, "wall_s": 1.0}
    figures = report.plots(data, tmp_path / "study")
    assert {p.name for p in figures} == {"sweep.png", "curves.png", "compensation_error.png"}
    markdown.write(data, tmp_path / "RESULTS.md", tmp_path / "notes.md", figures)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "BroadFace 96, no compensation" in text and "nproc" in text
