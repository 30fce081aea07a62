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

from broadface.fileio import atomic_write_json
from broadface.study import costs, markdown
from broadface.study.plan import PARTS, StudyConfig, plan
from broadface.study.runs import RunSpec, run

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": []}


def _warm_path(work: Path, spec: RunSpec) -> Path:
    import hashlib

    return work / f"warm_{hashlib.sha256(spec.key().encode()).hexdigest()[:16]}.pt"


def train_all(specs: list[RunSpec], data: dict, json_path: Path, work: Path, workers: int, threads: int) -> None:
    """Warm starts first, then every arm whose warm start exists, ``workers`` processes at a time."""
    done = {r["key"] for r in data["runs"]}
    todo = [s for s in specs if s.key() not in done]
    warms = list(dict.fromkeys(w for s in todo if (w := s.warm()) is not None))
    ready = {w for w in warms if _warm_path(work, w).exists()}
    print(f"{len(todo)} of {len(specs)} runs to do ({len(done)} in {json_path}), {len(warms) - len(ready)} warm starts",
          flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
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
                print(f"[{time.perf_counter() - t0:6.0f} s] {kind} {spec.part} seed {spec.seed} C={res['num_classes']} "
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
    args = ap.parse_args()
    if args.from_json:
        return markdown.render(json.loads(args.from_json.read_text()), args.out, args.results)
    sc = StudyConfig.quick() if args.quick else StudyConfig()
    if args.parts:
        sc.parts = tuple(args.parts)
    if args.seeds:
        sc.seeds = tuple(args.seeds)
    specs = plan(sc)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "runs.json"
    data = _load(json_path)
    data.update(command="python bench/study.py " + " ".join(sys.argv[1:]), config=asdict(sc),
                machine=markdown.machine(), wall_s_before=data.get("wall_s", 0), commit=_commit())
    data.setdefault("started", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    train_all(specs, data, json_path, args.work, args.workers, args.threads)
    if not args.skip_costs:
        measure_costs([RunSpec.from_dict(r["spec"]) for r in data["runs"]], data, args.threads, args.quick)
    data["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    atomic_write_json(json_path, data, indent=None)
    markdown.render(data, args.out, args.results)


if __name__ == "__main__":
    main()
