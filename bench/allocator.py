"""Allocator benchmark: glibc's own malloc against freed memory kept (``broadface.allocator``), side by side.

Runs bench/head.py (the head alone: plain ArcFace, the fp32 and the bf16 BroadFace union) and bench/train.py
(a full trainer step: plain ArcFace and BroadFace) once under ``BROADFACE_MALLOC=system`` and once under
``keep`` (the default of every process broadface starts), alternating, ``--rounds`` times, and prints each
row's step time and peak RSS under both with their ratios. Step times are bench/head.py's and bench/train.py's
own medians (each variant in alternating rounds inside its run); the ratio of a row is the median over
rounds of system ÷ keep. Same bits either way: only where memory comes from changes.

    python bench/allocator.py                # C=85,742, Q=8192 head; MobileFaceNet 112 px, C=10k step: ~25 min
    python bench/allocator.py --rounds 1 --head-classes 10000 --train-size 56     # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("system", "keep")


def run_bench(script: str, args: list[str], mode: str) -> list[dict]:
    """One run of bench/<script> under BROADFACE_MALLOC=mode; its JSON rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "rows.json"
        proc = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out_json)],
                              env={**os.environ, "BROADFACE_MALLOC": mode}, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench/{script} under BROADFACE_MALLOC={mode} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out_json.read_text())["rows"]


def head_rows(rows: list[dict]) -> dict[str, tuple[float, float]]:
    return {f"head {r['variant']}": (r["time"], r.get("peak_mib", float("nan")) * 2**20 / 1e6)
            for r in rows if "time" in r}


def train_rows(rows: list[dict], model: str) -> dict[str, tuple[float, float]]:
    return {f"{model} step, {r['union']}": (r["step_s"], r["peak_mb"]) for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="system/keep pairs, alternating")
    p.add_argument("--head-classes", type=int, default=85_742)
    p.add_argument("--head-queue", type=int, default=8192)
    p.add_argument("--train-model", default="mobilefacenet")
    p.add_argument("--train-size", type=int, default=112)
    p.add_argument("--train-classes", type=int, default=10_000)
    p.add_argument("--train-queue", type=int, default=8192)
    args = p.parse_args()
    head_args = ["--classes", str(args.head_classes), "--queues", str(args.head_queue), "--variants", "plain", "fp32",
                 "bf16", "--rounds", "3"]
    train_args = ["--model", args.train_model, "--size", str(args.train_size), "--classes", str(args.train_classes),
                  "--queue", str(args.train_queue), "--unions", "plain", "fp32", "--steps", "2", "--warmup", "1",
                  "--rounds", "1"]
    print(f"# head: C={args.head_classes:,}, Q={args.head_queue:,}; step: {args.train_model} {args.train_size} px, "
          f"C={args.train_classes:,}, Q={args.train_queue:,}; {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):  # alternate which goes first
            rows = {**head_rows(run_bench("head.py", head_args, mode)),
                    **train_rows(run_bench("train.py", train_args, mode), args.train_model)}
            runs[mode].append(rows)
            print(f"  round {r + 1} {mode}: " + ", ".join(f"{k} {v[0] * 1e3:,.0f} ms" for k, v in rows.items()),
                  flush=True)
    print("\n| workload | system ms | keep ms | speed-up | system peak MB | keep peak MB | peak ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in runs["keep"][0]:
        t = {m: statistics.median(x[name][0] for x in runs[m]) for m in MODES}
        mem = {m: max(x[name][1] for x in runs[m]) for m in MODES}
        speed = statistics.median(s[name][0] / k[name][0] for s, k in zip(runs["system"], runs["keep"]))
        print(f"| {name} | {t['system'] * 1e3:,.0f} | {t['keep'] * 1e3:,.0f} | {speed:.2f}× | {mem['system']:,.0f} "
              f"| {mem['keep']:,.0f} | {mem['keep'] / mem['system']:.2f}× |")
    print("\nspeed-up: median over rounds of system ÷ keep step time; peak: max RSS rise (head: of a variant's own "
          "process over two steps; step: the trainer process's max RSS), the largest of the rounds.")


if __name__ == "__main__":
    main()
