"""Training benchmark: a full trainer step, BroadFace against plain ArcFace, per union variant.

A step is ``Trainer.train_step``: loading a batch (in-memory random images through the deterministic
loader), backbone forward/backward, the head, SGD update and LR schedule. Labels are random over C classes;
the queue is pre-filled with Q random embeddings so every timed step trains the classifier on the full union.
The union variants are bench/head.py's: ``fp32`` (the default), ``bf16`` (head.union_dtype=bfloat16),
``rate 0.3`` / ``rate 0.1`` (head.sample_rate: the sampled union), ``bf16 + 0.1``. Each configuration runs in
a fresh subprocess (its own warm-up), in alternating rounds, so the variants are compared side by side under
the same machine load; the step time is the median over rounds of each round's median. Peak memory is the
process's max RSS (CPU) or ``torch.cuda.max_memory_allocated``. ``MAC model`` is the ratio a multiply-add
count predicts (below), over the classes the step used.

    python bench/train.py --quick                                  # mobilefacenet 56x56, C=10k: minutes
    python bench/train.py --model mobilefacenet --size 112 --classes 85742
    python bench/train.py --model iresnet50 --size 112 --classes 85742 --micro-batch 32 --same-process
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

UNIONS = {"plain": (0, "float32", 1.0), "fp32": (None, "float32", 1.0), "bf16": (None, "bfloat16", 1.0),
          "rate 0.3": (None, "float32", 0.3), "rate 0.1": (None, "float32", 0.1),
          "bf16 + 0.1": (None, "bfloat16", 0.1)}  # name: (queue (None: --queue), union dtype, sample rate)


class RandomFaces(torch.utils.data.Dataset):
    """``n`` random 3 x S x S images with random labels over ``num_classes`` (kept in memory)."""

    supports_generator = True

    def __init__(self, n: int, size: int, num_classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def getitem(self, i: int, generator=None):
        return self.images[i], int(self.labels[i])

    def __getitem__(self, i: int):
        return self.getitem(i)


def build_trainer(args: argparse.Namespace, queue: int, union_dtype: str, sample_rate: float):
    """A trainer of one union variant on random faces, its queue full (filling it by training takes Q/B steps)."""
    from broadface.train.config import Config, apply_overrides
    from broadface.train.trainer import Trainer

    cfg = apply_overrides(Config(), [
        f"model.name={args.model}", f"model.input_size={args.size}", f"model.embedding_size={args.dim}",
        f"head.queue_size={queue}", f"train.batch_size={args.batch}", f"train.device={args.device}",
        f"train.steps={10**6}", "train.output=null", "data.val_split=null", "optim.lr=0.01",
        f"head.union_dtype={union_dtype}", f"head.sample_rate={sample_rate}", f"train.amp={args.amp}",
        f"train.micro_batch={args.micro_batch or 'null'}"])
    data = RandomFaces(args.batch * 8, args.size, args.classes)
    trainer = Trainer(cfg, train_set=data, num_classes=args.classes, progress=False)
    if queue:
        g = torch.Generator().manual_seed(1)
        emb = torch.randn(queue, args.dim, generator=g).to(trainer.device)
        labels = torch.randint(0, args.classes, (queue,), generator=g).to(trainer.device)
        trainer.head.enqueue(emb, labels)
    return trainer


def timed_step(trainer) -> float:
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    """Time ``args.steps`` trainer steps after ``args.warmup`` and print one JSON line."""
    torch.set_num_threads(args.threads)
    trainer = build_trainer(args, args.queue, args.union_dtype, args.sample_rate)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = [timed_step(trainer) for _ in range(args.warmup + args.steps)][args.warmup:]
    cuda = trainer.device.type == "cuda"
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # ru_maxrss is KiB on Linux
    print(json.dumps({"queue": args.queue, "step_s": statistics.median(times), "peak_mb": peak,
                      "base_mb": base_rss / 1024, "fill": trainer.head.queue.fill,
                      "classes_used": trainer.head.stats.sampled_classes}))


def interleaved(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every union variant's trainer in this one process, one step each per round: load drift hits all alike
    (no per-variant peak memory then: they share the process)."""
    torch.set_num_threads(args.threads)
    trainers = {}
    for u in args.unions:
        queue, dtype, rate = UNIONS[u]
        trainers[u] = build_trainer(args, args.queue if queue is None else queue, dtype, rate)
        for _ in range(args.warmup):
            timed_step(trainers[u])
    times = {u: [] for u in trainers}
    for _ in range(args.rounds * args.steps):
        for u, t in trainers.items():
            times[u].append(timed_step(t))
    return {u: [{"queue": t.head.queue.size, "step_s": statistics.median(times[u]), "peak_mb": float("nan"),
                 "classes_used": t.head.stats.sampled_classes}] for u, t in trainers.items()}


