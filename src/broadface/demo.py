"""The demo: ArcFace vs BroadFace on real data, on a CPU, in two tracks (protocol also in the README).

1. **Many classes** (where BroadFace is meant to work): full Omniglot from scratch, the 964 background
   characters (a batch of 128 shows ~13 % of them), ArcFace with and without a compensated queue of
   8,192 embeddings, same seed ⇒ same initialisation and data order, for each of several seeds;
   Recall@1/2/4/8 on the 659 unseen evaluation characters; the paired difference over seeds.
   Each arm is one run of the study's ``sweep`` part (:mod:`broadface.study`).
2. **Faces** (few classes): a normalised-softmax warm start on CelebA-299's 149 training identities,
   then ArcFace and BroadFace (queue 2,048) from it with the same seed, data order and budget;
   Recall@K on the 150 unseen CelebA-299 identities and LFW 10-fold accuracy (6,000 View-2 pairs).
   Every class is in almost every batch here, so the queue has little to add (one seed: no effect is
   claimed either way). CelebA identities are anonymous, so people shared with LFW cannot be ruled out;
   no LFW image is trained on.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from broadface.fileio import atomic_write_json
from broadface.paths import data_root as find_data_root

KS = (1, 2, 4, 8)


@dataclass
class DemoConfig:
    """Sizes chosen so the full demo fits in about 20 minutes on 2 CPU cores."""

    data_root: str | None = None
    output: str = "runs/demo"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # many-class runs in parallel processes, threads // workers torch threads each: the tiny CNN uses one
    # core better than two (2 cores: 2 x 1 thread trained the six arms in 10.5 min, one 2-thread run at a time 16.5)
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    progress: bool = True
    # many-class track (Omniglot)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    omniglot_steps: int = 1500
    omniglot_queue: int = 8192
    omniglot_batch: int = 128
    omniglot_classes: int | None = None  # None: all 964 (fewer: smoke tests)
    omniglot_test_classes: int | None = None  # None: all 659 unseen characters (fewer: smoke tests)
    omniglot_width: int = 32
    omniglot_dim: int = 128
    curve_points: int = 5  # Recall@1 evaluations during the first seed's runs (learning curves)
    # face track (CelebA-299 -> LFW)
    faces: bool = True
    model: str = "iresnet"
    layers: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    base_width: int = 32  # half the usual iResNet width: ~0.11 GMAC per 56x56 face
    input_size: int = 56
    embedding_size: int = 128
    batch_size: int = 64
    warm_steps: int = 300
    steps: int = 200
    queue_size: int = 2048  # 32 steps of 64 images (~2/3 of the 3,150 training images)
    warm_lr: float = 0.1
    lr: float = 0.01
    eval_every: int = 100
    lfw_pairs: int | None = None  # None: all 6,000 View-2 pairs
    test_identities: int | None = None  # None: all 150 unseen CelebA-299 identities (fewer: smoke tests)
    seed: int = 0  # of the face track

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        """About 3 minutes: two seeds of short Omniglot runs; a short face track evaluated on 50 of the
        unseen CelebA identities and 1,200 LFW pairs."""
        base = dict(seeds=[0, 1], omniglot_steps=200, omniglot_queue=4096, curve_points=2, warm_steps=40,
                    steps=30, queue_size=1024, eval_every=30, lfw_pairs=1200, test_identities=50)
        return cls(**{**base, **kw})


def _say(cfg: DemoConfig, text: str) -> None:
    if cfg.progress:
        print(text, flush=True)


# ----------------------------------------------------------------------------- many classes: Omniglot


def omniglot_spec(cfg: DemoConfig, seed: int = 0, queue: int = 0, curve: bool = False):
    """The study's RunSpec of one many-class arm (``curve``: with the learning curve, as the first seed)."""
    from broadface.study.runs import RunSpec

    every = max(1, cfg.omniglot_steps // cfg.curve_points) if curve and cfg.curve_points else 0
    return RunSpec(part="demo", seed=seed, queue=queue, steps=cfg.omniglot_steps, batch=cfg.omniglot_batch,
                   classes=cfg.omniglot_classes, test_classes=cfg.omniglot_test_classes, width=cfg.omniglot_width,
                   dim=cfg.omniglot_dim, eval_every=every)


def run_threads(cfg: DemoConfig) -> int:
    """Torch threads of each many-class run (the thread count moves a run's figures: it is recorded)."""
    return max(1, cfg.threads // max(1, cfg.workers))


def study_records(results: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """The many-class runs of a demo's results.json as ``sweep`` records of the study (bench/study.py
    ``--import-demo``): the same specs the demo ran, so a study need not train them twice. Each record keeps
    ``source`` (the file it came from) and the demo's thread count (it changes the floating-point sums, so
    runs to be compared bit for bit need the same)."""
    cfg, om = DemoConfig(**results["config"]), results["omniglot"]
    out = []
    for arm in om["arms"].values():
        for seed, r in arm["runs"].items():
            spec = replace(omniglot_spec(cfg, int(seed), arm["queue"], curve=bool(r.get("curve"))), part="sweep")
            out.append({"spec": asdict(spec), "key": spec.key(), **r, "num_classes": om["classes"], "errors": [],
                        "source": source, "threads": run_threads(cfg)})
    return out


def omniglot_track(cfg: DemoConfig) -> dict[str, Any]:
    """ArcFace vs BroadFace from scratch on full Omniglot, per seed; the paired difference."""
    from broadface.metrics.paired import paired_difference
    from broadface.study.report import expected_classes_per_batch
    from broadface.study.parallel import run_parallel
    from broadface.study.runs import run, train_set

    base = omniglot_spec(cfg)
    # the longer BroadFace runs first, so that the workers end together
    jobs = [(arm, seed, omniglot_spec(cfg, seed, queue, curve=i == 0))
            for arm, queue in (("BroadFace", cfg.omniglot_queue), ("ArcFace", 0)) for i, seed in enumerate(cfg.seeds)]
    arms: dict[str, dict[int, dict]] = {"ArcFace": {}, "BroadFace": {}}
    threads = run_threads(cfg)
    _say(cfg, f"== many classes: {len(jobs)} runs ({len(cfg.seeds)} seeds × ArcFace, BroadFace queue "
              f"{cfg.omniglot_queue}), {base.steps} steps × {base.batch}, {cfg.workers} at a time × "
              f"{threads} thread(s)")

    def done(i: int, record: dict) -> None:
        arm, seed, spec = jobs[i]
        _say(cfg, f"   {arm} (queue {spec.queue}), seed {seed}: Recall@1 {record['recall@1']:.4f} "
                  f"({record['wall_s']:.0f} s)")

    # each record is as that run alone would give: a run depends on its spec and thread count only
    records = run_parallel(partial(run, threads=threads), [(s,) for _, _, s in jobs], cfg.workers, done)
    for (arm, seed, _), record in zip(jobs, records):
        arms[arm][seed] = record
    data = train_set(base)
    per_batch = expected_classes_per_batch(data.class_counts(), cfg.omniglot_batch)
    diff = {f"recall@{k}": asdict(paired_difference({s: r[f"recall@{k}"] for s, r in arms["BroadFace"].items()},
                                                    {s: r[f"recall@{k}"] for s, r in arms["ArcFace"].items()}))
            for k in KS}
    return {"data": "Omniglot, train: 964 background characters, test: 659 evaluation characters (unseen)",
            "classes": data.num_classes, "train_images": len(data), "batch": cfg.omniglot_batch,
            "classes_per_batch": per_batch, "seeds": list(cfg.seeds),
            "arms": {arm: {"queue": 0 if arm == "ArcFace" else cfg.omniglot_queue,
                           "runs": {str(s): _slim(r) for s, r in by_seed.items()}} for arm, by_seed in arms.items()},
            "paired_difference": diff}


def _slim(record: dict) -> dict:
    keep = ("train_s", "wall_s", "step_ms", "fill", "curve", "losses", *(f"recall@{k}" for k in KS))
    return {k: record[k] for k in keep}


# ----------------------------------------------------------------------------- few classes: faces


def _face_config(cfg: DemoConfig, name: str, steps: int, lr: float, queue: int, init: str | None):
    from broadface.train.config import Config

    c = Config()
    c.model.name = cfg.model
    c.model.kwargs = {"layers": list(cfg.layers), "base_width": cfg.base_width} if cfg.model == "iresnet" else {}
    c.model.embedding_size, c.model.input_size = cfg.embedding_size, cfg.input_size
    # the warm start is not evaluated (nothing reports it); the arms on the unseen identities
    val_split = "test" if init is not None else None
    c.data.name, c.data.root, c.data.train_split, c.data.val_split = "celeba299", cfg.data_root, "train", val_split
    # warm start: normalised softmax; both arms: ArcFace (s=32 suits 149 classes; m=0.5 as the paper)
    c.head.loss = "softmax" if init is None else "arcface"
    c.head.scale, c.head.margin, c.head.queue_size = 32.0, 0.5, queue
    c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.momentum = "sgd", lr, 5e-4, 0.9
    c.schedule.name = "multistep"
    c.schedule.warmup_steps = steps // 10 if init is None else 0
    c.schedule.milestones = [int(steps * 0.75)]
    c.train.steps, c.train.batch_size, c.train.seed = steps, cfg.batch_size, cfg.seed
    c.train.output = str(Path(cfg.output) / "faces" / name)
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
    import torch

    from broadface.train.trainer import Trainer

    torch.set_num_threads(cfg.threads)
    _say(cfg, f"== faces: {name}: {steps} steps, lr {lr}, queue {queue}" + (f", warm start {init}" if init else ""))
    trainer = Trainer(_face_config(cfg, name, steps, lr, queue, init), val_set=_val_set(cfg) if init else None,
                      progress=cfg.progress)
    t0 = time.perf_counter()
    result = trainer.fit()
    return trainer, result, time.perf_counter() - t0


def face_track(cfg: DemoConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Warm start + both arms on CelebA-299, evaluated on unseen CelebA identities and LFW."""
    from broadface.eval.verification import evaluate_pairs, lfw_pair_set
    from broadface.study.report import expected_classes_per_batch

    root = Path(cfg.data_root)
    pairs = lfw_pair_set(root / "lfw" / "pairs.txt", root / "lfw" / "aligned-112x112").subset(cfg.lfw_pairs)
    _, warm, warm_s = _fit(cfg, "warmstart_softmax", cfg.warm_steps, cfg.warm_lr, 0, None)
    arms, curves = {}, {}
    for arm, queue in (("ArcFace", 0), ("BroadFace", cfg.queue_size)):
        trainer, res, secs = _fit(cfg, arm.lower(), cfg.steps, cfg.lr, queue, str(warm.checkpoint))
        ret = res.evals[-1]  # the trainer's final evaluation on the unseen identities (flip TTA)
        ver = evaluate_pairs(trainer.model, pairs, folds=10, flip=True)
        arms[arm] = {"queue": queue, "train_s": round(secs, 1), **{f"recall@{k}": ret[f"val_recall@{k}"] for k in KS},
                     "lfw_accuracy": ver["accuracy"], "lfw_accuracy_std": ver["accuracy_std"]}
        curves[arm] = {"recall@1": res.metric("val_recall@1"), "scores": ver["scores"], "issame": ver["issame"]}
        counts = trainer.train_set.class_counts()
    return ({"data": "CelebA-299: train 149 identities, test the other 150 (unseen); LFW View-2 pairs",
             "classes": int(len(counts)), "train_images": int(counts.sum()), "batch": cfg.batch_size,
             "classes_per_batch": expected_classes_per_batch(counts, cfg.batch_size), "seed": cfg.seed,
             "warm_start_s": round(warm_s, 1), "lfw_pairs": len(pairs), "arms": arms}, curves)


# ----------------------------------------------------------------------------- the whole demo


OUTPUTS = ("results.json", "faces", "learning_curves_omniglot.png", "learning_curves_faces.png", "roc_lfw.png")


def prepare_output(cfg: DemoConfig, overwrite: bool = False) -> Path:
    """Check ``cfg.output`` before any work: a file, an unwritable folder or an earlier demo's results
    (unless ``overwrite``, which removes just those) is an error naming the path."""
    import shutil

    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file, expected a folder")
    found = [out / n for n in OUTPUTS if (out / n).exists()]
    if found and not overwrite:
        raise FileExistsError(f"--output {out} holds the results of an earlier demo ({found[0].name}); "
                              "pass --overwrite to replace them or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"--output {out} is not writable")
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Both tracks; writes ``results.json`` and the plots under ``cfg.output``; returns the results."""
    cfg.data_root = str(find_data_root(cfg.data_root))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    summary: dict[str, Any] = {"config": asdict(cfg), "omniglot": omniglot_track(cfg)}
    face_curves = None
    if cfg.faces:
        summary["faces"], face_curves = face_track(cfg)
    summary["wall_s"] = round(time.perf_counter() - wall0, 1)
    summary["plots"] = [str(p) for p in _plots(summary, face_curves, out)]
    atomic_write_json(out / "results.json", summary)
    print(format_table(summary))
    return summary


def _plots(summary: dict[str, Any], face_curves: dict | None, out: Path) -> list[Path]:
    from broadface.eval.plots import plot_learning_curves, plot_roc

    om = summary["omniglot"]["arms"]
    seed0 = str(summary["omniglot"]["seeds"][0])
    series = {"Omniglot Recall@1 (unseen characters)": {arm: om[arm]["runs"][seed0]["curve"] for arm in om},
              "Omniglot L(X), mini-batch loss": {arm: [(s, b) for s, b, _ in om[arm]["runs"][seed0]["losses"]]
                                                 for arm in om}}
    made = [plot_learning_curves(series, out / "learning_curves_omniglot.png",
                                 title=f"Many classes (Omniglot), seed {seed0}")]
    if face_curves:
        made.append(plot_learning_curves({"CelebA Recall@1 (unseen identities)":
                                          {a: c["recall@1"] for a, c in face_curves.items()}},
                                         out / "learning_curves_faces.png", title="Faces (CelebA-299)"))
        made.append(plot_roc({a: {"scores": c["scores"], "issame": c["issame"]} for a, c in face_curves.items()},
                             out / "roc_lfw.png", title="LFW View-2 pairs", far_range=(1e-3, 1.0)))
    return made


def _pm(values: list[float]) -> str:
    import numpy as np

    v = np.asarray(values, float)
    return f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if v.size > 1 else "")


def format_table(summary: dict[str, Any]) -> str:
    """The demo's one table: regime, Recall@K per arm, the paired difference, LFW, time per arm."""
    om = summary["omniglot"]
    lines = [f"{'track':<12} {'method':<10} {'queue':>6} {'R@1':>14} {'R@2':>6} {'R@4':>6} {'R@8':>6} "
             f"{'LFW acc':>16} {'s/arm':>7}"]
    regime = (f"Omniglot: {om['classes']} classes, {om['classes_per_batch']:.0f} per batch of {om['batch']} "
              f"({100 * om['classes_per_batch'] / om['classes']:.0f} %), {len(om['seeds'])} seeds (mean ± sd)")
    for arm, a in om["arms"].items():
        runs = list(a["runs"].values())
        r = {k: _pm([x[f"recall@{k}"] for x in runs]) for k in KS}
        secs = sum(x["wall_s"] for x in runs) / len(runs)
        lines.append(f"{'many-class':<12} {arm:<10} {a['queue']:>6} {r[1]:>14} {r[2].split(' ')[0]:>6} "
                     f"{r[4].split(' ')[0]:>6} {r[8].split(' ')[0]:>6} {'–':>16} {secs:>7.0f}")
    d = om["paired_difference"]["recall@1"]
    spread = "" if d["se"] is None else f" ± {100 * d['se']:.2f} (standard error)"
    lines.append(f"{'':<12} paired BroadFace − ArcFace, Recall@1: {100 * d['mean']:+.2f}{spread} points over "
                 f"seeds {list(d['seeds'])}: " + ", ".join(f"{100 * x:+.2f}" for x in d["diffs"]))
    lines.append(f"{'':<12} {regime}")
    if "faces" in summary:
        fa = summary["faces"]
        for arm, a in fa["arms"].items():
            lfw = f"{100 * a['lfw_accuracy']:.2f} ± {100 * a['lfw_accuracy_std']:.2f}%"
            lines.append(f"{'faces':<12} {arm:<10} {a['queue']:>6} {a['recall@1']:>14.3f} {a['recall@2']:>6.3f} "
                         f"{a['recall@4']:>6.3f} {a['recall@8']:>6.3f} {lfw:>16} {a['train_s']:>7.0f}")
        lines.append(f"{'':<12} CelebA-299: {fa['classes']} classes, {fa['classes_per_batch']:.0f} per batch of "
                     f"{fa['batch']} ({100 * fa['classes_per_batch'] / fa['classes']:.0f} %), one seed "
                     f"(warm start {fa['warm_start_s']:.0f} s); LFW: {fa['lfw_pairs']} pairs, 10 folds")
    lines.append(f"wall time {summary['wall_s']:.0f} s; plots: {', '.join(summary['plots'])}")
    return "\n".join(lines)
