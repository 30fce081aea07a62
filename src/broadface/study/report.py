"""docs/RESULTS.md and docs/study/*.png from the study's runs.json (no number is typed in here)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def _ms(values: list[float], pct: bool = False) -> str:
    """``mean ± std`` (std over seeds, ddof 1; n = 1 shows the value alone)."""
    v = np.asarray(values, dtype=float) * (100 if pct else 1)
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.2f}" if pct else f"{v[0]:.3f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if pct else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def _arm_name(queue: int, compensate: bool) -> str:
    if queue == 0:
        return "ArcFace (queue 0)"
    return f"BroadFace {queue}" + ("" if compensate else ", no compensation")


def _group(runs: list[dict]) -> dict[tuple[int, bool], list[dict]]:
    out: dict[tuple[int, bool], list[dict]] = defaultdict(list)
    for r in runs:
        if r["kind"] == "arm":
            out[(r["queue"], r["compensate"] or r["queue"] == 0)].append(r)
    ordered = sorted(out.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in ordered}


def sweep_table(runs: list[dict]) -> str:
    rows = ["| arm | queue | compensation | seeds | queue fill at end (full at step) | Recall@1 | Recall@8 "
            "| pair accuracy % (10-fold) | train s/run | step ms |",
            "|---|---:|---|---:|---|---|---|---|---:|---:|"]
    for (q, c), rs in _group(runs).items():
        full = sorted({r["first_full_step"] for r in rs if r["first_full_step"]})
        fill = f"{rs[0]['fill']}" + (f" (step {full[0]})" if full else (" (never full)" if q else ""))
        rows.append(f"| {_arm_name(q, c)} | {q} | {'yes' if c and q else ('no' if q else '–')} | {len(rs)} | {fill} "
                    f"| {_ms([r['recall@1'] for r in rs])} | {_ms([r['recall@8'] for r in rs])} "
                    f"| {_ms([r['pair_acc'] for r in rs], pct=True)} | {np.mean([r['wall_s'] for r in rs]):.0f} "
                    f"| {np.mean([r['step_ms'] for r in rs]):.0f} |")
    return "\n".join(rows)


def _pm(values: list[float], digits: int) -> str:
    """Signed mean ± sample std (just the mean for one value)."""
    if len(values) < 2:
        return f"{np.mean(values):+.{digits}f}" if values else "–"
    return f"{np.mean(values):+.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def paired_table(runs: list[dict]) -> str:
    """Differences to the same seed's ArcFace arm (paired by seed: same warm start and data order)."""
    groups = _group(runs)
    base = {r["seed"]: r for r in groups.get((0, True), [])}
    rows = ["| arm | Δ Recall@1 vs ArcFace (per seed, in seed order) | mean Δ ± std "
            "| Δ pair accuracy % (per seed) | mean Δ ± std |",
            "|---|---|---:|---|---:|"]
    for (q, c), rs in groups.items():
        if q == 0:
            continue
        d1 = [r["recall@1"] - base[r["seed"]]["recall@1"] for r in rs if r["seed"] in base]
        d2 = [100 * (r["pair_acc"] - base[r["seed"]]["pair_acc"]) for r in rs if r["seed"] in base]
        rows.append(f"| {_arm_name(q, c)} | {', '.join(f'{d:+.3f}' for d in d1)} | {_pm(d1, 3)} "
                    f"| {', '.join(f'{d:+.2f}' for d in d2)} | {_pm(d2, 2)} |")
    return "\n".join(rows)


