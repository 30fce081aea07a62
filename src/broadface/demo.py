"""The demo: ArcFace vs BroadFace from the same warm start, on real faces, on a CPU.

Protocol (also in the README):
1. Warm start: a normalised-softmax model is trained on the 149 *training* identities
   of CelebA-299 (identities sorted by numeric id, the first 149), as the paper
   warm-starts BroadFace from a softmax-trained model.
2. Two arms continue from that checkpoint with the same seed, data order, learning
   rate and step budget: plain ArcFace (queue 0) and BroadFace (ArcFace + a
   compensated queue). Nothing is tuned for one arm alone.
3. Both are evaluated on identities never seen in training: Recall@1/2/4/8 over
   the 150 test identities of CelebA-299 (every image queries all others), and LFW 10-fold verification accuracy on the View-2 pairs (flip TTA).
   CelebA identities are anonymous ids, so an overlap of people between CelebA-299's
   training identities and LFW cannot be ruled out; none of LFW's images is trained on.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broadface.paths import data_root as find_data_root


@dataclass
class DemoConfig:
    """Sizes chosen so the full demo fits in about 10 minutes on 2 CPU cores."""

    data_root: str | None = None
    output: str = "runs/demo"
    model: str = "iresnet"
    layers: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    base_width: int = 32  # half the usual iResNet width: ~0.11 GMAC per 56x56 face
    input_size: int = 56
    embedding_size: int = 128
    batch_size: int = 64
    warm_steps: int = 450
    steps: int = 300
    queue_size: int = 2048  # 32 steps of 64 images (~2/3 of the 3,150 training images)
    warm_lr: float = 0.1
    lr: float = 0.01
    eval_every: int = 100
    lfw_pairs: int | None = None  # None: all 6,000 View-2 pairs
    test_identities: int | None = None  # None: all 150 unseen CelebA-299 identities (fewer: smoke tests)
    seed: int = 0
    progress: bool = True

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        """About 2 minutes: fewer steps, 1,200 LFW pairs (still 10 folds)."""
        base = dict(warm_steps=80, steps=50, queue_size=1024, eval_every=50, lfw_pairs=1200)
        return cls(**{**base, **kw})


def _train_config(cfg: DemoConfig, name: str, steps: int, lr: float, queue: int, init: str | None):
    from broadface.train.config import Config

    c = Config()
    c.model.name = cfg.model
    c.model.kwargs = {"layers": list(cfg.layers), "base_width": cfg.base_width} if cfg.model == "iresnet" else {}
    c.model.embedding_size, c.model.input_size = cfg.embedding_size, cfg.input_size
    c.data.name, c.data.root, c.data.train_split, c.data.val_split = "celeba299", cfg.data_root, "train", "test"
    # warm start: normalised softmax; both arms: ArcFace (s=32 suits 149 classes; m=0.5 as the paper)
    c.head.loss = "softmax" if init is None else "arcface"
    c.head.scale, c.head.margin, c.head.queue_size = 32.0, 0.5, queue
    c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.momentum = "sgd", lr, 5e-4, 0.9
    c.schedule.name = "multistep"
    c.schedule.warmup_steps = steps // 10 if init is None else 0
    c.schedule.milestones = [int(steps * 0.75)]
    c.train.steps, c.train.batch_size, c.train.seed = steps, cfg.batch_size, cfg.seed
    c.train.output = str(Path(cfg.output) / name)
    c.train.log_every = max(1, steps // 20)
    c.train.checkpoint_every = 0
    c.train.eval_every = cfg.eval_every if init is not None else 0
    c.train.init = init
    c.train.tensorboard = False
    return c


def _val_set(cfg: DemoConfig):
    """The unseen CelebA-299 identities (optionally only the first ``test_identities``)."""
    from broadface.data import EvalTransform, FaceFolder, open_dataset

    val = open_dataset("celeba299", "test", transform=EvalTransform(size=cfg.input_size), data_root=cfg.data_root)
    if cfg.test_identities is None:
        return val
    return FaceFolder(val.root, val.transform, classes=list(val.classes)[:cfg.test_identities])


def _fit(cfg: DemoConfig, name: str, steps: int, lr: float, queue: int, init: str | None):
    from broadface.train.trainer import Trainer

    if cfg.progress:
        print(f"\n== {name}: {steps} steps, lr {lr}, queue {queue}" + (f", warm start {init}" if init else ""))
    trainer = Trainer(_train_config(cfg, name, steps, lr, queue, init), val_set=_val_set(cfg),
                      progress=cfg.progress)
    t0 = time.perf_counter()
    result = trainer.fit()
    return trainer, result, time.perf_counter() - t0


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train warm start + both arms, evaluate, write ``results.json`` and plots; return the results."""
    from broadface.eval.verification import evaluate_pairs, lfw_pair_set

    root = find_data_root(cfg.data_root)
    cfg.data_root = str(root)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    pairs = lfw_pair_set(root / "lfw" / "pairs.txt", root / "lfw" / "aligned-112x112").subset(cfg.lfw_pairs)

    _, warm, warm_s = _fit(cfg, "warmstart_softmax", cfg.warm_steps, cfg.warm_lr, 0, None)
    arms = {"ArcFace": 0, "BroadFace": cfg.queue_size}
    results: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for arm, queue in arms.items():
        trainer, res, secs = _fit(cfg, arm.lower(), cfg.steps, cfg.lr, queue, str(warm.checkpoint))
        ret = res.evals[-1]  # the trainer's final evaluation on the unseen identities (flip TTA)
        ver = evaluate_pairs(trainer.model, pairs, folds=10, flip=True)
        results[arm] = {"queue_size": queue, "train_seconds": round(secs, 1),
                        "samples_per_s": res.summary.get("samples_per_s"),
                        **{f"recall@{k}": ret[f"val_recall@{k}"] for k in (1, 2, 4, 8)},
                        "lfw_accuracy": ver["accuracy"], "lfw_accuracy_std": ver["accuracy_std"],
                        "lfw_pairs": ver["pairs"]}
        curves[arm] = {"batch_loss": res.metric("batch_loss"), "union_loss": res.metric("union_loss"),
                       "recall@1": res.metric("val_recall@1"), "scores": ver["scores"], "issame": ver["issame"]}
    summary = {"protocol": "train: CelebA-299 identities 1-149; test: CelebA-299 identities 150-299 (Recall@K), "
                           "LFW View-2 pairs (10-fold accuracy)",
               "config": asdict(cfg), "warm_start_seconds": round(warm_s, 1), "results": results,
               "wall_seconds": round(time.perf_counter() - wall0, 1)}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    summary["plots"] = [str(p) for p in _plots(curves, out)]
    print_table(summary)
    return summary


