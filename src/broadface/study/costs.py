"""The cost beside every gain: step time (side by side) and peak memory of the study's configurations.

* :func:`step_times` times the study's training step (tinycnn forward + backward + SGD, the BroadFace
  head with a full queue) for every configuration in one process, in interleaved rounds, and reports
  the median and the ratio to the same (classes, batch) without a queue.
* :func:`peak_memory` runs each configuration in a fresh subprocess (``python -m broadface.study.costs``)
  and reports the peak resident memory of a training step above the memory before the head is built.
  ``referenced`` gives the paper's Fig. 6: plain training at batch N against BroadFace at batch b with a
  queue of N − b, both referencing N instances per step.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class CostConfig:
    classes: int
    batch: int
    queue: int
    width: int = 32
    dim: int = 128
    size: int = 28

    def baseline(self) -> CostConfig:
        return CostConfig(self.classes, self.batch, 0, self.width, self.dim, self.size)


def _setup(c: CostConfig, seed: int = 0):
    from broadface.heads import ArcFace, BroadFace
    from broadface.models import build_model

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model("tinycnn", embedding_size=c.dim, input_size=c.size, width=c.width)
    head = BroadFace(ArcFace(c.classes, c.dim, scale=30.0, margin=0.3), queue_size=c.queue)
    for _ in range(-(-c.queue // 1024)):  # a full queue, as in steady state
        head.enqueue(torch.randn(1024, c.dim, generator=g), torch.randint(0, c.classes, (1024,), generator=g))
    x = torch.randn(c.batch, 3, c.size, c.size, generator=g)
    y = torch.randint(0, c.classes, (c.batch,), generator=g)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    return model, head, opt, x, y


def _step(model, head, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    head(model(x), y, enqueue=False).backward()
    opt.step()


def step_times(configs: list[CostConfig], rounds: int = 3, steps: int = 4, threads: int = 1) -> list[dict[str, Any]]:
    """Median ms per training step of each configuration (and of its queue-0 baseline), interleaved."""
    torch.set_num_threads(threads)
    wanted = list(dict.fromkeys([c.baseline() for c in configs] + list(configs)))
    times: dict[CostConfig, list[float]] = {c: [] for c in wanted}
    for _ in range(rounds):
        for c in wanted:  # one configuration alive at a time: the big ones do not crowd the small ones
            setup = _setup(c)
            _step(*setup)  # warm caches
            for _ in range(steps):
                t = time.perf_counter()
                _step(*setup)
                times[c].append(time.perf_counter() - t)
            del setup
    med = {c: statistics.median(t) for c, t in times.items()}
    return [{**asdict(c), "step_ms": round(1000 * med[c], 2), "vs_q0": round(med[c] / med[c.baseline()], 3),
             "samples": len(times[c])} for c in configs]


def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this fresh process: peak RSS of two training steps above the base."""
    c = CostConfig(**cfg["config"])
    torch.set_num_threads(cfg.get("threads", 1))
    from broadface.models import build_model

    warm = build_model("tinycnn", embedding_size=c.dim, input_size=c.size, width=c.width)
    warm(torch.randn(2, 3, c.size, c.size)).sum().backward()  # loads kernels and allocator pools
    del warm
    def two_steps() -> None:
        setup = _setup(c)
        for _ in range(2):
            _step(*setup)

    peak, step, reset = peak_rss_mb(two_steps)
    return {**asdict(c), "peak_mb": round(peak, 1), "step_mb": round(step, 1), "reset": reset}


def peak_rss_mb(fn: Callable[[], object]) -> tuple[float, float, bool]:
    """(peak resident MB while ``fn`` ran, that peak minus the resident MB before it, whether the peak was
    reset first). The high-water mark VmHWM is reset through /proc/self/clear_refs and read back from
    /proc/self/status; getrusage's ru_maxrss (the fallback without /proc, not reset then) kept a peak from
    before the reset in the study's measurements, so every configuration read the same."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    base = _status_mb("VmRSS")
    fn()
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak, peak - base, reset


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of /proc/self/status in MB (ru_maxrss where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(configs: list[CostConfig], threads: int = 1) -> list[dict[str, Any]]:
    """Peak step memory of each configuration, each in a fresh ``python -m broadface.study.costs`` process."""
    rows = []
    for c in configs:
        arg = json.dumps({"config": asdict(c), "threads": threads})
        out = subprocess.run([sys.executable, "-m", "broadface.study.costs", arg], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"memory of {c} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def fig6_configs(classes: int, referenced: list[int], small_batch: int) -> list[tuple[str, int, CostConfig]]:
    """(kind, N, config): plain batch N, and BroadFace batch ``small_batch`` + queue N − b."""
    out = []
    for n in referenced:
        out.append(("plain", n, CostConfig(classes, n, 0)))
        if n > small_batch:
            out.append(("broadface", n, CostConfig(classes, small_batch, n - small_batch)))
    return out


if __name__ == "__main__":  # the child of peak_memory
    print(json.dumps(_child(json.loads(sys.argv[1]))))
