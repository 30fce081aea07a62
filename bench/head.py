"""Head benchmark: step time and peak memory of the classification head alone.

Compares, for B=128, D=512 and a grid of classes C and queue sizes Q:
  (a) plain ArcFace,
  (b) broadface.BroadFace (compact queue, chunked union, gradient split),
  (c) a dense re-implementation as the official code does it: the queue grows by
      torch.cat, a dense (B+Q)×C one-hot, both e⁻ and W⁻_y stored, autograd over the union.
A step is forward + backward + SGD update of the head, with the embeddings a leaf
tensor standing in for the encoder. Each configuration runs in a fresh subprocess;
peak memory is the rise of that process's max RSS (CPU) or max_memory_allocated (CUDA).

    python bench/head.py --quick         # reduced grid, under a minute on 2 CPU cores
    python bench/head.py                 # C ∈ {10k, 85,742}, Q ∈ {0, 8192, 32768}
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


class DenseBroadFace(torch.nn.Module):
    """The straightforward design: cat-grown queue of (e⁻, W⁻_y), dense one-hot logits."""

    def __init__(self, num_classes: int, dim: int, queue_size: int, s: float = 64.0, m: float = 0.5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.q, self.s, self.m = queue_size, s, m
        self.qe = torch.empty(0, dim)
        self.qw = torch.empty(0, dim)
        self.qy = torch.empty(0, dtype=torch.long)

    def _loss(self, x, w, y):
        cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1, 1)
        onehot = F.one_hot(y, w.shape[0]).float()
        sin = (1 - cos * cos).clamp_min(1e-12).sqrt()
        phi = cos * torch.cos(torch.tensor(self.m)) - sin * torch.sin(torch.tensor(self.m))
        logits = self.s * (onehot * phi + (1 - onehot) * cos)
        return F.cross_entropy(logits, y)

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


def build(kind: str, C: int, Q: int, device: str):
    from broadface import ArcFace, BroadFace

    if kind == "plain":
        return ArcFace(C, D).to(device)
    if kind == "broadface":
        head = BroadFace(ArcFace(C, D), queue_size=Q, chunk_size=4096).to(device)
        head.enqueue(torch.randn(Q, D, device=device), torch.randint(0, C, (Q,), device=device))  # a full queue
        return head
    head = DenseBroadFace(C, D, Q)
    head.qe, head.qw = torch.randn(Q, D, device=device), torch.randn(Q, D, device=device) * 0.01
    head.qy = torch.randint(0, C, (Q,), device=device)
    head.weight.data = head.weight.data.to(device)
    return head


def head_flops(kind: str, C: int, Q: int) -> float:
    """Multiply-adds ×2 of the big matmuls: batch logits + ∂e, union logits + ∂W."""
    if kind == "plain":
        return 2 * C * D * (3 * B)
    return 2 * C * D * (2 * B + 2 * (B + Q))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def worker(cfg: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    head = build(cfg["kind"], cfg["C"], cfg["Q"], device)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    times = []
    for i in range(cfg["warmup"] + cfg["reps"]):
        e = torch.randn(B, D, device=device, requires_grad=True)
        y = torch.randint(0, cfg["C"], (B,), device=device)
        _sync(device)
        t0 = time.perf_counter()
        loss = head(e, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"time": statistics.median(times), "peak_mib": peak}


def matmul_gflops(device: str, threads: int) -> float:
    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def run_config(cfg: dict, mem_limit_gib: float) -> dict:
    if cfg["kind"] == "dense":  # logits, one-hot, softmax grad, margin temporaries: ~6 dense (B+Q)×C fp32
        est = 6 * (B + cfg["Q"]) * cfg["C"] * 4 / 2**30
        if est > mem_limit_gib:
            return {"skipped": f"needs ~{est:.0f} GiB"}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                         capture_output=True, text=True)
    if out.returncode < 0:  # SIGKILL from the kernel's OOM killer, typically
        return {"skipped": f"killed (signal {-out.returncode}, out of memory?)"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed: {tail[:60]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="C=10k, Q in {0, 4096}, fewer repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mem-limit-gib", type=float, default=16.0, help="skip dense configs estimated above this")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    classes = [10_000] if args.quick else [10_000, 85_742]
    queues = [0, 4096] if args.quick else [0, 8192, 32768]
    reps, warmup = (2, 1) if args.quick else (3, 1)
    peak_gflops = matmul_gflops(args.device, args.threads)
    print(f"device={args.device} threads={args.threads} B={B} D={D}  matmul 2048³: {peak_gflops:.0f} GFLOP/s\n")
    hdr = (f"{'C':>7} {'Q':>6} | {'plain ms':>9} {'MiB':>6} | {'broadface ms':>12} {'MiB':>6} | "
           f"{'dense ms':>9} {'MiB':>6} | {'b/a time':>8} {'b/c time':>8} {'b/c mem':>7} | "
           f"{'b GFLOP/s':>9} {'of peak':>7}")
    print(hdr)
    print("-" * len(hdr))
    for C in classes:
        plain = run_config({"kind": "plain", "C": C, "Q": 0, "device": args.device, "threads": args.threads,
                            "reps": reps, "warmup": warmup}, args.mem_limit_gib)
        for Q in queues:
            cfg = {"C": C, "Q": Q, "device": args.device, "threads": args.threads, "reps": reps, "warmup": warmup}
            bf = run_config({**cfg, "kind": "broadface"}, args.mem_limit_gib)
            dense = run_config({**cfg, "kind": "dense"}, args.mem_limit_gib) if Q else {"skipped": "-"}

            def cell(r, key, scale=1.0, fmt="{:.0f}"):
                return fmt.format(r[key] * scale) if key in r else r.get("skipped", "-")[:9]

            ratio = lambda x, y, k: f"{x[k] / y[k]:.2f}" if k in x and k in y else "-"  # noqa: E731
            gf = head_flops("broadface", C, Q) / bf["time"] / 1e9 if "time" in bf else float("nan")
            print(f"{C:>7} {Q:>6} | {cell(plain, 'time', 1e3):>9} {cell(plain, 'peak_mib'):>6} | "
                  f"{cell(bf, 'time', 1e3):>12} {cell(bf, 'peak_mib'):>6} | "
                  f"{cell(dense, 'time', 1e3):>9} {cell(dense, 'peak_mib'):>6} | "
                  f"{ratio(bf, plain, 'time'):>8} {ratio(bf, dense, 'time'):>8} {ratio(bf, dense, 'peak_mib'):>7} | "
                  f"{gf:>9.0f} {gf / peak_gflops:>7.0%}")
    print("\nb/a: BroadFace over plain ArcFace; b/c: BroadFace over the dense re-implementation (same run).")


if __name__ == "__main__":
    main()