def predicted_ratio(encoder_macs: float, batch: int, classes: int, dim: int, queue: int, used: int | None = None
                    ) -> float:
    """Step-time ratio BroadFace/plain from a multiply-add count (matmul-bound step).

    Plain step: encoder forward + backward (~3x its MACs per image) + classifier logits, ∂e and ∂W
    (3·B·C·D). BroadFace over ``used`` of the classes (sampling; default all): the mini-batch's logits and
    ∂e (2·B·used·D) and the union's logits and ∂W over B + Q rows (2·(B+Q)·used·D).
    """
    used = classes if used is None else used
    plain = 3 * encoder_macs * batch + 3 * batch * classes * dim
    if queue == 0:
        return 1.0
    return (3 * encoder_macs * batch + 2 * batch * used * dim + 2 * (batch + queue) * used * dim) / plain


def encoder_macs(name: str, size: int, dim: int) -> float:
    from broadface.models import build_model, count_macs

    return float(count_macs(build_model(name, embedding_size=dim, input_size=size), size))


def run_config(args: argparse.Namespace, union: str) -> dict:
    queue, dtype, rate = UNIONS[union]
    cmd = [sys.executable, __file__, "--worker", "--queue", str(args.queue if queue is None else queue),
           "--union-dtype", dtype, "--sample-rate", str(rate)]
    for k in ("model", "size", "dim", "batch", "classes", "steps", "warmup", "device", "threads", "amp"):
        cmd += [f"--{k}", str(getattr(args, k))]
    if args.micro_batch:
        cmd += ["--micro-batch", str(args.micro_batch)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"killed (signal {-out.returncode}, out of memory?)" if out.returncode < 0
                else f"failed: {tail[:80]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(v: float) -> str:
    return "–" if v != v else f"{v:,.0f}"  # NaN: not measured (--same-process)


def main() -> None:
    from broadface.allocator import configure_from_env

    malloc = configure_from_env()  # as the broadface command: freed memory kept unless BROADFACE_MALLOC=system
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="mobilefacenet 56x56, fewer steps and rounds")
    p.add_argument("--model", default=None)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--queue", type=int, default=8192)
    p.add_argument("--unions", nargs="+", choices=list(UNIONS), default=list(UNIONS))
    p.add_argument("--micro-batch", type=int, default=None,
                   help="train.micro_batch: the encoder's forward/backward in pieces (memory; iResNet-50 at B=128)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="train.amp of the encoder")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per run (the queue starts full)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--same-process", action="store_true",
                   help="all variants in one process, one step each per round (steady ratios; no peak memory)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--union-dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--sample-rate", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model or ("mobilefacenet" if args.quick else "iresnet18")
    args.steps = args.steps or (3 if args.quick else 4)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.warmup = args.warmup if args.warmup is not None else 1
    if args.worker:
        worker(args)
        return

    import os

    print(f"# {args.model} {args.size}x{args.size}, D={args.dim}, B={args.batch}, C={args.classes}, Q={args.queue}, "
          f"amp={args.amp}, micro-batch {args.micro_batch}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.rounds} rounds, device={args.device}, threads={args.threads}, malloc={malloc}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.same_process:
        runs = interleaved(args)
    else:
        runs = {u: [] for u in args.unions}
        for _ in range(args.rounds):
            for u in args.unions:  # alternate so drift in machine load hits every variant alike
                runs[u].append(run_config(args, u))
    macs = encoder_macs(args.model, args.size, args.dim)
    done = {u: [r for r in rs if "step_s" in r] for u, rs in runs.items()}
    base = statistics.median(r["step_s"] for r in done["plain"]) if done.get("plain") else None
    print("| union | Q | classes used | step ms | samples/s | peak MB | vs ArcFace | MAC model |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for u in args.unions:
        if not done[u]:
            print(f"| {u} | – | – | {runs[u][-1]['skipped']} | – | – | – | – |")
            continue
        step = statistics.median(r["step_s"] for r in done[u])
        r0 = done[u][-1]
        pred = predicted_ratio(macs, args.batch, args.classes, args.dim, r0["queue"], r0["classes_used"])
        vs = f"{step / base:.3f}" if base else "–"
        print(f"| {u} | {r0['queue']} | {r0['classes_used']:,} | {step * 1e3:,.0f} | {args.batch / step:.1f} "
              f"| {_mb(max(r['peak_mb'] for r in done[u]))} | {vs} | {pred:.3f} |")
        rows.append({"union": u, "step_s": step, "vs_plain": None if base is None else step / base, "mac_model": pred,
                     **r0})
    paper = predicted_ratio(encoder_macs("iresnet100", 112, 512), 128, 85_742, 512, 8192)
    print(f"\nencoder {macs / 1e9:.3f} GMAC/image. The same MAC model for the paper's setting (iResNet-100 at 112, "
          f"B=128 per GPU, C=85,742, Q=8192 per GPU, fp32 union) predicts {paper:.3f}.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "encoder_gmac": macs / 1e9, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
