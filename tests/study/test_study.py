"""The study's machinery (bench/study.py) in micro form on the real Omniglot zips."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from broadface.study import markdown, report
from broadface.study.data import MemorySet, class_subset
from broadface.study.plan import StudyConfig, plan
from broadface.study.runs import RunSpec, run


def test_plan_pairs_every_arm_with_a_queue_zero_arm_of_the_same_seed():
    specs = plan(StudyConfig())
    assert len({s.key() for s in specs}) == len(specs)  # no run twice
    sweep = [s for s in specs if s.part == "sweep"]
    assert {(s.queue, s.compensate) for s in sweep} == {(0, True)} | {
        (q, c) for q in (1024, 4096, 8192, 16384, 32768) for c in (True, False)}
    assert {s.seed for s in specs} == {0, 1, 2}
    by_pair = {}
    for s in specs:  # the union part pairs arms that differ in their head settings too
        by_pair.setdefault(s.pair_key(("head",) if s.part == "union" else ()), []).append(s)
    for arms in by_pair.values():  # each pair key: one queue-0 arm and arms that differ only in the queue
        assert sum(a.queue == 0 for a in arms) == 1
        assert len({(a.seed, a.batch, a.classes, a.rotations, a.lr, a.steps, a.warm_steps) for a in arms}) == 1
    regime = {(s.classes, s.rotations, s.batch) for s in specs if s.part == "regime"}
    assert regime == {(c, r, b) for c, r in ((136, 1), (482, 1), (None, 1), (None, 4)) for b in (32, 128, 512)}
    warm = [s for s in specs if s.part == "warm"]
    assert warm and all(s.warm() == warm[0].warm() for s in warm if s.seed == warm[0].seed)


def test_class_subset_keeps_every_kth_class_with_all_its_images():
    labels = torch.arange(10).repeat_interleave(3)
    data = MemorySet(torch.arange(30.0)[:, None], labels, [f"c{i}" for i in range(10)])
    sub = class_subset(data, 4)  # k = 10 // 4 = 2: classes 0, 2, 4, 6
    assert sub.classes == ["c0", "c2", "c4", "c6"] and sub.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert sub.images[:, 0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20]
    assert class_subset(data, None) is data
    with pytest.raises(ValueError, match="num_classes"):
        class_subset(data, 11)


def test_expected_classes_per_batch_matches_sampling():
    counts = np.full(50, 20)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(50), 20)
    sampled = np.mean([len(np.unique(rng.choice(labels, 32, replace=False))) for _ in range(4000)])
    assert report.expected_classes_per_batch(counts, 32) == pytest.approx(sampled, abs=0.1)
    assert report.expected_classes_per_batch(counts, 1) == pytest.approx(1.0)


def test_micro_study_end_to_end(tmp_path, root):
    """Two paired arms and a warm start on the real data, then the report renders from the JSON alone."""
    base = RunSpec(part="sweep", seed=0, classes=40, test_classes=30, batch=16, steps=6, width=8, dim=16, eval_every=3,
                   error_steps=(6,), error_stride=1)
    arms = [replace(base, eval_every=0, error_steps=()), replace(base, queue=64),
            replace(base, queue=64, compensate=False, eval_every=0, error_steps=())]
    runs = [run(s) for s in arms]
    plain, comp, nocomp = runs
    assert plain["fill"] == 0 and comp["fill"] == 64 and comp["num_classes"] == 40
    assert plain["threads"] == 1 and 0 < plain["step_ms_median"] <= 1000 * plain["train_s"]
    err = comp["errors"][0]
    assert err["step"] == 6 and len(err["age"]) == 64 == len(err["compensated"]) == len(err["uncompensated"])
    assert sorted(set(err["age"])) == [0, 1, 2, 3]  # 4 enqueue steps of 16 in a queue of 64
    assert [s for s, _ in comp["curve"]] == [0, 3, 6]
    assert not nocomp["errors"] and not nocomp["curve"]
    # paired: same seed, initialisation and first batch, and an empty queue at step 1 -> the same first loss
    assert plain["losses"][0][0] == comp["losses"][0][0] == 1
    assert comp["losses"][0][1] == pytest.approx(plain["losses"][0][1], rel=1e-6)
    g = report.gain(runs, "sweep", report._base_key(arms[1]), 64, True)
    assert g.n == 1 and g.mean == pytest.approx(comp["recall@1"] - plain["recall@1"])
    warm_spec = replace(base, part="warm", queue=64, warm_steps=3, eval_every=0, error_steps=())
    warm_path = tmp_path / "warm.pt"
    run(warm_spec.warm(), save=str(warm_path))
    warm_arm = run(warm_spec, init=str(warm_path))
    assert warm_arm["fill"] == 64
    data = {"command": "test", "config": asdict(StudyConfig()),
            "machine": markdown.machine(), "runs": runs + [warm_arm], "step_times": [], "memory": []}
    markdown.render(json.loads(json.dumps(data)), tmp_path / "study", tmp_path / "RESULTS.md")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "BroadFace 64, no compensation" in text and "(n=1)" in text
    assert (tmp_path / "study" / "sweep.png").stat().st_size > 1000


def test_margin_and_union_parts_pair_what_they_compare():
    specs = plan(StudyConfig())
    margins = [s for s in specs if s.part == "margins" and s.seed == 0]
    assert {(s.loss, s.queue) for s in margins} == {(loss, q) for loss in ("arcface", "cosface", "adaface", "magface",
                                                                         "curricularface", "subcenter")
                                                    for q in (0, 8192)}
    union = [s for s in specs if s.part == "union" and s.seed == 0]
    assert {(s.rotations, s.queue, s.head) for s in union} == {
        (1, 0, ()), (1, 8192, ()), (1, 8192, (("union_dtype", "bfloat16"),)),
        (4, 0, ()), (4, 1024, ()), (4, 1024, (("sample_rate", 0.3),)), (4, 1024, (("sample_rate", 0.1),))}
    groups = {s.pair_key(("head",)) for s in union}
    assert len(groups) == 2 and len({s.pair_key() for s in union}) == 5  # head settings split the plain pair key


def _fake(spec, r1, step_ms=10.0, classes=964):
    return {"spec": asdict(spec), "key": spec.key(), "recall@1": r1, "recall@8": r1, "step_ms": step_ms,
            "num_classes": classes, "fill": spec.queue, "curve": [], "errors": [], "losses": []}


def test_arm_table_pairs_compensation_against_no_compensation_by_seed():
    """Table 6a's ablation: the compensated arm against the uncompensated one of the same seed and queue."""
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.03), (2, -0.02)):
        base = RunSpec(part="warm", seed=seed)
        runs += [_fake(base, 0.70 + shift), _fake(replace(base, queue=8192), 0.72 + shift + 0.01 * seed),
                 _fake(replace(base, queue=8192, compensate=False), 0.69 + shift)]
    group = report._base_key(RunSpec(part="warm", seed=0))
    d = report.compensation_gain(runs, "warm", group, 8192)
    assert d.n == 3 and d.mean == pytest.approx(0.04) and d.se == pytest.approx(0.01 / 3 ** 0.5)
    assert report.compensation_gain(runs, "warm", group, 0) is None
    table = markdown.arm_table({"runs": runs, "config": asdict(StudyConfig())}, "warm")
    row = next(line for line in table.splitlines() if line.startswith("| BroadFace 8192 |"))
    assert row.split(" | ")[4:6] == ["+3.00 ± 0.58 (n=3)", "+4.00 ± 0.58 (n=3)"]
    raw = next(line for line in table.splitlines() if line.startswith("| BroadFace 8192, no compensation |"))
    assert raw.split(" | ")[5] == "–"


