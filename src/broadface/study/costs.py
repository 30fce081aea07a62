"""Cost measurements of the study: step time vs queue size (side by side) and peak memory (paper Fig. 6).

* :func:`overhead` times the study's own training step (tinycnn, its batch, C classes, D) for every
  queue size with the queue pre-filled, in one process, in interleaved rounds; median per size.
* :func:`memory` runs ``bench/memory.py``'s child (a fresh subprocess per configuration, peak RSS
  after a warm-up) for plain mini-batch training at batch N versus BroadFace at batch b with a
  queue of N − b, N = the number of instances the classifier references per step.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from broadface.study.runs import StudyConfig

BENCH_MEMORY = Path(__file__).resolve().parents[3] / "bench" / "memory.py"


def overhead(sc: StudyConfig, classes: int, rounds: int = 3, steps: int = 5) -> list[dict[str, Any]]:
    """Median step time (forward, backward, SGD step) per queue size, rounds interleaved across sizes."""
    from broadface.heads import ArcFace, BroadFace
    from broadface.models import build_model

    torch.set_num_threads(sc.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sc.batch_size, 3, sc.input_size, sc.input_size, generator=g)
    y = torch.randint(0, classes, (sc.batch_size,), generator=g)
    setups = {}
    for q in sc.queues:
        torch.manual_seed(0)
        model = build_model("tinycnn", embedding_size=sc.embedding_size, input_size=sc.input_size, width=sc.width)
        head = BroadFace(ArcFace(classes, sc.embedding_size, scale=sc.scale, margin=sc.margin), queue_size=q)
        for _ in range(-(-q // sc.batch_size)):  # a full queue, as in steady state
            head.enqueue(torch.randn(sc.batch_size, sc.embedding_size, generator=g),
                         torch.randint(0, classes, (sc.batch_size,), generator=g))
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
        setups[q] = (model, head, opt)
    times: dict[int, list[float]] = {q: [] for q in sc.queues}
    for r in range(rounds):
        for q, (model, head, opt) in setups.items():
            for i in range(steps + 1):
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                head(model(x), y, enqueue=False).backward()
                opt.step()
                if i:  # the first step of a round warms caches
                    times[q].append(time.perf_counter() - t)
    base = statistics.median(times[sc.queues[0]])
    return [{"queue": q, "fill": int(setups[q][1].queue.fill), "step_ms": 1000 * statistics.median(t),
             "min_ms": 1000 * min(t), "max_ms": 1000 * max(t), "samples_per_s": sc.batch_size / statistics.median(t),
             "vs_q0": statistics.median(t) / base} for q, t in times.items()]


def _memory_module():
    spec = importlib.util.spec_from_file_location("broadface_bench_memory", BENCH_MEMORY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def memory(sc: StudyConfig, classes: int, referenced: list[int], small_batch: int) -> list[dict[str, Any]]:
    """Peak memory of a training step: plain batch N vs BroadFace batch ``small_batch`` + queue N − b."""
    mod = _memory_module()
    common = dict(size=sc.input_size, width=sc.width, dim=sc.embedding_size, classes=classes, steps=2,
                  device="cpu", threads=sc.threads, micro=0)
    rows = []
    for n in referenced:
        for kind, b, q in (("plain", n, 0), ("broadface", min(small_batch, n), n - min(small_batch, n))):
            if kind == "broadface" and q == 0:
                continue  # identical to plain
            res = mod.run_child({**common, "batch": b, "queue": q})
            rows.append({"kind": kind, "referenced": n, "batch": b, "queue": q, "peak_mb": res["peak_mb"],
                         "step_mb": res["peak_mb"] - res["base_mb"], "reset": res["reset"]})
    return rows
