"""Reproduction study: does BroadFace do what the paper says, measured on the real data here.

    python bench/study.py                 # full study (3 seeds), writes docs/RESULTS.md + docs/study/*
    python bench/study.py --quick         # 1 seed, short runs, small queues: a few minutes (debugging)
    python bench/study.py --from-json docs/study/runs.json   # re-render RESULTS.md and the plots only

Runs (see broadface.study): per seed one ArcFace warm start, then every arm (queue 0, and each queue
size with and without compensation) fine-tuned from it with the same seed, steps and batch size;
then the step-time overhead and the memory table. Results are appended to runs.json after every
run, so an interrupted study keeps what it finished and ``--from-json`` renders it (marked incomplete).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

from broadface.study import costs, markdown, report
from broadface.study.runs import StudyConfig, arm_run, arms, config_dict, warm_start_run

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_CLASSES = 136


def quick_config() -> StudyConfig:
    return StudyConfig(seeds=[0], queues=[0, 1024, 4096], warm_steps=60, steps=60, eval_every=20,
                       error_steps=[40, 60], error_stride=2)


def _save(data: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    tmp.replace(path)


def render(data: dict, out_dir: Path, results: Path, notes: Path) -> None:
    figures = report.plots(data, out_dir)
    markdown.write(data, results, notes, figures)
    print(f"wrote {results} and {len(figures)} plot(s) in {out_dir}", flush=True)


def train_all(sc: StudyConfig, data: dict, json_path: Path, work: Path, workers: int) -> None:
    """Warm starts, then every (seed, arm) job in a pool of ``workers`` processes; saved after each run."""
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        warm = {s: str(work / f"warm_seed{s}.pt") for s in sc.seeds}
        futures = {pool.submit(warm_start_run, sc, s, warm[s]): ("warm", s) for s in sc.seeds}
        arm_futures = {}
        total = len(sc.seeds) * (1 + len(arms(sc)))
        while futures or arm_futures:
            pending = {**futures, **arm_futures}
            fut = next(as_completed(pending))
            res = fut.result()
            futures.pop(fut, None)
            arm_futures.pop(fut, None)
            data["runs"].append(res)
            if res["kind"] == "warm":  # its arms can start now
                for q, c in arms(sc):
                    arm_futures[pool.submit(arm_run, sc, res["seed"], q, c, warm[res["seed"]])] = ("arm", res["seed"])
            data["progress"] = f"{len(data['runs'])} of {total} training runs finished"
            data["wall_s"] = time.perf_counter() - t0
            _save(data, json_path)
            print(f"[{time.perf_counter() - t0:6.0f} s] {data['progress']}: {res['kind']} seed {res['seed']} "
                  f"queue {res.get('queue', 0)} comp {res.get('compensate', '-')}: R@1 {res['recall@1']:.3f} "
                  f"pair {100 * res['pair_acc']:.2f}% ({res['wall_s']:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 60 steps, queues 0/1k/4k (debugging)")
    ap.add_argument("--from-json", type=Path, help="only re-render RESULTS.md and the plots from this runs.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "study", help="plots and runs.json")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    ap.add_argument("--notes", type=Path, default=ROOT / "docs" / "study_notes.md")
    ap.add_argument("--work", type=Path, default=Path("/tmp/broadface_study"), help="warm-start checkpoints")
    ap.add_argument("--workers", type=int, default=2, help="training runs in parallel (1 torch thread each)")
    ap.add_argument("--skip-costs", action="store_true", help="no overhead / memory measurements")
    args = ap.parse_args()
    if args.from_json:
        return render(json.loads(args.from_json.read_text()), args.out, args.results, args.notes)

    sc = quick_config() if args.quick else StudyConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "runs.json"
    command = "python bench/study.py" + (" --quick" if args.quick else "")
    data = {"command": command, "argv": sys.argv[1:], "config": config_dict(sc), "machine": markdown.machine(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "runs": [], "complete": False}
    t0 = time.perf_counter()
    train_all(sc, data, json_path, args.work, args.workers)
    if not args.skip_costs:
        t = time.perf_counter()
        data["overhead"] = costs.overhead(sc, OMNIGLOT_CLASSES, rounds=2 if args.quick else 3)
        data["overhead_meta"] = {"width": sc.width, "batch": sc.batch_size, "classes": OMNIGLOT_CLASSES,
                                 "dim": sc.embedding_size, "rounds": 2 if args.quick else 3, "steps": 5,
                                 "threads": sc.threads, "wall_s": time.perf_counter() - t,
                                 "machine": markdown.machine()}
        _save(data, json_path)
        t = time.perf_counter()
        referenced = [128, 256, 512] if args.quick else [128, 256, 512, 1024, 2048]
        data["memory"] = costs.memory(sc, OMNIGLOT_CLASSES, referenced, small_batch=128)
        data["memory_meta"] = {"width": sc.width, "size": sc.input_size, "classes": OMNIGLOT_CLASSES,
                               "dim": sc.embedding_size, "wall_s": time.perf_counter() - t}
    data["wall_s"] = time.perf_counter() - t0
    data["complete"] = True
    data["progress"] = "complete"
    _save(data, json_path)
    render(data, args.out, args.results, args.notes)


if __name__ == "__main__":
    main()