def test_union_and_margin_tables_pair_by_seed():
    """Paired Δ of each union setting against the fp32 union of the same queue, and of each margin's queue arm."""
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        base = RunSpec(part="union", seed=seed)
        bf16 = (("union_dtype", "bfloat16"),)
        runs += [_fake(base, 0.70 + shift), _fake(replace(base, queue=8192), 0.74 + shift, 20.0),
                 _fake(replace(base, queue=8192, head=bf16), 0.73 + shift + 0.01 * seed, 14.0)]
        m = RunSpec(part="margins", seed=seed, loss="adaface")
        runs += [_fake(m, 0.60 + shift, 10.0), _fake(replace(m, queue=8192), 0.65 + shift, 30.0)]
    group = report._base_key(RunSpec(part="union", seed=0), ("head",))
    d = report.head_gain(runs, "union", group, 8192, (("union_dtype", "bfloat16"),), 8192)
    assert d.n == 2 and d.mean == pytest.approx(-0.005) and d.se == pytest.approx(0.005)
    assert report.head_gain(runs, "union", group, 8192, (), 0).mean == pytest.approx(0.04)
    data = {"runs": runs, "config": asdict(StudyConfig())}
    table = markdown.union_table(data)
    assert "| 964 | BroadFace 8192, bfloat16 union | 2 | 0.7450 ± 0.0212 | -0.50 ± 0.50 (n=2) | +3.50 ± 0.50 (n=2) " \
           "| 0.70× |" in table
    assert "| AdaFace | 2 | 0.6100 ± 0.0141 | 0.6600 ± 0.0141 | 8192 | +5.00 ± 0.00 (n=2) | no | 3.00× |" \
           in markdown.margin_table(data)


