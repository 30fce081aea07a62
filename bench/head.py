"""Head benchmark: step time, peak memory and GFLOP/s of the classification head alone, per union variant.

For B=128, D=512 and a grid of classes C and queue sizes Q (the queue full), side by side:
  plain      ArcFace without a queue,
  fp32       BroadFace, the float32 union (the default),
  bf16       the union's matmuls in bfloat16 (head.union_dtype=bfloat16; fp32 log-sum-exp and ∂W sums),
  rate 0.3 / rate 0.1   the sampled union (head.sample_rate: every positive of batch and queue, a fraction
             of the negatives), fp32,
  bf16 + 0.1 both,
  (--dense)  the straightforward re-implementation as the official code does it (dense one-hot, cat-grown
             queue of e⁻ and W⁻_y, autograd over the union), where it fits in --mem-limit-gib,
  (--compare-src DIR)  the fp32 union of another checkout's code (e.g. main), in the same rounds.
A step is forward + backward + SGD update of the head, the embeddings a leaf tensor standing in for the
encoder. Step times are measured side by side: one process per (C, Q) holds every variant and times them in
alternating rounds (one step each per round, after one warm-up step each), the median over rounds, so drifts
in machine load hit every variant alike. Peak memory is measured apart, each variant in a fresh subprocess:
its max-RSS rise (CPU) or max_memory_allocated (CUDA) over a warm-up step and one more. GFLOP/s counts the
big matmuls (batch logits and ∂e, union logits and ∂W) over the classes the step used, against the fp32 or
bf16 matmul peak measured here at 2048³ (same threads): once at the start (``of peak``), and in every timed round of
each (C, Q) cell, in the process and between the rounds of its steps (``of the peak in the rounds``: against the
median of those, the ratio measured side by side; this VM's matmul rate moves by 10-20 % between minutes).

    python bench/head.py --quick            # C=10k, Q=4096: a few minutes on 2 CPU cores
    python bench/head.py                    # C ∈ {10k, 85,742}, Q ∈ {8192, 32768}
    python bench/head.py --json out.json    # also the rows as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

B, D = 128, 512
VARIANTS = {  # name: (kind, union dtype, sample rate)
    "plain": ("plain", "float32", 1.0), "fp32": ("broadface", "float32", 1.0),
    "bf16": ("broadface", "bfloat16", 1.0), "rate 0.3": ("broadface", "float32", 0.3),
    "rate 0.1": ("broadface", "float32", 0.1), "bf16 + 0.1": ("broadface", "bfloat16", 0.1),
}


class DenseBroadFace(torch.nn.Module):
    """The straightforward design: cat-grown queue of (e⁻, W⁻_y), dense one-hot logits."""

    def __init__(self, num_classes: int, dim: int, queue_size: int, s: float = 64.0, m: float = 0.5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.q, self.s, self.m = queue_size, s, m
        self.qe, self.qw, self.qy = torch.empty(0, dim), torch.empty(0, dim), torch.empty(0, dtype=torch.long)

    def _loss(self, x, w, y):
        cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1, 1)
        onehot = F.one_hot(y, w.shape[0]).float()
        sin = (1 - cos * cos).clamp_min(1e-12).sqrt()
        phi = cos * torch.cos(torch.tensor(self.m)) - sin * torch.sin(torch.tensor(self.m))
        return F.cross_entropy(self.s * (onehot * phi + (1 - onehot) * cos), y)

    def forward(self, e, y):
        w = self.weight
        batch = self._loss(e, w.detach(), y)
        lam = self.qe.norm(dim=1, keepdim=True) / self.qw.norm(dim=1, keepdim=True).clamp_min(1e-12)
        past = self.qe + lam * (w.detach()[self.qy] - self.qw)
        union = self._loss(torch.cat([e.detach(), past]), w, torch.cat([y, self.qy]))
        self.qe = torch.cat([self.qe, e.detach()])[-self.q:]
        self.qw = torch.cat([self.qw, w.detach()[y]])[-self.q:]
        self.qy = torch.cat([self.qy, y])[-self.q:]
        return batch + union - union.detach()


def build(cfg: dict):
    from broadface.heads import ArcFace, BroadFace

    C, Q, device = cfg["C"], cfg["Q"], cfg["device"]
    if cfg["kind"] == "plain":
        return ArcFace(C, D).to(device)
    if cfg["kind"] == "dense":
        head = DenseBroadFace(C, D, Q)
        head.qe, head.qw = torch.randn(Q, D, device=device), torch.randn(Q, D, device=device) * 0.01
        head.qy = torch.randint(0, C, (Q,), device=device)
        head.weight.data = head.weight.data.to(device)
        return head
    extra = {} if cfg["dtype"] == "float32" else {"union_dtype": getattr(torch, cfg["dtype"])}  # old code: no kwarg
    if cfg["rate"] < 1:
        head = BroadFace.sharded(ArcFace, C, D, Q, sample_rate=cfg["rate"], chunk_size=4096, **extra)
    else:
        head = BroadFace(ArcFace(C, D), queue_size=Q, chunk_size=4096, **extra)
    head = head.to(device)
    head.enqueue(torch.randn(Q, D, device=device), torch.randint(0, C, (Q,), device=device))  # a full queue
    return head


def head_flops(kind: str, C: int, Q: int) -> float:
    """Multiply-adds ×2 of the big matmuls: batch logits + ∂e (+ ∂W plain), union logits + ∂W."""
    if kind == "plain":
        return 2 * C * D * (3 * B)
    return 2 * C * D * (2 * B + 2 * (B + Q))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One head variant and its optimizer; ``step()`` times one training step of it."""

    def __init__(self, cfg: dict):
        self.cfg, self.head = cfg, build(cfg)
        self.opt = torch.optim.SGD(self.head.parameters(), lr=0.1, momentum=0.9)
        self.times, self.cpu, self.used = [], [], cfg["C"]

    def step(self, record: bool = True) -> None:
        device = self.cfg["device"]
        e = torch.randn(B, D, device=device, requires_grad=True)
        y = torch.randint(0, self.cfg["C"], (B,), device=device)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.head(e, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(device)
        if record:
            self.times.append(time.perf_counter() - t0)
            self.cpu.append(time.process_time() - c0)
        stats = getattr(self.head, "stats", None)
        self.used = stats.sampled_classes if stats is not None else self.cfg["C"]


def worker(cfg: dict) -> dict:
    """Peak memory of one variant (a warm-up step and one more) in this fresh process."""
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r = Runner(cfg)
    r.step(record=False)
    r.step()
    if cfg["device"] == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"time": r.times[0], "peak_mib": peak, "classes_used": r.used}


