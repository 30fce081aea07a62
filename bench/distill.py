"""Distillation benchmark: a small student distilled from a larger teacher vs the same student alone.

On CelebA-299 (the 149 training identities, 56x56) it trains

1. a teacher: iResNet [2,2,2,2] (base width 64; ``--quick``: 32), D=256, ArcFace + BroadFace queue;
2. the student, iResNet [1,1,1,1] base width 32, D=128, CosFace (m=0.4, s=64) + BroadFace queue,
   without distillation;
3. the same student (same seed, steps, data order, masks) with + λ·(1 − cos) to the teacher
   (λ = 9; a learnable 128 -> 256 projection; teacher embeddings cached on disk, or, in
   ``--quick``, computed on the fly),

both students with ``data.mask_prob`` (default 0.35), and reports for each model LFW View 2
10-fold accuracy unmasked and masked (second image of every pair masked), and Recall@1 on the
150 unseen CelebA-299 identities, as a table and a JSON file. One seed: differences of a
fraction of a percent are within the run-to-run noise.

    python bench/distill.py --quick      # ~3 min on 2 quiet cores: few steps, 1200 LFW pairs, no flip TTA
    python bench/distill.py              # ~12 min: more steps, all 6000 LFW pairs, flip TTA
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

FULL = dict(teacher_width=64, teacher_steps=100, student_steps=150, batch=64, pairs=None, flip=True, cache=True)
QUICK = dict(teacher_width=32, teacher_steps=30, student_steps=40, batch=32, pairs=1200, flip=False, cache=False)


def base_config(out: Path | None, steps: int, batch: int, seed: int, *overrides: str):
    from broadface.train.config import Config, apply_overrides

    warm = max(1, steps // 10)
    return apply_overrides(Config(), [
        "data.name=celeba299", "data.train_split=train", "data.val_split=null", "model.input_size=56",
        "optim.lr=0.1", "optim.weight_decay=5e-4", "schedule.name=poly", "schedule.power=1.0",
        f"schedule.warmup_steps={warm}", f"train.steps={steps}", f"train.batch_size={batch}", f"train.seed={seed}",
        f"train.output={'null' if out is None else out}", f"train.log_every={max(1, steps // 5)}",
        "train.checkpoint_every=0", "train.tensorboard=false", "train.device=cpu", "head.queue_size=1024",
        *overrides])


def train(cfg) -> tuple[torch.nn.Module, float, dict]:
    from broadface.train.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit()
    return trainer.model, time.perf_counter() - t0, (result.history[-1] if result.history else {})


def evaluate(model: torch.nn.Module, lfw, celeba_test, flip: bool) -> dict:
    from broadface import eval as ev
    from broadface.data.masks import apply_mask

    t0 = time.perf_counter()
    plain = ev.evaluate_pairs(model, lfw, folds=10, flip=flip)
    masked = ev.evaluate_pairs(model, lfw, folds=10, flip=flip, image_hook=apply_mask, hook_seed=0)
    recall = ev.evaluate_retrieval(model, celeba_test, ks=(1,), flip=flip)
    return {"lfw": plain["accuracy"], "lfw_std": plain["accuracy_std"], "lfw_masked": masked["accuracy"],
            "lfw_masked_std": masked["accuracy_std"], "celeba_recall@1": recall["recall@1"],
            "eval_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small teacher, few steps, LFW subset, no flip TTA")
    p.add_argument("--output", default="runs/bench_distill", help="teacher checkpoint, cache and results")
    p.add_argument("--json", default=None, help="results file (default OUTPUT/results.json)")
    p.add_argument("--mask-prob", type=float, default=0.35, help="data.mask_prob of both students")
    p.add_argument("--weight", type=float, default=9.0, help="distill.weight λ")
    p.add_argument("--kind", default="cosine", choices=["cosine", "l2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("overrides of the --quick / full setup")
    o.add_argument("--teacher-width", type=int)
    o.add_argument("--teacher-steps", type=int)
    o.add_argument("--student-steps", type=int)
    o.add_argument("--batch", type=int)
    o.add_argument("--pairs", type=int, help="evenly spaced LFW pairs (default: quick 1200, full all 6000)")
    o.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="flip TTA at evaluation")
    o.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None, help="cache teacher embeddings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    setup = dict(QUICK if args.quick else FULL)
    setup.update({k: v for k, v in vars(args).items() if k in setup and v is not None})
    out = Path(args.output) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)

    from broadface import eval as ev
    from broadface.data import EvalTransform, open_dataset
    from broadface.paths import data_root

    wall0 = time.perf_counter()
    lfw_dir = data_root() / "lfw"
    lfw = ev.lfw_pair_set(lfw_dir / "pairs.txt", lfw_dir / "aligned-112x112", "lfw").subset(setup["pairs"])
    celeba_test = open_dataset("celeba299", "test", EvalTransform(56))
    steps_s, steps_t, batch = setup["student_steps"], setup["teacher_steps"], setup["batch"]

    print(f"# teacher: iresnet [2,2,2,2] w{setup['teacher_width']} D=256, {steps_t} steps x {batch}", flush=True)
    tdir = out / "teacher"
    if tdir.exists():
        import shutil

        shutil.rmtree(tdir)
    tcfg = base_config(tdir, steps_t, batch, args.seed, "model.name=iresnet", "model.embedding_size=256",
                       f"model.kwargs={{layers: [2,2,2,2], base_width: {setup['teacher_width']}}}",
                       "head.loss=arcface", "head.scale=32.0", "head.margin=0.3")
    teacher, t_teacher, t_last = train(tcfg)
    rows = {"teacher": {"train_s": t_teacher, "final_batch_loss": t_last.get("batch_loss"),
                        **evaluate(teacher, lfw, celeba_test, setup["flip"])}}

    student = ["model.name=iresnet", "model.embedding_size=128", "model.kwargs={layers: [1,1,1,1], base_width: 32}",
               "head.loss=cosface", "head.scale=64.0", "head.margin=0.4", f"data.mask_prob={args.mask_prob}"]
    cache = out / "teacher_cache.npy"
    for f in (cache, cache.with_name(cache.name + ".json")):
        f.unlink(missing_ok=True)  # the teacher was just retrained
    variants = {
        "student": [],
        "student + distill": [f"distill.teacher={tdir / 'final.pt'}", f"distill.weight={args.weight}",
                              f"distill.kind={args.kind}"] + ([f"distill.cache={cache}"] if setup["cache"] else []),
    }
    for name, extra in variants.items():
        print(f"# {name}: iresnet [1,1,1,1] w32 D=128, {steps_s} steps x {batch}, mask_prob {args.mask_prob}",
              flush=True)
        model, seconds, last = train(base_config(None, steps_s, batch, args.seed, *student, *extra))
        rows[name] = {"train_s": seconds, "final_batch_loss": last.get("batch_loss"),
                      "final_distill_loss": last.get("distill_loss"),
                      **evaluate(model, lfw, celeba_test, setup["flip"])}
    wall = time.perf_counter() - wall0

    print(f"\n# CelebA-299 (149 ids) 56x56, seed {args.seed}, {len(lfw)} LFW pairs, flip TTA {setup['flip']}, "
          f"threads {args.threads}, wall {wall:.0f} s")
    print(f"{'model':<20}{'LFW %':>14}{'LFW masked %':>16}{'CelebA R@1':>12}{'train s':>9}{'eval s':>8}")
    for name, r in rows.items():
        print(f"{name:<20}{100 * r['lfw']:>8.2f} ±{100 * r['lfw_std']:>4.2f}{100 * r['lfw_masked']:>10.2f} "
              f"±{100 * r['lfw_masked_std']:>4.2f}{r['celeba_recall@1']:>12.4f}{r['train_s']:>9.0f}{r['eval_s']:>8.0f}")
    base, dist = rows["student"], rows["student + distill"]
    print(f"{'distill - student':<20}{100 * (dist['lfw'] - base['lfw']):>+14.2f}"
          f"{100 * (dist['lfw_masked'] - base['lfw_masked']):>+16.2f}"
          f"{dist['celeba_recall@1'] - base['celeba_recall@1']:>+12.4f}")
    report = {"mode": "quick" if args.quick else "full", "setup": setup, "args": vars(args), "wall_s": wall,
              "lfw_pairs": len(lfw), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch_threads": torch.get_num_threads(), "results": rows}
    path = Path(args.json) if args.json else out / "results.json"
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    from broadface.allocator import configure_from_env

    configure_from_env()  # as the broadface command: freed memory kept unless BROADFACE_MALLOC=system
    main()