def test_a_run_planned_by_two_parts_is_trained_once_at_one_thread_count():
    path = Path(__file__).resolve().parents[2] / "bench" / "study.py"
    spec = importlib.util.spec_from_file_location("study_cli", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    margins = RunSpec(part="margins", seed=0, queue=8192)
    data = {"runs": [{**_fake(margins, 0.7), "threads": 1}, _fake(RunSpec(part="margins", seed=1), 0.6)]}
    union = [replace(margins, part="union"), replace(margins, part="union", seed=1, queue=0),
             replace(margins, part="union", head=(("union_dtype", "bfloat16"),))]
    assert study.reuse(union, data, threads=2) == union  # another thread count: trained again
    assert study.reuse(union, data, threads=1) == union[1:]  # seed 1's record has no thread count: trained again
    copy = data["runs"][-1]
    assert copy["key"] == union[0].key() and copy["spec"]["part"] == "union" and copy["same_as"] == "margins"
    assert copy["recall@1"] == 0.7 and len(data["runs"]) == 3


def test_step_ratio_takes_the_median_step_when_both_runs_have_it():
    arm, base = {0: {"step_ms": 30.0, "step_ms_median": 20.0}}, {0: {"step_ms": 10.0, "step_ms_median": 10.0}}
    assert report.step_ratio(arm, base) == pytest.approx(2.0)
    del base[0]["step_ms_median"]
    assert report.step_ratio(arm, base) == pytest.approx(3.0)


def test_regime_table_costs_each_cell_from_its_runs_when_no_side_by_side_timing_exists():
    """Without a `step_times` measurement the cell's step ratio and gain per extra step-second come from the
    paired runs' own step times; a measured row takes precedence."""
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.01)):
        base = RunSpec(part="regime", seed=seed, batch=32, classes=136)
        runs += [_fake(base, 0.50 + shift, 10.0, classes=136),
                 _fake(replace(base, queue=8192), 0.53 + shift + 0.01 * seed, 25.0, classes=136)]
    (cell,) = report.regime_cells(runs)
    assert cell["step_ratio"] == pytest.approx(2.5) and cell["extra_step_ms"] == pytest.approx(15.0)
    data = {"runs": runs, "config": asdict(StudyConfig())}
    # gain +3.5 points (n=2) over 15 ms extra per step: 3.5 / 0.015 = +233.3 points per extra step-second
    row = next(line for line in markdown.regime_table(data).splitlines() if line.startswith("| 136 | 32 |"))
    assert "| +3.50 ± 0.50 (n=2) |" in row and row.endswith("| 2.50× ‡ | +233.3 |")
    assert "‡ no side-by-side timing" in markdown.regime_table(data)
    data["step_times"] = [{"classes": 136, "batch": 32, "queue": q, "step_ms": ms, "vs_q0": ms / 10.0}
                          for q, ms in ((0, 10.0), (8192, 30.0))]
    row = next(line for line in markdown.regime_table(data).splitlines() if line.startswith("| 136 | 32 |"))
    assert row.endswith("| 3.00× | +175.0 |") and "‡" not in markdown.regime_table(data)


def test_peak_rss_counts_what_the_measured_code_holds_not_the_process_peak_before_it():
    """The step memory of the cost columns: a 100 MB tensor reads ~100 MB right after the process held 400 MB,
    and a study step's reading (each configuration in a fresh process) grows with its queue (32k entries and
    the union's chunk buffers: ~100 MB here; 8k is within the allocator's noise)."""
    from broadface.study.costs import CostConfig, peak_memory, peak_rss_mb

    big = torch.ones(100_000_000)  # 400 MB, then freed: the process's peak so far
    del big
    peak, step, reset = peak_rss_mb(lambda: torch.ones(25_000_000).add_(1))
    if not reset:
        pytest.skip("no /proc/self/clear_refs here")
    assert 80 < step < 250, step
    q0, q32k = peak_memory([CostConfig(964, 128, 0), CostConfig(964, 128, 32768)])
    assert q32k["step_mb"] > q0["step_mb"] + 50 and q0["step_mb"] > 0


def test_faces_section_pairs_the_arms_by_seed(tmp_path):
    """The faces table of RESULTS pairs bench/faces.py's arms seed by seed and says so when nothing ran."""
    assert "not run" in "\n".join(markdown._faces_section(tmp_path / "none"))
    runs = [{"seed": s, "queue": q, "train_s": 10.0 + q / 1000, "classes": 149, "images": 3214, "lfw_pairs": 6000,
             "recall@1": r1, "recall@8": 0.9, "lfw_accuracy": acc}
            for s, q, r1, acc in [(0, 0, 0.50, 0.80), (0, 2048, 0.53, 0.81), (1, 0, 0.40, 0.79),
                                  (1, 2048, 0.41, 0.79), (2, 2048, 0.9, 0.9)]]  # seed 2 has no pair
    args = {"setting": "celeba", "queue": 2048, "batch": 16, "steps": 1500, "lr": 0.1, "size": 56, "scale": 32.0,
            "margin": 0.3}
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "celeba.json").write_text(json.dumps({"args": args, "runs": runs}))
    text = "\n".join(markdown._faces_section(tmp_path / "faces"))
    assert "paired Δ Recall@1, BroadFace − ArcFace: +2.00 ± 1.00 points over seeds [0, 1] (+3.00, +1.00)" in text
    assert "paired Δ LFW accuracy, BroadFace − ArcFace: +0.50 ± 0.50 points" in text
    assert "| BroadFace 2048 | 3 |" in text and "149 training identities, 3214 images, batch 16" in text
