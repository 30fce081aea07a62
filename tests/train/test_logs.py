"""Logs: CSV files, TensorBoard events, JSON summary, callbacks, silent progress, resume truncation."""
from __future__ import annotations

import csv
import json

import pytest

from broadface.train.logs import CsvLog, IntervalMeter
from broadface.train.trainer import train


def test_run_writes_csv_tensorboard_summary_and_calls_back(tmp_path, faces, val_faces, make_config, capsys):
    seen = []
    cfg = make_config(tmp_path, "train.log_every=2", "train.eval_every=4", "head.queue_size=16",
                      "train.tensorboard=true")
    result = train(cfg, train_set=faces, val_set=val_faces, progress=False,
                   callbacks=[lambda kind, rec: seen.append((kind, rec["step"]))])
    assert seen == [("train", 2), ("train", 4), ("eval", 4), ("train", 6), ("eval", 6)]
    rows = list(csv.DictReader((tmp_path / "train.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert float(rows[-1]["batch_loss"]) == pytest.approx(result.history[-1]["batch_loss"], rel=1e-5)
    assert int(rows[-1]["queue_fill"]) == 16 and float(rows[-1]["samples_per_s"]) > 0
    evals = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert [int(r["step"]) for r in evals] == [4, 6] and "val_recall@1" in evals[0]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 6
    assert summary["eval"]["val_recall@1"] == result.evals[-1]["val_recall@1"]
    assert summary["config"]["head"]["queue_size"] == 16
    assert (tmp_path / "config.yaml").exists()
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""  # progress=False: nothing printed


def test_csv_drops_rows_after_the_resumed_step(tmp_path):
    path = tmp_path / "train.csv"
    log = CsvLog(path, ["step", "loss"], keep_until=0)
    for s in range(1, 6):
        log.write({"step": s, "loss": 1.0 / s})
    log.close()
    log = CsvLog(path, ["step", "loss"], keep_until=3)  # resumed from the step-3 checkpoint
    log.write({"step": 4, "loss": 0.0})
    log.close()
    assert [r["step"] for r in csv.DictReader(path.open())] == ["1", "2", "3", "4"]


def test_interval_meter_averages_losses():
    m = IntervalMeter()
    m.add({"batch_loss": 1.0, "union_loss": 3.0, "lr": 0.1}, samples=8, seconds=0.5)
    m.add({"batch_loss": 2.0, "union_loss": 5.0, "lr": 0.2}, samples=8, seconds=0.5)
    out = m.flush()
    assert out == {"batch_loss": 1.5, "union_loss": 4.0, "lr": 0.2, "samples_per_s": 16.0, "interval_steps": 2}
