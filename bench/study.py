"""Reproduction study in the many-class regime (full Omniglot): writes docs/RESULTS.md and docs/study/*.png.

    python bench/study.py                          # every part, 3 seeds (hours on 2 cores; resumable)
    python bench/study.py --parts sweep regime     # some parts only
    python bench/study.py --quick --out /tmp/s     # 1 seed, tiny runs: a few minutes (debugging)
    python bench/study.py --from-json docs/study/runs.json   # re-render RESULTS.md and the plots only

Runs are listed by ``broadface.study.plan``; each finished run is appended to runs.json at once, and a
second invocation with the same JSON skips the runs it already holds, so an interrupted study resumes.
Warm starts (shared by the arms of a seed) are trained first and kept in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from broadface.allocator import configure_from_env
from broadface.fileio import atomic_write_json
from broadface.study import costs, markdown
from broadface.study.plan import PARTS, StudyConfig, plan
from broadface.demo import study_records
from broadface.study.runs import RunSpec, run

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": []}


def _warm_path(work: Path, spec: RunSpec) -> Path:
    import hashlib

    return work / f"warm_{hashlib.sha256(spec.key().encode()).hexdigest()[:16]}.pt"


def reuse(todo: list[RunSpec], data: dict, threads: int) -> list[RunSpec]:
    """Record each planned run that another part already trained (same spec but the part, same thread count:
    the thread count alone moves a run) from that run; return the runs left to train."""
    trained = {(RunSpec.from_dict(r["spec"]).trained_key(), r["threads"]): r for r in data["runs"] if "threads" in r}
    left = []
    for s in todo:
        r = trained.get((s.trained_key(), threads))
        if r is None:
            left.append(s)
        else:
            data["runs"].append({**r, "spec": asdict(s), "key": s.key(), "same_as": r["spec"]["part"]})
    return left


def train_all(specs: list[RunSpec], data: dict, json_path: Path, work: Path, workers: int, threads: int) -> None:
    """Warm starts first, then every arm whose warm start exists, ``workers`` processes at a time."""
    done = {r["key"] for r in data["runs"]}
    todo = reuse([s for s in specs if s.key() not in done], data, threads)
    warms = list(dict.fromkeys(w for s in todo if (w := s.warm()) is not None))
    ready = {w for w in warms if _warm_path(work, w).exists()}
    print(f"{len(todo)} of {len(specs)} runs to do ({len(done)} in {json_path}), {len(warms) - len(ready)} warm starts",
          flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=configure_from_env) as pool:
        running: dict = {}
        queue = [("warm", w) for w in warms if w not in ready] + [("arm", s) for s in todo]
        while queue or running:
            for item in list(queue):
                if len(running) >= workers:
                    break
                kind, spec = item
                w = spec.warm() if kind == "arm" else None
                if w is not None and w not in ready:
                    continue  # its warm start is still training
                queue.remove(item)
                if kind == "warm":
                    fut = pool.submit(run, spec, None, str(_warm_path(work, spec)), threads)
                else:
                    fut = pool.submit(run, spec, None if w is None else str(_warm_path(work, w)), None, threads)
                running[fut] = item
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, spec = running.pop(fut)
                res = fut.result()
                if kind == "warm":
                    ready.add(spec)
                    data.setdefault("warm", []).append(res)
                else:
                    data["runs"].append(res)
                data["wall_s"] = data.get("wall_s_before", 0) + time.perf_counter() - t0
                atomic_write_json(json_path, data, indent=None)
                print(f"[{time.perf_counter() - t0:6.0f} s] {kind} {spec.part} {spec.loss} {dict(spec.head) or ''} "
                      f"seed {spec.seed} C={res['num_classes']} "
                      f"B={spec.batch} Q={spec.queue}{'' if spec.compensate else ' no-comp'} lr={spec.lr:g}: "
                      f"R@1 {res['recall@1']:.4f} ({res['wall_s']:.0f} s)", flush=True)


def measure_costs(specs: list[RunSpec], data: dict, threads: int, quick: bool) -> None:
    """Step-time ratios and peak memory of every distinct configuration, side by side in this process."""
    configs = sorted({costs.CostConfig(_classes(s), s.batch, s.queue) for s in specs},
                     key=lambda c: (c.classes, c.batch, c.queue))
    t = time.perf_counter()
    data["step_times"] = costs.step_times(configs, rounds=1 if quick else 3, steps=2 if quick else 4, threads=threads)
    data["memory"] = costs.peak_memory(configs, threads)
    fig6 = costs.fig6_configs(964, [128, 256, 512] if quick else [128, 512, 2048, 8192], 128)
    rows = costs.peak_memory([c for _, _, c in fig6], threads)
    data["fig6"] = [{"kind": k, "referenced": n, **r} for (k, n, _), r in zip(fig6, rows)]
    data["costs_meta"] = {"threads": threads, "wall_s": round(time.perf_counter() - t, 1),
                          "machine": markdown.machine()}


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _classes(spec: RunSpec) -> int:
    if spec.classes is not None:
        return spec.classes
    return 964 * spec.rotations


def _matches(spec: RunSpec, where: str) -> bool:
    """``FIELD=VALUE`` (VALUE as JSON: 8192, false, null; else a string) against a RunSpec field."""
    name, sep, text = where.partition("=")
    if not sep or name not in asdict(spec):
        raise SystemExit(f"--where {where!r}: expected FIELD=VALUE with FIELD one of {sorted(asdict(spec))}")
    try:
        value = json.loads(text.lower() if text in ("True", "False") else text)
    except json.JSONDecodeError:
        value = text
    return getattr(spec, name) == value


def _import_demo(data: dict, path: Path) -> None:
    """Add the demo's many-class runs as sweep records (a run already in ``data`` is kept)."""
    have = {(RunSpec.from_dict(r["spec"]).pair_key(), r["spec"]["queue"], r["spec"]["compensate"], r["spec"]["seed"])
            for r in data["runs"]}
    added = 0
    for r in study_records(json.loads(path.read_text()), source=str(path)):
        s = RunSpec.from_dict(r["spec"])
        if (s.pair_key(), s.queue, s.compensate, s.seed) not in have:
            data["runs"].append(r)
            added += 1
    print(f"imported {added} run(s) of the demo's many-class track from {path}", flush=True)


