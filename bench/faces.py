"""Does BroadFace help on faces here? ArcFace vs BroadFace from scratch on the shared face sets, paired seeds.

Two face settings where a batch shows few of the training identities (the regime the method is for):

* ``lfw``:    train on the LFW identities outside View-2 fold ``--fold`` (5,314 identities, 12,052 images,
              most with one image), test on fold ``--fold``: its 600 pairs (10-fold threshold protocol
              inside them) and Recall@1 over its identities;
* ``celeba``: train on CelebA-299's 149 training identities (3,214 images) with a small batch (16 images:
              ~10 % of the identities per batch; queue 2,048, below the image count, so it holds no stale
              copy of an image), test on the 150 unseen identities (Recall@1) and LFW (6,000 pairs).

    python bench/faces.py --setting celeba --seeds 0 1 2 --workers 2 --json docs/faces/celeba.json
    python bench/faces.py --setting lfw --fold 0 --seeds 0 1 2 --json docs/faces/lfw.json

Each seed trains both arms with the same initialisation and data order; the table prints the paired
difference. Runs go ``--workers`` processes at a time (``--threads`` each); each is appended to ``--json``
as it finishes (a rerun skips finished runs).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from broadface.fileio import atomic_write_json
from broadface.metrics.paired import paired_difference
from broadface.study.parallel import run_parallel

DEFAULTS = {"celeba": {"batch": 16, "queue": 2048}, "lfw": {"batch": 64, "queue": 8192}}


def _config(a, seed: int, queue: int):
    from broadface.train.config import Config

    c = Config()
    c.model.name, c.model.embedding_size, c.model.input_size = "iresnet", 128, a.size
    c.model.kwargs = {"layers": [1, 1, 1, 1], "base_width": 32}
    c.head.loss, c.head.scale, c.head.margin, c.head.queue_size = "arcface", a.scale, a.margin, queue
    c.optim.lr, c.optim.weight_decay = a.lr, 5e-4
    c.schedule.name, c.schedule.milestones, c.schedule.warmup_steps = "multistep", [int(0.8 * a.steps)], a.steps // 20
    c.train.steps, c.train.batch_size, c.train.seed = a.steps, a.batch, seed
    c.train.output, c.train.tensorboard, c.train.device = None, False, "cpu"
    c.data.val_split = None
    return c


def _sets(a):
    """(train set, retrieval test set, LFW pair set) of the setting."""
    from broadface.data import EvalTransform, FaceTransform, open_dataset
    from broadface.eval.verification import lfw_pair_set
    from broadface.paths import data_root

    root = data_root()
    train_tf, eval_tf = FaceTransform(a.size, flip_p=0.5), EvalTransform(a.size)
    pairs = lfw_pair_set(root / "lfw" / "pairs.txt", root / "lfw" / "aligned-112x112")
    if a.setting == "celeba":
        return (open_dataset("celeba299", "train", train_tf), open_dataset("celeba299", "test", eval_tf), pairs)
    train = open_dataset("lfw", "train", train_tf, test_fold=a.fold)
    test = open_dataset("lfw", "test", eval_tf, test_fold=a.fold)
    keep = np.flatnonzero(np.arange(len(pairs)) // 600 == a.fold)  # the fold's 300 + 300 pairs
    return train, test, replace(pairs, left=pairs.left[keep], right=pairs.right[keep], issame=pairs.issame[keep])


def run_arm(a, seed: int, queue: int) -> dict:
    from broadface.eval.retrieval import evaluate_retrieval
    from broadface.eval.verification import evaluate_pairs
    from broadface.train.trainer import Trainer

    torch.set_num_threads(a.threads)
    train, test, pairs = _sets(a)
    tr = Trainer(_config(a, seed, queue), train_set=train, progress=False)
    t0 = time.perf_counter()
    first = None
    while tr.step < a.steps:
        stats = tr.train_step()
        first = stats.as_dict()["batch_loss"] if first is None else first
    train_s = time.perf_counter() - t0
    ret = evaluate_retrieval(tr.model, test, flip=True)
    ver = evaluate_pairs(tr.model, pairs, folds=10, flip=True)
    return {"seed": seed, "queue": queue, "train_s": round(train_s, 1), "first_loss": first,
            "classes": tr.num_classes, "images": len(train), "recall@1": ret["recall@1"], "recall@8": ret["recall@8"],
            "lfw_accuracy": ver["accuracy"], "lfw_pairs": ver["pairs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=["lfw", "celeba"], required=True)
    ap.add_argument("--fold", type=int, default=0, help="lfw: the View-2 fold held out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--queue", type=int, help=f"default per setting: {DEFAULTS}")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, help="default per setting (see --queue)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--scale", type=float, default=32.0)
    ap.add_argument("--margin", type=float, default=0.3)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (spawned processes; 1: in this one)")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    a.batch = a.batch or DEFAULTS[a.setting]["batch"]
    a.queue = a.queue if a.queue is not None else DEFAULTS[a.setting]["queue"]
    args = vars(a) | {"json": str(a.json)}
    data = json.loads(a.json.read_text()) if a.json.exists() else {"args": args, "runs": []}
    fixed = ("setting", "fold", "steps", "batch", "lr", "scale", "margin", "size")
    if any(data["args"].get(k) != args[k] for k in fixed):
        raise SystemExit(f"{a.json}: holds runs of {({k: data['args'].get(k) for k in fixed})}; "
                         f"this command asks for {({k: args[k] for k in fixed})} (use another --json)")
    done = {(r["seed"], r["queue"]) for r in data["runs"]}
    todo = [(seed, queue) for seed in a.seeds for queue in (0, a.queue) if (seed, queue) not in done]

    def save(_: int, r: dict) -> None:  # each run kept as it ends
        data["runs"].append(r)
        atomic_write_json(a.json, data)
        print(json.dumps(r), flush=True)

    run_parallel(run_arm, [(a, seed, queue) for seed, queue in todo], a.workers, save)
    by = {q: {r["seed"]: r for r in data["runs"] if r["queue"] == q} for q in (0, a.queue)}
    print(f"{'arm':<10} {'queue':>6} {'seeds':>5} {'Recall@1':>9} {'Recall@8':>9} {'LFW acc':>8} {'train s':>8}")
    for name, q in (("ArcFace", 0), ("BroadFace", a.queue)):
        rs = list(by[q].values())
        print(f"{name:<10} {q:>6} {len(rs):>5} {np.mean([r['recall@1'] for r in rs]):>9.4f} "
              f"{np.mean([r['recall@8'] for r in rs]):>9.4f} {np.mean([r['lfw_accuracy'] for r in rs]):>8.4f} "
              f"{np.median([r['train_s'] for r in rs]):>8.0f}")
    for metric in ("recall@1", "lfw_accuracy"):
        d = paired_difference({s: r[metric] for s, r in by[a.queue].items()}, {s: r[metric] for s, r in by[0].items()})
        se = "" if d.se is None else f" ± {100 * d.se:.2f}"
        print(f"{metric}: BroadFace − ArcFace = {100 * d.mean:+.2f}{se} points over seeds {list(d.seeds)}")


if __name__ == "__main__":
    from broadface.allocator import configure_from_env

    configure_from_env()  # as the broadface command: freed memory kept unless BROADFACE_MALLOC=system
    main()
