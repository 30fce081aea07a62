"""Render docs/RESULTS.md and docs/study/*.png from the study's runs.json (no number is typed in here)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from broadface.fileio import atomic_write_text
from broadface.study import report
from broadface.study.runs import RunSpec


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def _arm(q: int, c: bool) -> str:
    return "ArcFace (queue 0)" if q == 0 else f"BroadFace {q}" + ("" if c else ", no compensation")


def arm_table(data: dict, part: str) -> str:
    """One row per arm of a part: Recall@1/8 over seeds, paired gains (over queue 0; a compensated arm also
    over the uncompensated one at its queue), cost."""
    runs = data["runs"]
    rows = ["| arm | seeds | Recall@1 | Recall@8 | paired Δ Recall@1, points | Δ vs no compensation, points "
            "| step time vs queue 0 | step MB |", "|---|---:|---|---|---|---|---:|---:|"]
    a = report.arms(runs, part)
    from_runs = False
    for (g, q, c), by_seed in sorted(a.items(), key=lambda kv: (kv[0][1], not kv[0][2])):
        r0 = next(iter(by_seed.values()))
        s = RunSpec.from_dict(r0["spec"])
        cost = report.cost_of(data, int(r0["num_classes"]), s.batch, q)
        gain = "–" if q == 0 else report.fmt_gain(report.gain(runs, part, g, q, c))
        vs_raw = report.fmt_gain(report.compensation_gain(runs, part, g, q)) if c else "–"
        ratio = f"{cost['vs_q0']:.2f}×" if "vs_q0" in cost else "–"
        if "vs_q0" not in cost and q and (own := report.step_ratio(by_seed, a.get((g, 0, True), {}))) is not None:
            ratio, from_runs = f"{own:.2f}× ‡", True
        mb = f"{cost['step_mb']:.0f}" if "step_mb" in cost else "–"
        dagger = " †" if any("source" in r for r in by_seed.values()) else ""
        rows.append(f"| {_arm(q, c)}{dagger} | {len(by_seed)} "
                    f"| {report.mean_sd([r['recall@1'] for r in by_seed.values()])} "
                    f"| {report.mean_sd([r['recall@8'] for r in by_seed.values()])} | {gain} | {vs_raw} | {ratio} "
                    f"| {mb} |")
    return "\n".join(rows + ([FROM_RUNS] if from_runs else []))


FROM_RUNS = ("\n‡ no side-by-side timing of this configuration: the mean over seeds of the paired runs' median "
             "step times.")


LOSS_NAMES = {"arcface": "ArcFace", "cosface": "CosFace", "adaface": "AdaFace", "magface": "MagFace",
              "curricularface": "CurricularFace", "subcenter": "sub-center ArcFace (K = 3)"}


def margin_table(data: dict, part: str = "margins") -> str:
    """One row per margin: Recall@1 without and with the queue, the paired gain, the step-time ratio."""
    runs = data["runs"]
    rows = ["| margin | seeds | Recall@1, queue 0 | Recall@1, queue Q | Q | paired Δ Recall@1, points | > 2 SE "
            "| step time, queue / none |", "|---|---:|---|---|---:|---|:---:|---:|"]
    a = report.arms(runs, part)
    groups = {g: RunSpec.from_dict(next(iter(v.values()))["spec"]).loss for (g, q, _), v in a.items() if q == 0}
    order = list(LOSS_NAMES)
    for g, loss in sorted(groups.items(), key=lambda kv: order.index(kv[1]) if kv[1] in order else len(order)):
        base = a[(g, 0, True)]
        for (gg, q, c), arm in sorted(a.items(), key=lambda kv: kv[0][1]):
            if gg != g or q == 0:
                continue
            d = report.gain(runs, part, g, q, c)
            ratio = report.step_ratio(arm, base)
            rows.append(f"| {LOSS_NAMES.get(loss, loss)} | {len(set(arm) & set(base))} "
                        f"| {report.mean_sd([r['recall@1'] for r in base.values()])} "
                        f"| {report.mean_sd([r['recall@1'] for r in arm.values()])} | {q} | {report.fmt_gain(d)} "
                        f"| {'yes' if d is not None and d.significant() else 'no'} "
                        f"| {'–' if ratio is None else f'{ratio:.2f}×'} |")
    return "\n".join(rows)


def _union_arm(q: int, head: tuple) -> str:
    if q == 0:
        return "ArcFace (queue 0)"
    opts = dict(head)
    what = [f"{opts['union_dtype']} union" if "union_dtype" in opts else "",
            f"sampled {opts['sample_rate']:g}" if "sample_rate" in opts else ""]
    return f"BroadFace {q}, " + (", ".join(w for w in what if w) or "fp32 union")


def union_table(data: dict, part: str = "union") -> str:
    """One row per arm: Recall@1, paired Δ against the fp32 union of the same queue and against queue 0,
    the step-time ratio against the fp32 union (each run's own timing)."""
    runs = data["runs"]
    rows = ["| training classes | arm | seeds | Recall@1 | Δ vs fp32 union, points | Δ vs queue 0, points "
            "| step time vs fp32 union |", "|---:|---|---:|---|---|---|---:|"]
    a = report.head_arms(runs, part)
    def order(kv):  # within a group: by queue, then fp32 before bf16, then the sample rate falling
        (g, q, head), opts = kv[0], dict(kv[0][2])
        return g, q, opts.get("union_dtype", ""), -opts.get("sample_rate", 1.0)

    for (g, q, head), arm in sorted(a.items(), key=order):
        classes = next(iter(arm.values()))["num_classes"]
        fp32 = a.get((g, q, ()))
        vs32 = "–" if q == 0 or not head else report.fmt_gain(report.head_gain(runs, part, g, q, head, q))
        vs0 = "–" if q == 0 else report.fmt_gain(report.head_gain(runs, part, g, q, head, 0))
        ratio = report.step_ratio(arm, fp32) if fp32 and q else None
        rows.append(f"| {classes} | {_union_arm(q, head)} | {len(arm)} "
                    f"| {report.mean_sd([r['recall@1'] for r in arm.values()])} | {vs32} | {vs0} "
                    f"| {'–' if ratio is None else f'{ratio:.2f}×'} |")
    return "\n".join(rows)


def regime_table(data: dict) -> str:
    rows = ["| training classes | batch | distinct classes per batch (share of all) | ArcFace Recall@1 "
            "| BroadFace Recall@1 | paired Δ, points | > 2 SE | step time vs queue 0 "
            "| Δ points per extra step-second |",
            "|---:|---:|---|---|---|---|:---:|---:|---:|"]
    from_runs = False
    for c in report.regime_cells(data["runs"]):
        # the step-time cost: the side-by-side measurement where one was made, else the runs' own median steps
        cost = report.cost_of(data, c["classes"], c["batch"], c["queue"])
        base = report.cost_of(data, c["classes"], c["batch"], 0)
        measured = "step_ms" in cost and "step_ms" in base
        if measured:
            vs_q0, extra = cost["vs_q0"], cost["step_ms"] - base["step_ms"]
        else:
            vs_q0, extra = c["step_ratio"], c["extra_step_ms"]
            from_runs = from_runs or vs_q0 is not None
        g = c["gain"]
        per_s = "–"
        if g is not None and vs_q0 is not None and vs_q0 > 1.05:
            per_s = f"{100 * g.mean / (extra / 1000):+.1f}"
        name = f"{c['classes']}" + (" (964 × 4 rotations)" if c["rotations"] == 4 else "")
        ratio = "–" if vs_q0 is None else f"{vs_q0:.2f}×" + ("" if measured else " ‡")
        rows.append(f"| {name} | {c['batch']} | {c['classes_per_batch']:.0f} ({100 * c['coverage']:.1f} %) "
                    f"| {report.mean_sd(c['arcface'])} | {report.mean_sd(c['broadface'])} | {report.fmt_gain(g)} "
                    f"| {'yes' if g is not None and g.significant() else 'no'} | {ratio} | {per_s} |")
    return "\n".join(rows + ([FROM_RUNS] if from_runs else []))


def error_table(runs: list[dict], part: str) -> str:
    rows = ["| measured after step (lr) | entry age, steps | entries | 1 − cos, compensated e* "
            "| 1 − cos, uncompensated e⁻ | e⁻ / e* |", "|---|---|---:|---:|---:|---:|"]
    for b in report.error_bins(runs, part):
        ratio = b["uncompensated"] / b["compensated"] if b["compensated"] > 0 else float("nan")
        rows.append(f"| {b['step']} ({b['lr']:g}) | {b['age_lo']}–{b['age_hi']} | {b['entries']} "
                    f"| {b['compensated']:.4f} | {b['uncompensated']:.4f} | {ratio:.2f} |")
    return "\n".join(rows)


def fig6_table(rows: list[dict]) -> str:
    plain = {r["referenced"]: r["step_mb"] for r in rows if r["kind"] == "plain"}
    out = ["| instances referenced N | plain: batch N, step MB | BroadFace: batch b + queue N − b | step MB "
           "| BroadFace / plain |", "|---:|---:|---|---:|---:|"]
    for n in sorted(plain):
        bf = [r for r in rows if r["kind"] == "broadface" and r["referenced"] == n]
        cell = (f"{bf[0]['batch']} + {bf[0]['queue']} | {bf[0]['step_mb']:.0f} | {bf[0]['step_mb'] / plain[n]:.2f}"
                if bf else "– (N = b) | – | –")
        out.append(f"| {n} | {plain[n]:.0f} | {cell} |")
    return "\n".join(out)


def _setup_lines(data: dict) -> list[str]:
    c = data["config"]
    b = c["base"]
    return [
        f"- Data: full Omniglot, the standard split: train on the 964 characters of the 30 background alphabets "
        f"(19,280 images; the regime map also uses every k-th class, and the 3,856 rotation classes), evaluate "
        f"on the 659 characters of the 20 evaluation alphabets (13,180 images, never trained on), "
        f"{b['size']}×{b['size']}, no flip.",
        f"- Model: `tinycnn` width {b['width']}, D = {b['dim']}; {b['loss']} s = {b['scale']:g}, m = {b['margin']:g}; "
        f"SGD momentum 0.9, weight decay {b['weight_decay']:g}; lr × 0.1 at {int(100 * b['drop_at'])} % of the steps; "
        f"torch threads per run as each command above says (`--threads`, default 1; the demo's runs: 2).",
        "- Metric: Recall@K, every evaluation image querying the other 13,179 (cosine, no flip).",
        f"- Pairs: the arms of a seed share initialisation and data order (and the warm start), so every gain is "
        f"the mean over the seeds of the pair ({sorted({r['spec']['seed'] for r in data['runs']})} in this report; "
        "each table gives n) of the per-seed difference, ± its standard error.",
        "- Cost: `step time vs queue 0` is the training step (forward, backward, SGD; the queue full) of that "
        "configuration against the same configuration without a queue, timed side by side in one process "
        "(interleaved rounds, median); `step MB` the peak memory of a step in a fresh process.",
    ]


def render(data: dict, out_dir: Path, results: Path) -> None:
    runs = data["runs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    c = data["config"]
    figs = {
        "sweep": report.plot_sweep(runs, "sweep", out_dir / "sweep.png",
                                   f"From scratch, 964 classes, batch 128, {c['steps']} steps"),
        "warm": report.plot_sweep(runs, "warm", out_dir / "sweep_warm.png",
                                  f"From a warm start ({c['warm_steps']} steps), {c['warm_arm_steps']} steps"),
        "curves": report.plot_curves(runs, "sweep", out_dir / "curves.png"),
        "errors": report.plot_errors(runs, ["sweep", "drift"], out_dir / "compensation_error.png"),
        "regime": report.plot_regime(report.regime_cells(runs), out_dir / "regime.png"),
        "fig6": report.plot_fig6(data.get("fig6") or [], out_dir / "memory.png"),
    }
    rel = {k: os.path.relpath(p, results.parent) for k, p in figs.items() if p is not None}
    img = lambda k, alt: [f"![{alt}]({rel[k]})", ""] if k in rel else []  # noqa: E731
    parts = _header(data)
    parts += ["## 1. Queue-size sweep from scratch (cf. paper Table 6a, Fig. 7)", "",
              f"964 classes, batch 128 (a batch shows ~13 % of the classes), {c['steps']} steps, "
              f"lr {c['base']['lr']:g}.",
              "", arm_table(data, "sweep"), "", *_sources(runs), *img("sweep", "queue sweep"),
              *img("curves", "learning curves")]
    parts += ["## 2. From a warm start", ""] + _unless_run(runs, "warm", [
              f"Each seed's arms start from one ArcFace model trained {c['warm_steps']} steps without a queue "
              f"(lr {c['base']['warm_lr']:g}), then train {c['warm_arm_steps']} more steps at lr "
              f"{c['base']['lr']:g} (× 0.1 at 80 %). Why this schedule: the queue is filled from an encoder whose "
              "embeddings already mean something (the paper's reason for its warm start), every arm has the "
              "sweep's budget of steps in all, and the queue acts for most of it at a learning rate where W still "
              "moves; at a tenth of it (the fine-tune below) W stays near the warm start.", "",
              arm_table(data, "warm"), "", *img("warm", "warm-start sweep")])
    parts += _unless_run(runs, "finetune", [
        f"Fine-tuned instead, from the same warm start at lr {c['finetune_lr']:g} (× 0.1 at 80 %):", "",
        arm_table(data, "finetune"), ""])
    parts += ["## 3. Regime map: when does the queue pay?", ""] + _unless_run(runs, "regime", [
              f"Queue {c['regime_queue']} against none, {c['regime_steps']} steps at every batch size, over the "
              "number of training classes and the batch. `distinct classes per batch` is the expected number of "
              "classes a batch shows (hypergeometric, 20 images per class); `Δ points per extra step-second` "
              "divides the gain by the extra time per step the queue costs.", "",
              regime_table(data), "", *img("regime", "regime map")])
    parts += ["## 4. Drift and compensation (cf. paper Fig. 5a, Table 6a)", ""] + _unless_run(runs, "drift", [
              f"Large drift: the sweep at lr {c['base']['lr']:g} and the same runs at lr {c['drift_lr']:g}.", "",
              arm_table(data, "drift"), ""]) + [
              "Compensation error: mean 1 − cos between a queued entry and the current embedding of the same "
              "image, by entry age, pooled over seeds (largest compensated queue; the samples of one enqueue step "
              "are re-embedded together in train mode on a copy of the encoder).", "",
              "lr " + f"{c['base']['lr']:g}:", "", error_table(runs, "sweep"), "",
              *([f"lr {c['drift_lr']:g}:", "", error_table(runs, "drift"), ""] if _ran(runs, "drift") else []),
              *img("errors", "compensation error")]
    parts += _family_sections(data)
    if data.get("fig6"):
        parts += ["## 7. Memory (cf. paper Fig. 6)", "", fig6_table(data["fig6"]), "", *img("fig6", "memory")]
    parts += _distill_section(results.parent / "distill" / "results.json")
    parts += _faces_section(results.parent / "faces")
    notes = results.parent / "study_notes.md"
    parts += ["---", "", notes.read_text().strip() if notes.exists() else "", ""]
    atomic_write_text(results, "\n".join(parts))
    print(f"wrote {results} and {len(rel)} plot(s) in {out_dir}", flush=True)


def _header(data: dict) -> list[str]:
    """Title, provenance (every command that added runs) and the setup lines."""
    return ["# Reproduction study: BroadFace in the many-class regime", "",
            "Generated by " + ", then ".join(f"`{c}`" for c in data.get("commands", [data["command"]]))
            + "; re-render without training: "
            "`python bench/study.py --from-json docs/study/runs.json`. Every number and plot comes from "
            "`docs/study/runs.json`.", "",
            f"- machine: {data['machine']['nproc']} cores, {data['machine']['cpu']}, "
            f"torch {data['machine']['torch']}; "
            f"started {data.get('started', '?')}, finished {data.get('finished', 'not yet (incomplete)')}, "
            f"{data.get('wall_s', 0) / 3600:.1f} h of training wall time; the machine was shared with other jobs, "
            f"so absolute times are indicative and only the side-by-side ratios are comparable.",
            *_setup_lines(data), ""]


def _ran(runs: list[dict], part: str) -> bool:
    return any(r["spec"]["part"] == part for r in runs)


def _unless_run(runs: list[dict], part: str, lines: list[str]) -> list[str]:
    """``lines`` when the part has runs, else one line saying it was not run and how to run it."""
    if _ran(runs, part):
        return lines
    return [f"Not run for this report: `python bench/study.py --parts {part}` runs it (and re-renders this page).", ""]


def _sources(runs: list[dict]) -> list[str]:
    """The footnote for arms (†) with runs taken from a `broadface demo` (same recipe, not trained twice)."""
    src = sorted({r["source"] for r in runs if "source" in r})
    if not src:
        return []
    n = sum("source" in r for r in runs)
    return [f"† {n} of these runs are the many-class track of `broadface demo` ({', '.join(f'`{s}`' for s in src)}, "
            "imported with `--import-demo`): the same recipe, run with the demo's thread count and curve "
            "resolution.", ""]


def _family_sections(data: dict) -> list[str]:
    """The margin family with and without the queue, and the union's speed settings."""
    c, runs = data["config"], data["runs"]
    out = ["## 5. The margin family with the queue (issue 13)", ""] + _unless_run(runs, "margins", [
           f"From scratch as the sweep ({c['steps']} steps, 964 classes, batch 128): each margin without a "
           f"queue and with {c.get('margin_queue', '?')}, paired by seed (the arms of a margin share the "
           "seed's initialisation and data order). AdaFace and MagFace at their papers' parameters, the "
           "others with the base's m; `step time` is the ratio of the two runs' median ms per step (each run's "
           "own timing; the runs shared the machine two at a time), mean over seeds.", "", margin_table(data), ""])
    out += ["## 6. The union's speed settings and accuracy (issue 15)", ""] + _unless_run(runs, "union", [
            "The bf16 union (`head.union_dtype=bfloat16`) and the sampled union (`head.sample_rate`) against "
            "the fp32 union with the same queue, paired by seed. Sampling keeps every positive of batch and "
            "queue, so it has negatives to drop only where the classes far outnumber the union: 3,856 rotation "
            f"classes with queue {c.get('union_sampled_queue', '?')}.", "", union_table(data), ""])
    return out


def _distill_section(path: Path) -> list[str]:
    """The BigFace distillation table from the JSON that ``bench/distill.py --json`` wrote."""
    head = ["## 8. BigFace distillation and masked faces (bench/distill.py)", ""]
    if not path.exists():
        return head + ["(not run: `python bench/distill.py --json docs/distill/results.json`)", ""]
    r = json.loads(path.read_text())
    a, st = r["args"], r["setup"]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items()
                     if k in ("threads", "teacher_width", "teacher_steps", "student_steps", "pairs") and v is not None)
    rows = ["| model | LFW % | LFW, one image masked % | CelebA-299 Recall@1 | train s |", "|---|---|---|---:|---:|"]
    for name, m in r["results"].items():
        if "lfw" in m:
            rows.append(f"| {name} | {100 * m['lfw']:.2f} ± {100 * m['lfw_std']:.2f} | "
                        f"{100 * m['lfw_masked']:.2f} ± {100 * m['lfw_masked_std']:.2f} | "
                        f"{m['celeba_recall@1']:.4f} | {m['train_s']:.0f} |")
    return head + [
        f"Command: `python bench/distill.py {flags}{' --no-flip' if not st['flip'] else ''}` "
        f"(one seed, {r['lfw_pairs']} LFW pairs, mask_prob {a['mask_prob']}, λ = {a['weight']}, "
        f"{a['kind']} distance; teacher iResNet width {st['teacher_width']} trained {st['teacher_steps']} steps; "
        f"students {st['student_steps']} steps); wall {r['wall_s']:.0f} s. Details: "
        "[distillation](distillation.md).", "", *rows, ""]


def _faces_section(folder: Path) -> list[str]:
    """ArcFace vs BroadFace on faces from the JSONs ``bench/faces.py --json`` wrote (one per setting)."""
    from broadface.metrics.paired import paired_difference

    head = ["## 9. Faces from scratch with few classes per batch (bench/faces.py)", ""]
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return head + ["(not run: `python bench/faces.py --setting celeba --json docs/faces/celeba.json`)", ""]
    out = head
    for path in files:
        r = json.loads(path.read_text())
        a, q = r["args"], r["args"]["queue"]
        by = {k: {x["seed"]: x for x in r["runs"] if x["queue"] == k} for k in (0, q)}
        first = next(iter(by[0].values()), None) or next(iter(by[q].values()))
        out += [f"`{a['setting']}` ({path.name}): {first['classes']} training identities, {first['images']} images, "
                f"batch {a['batch']}, {a['steps']} steps, lr {a['lr']:g}, {a['size']} px, ArcFace s = {a['scale']:g} "
                f"m = {a['margin']:g}, test-time flip; Recall@1 over the unseen identities, LFW accuracy over "
                f"{first['lfw_pairs']} pairs (10-fold thresholds); the model as bench/faces.py builds it."
                + (f" Command: `{r['command']}`." if r.get("command") else ""), "",
                "| arm | seeds | Recall@1 | LFW accuracy | train s (median) |", "|---|---:|---|---|---:|"]
        for name, k in (("ArcFace (queue 0)", 0), (f"BroadFace {q}", q)):
            rs = list(by[k].values())
            if rs:
                out.append(f"| {name} | {len(rs)} | {report.mean_sd([x['recall@1'] for x in rs])} | "
                           f"{report.mean_sd([x['lfw_accuracy'] for x in rs])} | "
                           f"{sorted(x['train_s'] for x in rs)[len(rs) // 2]:.0f} |")
        if set(by[0]) & set(by[q]):
            out.append("")
            for metric, label in (("recall@1", "Recall@1"), ("lfw_accuracy", "LFW accuracy")):
                d = paired_difference({s: x[metric] for s, x in by[q].items()},
                                      {s: x[metric] for s, x in by[0].items()})
                se = "" if d.se is None else f" ± {100 * d.se:.2f}"
                out.append(f"- paired Δ {label}, BroadFace − ArcFace: {100 * d.mean:+.2f}{se} points over seeds "
                           f"{list(d.seeds)} ({', '.join(f'{100 * x:+.2f}' for x in d.diffs)})")
        out.append("")
    return out