def _regime_classes(text: str) -> int | str | None:
    """'all' -> every background character, 'rot' -> the 3,856 rotation classes, else a count."""
    if text in ("all", "rot"):
        return None if text == "all" else "rot"
    if not text.isdigit():
        raise SystemExit(f"--regime-classes: expected a count, 'all' or 'rot', got {text!r}")
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny runs (debugging the machinery)")
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), help="default: all")
    ap.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2")
    ap.add_argument("--from-json", type=Path, help="only re-render RESULTS.md and the plots from this runs.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "study", help="runs.json and the plots")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    ap.add_argument("--work", type=Path, default=Path("/tmp/broadface_study"), help="warm-start checkpoints")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--skip-costs", action="store_true", help="no step-time / memory measurements")
    ap.add_argument("--where", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="run only the planned runs whose RunSpec field has this value (e.g. compensate=False)")
    ap.add_argument("--import-demo", type=Path, metavar="RESULTS_JSON",
                    help="take the sweep's queue-0 / compensated arms from a `broadface demo` results.json")
    ap.add_argument("--queues", nargs="+", type=int, help="sweep/warm queue sizes (default: 0 1k 4k 8k 16k 32k)")
    ap.add_argument("--regime-classes", nargs="+", help="training classes of the regime map: counts, 'all', 'rot'")
    ap.add_argument("--regime-batches", nargs="+", type=int, help="batch sizes of the regime map (default: 32 128 512)")
    ap.add_argument("--regime-queue", type=int, help="the regime map's queue (default: 8192)")
    ap.add_argument("--regime-steps", type=int, help="steps of each regime-map run (default: 1000)")
    args = ap.parse_args()
    if args.from_json:
        return markdown.render(json.loads(args.from_json.read_text()), args.out, args.results)
    sc = StudyConfig.quick() if args.quick else StudyConfig()
    if args.parts:
        sc.parts = tuple(args.parts)
    if args.seeds:
        sc.seeds = tuple(args.seeds)
    if args.queues:
        sc.queues = tuple(args.queues)
    if args.regime_classes:
        sc.regime_classes = tuple(_regime_classes(c) for c in args.regime_classes)
    if args.regime_batches:
        sc.regime_batches = tuple(args.regime_batches)
    if args.regime_queue is not None:
        sc.regime_queue = args.regime_queue
    if args.regime_steps:
        sc.regime_steps = args.regime_steps
    specs = [s for s in plan(sc) if all(_matches(s, w) for w in args.where)]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "runs.json"
    data = _load(json_path)
    command = "python bench/study.py " + " ".join(sys.argv[1:])
    data.setdefault("commands", [data["command"]] if "command" in data else [])
    if command not in data["commands"]:
        data["commands"].append(command)
    data.update(command=command, config=asdict(sc),
                machine=markdown.machine(), wall_s_before=data.get("wall_s", 0), commit=_commit())
    data.setdefault("started", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if args.import_demo:
        _import_demo(data, args.import_demo)
    train_all(specs, data, json_path, args.work, args.workers, args.threads)
    if not args.skip_costs:
        measure_costs([RunSpec.from_dict(r["spec"]) for r in data["runs"]], data, args.threads, args.quick)
    data["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    atomic_write_json(json_path, data, indent=None)
    markdown.render(data, args.out, args.results)


if __name__ == "__main__":
    from broadface.allocator import configure_from_env

    configure_from_env()  # as the broadface command: freed memory kept unless BROADFACE_MALLOC=system
    main()
