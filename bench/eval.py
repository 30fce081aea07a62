"""Evaluation benchmark: metric speed vs the reference implementations, and embedding throughput.

  (a) TAR@FAR on N synthetic verification scores (IJB-C-like: 0.125% genuine):
      broadface.metrics.tar_at_far vs sklearn.metrics.roc_curve + insightface's nearest-FPR search,
      time and peak traced memory, same run; the TAR values must agree.
  (b) LFW-protocol 10-fold accuracy + VAL@FAR on 6,000 pairs: kfold_accuracy vs a loop-per-threshold
      re-implementation of insightface's evaluate().
  (c) Recall@K self-retrieval: exact chunked search, torch vs faiss (IndexFlatIP).
  (d) Embedding throughput at 112 px, PyTorch vs ONNX Runtime (CPU, same thread count), iresnet50 and
      mobilefacenet at batch 1 and 64: a checkpoint and its `export_onnx` file, both opened with
      broadface.models.loader.load_model (what `broadface eval` / `embed` run), side by side in one run.

    python bench/eval.py --quick      # ~2-4 minutes on 2 busy CPU cores
    python bench/eval.py              # 10M scores, 60k-item retrieval, batch 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/reference.py, the insightface baselines (a, b)

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def timed(fn, *args, repeat: int = 1, **kw):
    """(result, best seconds, peak traced MiB of the last run)."""
    times, out, peak = [], None, 0.0
    for _ in range(repeat):
        tracemalloc.start()
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        times.append(time.perf_counter() - t0)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out, min(times), peak


def table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------------- (a)
def sklearn_insightface(scores, same):
    """sklearn ROC + eval_ijbc.py's nearest-FPR search (bench/reference.py)."""
    from reference import insightface_tar_at_far

    return insightface_tar_at_far(scores, same, FARS)


def roc_only(scores, same):
    from sklearn.metrics import roc_curve

    return roc_curve(same, scores)


def bench_tar(n: int) -> None:
    from broadface.metrics import tar_at_far

    rng = np.random.default_rng(0)
    same = rng.random(n) < 0.00125
    scores = (rng.normal(0.0, 0.1, n) + same * rng.normal(0.45, 0.15, n)).astype(np.float32)
    ours, t_ours, m_ours = timed(tar_at_far, scores, same, FARS, "nearest")
    strict, t_strict, m_strict = timed(tar_at_far, scores, same, FARS, "strict")
    ref, t_ref, m_ref = timed(sklearn_insightface, scores, same)
    _, t_sk, m_sk = timed(roc_only, scores, same)
    agree = np.array_equal(ours.tars, ref)
    rows = [["broadface tar_at_far (nearest)", f"{t_ours:.2f}", f"{m_ours:.0f}", f"{t_ref / t_ours:.1f}x"],
            ["broadface tar_at_far (strict)", f"{t_strict:.2f}", f"{m_strict:.0f}", f"{t_ref / t_strict:.1f}x"],
            ["sklearn roc_curve + insightface search", f"{t_ref:.2f}", f"{m_ref:.0f}", "1.0x"],
            ["  of which sklearn roc_curve alone", f"{t_sk:.2f}", f"{m_sk:.0f}", ""]]
    table(f"(a) TAR@FAR on {n:,} scores ({same.sum():,} genuine), float32", ["method", "seconds", "peak MiB",
                                                                             "speed-up"], rows)
    print("    TAR (nearest): " + "  ".join(f"{f:.0e}:{t:.4f}" for f, t in zip(FARS, ours.tars))
          + f"   identical to sklearn+insightface: {agree}")
    print("    TAR (strict):  " + "  ".join(f"{f:.0e}:{t:.4f}" for f, t in zip(FARS, strict.tars)))


# ---------------------------------------------------------------------------------------------- (b)
def bench_kfold() -> None:
    from reference import insightface_kfold

    from broadface.metrics import kfold_accuracy

    rng = np.random.default_rng(1)
    n = 6000
    same = np.repeat(np.tile([True, False], 10), 300)
    e1 = rng.normal(size=(n, 64))
    e2 = e1 * same[:, None] * 0.35 + rng.normal(size=(n, 64))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum((e1 - e2) ** 2, 1)
    ours, t_ours, _ = timed(kfold_accuracy, dist, same, distance=True, repeat=3)
    ref, t_ref, _ = timed(insightface_kfold, dist, same)
    agree = (ours.accuracy_mean, ours.val, ours.far) == (ref["accuracy"], ref["val"], ref["far"])
    table("(b) LFW protocol on 6,000 pairs (10 folds, 400 + 4,000 thresholds)",
          ["method", "seconds", "speed-up", "accuracy", "VAL@1e-3"],
          [["broadface kfold_accuracy", f"{t_ours:.3f}", f"{t_ref / t_ours:.0f}x", f"{ours.accuracy_mean:.4f}",
            f"{ours.val:.4f}"],
           ["insightface loops (re-implemented)", f"{t_ref:.3f}", "1x", f"{ref['accuracy']:.4f}", f"{ref['val']:.4f}"]])
    print(f"    identical results: {agree}")


