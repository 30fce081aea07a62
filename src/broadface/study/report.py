"""Tables and plots of the study from its runs.json (no number is typed in here).

Every comparison is paired: an arm's Recall@1 minus that of the queue-0 arm with the same pair key
(same seed, data, schedule; :meth:`RunSpec.pair_key`), as mean ± standard error over seeds.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from broadface.fileio import atomic_savefig
from broadface.metrics.paired import PairedDifference, paired_difference
from broadface.study.runs import RunSpec


def specs(runs: list[dict]) -> list[tuple[RunSpec, dict]]:
    return [(RunSpec.from_dict(r["spec"]), r) for r in runs]


def _base_key(spec: RunSpec, also: tuple[str, ...] = ()) -> str:
    """The pair key of the seed-independent arm group (pairs are then matched by seed)."""
    import json

    d = json.loads(spec.pair_key(also))
    d.pop("seed")
    return json.dumps(d, sort_keys=True)


def arms(runs: list[dict], part: str) -> dict[tuple[str, int, bool], dict[int, dict]]:
    """``{(group key, queue, compensate): {seed: record}}`` for one part."""
    out: dict[tuple[str, int, bool], dict[int, dict]] = defaultdict(dict)
    for s, r in specs(runs):
        if s.part == part:
            out[(_base_key(s), s.queue, s.compensate or s.queue == 0)][s.seed] = r
    return out


def _paired(arm: dict[int, dict] | None, base: dict[int, dict] | None, metric: str) -> PairedDifference | None:
    """Paired difference ``arm − base`` over their common seeds, or None if either is missing or none is shared."""
    if not base or not arm or not set(base) & set(arm):
        return None
    return paired_difference({k: v[metric] for k, v in arm.items()}, {k: v[metric] for k, v in base.items()})


def gain(runs: list[dict], part: str, group: str, queue: int, compensate: bool,
         metric: str = "recall@1") -> PairedDifference | None:
    """Paired gain of an arm over the queue-0 arm of its group, or None if either is missing."""
    a = arms(runs, part)
    return _paired(a.get((group, queue, compensate)), a.get((group, 0, True)), metric)


def compensation_gain(runs: list[dict], part: str, group: str, queue: int,
                      metric: str = "recall@1") -> PairedDifference | None:
    """Paired gain of the compensated arm over the uncompensated one at the same queue (the paper's Table 6a
    ablation), or None if either is missing."""
    if not queue:
        return None
    a = arms(runs, part)
    return _paired(a.get((group, queue, True)), a.get((group, queue, False)), metric)


def head_arms(runs: list[dict], part: str) -> dict[tuple[str, int, tuple], dict[int, dict]]:
    """``{(group key, queue, head settings): {seed: record}}``: arms that differ in the queue and the head's
    settings (union dtype, sample rate) are paired within a group."""
    out: dict[tuple[str, int, tuple], dict[int, dict]] = defaultdict(dict)
    for s, r in specs(runs):
        if s.part == part:
            out[(_base_key(s, ("head",)), s.queue, s.head)][s.seed] = r
    return out


def head_gain(runs: list[dict], part: str, group: str, queue: int, head: tuple, base_queue: int,
              base_head: tuple = (), metric: str = "recall@1") -> PairedDifference | None:
    """Paired difference of arm (queue, head) over arm (base_queue, base_head) of its group (None: either missing)."""
    a = head_arms(runs, part)
    return _paired(a.get((group, queue, head)), a.get((group, base_queue, base_head)), metric)


def _paired_steps(arm: dict[int, dict], base: dict[int, dict]) -> list[tuple[float, float]]:
    """(arm, base) ms per step for each shared seed: the median step where both runs recorded it, else the mean."""
    seeds = sorted(set(arm) & set(base))
    key = "step_ms_median" if all("step_ms_median" in r[s] for r in (arm, base) for s in seeds) else "step_ms"
    return [(arm[s][key], base[s][key]) for s in seeds]


def step_ratio(arm: dict[int, dict], base: dict[int, dict]) -> float | None:
    """Mean over shared seeds of the arm's ms per step over the base arm's (each run's own timing: the median
    step where both runs recorded it, else the mean)."""
    pairs = _paired_steps(arm, base)
    return float(np.mean([a / b for a, b in pairs])) if pairs else None


def extra_step_ms(arm: dict[int, dict], base: dict[int, dict]) -> float | None:
    """Mean over shared seeds of the ms per step the arm takes beyond the base arm (medians where recorded)."""
    pairs = _paired_steps(arm, base)
    return float(np.mean([a - b for a, b in pairs])) if pairs else None


def expected_classes_per_batch(counts: np.ndarray, batch: int) -> float:
    """Expected number of distinct classes in a batch drawn without replacement (hypergeometric)."""
    n = int(counts.sum())
    i = np.arange(batch)
    absent = np.array([np.exp(np.sum(np.log1p(-c / (n - i)))) if c < n - batch + 1 else 0.0 for c in counts])
    return float(np.sum(1.0 - absent))


def cost_of(data: dict, classes: int, batch: int, queue: int) -> dict[str, Any]:
    """The step-time ratio and step memory measured for this configuration ({} when not measured)."""
    out: dict[str, Any] = {}
    for row in data.get("step_times", []):
        if (row["classes"], row["batch"], row["queue"]) == (classes, batch, queue):
            out.update(step_ms=row["step_ms"], vs_q0=row["vs_q0"])
    for row in data.get("memory", []):
        if (row["classes"], row["batch"], row["queue"]) == (classes, batch, queue):
            out["step_mb"] = row["step_mb"]
    return out


def fmt_gain(g: PairedDifference | None, scale: float = 100.0) -> str:
    """``+2.31 ± 0.45 (n=3)`` in points (×100), or ``–``."""
    if g is None:
        return "–"
    se = "" if g.se is None else f" ± {scale * g.se:.2f}"
    return f"{scale * g.mean:+.2f}{se} (n={g.n})"


def mean_sd(values: list[float]) -> str:
    v = np.asarray(values, float)
    if v.size == 0:
        return "–"
    return f"{v.mean():.4f}" if v.size == 1 else f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


# ----------------------------------------------------------------------------- plots


def _fig(w: float = 5.5, h: float = 3.8):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def plot_sweep(runs: list[dict], part: str, path: Path, title: str) -> Path | None:
    """Paired ΔRecall@1 against queue size, with and without compensation (cf. paper Fig. 7a / Table 6a)."""
    a = arms(runs, part)
    groups = sorted({g for g, _, _ in a})
    if not groups:
        return None
    g = groups[0]
    queues = sorted({q for gg, q, _ in a if gg == g and q})
    fig = _fig()
    ax = fig.add_subplot(1, 1, 1)
    for comp, style, shift in ((True, "o-", -0.05), (False, "s--", 0.05)):
        pts = [(i, gain(runs, part, g, q, comp)) for i, q in enumerate(queues)]
        pts = [(i, d) for i, d in pts if d is not None]
        if pts:
            ax.errorbar([i + shift for i, _ in pts], [100 * d.mean for _, d in pts],
                        yerr=[100 * (d.se or 0) for _, d in pts], fmt=style, capsize=3,
                        label="compensated" if comp else "no compensation")
    ax.set_xticks(range(len(queues)), [f"{q // 1024}k" if q >= 1024 else str(q) for q in queues])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("queue size")
    ax.set_ylabel("Δ Recall@1 vs queue 0, points (mean ± SE)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def plot_curves(runs: list[dict], part: str, path: Path) -> Path | None:
    """Recall@1 against step for the arms with a learning curve (mean ± std over seeds)."""
    a = {k: v for k, v in arms(runs, part).items() if any(r["curve"] for r in v.values())}
    if not a:
        return None
    fig = _fig()
    ax = fig.add_subplot(1, 1, 1)
    for (g, q, c), by_seed in sorted(a.items(), key=lambda kv: kv[0][1]):
        curves = [r["curve"] for r in by_seed.values()]
        steps = [s for s, _ in curves[0]]
        vals = np.array([[v for _, v in cv] for cv in curves if len(cv) == len(steps)])
        mean = vals.mean(0)
        std = vals.std(0, ddof=1) if len(vals) > 1 else np.zeros_like(mean)
        label = "ArcFace (queue 0)" if q == 0 else f"BroadFace {q}" + ("" if c else ", no comp.")
        ax.plot(steps, mean, label=f"{label}, {len(vals)} seeds")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("Recall@1, 659 unseen characters")
    ax.set_title("Learning curves (cf. paper Fig. 7b)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def error_bins(runs: list[dict], part: str, bins: int = 8) -> list[dict[str, Any]]:
    """Mean compensated / uncompensated cosine error per entry-age bin and measurement step, over seeds."""
    es = [e for s, r in specs(runs) if s.part == part for e in r["errors"]]
    out = []
    for step in sorted({e["step"] for e in es}):
        at = [e for e in es if e["step"] == step]
        age = np.concatenate([np.asarray(e["age"]) for e in at])
        comp = np.concatenate([np.asarray(e["compensated"]) for e in at])
        unc = np.concatenate([np.asarray(e["uncompensated"]) for e in at])
        edges = np.unique(np.linspace(0, age.max() + 1, bins + 1).astype(int))
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (age >= lo) & (age < hi)
            if m.any():
                out.append({"step": step, "lr": at[0]["lr"], "seeds": len(at), "age_lo": int(lo),
                            "age_hi": int(hi - 1), "entries": int(m.sum()), "compensated": float(comp[m].mean()),
                            "uncompensated": float(unc[m].mean())})
    return out


def plot_errors(runs: list[dict], parts: list[str], path: Path) -> Path | None:
    """Paper Fig. 5a: 1 − cos(entry, current embedding) against entry age, e* and e⁻."""
    fig = _fig(5.5 * len(parts), 3.8)
    drew = False
    for i, part in enumerate(parts):
        ax = fig.add_subplot(1, len(parts), i + 1)
        bins = error_bins(runs, part, bins=16)
        for step in sorted({b["step"] for b in bins}):
            bs = [b for b in bins if b["step"] == step]
            mid = [(b["age_lo"] + b["age_hi"]) / 2 for b in bs]
            line, = ax.plot(mid, [b["uncompensated"] for b in bs], "s--", ms=3,
                            label=f"e⁻ (no comp.), step {step}, lr {bs[0]['lr']:g}")
            ax.plot(mid, [b["compensated"] for b in bs], "o-", ms=3, color=line.get_color(),
                    label=f"e* (compensated), step {step}")
            drew = True
        ax.set_xlabel("age of the queue entry, steps")
        ax.set_ylabel("mean 1 − cos(entry, embedding now)")
        ax.set_title(f"{part}: compensation error vs age (cf. Fig. 5a)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not drew:
        return None
    fig.tight_layout()
    return atomic_savefig(fig, path)


def regime_cells(runs: list[dict]) -> list[dict[str, Any]]:
    """One row per (classes, batch) cell of the regime map with its paired gain."""
    a = arms(runs, "regime")
    cells = []
    for (g, q, c), by_seed in a.items():
        if q == 0:
            continue
        s = RunSpec.from_dict(next(iter(by_seed.values()))["spec"])
        r0 = next(iter(by_seed.values()))
        classes = r0["num_classes"]
        counts = np.full(classes, 20)  # Omniglot: 20 drawers per character (and per rotation)
        per_batch = expected_classes_per_batch(counts, s.batch)
        base = a.get((g, 0, True), {})
        cells.append({"classes": classes, "rotations": s.rotations, "batch": s.batch, "queue": q,
                      "classes_per_batch": per_batch, "coverage": per_batch / classes,
                      "seen_per_class": s.batch / classes, "gain": gain(runs, "regime", g, q, c),
                      "arcface": [r["recall@1"] for r in base.values()],
                      "broadface": [r["recall@1"] for r in by_seed.values()],
                      "step_ratio": step_ratio(by_seed, base), "extra_step_ms": extra_step_ms(by_seed, base)})
    return sorted(cells, key=lambda x: (x["classes"], x["batch"]))


def plot_regime(cells: list[dict], path: Path) -> Path | None:
    """Heat map of the paired gain over (training classes, batch), annotated with Δ ± SE and coverage."""
    if not cells:
        return None
    classes = sorted({c["classes"] for c in cells})
    batches = sorted({c["batch"] for c in cells})
    grid = np.full((len(classes), len(batches)), np.nan)
    fig = _fig(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for c in cells:
        if c["gain"] is not None:
            grid[classes.index(c["classes"]), batches.index(c["batch"])] = 100 * c["gain"].mean
    lim = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    for c in cells:
        i, j = classes.index(c["classes"]), batches.index(c["batch"])
        g = c["gain"]
        text = "–" if g is None else f"{100 * g.mean:+.1f}" + ("" if g.se is None else f"\n± {100 * g.se:.1f}")
        dark = g is not None and abs(100 * g.mean) > 0.6 * lim  # white on the saturated cells
        ax.text(j, i, f"{text}\n{100 * c['coverage']:.0f}% cls/batch", ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("training classes")
    ax.set_title("Regime map: paired Δ Recall@1 (points) of BroadFace over ArcFace", fontsize=9)
    fig.colorbar(im, ax=ax, label="Δ Recall@1, points")
    fig.tight_layout()
    return atomic_savefig(fig, path)


def plot_fig6(rows: list[dict], path: Path) -> Path | None:
    if not rows:
        return None
    fig = _fig()
    ax = fig.add_subplot(1, 1, 1)
    for kind, style in (("plain", "o-"), ("broadface", "s-")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["referenced"])
        if rs:
            label = "plain, batch N" if kind == "plain" else f"BroadFace, batch {rs[0]['batch']} + queue N − b"
            ax.plot([r["referenced"] for r in rs], [r["step_mb"] for r in rs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("instances the classifier references per step, N")
    ax.set_ylabel("peak step memory above the base, MB")
    ax.set_title("Memory (cf. paper Fig. 6), CPU peak RSS", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)
