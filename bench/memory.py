"""Memory and scaling, measured side by side in one run (the paper's Fig. 6, on a small CPU backbone).

1. Peak memory of one training step, each configuration in a fresh subprocess (``ru_maxrss``
   on CPU, ``max_memory_allocated`` on CUDA): plain mini-batch training at batch B versus
   BroadFace at batch b with a queue of Q = B − b embeddings (the classifier sees the same
   B instances per step), and BroadFace with micro-batched encoder passes.
2. Step time of 1 process versus 2 gloo processes (DDP backbone + class-sharded BroadFace
   head) at the same global batch: the bare loop, and the real ``broadface.train.Trainer``
   step (what ``torchrun --nproc_per_node 2 -m broadface train`` runs), on in-memory images.

    python bench/memory.py [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak(device: str) -> bool:
    """Start a new peak: CUDA's counter, or the kernel's RSS high-water mark (/proc/self/clear_refs)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False  # ru_maxrss then also covers the warm-up


def _current_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return _peak_mb(device)


def _setup(cfg: dict, device: str):
    from broadface.models import build_model

    torch.manual_seed(0)
    model = build_model("tinycnn", embedding_size=cfg["dim"], input_size=cfg["size"], width=cfg["width"]).to(device)
    return model


def child(cfg: dict) -> None:
    """One configuration in this fresh process; prints a JSON line."""
    from broadface.heads import ArcFace, BroadFace
    from broadface.train.memory import micro_batch_backward

    device = cfg["device"]
    torch.set_num_threads(cfg.get("threads", 1))
    model = _setup(cfg, device)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
    y = torch.randint(0, cfg["classes"], (cfg["batch"],), device=device)
    # warm-up on 2 images: loads kernels and allocator pools, which every configuration pays alike
    ArcFace(cfg["classes"], cfg["dim"]).to(device)(model(x[:2]), y[:2]).backward()
    model.zero_grad(set_to_none=True)
    reset = _reset_peak(device)
    base = _current_mb(device)
    head = BroadFace(ArcFace(cfg["classes"], cfg["dim"]), queue_size=cfg["queue"]).to(device)
    if cfg["queue"]:  # a full queue, as in steady-state training
        for _ in range(-(-cfg["queue"] // 1024)):
            head.enqueue(torch.randn(1024, cfg["dim"], device=device),
                         torch.randint(0, cfg["classes"], (1024,), device=device))
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    for _ in range(cfg["steps"]):
        opt.zero_grad(set_to_none=True)
        if cfg["micro"]:
            micro_batch_backward(model, lambda e: head(e, y), x, cfg["micro"])
        else:
            head(model(x), y).backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"base_mb": base, "peak_mb": _peak_mb(device), "reset": reset}))


def run_child(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"configuration {cfg} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(args, common: dict) -> None:
    big, smalls = common["big"], common["smalls"]
    rows = [("plain", big, 0, 0)]
    for b in smalls:
        rows += [("plain", b, 0, 0), ("broadface", b, big - b, 0)]
    rows += [("plain, micro-batch", big, 0, smalls[0])]  # batch B, encoder run b images at a time
    print(f"\n1. Peak memory of a training step ({common['device']}, tinycnn width {common['width']}, "
          f"{common['size']}x{common['size']} images, C={common['classes']}, D={common['dim']}); fresh process each")
    print(f"{'config':<17} {'batch b':>8} {'queue Q':>8} {'b+Q':>6} {'micro':>6} {'peak MB':>9} {'step MB':>9} "
          f"{'vs plain B':>11}")
    ref, reset = None, False
    for kind, b, q, micro in rows:
        res = run_child({**common, "batch": b, "queue": q, "micro": micro})
        reset = res["reset"]
        step = res["peak_mb"] - res["base_mb"]
        ref = step if ref is None else ref
        print(f"{kind:<17} {b:>8} {q:>8} {b + q:>6} {micro or '-':>6} {res['peak_mb']:>9.0f} {step:>9.0f} "
              f"{step / ref:>10.2f}x")
    how = ("CUDA stats" if common["device"] == "cuda" else "/proc/self/clear_refs" if reset
           else "nothing: ru_maxrss includes the warm-up")
    print(f"'step MB' = peak − memory before the head was built: classifier, queue, activations, gradients and "
          f"optimizer state (after a 2-image warm-up; peak reset via {how}). Ratios relative to plain training "
          f"at B={big}.")


# ----------------------------------------------------------------------------- step time


def _timed_steps(model, head, opt, x, y, steps: int) -> list[float]:
    times = []
    for i in range(steps + 1):  # +1 warm-up
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        head(model(x), y).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    return times


def _rank(rank: int, world: int, init: str, cfg: dict, out: str) -> None:
    import torch.distributed as dist

    from broadface.dist import rank_slice
    from broadface.heads import ArcFace, ShardedBroadFace

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_setup(cfg, "cpu"))
        head = ShardedBroadFace(ArcFace, cfg["classes"], cfg["dim"], queue_size=cfg["queue"] // world)
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=g)[rank_slice(cfg["batch"], world, rank)]
        y = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g)[rank_slice(cfg["batch"], world, rank)]
        times = _timed_steps(model, head, opt, x, y, cfg["steps"])
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


