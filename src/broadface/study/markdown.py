"""Render docs/RESULTS.md from runs.json (tables, plots, machine, commands, wall times) + docs/study_notes.md."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from broadface.study import report
from broadface.study.runs import arms, fill_steps


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": os.getloadavg()}


def _machine_line(m: dict[str, Any], when: str = "") -> str:
    load = ", ".join(f"{x:.1f}" for x in m["load_avg"])
    return (f"machine: `nproc` = {m['nproc']}, CPU {m['cpu']}, torch {m['torch']}, Python {m['python']}; "
            f"load average {load}{when}")


def _plan(d: dict[str, Any]) -> str:
    c = d["config"]
    from broadface.study.runs import StudyConfig

    sc = StudyConfig(**c)
    fills = ", ".join(f"{q}: step {s}" for q, s in fill_steps(sc).items())
    n_arms = len(arms(sc))
    return (f"- Data: Omniglot (the real zips in the data root). Train on the 136 characters of the 5 background "
            f"alphabets (2,720 images), evaluate on the 106 characters of 3 other alphabets (2,120 images), "
            f"{c['input_size']}×{c['input_size']}, no flip.\n"
            f"- Model: `tinycnn` width {c['width']}, D = {c['embedding_size']}; ArcFace s = {c['scale']:g}, "
            f"m = {c['margin']:g}; SGD momentum 0.9, weight decay {c['weight_decay']:g}; "
            f"{c['threads']} torch thread per run.\n"
            f"- Warm start (one per seed, shared by every arm of that seed): ArcFace from scratch, "
            f"{c['warm_steps']} steps × "
            f"batch {c['batch_size']}, lr {c['warm_lr']:g} (30-step warm-up, then constant).\n"
            f"- Every arm: {c['steps']} fine-tuning steps × batch {c['batch_size']} from that warm start, "
            f"lr {c['lr']:g}, × 0.1 at "
            f"step {int(c['lr_drop_at'] * c['steps'])}, same seed ⇒ same data order; only the queue size and the "
            f"compensation differ. {n_arms} arms × {len(c['seeds'])} seeds (seeds {c['seeds']}) = "
            f"{n_arms * len(c['seeds'])} fine-tuning runs + {len(c['seeds'])} warm starts.\n"
            f"- Queue fill: {c['batch_size']} entries are pushed after each step, so the classifier sees a full "
            f"queue from — {fills}. "
            f"The training set has 2,720 images, so a queue larger than that holds several entries of the same image "
            f"(of different ages).\n"
            f"- Evaluation: Recall@K, every test image querying the other 2,119 (cosine); pair verification on "
            f"10 class-disjoint folds × (300 same + 300 different) pairs drawn with a fixed seed from the test "
            f"characters, accuracy by `broadface.metrics.kfold_accuracy` (threshold chosen on 9 folds, applied to the "
            f"10th). Learning curves: Recall@1 every {c['eval_every']} steps for queue 0 and the largest queue.\n"
            f"- Compensation error: in the largest compensated arm, at steps {c['error_steps']}, the entries of every "
            f"{c['error_stride']}th enqueue step are re-embedded by the current encoder (as the same mini-batch, in "
            f"train mode, on a copy of the encoder) and compared with e* and e⁻ (full-storage queue with sample "
            f"ids).")


def _distill_section(results: Path) -> list[str]:
    """Section 6 from the JSON that ``bench/distill.py --json`` wrote (copied to docs/distill/results.json)."""
    head = ["## 6. BigFace distillation and masked faces (bench/distill.py)", ""]
    if not results.exists():
        return head + ["(not run: `python bench/distill.py --json docs/distill/results.json`)", ""]
    r = json.loads(results.read_text())
    a, st = r["args"], r["setup"]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items()
                     if k in ("threads", "teacher_width", "teacher_steps", "student_steps", "pairs") and v is not None)
    rows = ["| model | LFW % | LFW, one image masked % | CelebA-299 Recall@1 | train s |", "|---|---|---|---:|---:|"]
    for name, m in r["results"].items():
        if "lfw" not in m:
            continue
        rows.append(f"| {name} | {100 * m['lfw']:.2f} ± {100 * m['lfw_std']:.2f} | "
                    f"{100 * m['lfw_masked']:.2f} ± {100 * m['lfw_masked_std']:.2f} | "
                    f"{m['celeba_recall@1']:.4f} | {m['train_s']:.0f} |")
    return head + [
        f"Command: `python bench/distill.py {flags}{' --no-flip' if not st['flip'] else ''}` "
        f"(one seed, {r['lfw_pairs']} LFW pairs, mask_prob {a['mask_prob']}, λ = {a['weight']}, "
        f"{a['kind']} distance; teacher iResNet width {st['teacher_width']} trained {st['teacher_steps']} steps; "
        f"students {st['student_steps']} steps; {r['torch_threads']} torch thread, shared 2-core CPU); "
        f"wall {r['wall_s']:.0f} s. Details: [distillation](distillation.md).", "", *rows, ""]


def write(d: dict[str, Any], path: Path, notes: Path, figures: list[Path]) -> None:
    runs = d["runs"]
    rel = {p.name: os.path.relpath(p, path.parent) for p in figures}
    parts = ["# Reproduction study: BroadFace on the real data here",
             "",
             "Generated by `" + d["command"] + "` (regenerate the text and plots without training: "
             "`python bench/study.py --from-json docs/study/runs.json`). Every number and plot below comes from "
             "`docs/study/runs.json`; the interpretation is in the notes at the end.",
             "",
             "- " + _machine_line(d["machine"], " at the start of the run"),
             f"- started {d['started']}, total wall time {d.get('wall_s', 0):.0f} s"
             + ("" if d.get("complete") else f" — **INCOMPLETE: {d.get('progress', '')}**"),
             f"- the machine was shared with other engineers' jobs: wall and step times are indicative only",
             "",
             "## Compute plan", "", _plan(d), "",
             "## Warm starts", "", report.warm_table(runs), "",
             "## 1. Queue-size sweep (paper Table 6a / Fig. 7a)", "",
             "Mean ± std (sample std over seeds). `train s/run` is the wall time of one fine-tuning run including its "
             "evaluations; `step ms` the mean training-step time inside it (parallel runs shared the cores).", "",
             report.sweep_table(runs), "", "Paired by seed (same warm start and batches), difference to ArcFace:", "",
             report.paired_table(runs), ""]
    if "sweep.png" in rel:
        parts += [f"![queue sweep]({rel['sweep.png']})", ""]
    parts += ["## 2. Learning curves (paper Fig. 7b)", ""]
    parts += [f"![learning curves]({rel['curves.png']})", ""] if "curves.png" in rel else ["(not run)", ""]
    parts += ["## 3. Compensation error (paper Fig. 5a)", "",
              "Mean 1 − cos between a queue entry and the current embedding of the same image, by entry age "
              "(age 0 = pushed at the last step, one optimizer update ago), pooled over seeds.", "",
              report.error_table(runs) if any(r.get("errors") for r in runs) else "(not run)", ""]
    if "compensation_error.png" in rel:
        parts += [f"![compensation error]({rel['compensation_error.png']})", ""]
    mem = d.get("memory") or []
    parts += ["## 4. Memory (paper Fig. 6)", ""]
    if mem:
        mm = d["memory_meta"]
        parts += [f"`bench/memory.py`'s child (fresh process per configuration, peak RSS of two training steps "
                  f"minus the memory before the head was built, after a 2-image warm-up), tinycnn width "
                  f"{mm['width']}, {mm['size']}×{mm['size']} inputs, C = {mm['classes']}, D = {mm['dim']}; "
                  f"wall {mm['wall_s']:.0f} s.", "", report.memory_table(mem), "",
                  f"![memory]({rel['memory.png']})" if "memory.png" in rel else "", ""]
    else:
        parts += ["(not run)", ""]
    parts += ["## 5. Overhead: step time with and without the queue", ""]
    if d.get("overhead"):
        om = d["overhead_meta"]
        parts += [f"The study's training step (tinycnn width {om['width']}, batch {om['batch']}, C = {om['classes']}, "
                  f"D = {om['dim']}, forward + backward + SGD; queue pre-filled), all sizes in one process, "
                  f"{om['rounds']} interleaved rounds × {om['steps']} timed steps, {om['threads']} thread; "
                  f"wall {om['wall_s']:.0f} s; {_machine_line(om['machine'])}.", "",
                  report.overhead_table(d["overhead"]), ""]
    else:
        parts += ["(not run)", ""]
    parts += _distill_section(path.parent / "distill" / "results.json")
    parts += ["## Wall time of every run", "", "| run | seed | queue | compensation | wall s |",
              "|---|---:|---:|---|---:|"]
    for r in sorted(runs, key=lambda r: (r["kind"] != "warm", r["seed"], r.get("queue", 0), not r.get("compensate"))):
        comp = ("yes" if r["compensate"] else "no") if r.get("queue") else "–"
        parts.append(f"| {r['kind']} | {r['seed']} | {r.get('queue', 0)} | {comp} | {r['wall_s']:.0f} |")
    parts += ["", "---", ""]
    parts += [notes.read_text().strip() if notes.exists() else "(docs/study_notes.md not written yet)", ""]
    path.write_text("\n".join(parts))