# ---------------------------------------------------------------------------------------------- (c)
def bench_search(n: int, dim: int = 128) -> None:
    from broadface.metrics import faiss_available, recall_at_k

    rng = np.random.default_rng(2)
    classes = n // 5
    y = rng.integers(0, classes, n)
    x = (rng.normal(size=(classes, dim))[y] + 1.5 * rng.normal(size=(n, dim))).astype(np.float32)
    rows, results = [], {}
    for backend in ("torch", "faiss") if faiss_available() else ("torch",):
        r, t, _ = timed(recall_at_k, x, y, backend=backend)
        results[backend] = r
        rows.append([backend, f"{t:.2f}", f"{r[1]:.4f}", f"{r[8]:.4f}"])
    table(f"(c) Recall@K self-retrieval, {n:,} x {dim}-d ({n * n / 1e9:.2f}G similarities, chunked)",
          ["backend", "seconds", "R@1", "R@8"], rows)
    if len(results) == 2:
        print(f"    identical recall: {results['torch'] == results['faiss']}")


# ---------------------------------------------------------------------------------------------- (d)
def _median_seconds(fn, x, repeat: int) -> float:
    fn(x), fn(x)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_throughput(models: list[str], batches: list[int], repeat: int) -> None:
    import torch

    from broadface.fileio import atomic_torch_save
    from broadface.infer.export import check_onnx_parity, export_onnx
    from broadface.models import build_model, recalibrate_batchnorm
    from broadface.models.loader import load_model
    from broadface.models.onnx import OnnxEmbedder

    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            torch.manual_seed(0)
            model = build_model(name, embedding_size=512 if name.startswith("iresnet") else 128)
            recalibrate_batchnorm(model, [torch.rand(4, 3, 112, 112) * 2 - 1])
            ckpt = atomic_torch_save({"format": "broadface", "version": 1, "model": model.config,
                                      "backbone": model.state_dict()}, Path(tmp) / f"{name}.pt")
            path = export_onnx(model, Path(tmp) / f"{name}.onnx")
            parity = check_onnx_parity(model, path, n=4)
            engines = {"pt": load_model(ckpt), "onnx": load_model(path)}
            engines["onnx"].net = OnnxEmbedder(path, threads=threads)  # the same thread count as PyTorch
            for b in batches:
                x = torch.rand(b, 3, 112, 112) * 2 - 1
                with torch.inference_mode():
                    pt, ox = (_median_seconds(engines[k], x, repeat) for k in ("pt", "onnx"))
                rows.append([name, b, f"{b / pt:.1f}", f"{b / ox:.1f}", f"{pt / ox:.2f}x", f"{parity:.1e}"])
                print(f"    ... {name} batch {b} done", file=sys.stderr)
    table(f"(d) Embedding throughput at 112 px on CPU ({threads} threads each), images/s (median of {repeat})",
          ["model", "batch", "PyTorch", "ONNX Runtime", "ORT speed-up", "max |Δ| (L2-normed)"], rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (2M scores, 10k retrieval, batch 1/16)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: a,b,c,d")
    p.add_argument("--threads", type=int, help="(d) threads for PyTorch and ONNX Runtime (default: torch's default)")
    p.add_argument("--batches", help="(d) comma list of batch sizes (default 1,64; --quick 1,16)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"bench/eval.py  quick={args.quick}  cpus={os.cpu_count()}  load={os.getloadavg()[0]:.1f}")
    if "a" not in skip:
        bench_tar(2_000_000 if args.quick else 10_000_000)
    if "b" not in skip:
        bench_kfold()
    if "c" not in skip:
        bench_search(10_000 if args.quick else 60_000)
    if "d" not in skip:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 16] if args.quick else [1, 64]
        bench_throughput(["mobilefacenet", "iresnet50"], batches, 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