def warm_table(runs: list[dict]) -> str:
    rows = ["| seed | warm-start steps | Recall@1 | pair accuracy % | wall s |", "|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in runs if r["kind"] == "warm"), key=lambda r: r["seed"]):
        rows.append(f"| {r['seed']} | {r['steps']} | {r['recall@1']:.3f} | {100 * r['pair_acc']:.2f} "
                    f"| {r['wall_s']:.0f} |")
    return "\n".join(rows)


def error_bins(runs: list[dict], bins: int = 8) -> list[dict[str, Any]]:
    """Mean compensated / uncompensated cosine error per age bin, per measurement step, pooled over seeds."""
    out = []
    for step in sorted({e["step"] for r in runs if r["kind"] == "arm" for e in r["errors"]}):
        es = [e for r in runs if r["kind"] == "arm" for e in r["errors"] if e["step"] == step]
        age = np.concatenate([np.asarray(e["age"]) for e in es])
        comp = np.concatenate([np.asarray(e["compensated"]) for e in es])
        unc = np.concatenate([np.asarray(e["uncompensated"]) for e in es])
        edges = np.unique(np.linspace(0, age.max() + 1, bins + 1).astype(int))
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (age >= lo) & (age < hi)
            if m.any():
                out.append({"step": step, "lr": es[0]["lr"], "seeds": len(es), "age_lo": int(lo), "age_hi": int(hi - 1),
                            "entries": int(m.sum()), "compensated": float(comp[m].mean()),
                            "uncompensated": float(unc[m].mean())})
    return out


def error_table(runs: list[dict]) -> str:
    rows = ["| measured at step (lr) | entry age, steps | entries (all seeds) | 1 − cos, compensated e* "
            "| 1 − cos, uncompensated e⁻ | ratio |", "|---|---|---:|---:|---:|---:|"]
    for b in error_bins(runs):
        ratio = b["uncompensated"] / b["compensated"] if b["compensated"] > 0 else float("nan")
        rows.append(f"| {b['step']} ({b['lr']:g}) | {b['age_lo']}–{b['age_hi']} | {b['entries']} "
                    f"| {b['compensated']:.4f} | {b['uncompensated']:.4f} | {ratio:.2f} |")
    return "\n".join(rows)


def overhead_table(rows: list[dict]) -> str:
    out = ["| queue Q | filled | median step ms | min–max ms | samples/s | vs Q = 0 |",
           "|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['queue']} | {r['fill']} | {r['step_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} "
                   f"| {r['samples_per_s']:.0f} | {r['vs_q0']:.2f}× |")
    return "\n".join(out)


def memory_table(rows: list[dict]) -> str:
    plain = {r["referenced"]: r["step_mb"] for r in rows if r["kind"] == "plain"}
    out = ["| referenced instances N | plain: batch N, step MB | BroadFace: batch b + queue N − b "
           "| BroadFace step MB "
           "| BroadFace / plain |", "|---:|---:|---|---:|---:|"]
    for n in sorted(plain):
        bf = [r for r in rows if r["kind"] == "broadface" and r["referenced"] == n]
        cell = (f"{bf[0]['batch']} + {bf[0]['queue']} | {bf[0]['step_mb']:.0f} | {bf[0]['step_mb'] / plain[n]:.2f}"
                if bf else "– (N = b) | – | –")
        out.append(f"| {n} | {plain[n]:.0f} | {cell} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def _fig(w: float = 5.5, h: float = 3.8):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def plot_sweep(runs: list[dict], path: Path) -> None:
    """Per queue size: the difference to the same seed's ArcFace run (mean ± std over seeds)."""
    groups = _group(runs)
    base = {r["seed"]: r for r in groups.get((0, True), [])}
    fig = _fig(10, 3.8)
    for i, (key, label, unit) in enumerate((("recall@1", "Δ Recall@1 vs ArcFace (unseen classes)", 1),
                                            ("pair_acc", "Δ pair accuracy vs ArcFace, % points", 100))):
        ax = fig.add_subplot(1, 2, i + 1)
        for comp, style, shift in ((True, "o-", -0.06), (False, "s--", 0.06)):
            pts = [(0, [0.0] * len(base))] + [
                (q, [unit * (r[key] - base[r["seed"]][key]) for r in rs if r["seed"] in base])
                for (q, c), rs in groups.items() if q and c == comp]
            xs = np.arange(len(pts)) + shift
            ax.errorbar(xs, [np.mean(v) for _, v in pts], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for _, v in pts],
                        fmt=style, capsize=3, label="compensated" if comp else "no compensation")
            ax.set_xticks(np.arange(len(pts)), [str(q) for q, _ in pts])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("queue size (0 = ArcFace)")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Queue-size sweep, Omniglot: paired difference to ArcFace, mean ± std over seeds "
                 "(cf. paper Fig. 7a; absolute values in the table)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(runs: list[dict], path: Path) -> None:
    """Left: Recall@1 per arm (mean ± std over seeds). Right: difference to the same seed's ArcFace."""
    groups = {k: rs for k, rs in _group(runs).items() if rs[0]["curve"]}
    base = {r["seed"]: np.array([v for _, v in r["curve"]]) for r in groups.get((0, True), [])}
    fig = _fig(10, 3.8)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for (q, c), rs in groups.items():
        steps = np.array([s for s, _ in rs[0]["curve"]])
        vals = np.array([[v for _, v in r["curve"]] for r in rs])
        diff = np.array([x - base[r["seed"]] for x, r in zip(vals, rs) if r["seed"] in base])
        for ax, v in ((left, vals), (right, diff)):
            if len(v) == 0:
                continue
            mean, std = v.mean(0), (v.std(0, ddof=1) if len(v) > 1 else 0 * v[0])
            ax.plot(steps, mean, label=f"{_arm_name(q, c)} ({len(v)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    full = [rs[0]["first_full_step"] for (q, _), rs in groups.items() if q and rs[0]["first_full_step"]]
    if full:
        for ax in (left, right):
            ax.axvline(max(full), color="grey", ls=":", lw=1)
        right.annotate("largest queue full", (max(full), 0), fontsize=7, color="grey")
    left.set_ylabel("test Recall@1 (unseen classes)")
    right.set_ylabel("Δ Recall@1 vs the same seed's ArcFace")
    for ax in (left, right):
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Learning curves, mean ± std over seeds (cf. paper Fig. 7b)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_error(runs: list[dict], path: Path) -> None:
    bins = error_bins(runs, bins=16)
    fig = _fig()
    ax = fig.add_subplot(1, 1, 1)
    for step in sorted({b["step"] for b in bins}):
        bs = [b for b in bins if b["step"] == step]
        mid = [(b["age_lo"] + b["age_hi"]) / 2 for b in bs]
        line, = ax.plot(mid, [b["uncompensated"] for b in bs], "s--", ms=3, label=f"uncompensated e⁻, at step {step}")
        ax.plot(mid, [b["compensated"] for b in bs], "o-", ms=3, color=line.get_color(),
                label=f"compensated e*, at step {step}")
    ax.set_xlabel("age of the queue entry (steps)")
    ax.set_ylabel("mean 1 − cos(entry, current embedding)")
    ax.set_title("Compensation error vs entry age (cf. paper Fig. 5a)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_memory(rows: list[dict], path: Path) -> None:
    fig = _fig()
    ax = fig.add_subplot(1, 1, 1)
    for kind, style in (("plain", "o-"), ("broadface", "s-")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["referenced"])
        label = ("plain mini-batch (batch N)" if kind == "plain" else
                 f"BroadFace (batch {rs[0]['batch']} + queue N − b)" if rs else kind)
        ax.plot([r["referenced"] for r in rs], [r["step_mb"] for r in rs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("instances referenced by the classifier per step, N")
    ax.set_ylabel("step peak − memory before the head, MB")
    ax.set_title("Memory (cf. paper Fig. 6), CPU peak RSS", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = data["runs"]
    made = []
    for name, fn, arg, ok in (("sweep.png", plot_sweep, runs, any(r["kind"] == "arm" for r in runs)),
                              ("curves.png", plot_curves, runs, any(r.get("curve") for r in runs)),
                              ("compensation_error.png", plot_error, runs, any(r.get("errors") for r in runs)),
                              ("memory.png", plot_memory, data.get("memory") or [], bool(data.get("memory")))):
        if ok:
            fn(arg, out_dir / name)
            made.append(out_dir / name)
    return made
