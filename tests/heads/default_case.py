"""A fixed-seed case of the default head path, whose outputs are pinned bit for bit (``data/default_case.json``).

The default path is ArcFace / CosFace / CombinedMargin / NormSoftmax, with or without the BroadFace queue
(compact and full storage, with and without compensation), a float32 union, no class sampling, built
directly or from the config (``broadface.train.build.build_head``), also under bf16 autocast. The saved
outputs were computed by the code of ``main`` at commit a3e47de (before the margin family, reduced-precision
and sampled unions were added), with::

    PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/path/to/main/src python -m tests.heads.default_case

``tests/heads/test_default_path.py`` reruns the case on the current code and requires every loss and
gradient to be *equal* (``torch.equal``) to the saved ones: a change of the default path's arithmetic
(an order of operations, a chunking, a dtype) fails it. Uses only APIs that existed at that commit.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from tests.helpers import cpu_vendor

PATH = Path(__file__).parent / "data" / "default_case.json"
C, D, B, Q, STEPS = 300, 32, 16, 40, 5


def _margins():
    from broadface.heads import ArcFace, CombinedMargin, CosFace, NormSoftmax

    return {"arcface": lambda: ArcFace(C, D, scale=32.0, margin=0.5),
            "cosface": lambda: CosFace(C, D, scale=32.0, margin=0.4),
            "combined": lambda: CombinedMargin(C, D, m1=1.1, m2=0.3, m3=0.2, scale=32.0),
            "combined_arc": lambda: CombinedMargin(C, D, m1=1.0, m2=0.3, m3=0.2, scale=32.0),
            "softmax": lambda: NormSoftmax(C, D, scale=32.0)}


def _heads():
    """name -> a fresh head, seeded."""
    from broadface.heads import BroadFace
    from broadface.train.build import build_head
    from broadface.train.config import HeadConfig

    out = {}
    for name, make in _margins().items():
        out[f"{name}/plain"] = lambda make=make: BroadFace(make(), queue_size=0)
        out[f"{name}/q"] = lambda make=make: BroadFace(make(), queue_size=Q, chunk_size=24)
    out["arcface/q/nocomp"] = lambda: BroadFace(_margins()["arcface"](), queue_size=Q, compensate=False)
    out["arcface/q/full"] = lambda: BroadFace(_margins()["arcface"](), queue_size=Q, storage="full", chunk_size=7)
    out["arcface/q/bf16store"] = lambda: BroadFace(_margins()["arcface"](), queue_size=Q,
                                                   storage_dtype=torch.bfloat16)
    out["config/arcface"] = lambda: build_head(HeadConfig(queue_size=Q, scale=32.0), C, D)
    out["config/cosface"] = lambda: build_head(HeadConfig(loss="cosface", margin=0.35, queue_size=Q), C, D)
    out["config/plain"] = lambda: build_head(HeadConfig(), C, D)
    return out


def run_case(name: str, amp: bool = False) -> dict[str, list[torch.Tensor]]:
    """Drive one head like a trainer for STEPS steps (a linear 'encoder', SGD on both); record everything."""
    torch.manual_seed(0)
    head = _heads()[name]()
    enc = torch.nn.Linear(20, D)
    with torch.no_grad():
        head.weight.normal_()  # λ ≈ 1, like a trained classifier
    g = torch.Generator().manual_seed(1)
    rec: dict[str, list[torch.Tensor]] = {k: [] for k in ("loss", "union", "e_grad", "w_grad", "enc_grad")}
    for _ in range(STEPS):
        x = torch.randn(B, 20, generator=g)
        y = torch.randint(0, C, (B,), generator=g)
        head.zero_grad()
        enc.zero_grad()
        e = enc(x)
        e.retain_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = head(e, y)
        loss.backward()
        for k, v in (("loss", loss), ("union", head.stats.union_loss), ("e_grad", e.grad),
                     ("w_grad", head.weight.grad), ("enc_grad", enc.weight.grad)):
            rec[k].append(v.detach().clone())
        with torch.no_grad():
            head.weight.sub_(1.0 * head.weight.grad)
            enc.weight.sub_(0.1 * enc.weight.grad)
    rec["queue_vectors"] = [head.queue.entries().vectors.clone()]
    return rec


def cases() -> list[tuple[str, bool]]:
    return [(n, False) for n in _heads()] + [("arcface/q", True), ("cosface/plain", True)]


def digest(rec: dict[str, list[torch.Tensor]]) -> dict[str, list[str]]:
    """Losses as exact hex floats, every tensor as the SHA-256 of its bytes: equal digests = equal bits."""
    out = {}
    for k, vs in rec.items():
        if k in ("loss", "union"):
            out[k] = [float(v).hex() for v in vs]
        else:
            out[k] = [hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:32] for v in vs]
    return out


def compute() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {f"{n}{'/amp' if amp else ''}": digest(run_case(n, amp)) for n, amp in cases()}
    finally:
        torch.set_num_threads(threads)
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu_vendor": cpu_vendor(), "cases": out}


if __name__ == "__main__":
    import broadface

    PATH.parent.mkdir(parents=True, exist_ok=True)
    data = compute()
    data["source"] = str(Path(broadface.__file__).resolve())
    PATH.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {PATH} ({len(data['cases'])} cases) from {data['source']}")