def interleaved(cfgs: dict[str, dict], rounds: int) -> dict[str, dict]:
    """Median step time of every variant, timed in alternating rounds in this one process."""
    torch.manual_seed(0)
    torch.set_num_threads(next(iter(cfgs.values()))["threads"])
    runners = {n: Runner(c) for n, c in cfgs.items()}
    for r in runners.values():
        r.step(record=False)
    first = next(iter(cfgs.values()))
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):  # each round also times the matmul peaks, so the ratio to them is side by side
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[name].append(matmul_gflops(first["device"], first["threads"], dtype))
        for r in runners.values():
            r.step()
    out = {n: {"time": statistics.median(r.times), "times": r.times, "cpu": statistics.median(r.cpu),
               "classes_used": r.used} for n, r in runners.items()}
    return {**out, "_peaks": peaks}


def matmul_gflops(device: str, threads: int, dtype: torch.dtype) -> float:
    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best, reps = 0.0, 5
    for _ in range(3):  # a peak: the best of three timings (one alone came out 0.68x of it on a cold VM)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def run_config(cfg: dict, mem_limit_gib: float, src: str | None = None, mode: str = "--worker") -> dict:
    if cfg.get("kind") == "dense":  # logits, one-hot, softmax grad, margin temporaries: ~6 dense (B+Q)×C fp32
        est = 6 * (B + cfg["Q"]) * cfg["C"] * 4 / 2**30
        if est > mem_limit_gib:
            return {"skipped": f"needs ~{est:.0f} GiB"}
    env = dict(os.environ, **({"PYTHONPATH": src, "PYTHONDONTWRITEBYTECODE": "1"} if src else {}))
    if src and os.environ.get("BROADFACE_MALLOC", "keep") != "system":  # allocator.keep_freed_memory's settings
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    out = subprocess.run([sys.executable, __file__, mode, json.dumps(cfg)], capture_output=True, text=True,
                         env=env)
    if out.returncode < 0:  # SIGKILL from the kernel's OOM killer, typically
        return {"skipped": f"killed (signal {-out.returncode}, out of memory?)"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed: {tail[:60]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(C: int, Q: int, name: str, r: dict, fp32: dict, peaks: dict) -> str:
    if "time" not in r:
        return f"| {C:,} | {Q:,} | {name} | – | {r['skipped']} | – | – | – | – | – | – |"
    kind = "plain" if name == "plain" else "broadface"
    gf = head_flops(kind, r["classes_used"], Q) / r["time"] / 1e9
    peak_name = "bf16" if name.startswith("bf16") else "fp32"
    speed = f"{fp32['time'] / r['time']:.2f}×" if "time" in fp32 and kind != "plain" else "–"
    cpu = f"{fp32['cpu'] / r['cpu']:.2f}×" if "cpu" in fp32 and "cpu" in r and kind != "plain" else "–"
    peak = f"{r['peak_mib']:,.0f}" if "peak_mib" in r else "–"
    rounds = peaks.get("rounds", {}).get(peak_name)
    in_rounds = f"{gf / statistics.median(rounds):.0%}" if rounds else "–"
    return (f"| {C:,} | {Q:,} | {name} | {r['classes_used']:,} | {1e3 * r['time']:,.0f} | {peak} "
            f"| {speed} | {cpu} | {gf:,.0f} | {gf / peaks[peak_name]:.0%} of {peak_name} | {in_rounds} |")


def malloc_setup() -> str:
    """The broadface command's allocator set-up (freed memory kept unless BROADFACE_MALLOC=system); an older
    checkout's code (--compare-src) may predate broadface.allocator: there glibc's own environment variables,
    set by run_config, do the same."""
    try:
        from broadface.allocator import configure_from_env
    except ImportError:
        return "keep (glibc env)" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "system"
    return configure_from_env()


def main() -> None:
    malloc = malloc_setup()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="C=10k, Q=4096, fewer repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--classes", type=int, nargs="+", help="default: 10000 85742 (quick: 10000)")
    ap.add_argument("--queues", type=int, nargs="+", help="default: 8192 32768 (quick: 4096)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--dense", action="store_true", help="also the dense re-implementation")
    ap.add_argument("--compare-src", help="also the fp32 union of the code under this src/ directory")
    ap.add_argument("--mem-limit-gib", type=float, default=16.0, help="skip dense configs estimated above this")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--rounds", type=int, help="timed rounds (default 3, quick 2)")
    ap.add_argument("--max-step-s", type=float, default=None,
                    help="leave out (and say so) a (C, Q) cell whose fp32 step, estimated from its FLOPs at the "
                         "measured fp32 peak, would take longer")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--interleaved", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.interleaved:
        spec = json.loads(args.interleaved)
        print(json.dumps(interleaved(spec["cfgs"], spec["rounds"])))
        return
    classes = args.classes or ([10_000] if args.quick else [10_000, 85_742])
    queues = args.queues or ([4096] if args.quick else [8192, 32768])
    rounds = args.rounds or (2 if args.quick else 3)
    peaks = {"fp32": matmul_gflops(args.device, args.threads, torch.float32),
             "bf16": matmul_gflops(args.device, args.threads, torch.bfloat16)}
    print(f"device={args.device} threads={args.threads} malloc={malloc} B={B} D={D}; "
          f"matmul 2048³: {peaks['fp32']:.0f} GFLOP/s fp32, "
          f"{peaks['bf16']:.0f} GFLOP/s bf16; load average {os.getloadavg()[0]:.1f}\n")
    print("| C | Q | union | classes used | step ms | peak MiB | speed vs fp32 union | same, CPU time | GFLOP/s "
          "| of peak | of the peak in the rounds |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for C in classes:
        for Q in queues:
            base = {"C": C, "Q": Q, "device": args.device, "threads": args.threads}
            est = head_flops("broadface", C, Q) / (peaks["fp32"] * 1e9)
            if args.max_step_s is not None and est > args.max_step_s:
                print(f"| {C:,} | {Q:,} | every union | – | not run: fp32 step est. ≥ {est:,.0f} s at the fp32 peak "
                      f"(--max-step-s {args.max_step_s:g}) | – | – | – | – | – |", flush=True)
                rows.append({"C": C, "Q": Q, "variant": "all", "skipped": f"est. {est:.0f} s per fp32 step"})
                continue
            cfgs = {n: dict(base, kind=k, dtype=dt, rate=rt) for n, (k, dt, rt) in VARIANTS.items()
                    if n in args.variants}
            mem = {n: run_config(c, args.mem_limit_gib) for n, c in cfgs.items()}
            timed_ = run_config({"cfgs": cfgs, "rounds": rounds}, args.mem_limit_gib, mode="--interleaved")
            round_peaks = timed_.pop("_peaks", None)
            cell_peaks = {**peaks, "rounds": round_peaks or {}}
            res = {n: {**mem[n], **timed_[n]} if n in timed_ else {**timed_, "classes_used": 0} for n in cfgs}
            extra = []  # apart, each in its own process (not interleaved): noisier times
            if args.compare_src:
                extra.append(("fp32, " + args.compare_src, dict(base, kind="broadface", dtype="float32", rate=1.0),
                              args.compare_src))
            if args.dense:
                extra.append(("dense", dict(base, kind="dense", dtype="float32", rate=1.0), None))
            res.update({n: run_config(c, args.mem_limit_gib, src) for n, c, src in extra})
            for n, r in res.items():
                print(_row(C, Q, n, r, res.get("fp32", {}), cell_peaks), flush=True)
                rows.append({"C": C, "Q": Q, "variant": n, **r})
            if round_peaks:
                print("| | | matmul peaks in the rounds (GFLOP/s, each the best of three) | | "
                      + "; ".join(f"{k} {', '.join(f'{v:.0f}' for v in vs)}" for k, vs in round_peaks.items())
                      + " | | | | | | |", flush=True)
                rows.append({"C": C, "Q": Q, "variant": "peaks in the rounds", **round_peaks})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"peaks": peaks, "threads": args.threads, "device": args.device, "rows": rows}, fh, indent=1)
    print("\nspeed vs fp32 union: step-time ratio against the fp32 BroadFace head of the same (C, Q), timed in the "
          "same process in alternating rounds (--compare-src, --dense: one step in a process of their own).")


if __name__ == "__main__":
    main()