class _Images(torch.utils.data.Dataset):
    """Fixed random images and labels, in memory (no decoding in the timed steps)."""

    def __init__(self, n: int, size: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _trainer_times(cfg: dict, world: int) -> list[float]:
    """Seconds per step of the real Trainer (this process is one rank of ``world``)."""
    from broadface.train.config import Config, apply_overrides
    from broadface.train.trainer import Trainer

    steps, stamps = cfg["steps"] + 1, []
    conf = apply_overrides(Config(), [
        "model.name=tinycnn", f"model.embedding_size={cfg['dim']}", f"model.input_size={cfg['size']}",
        f"model.kwargs={{width: {cfg['width']}}}", f"head.queue_size={cfg['queue'] // world}",
        f"train.batch_size={cfg['batch'] // world}", f"train.steps={steps}", "train.log_every=1", "train.output=null",
        "train.device=cpu", "data.val_split=null", "optim.lr=0.01"])
    data = _Images(cfg["batch"] * (steps + 1), cfg["size"], cfg["classes"])
    trainer = Trainer(conf, train_set=data, progress=False,
                      callbacks=[lambda kind, r: stamps.append(time.perf_counter())])
    trainer.fit()
    return [b - a for a, b in zip(stamps, stamps[1:])]  # from the end of step 1 (warm-up) on


def _trainer_rank(rank: int, world: int, init: str, cfg: dict, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        times = _trainer_times(cfg, world)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def time_table(args, common: dict) -> None:
    import torch.multiprocessing as mp

    from broadface.heads import ArcFace, BroadFace

    cfg = {**common, "batch": common["big"], "queue": common["big"] * 2, "steps": common["time_steps"]}
    print(f"\n2. Step time at global batch {cfg['batch']}, BroadFace queue {cfg['queue']} in total, "
          f"C={cfg['classes']} (CPU, {os.cpu_count()} cores visible, shared)")
    print(f"{'setup':<50} {'median s/step':>14} {'samples/s':>10} {'speed-up':>9}")
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model = _setup(cfg, "cpu")
        head = BroadFace(ArcFace(cfg["classes"], cfg["dim"]), queue_size=cfg["queue"])
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=g)
        y = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g)
        results.append((f"1 process, {threads} thread(s), BroadFace", statistics.median(
            _timed_steps(model, head, opt, x, y, cfg["steps"]))))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_rank, args=(2, f"file://{tmp}/rdv", cfg, out), nprocs=2, start_method="spawn")
        times = json.loads(Path(out).read_text())
        results.append(("2 processes x 1 thread, DDP + ShardedBroadFace", statistics.median(times)))
    torch.set_num_threads(1)
    results.append(("1 process, 1 thread, Trainer step", statistics.median(_trainer_times(cfg, 1))))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_trainer_rank, args=(2, f"file://{tmp}/rdv", cfg, out), nprocs=2, start_method="spawn")
        results.append(("2 processes x 1 thread, Trainer step (torchrun)", statistics.median(
            json.loads(Path(out).read_text()))))
    base = results[0][1]
    for name, t in results:
        print(f"{name:<50} {t:>14.3f} {cfg['batch'] / t:>10.1f} {base / t:>8.2f}x")
    print(f"Trainer step, 2 processes vs 1 process: {results[-2][1] / results[-1][1]:.2f}x speed-up")
    print("speed-up relative to 1 process with 1 thread; timings on a shared machine are noisy.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute on a CPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        common = dict(big=128, smalls=[32], size=32, width=32, dim=128, classes=2000, steps=2, time_steps=3)
    else:
        common = dict(big=512, smalls=[64, 128], size=64, width=32, dim=128, classes=10000, steps=2, time_steps=5)
    common["device"] = args.device
    memory_table(args, common)
    time_table(args, common)


if __name__ == "__main__":
    from broadface.allocator import configure_from_env

    configure_from_env()  # as the broadface command: freed memory kept unless BROADFACE_MALLOC=system
    main()