def _plots(curves: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from broadface.eval.plots import plot_roc

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, c in curves.items():
        for ax, key in zip(axes, ("batch_loss", "recall@1")):
            pts = c[key]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=arm)
    for ax, title in zip(axes, ("mini-batch loss L(X)", "Recall@1, unseen CelebA identities")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, linestyle=":", linewidth=0.5)
        ax.legend()
    fig.tight_layout()
    curves_png = out / "learning_curves.png"
    fig.savefig(curves_png, dpi=120)
    plt.close(fig)
    roc_png = plot_roc({arm: {"scores": c["scores"], "issame": c["issame"]} for arm, c in curves.items()},
                       out / "roc_lfw.png", title="LFW View-2 pairs", far_range=(1e-3, 1.0))
    return [curves_png, roc_png]


def print_table(summary: dict[str, Any]) -> None:
    res = summary["results"]
    print(f"\n{summary['protocol']}")
    print(f"{'method':<10} {'queue':>6} {'R@1':>6} {'R@2':>6} {'R@4':>6} {'R@8':>6} "
          f"{'LFW acc':>16} {'train s':>8}")
    for arm, r in res.items():
        lfw = f"{100 * r['lfw_accuracy']:.2f} ± {100 * r['lfw_accuracy_std']:.2f}%"
        print(f"{arm:<10} {r['queue_size']:>6} {r['recall@1']:>6.3f} {r['recall@2']:>6.3f} {r['recall@4']:>6.3f} "
              f"{r['recall@8']:>6.3f} {lfw:>16} {r['train_seconds']:>8.1f}")
    print(f"LFW pairs: {next(iter(res.values()))['lfw_pairs']}; wall time {summary['wall_seconds']:.0f} s; "
          f"plots: {', '.join(summary.get('plots', []))}")
