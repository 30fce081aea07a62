"""``broadface demo``: ArcFace vs BroadFace from one warm start on real faces (the main job)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="train ArcFace and BroadFace from one warm start on CelebA-299; compare on unseen faces",
        description="Train an ArcFace warm start on CelebA-299's 149 training identities, continue it as plain "
        "ArcFace and as BroadFace with the same seed and budget, then print Recall@1/2/4/8 on the 150 unseen "
        "CelebA-299 identities and LFW 10-fold verification accuracy, and write learning-curve and ROC plots. "
        "About 10 minutes on 2 CPU cores (--quick: about 2).")
    p.add_argument("--quick", action="store_true", help="short run (fewer steps, 1,200 LFW pairs)")
    p.add_argument("--data-root", default=None, help="folder holding lfw/ and celeba299/ (default: $BROADFACE_DATA "
                   "or shared/data beside the checkout)")
    p.add_argument("--output", default="runs/demo", help="where checkpoints, results.json and plots go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from broadface.demo import DemoConfig, run_demo

    kw = dict(data_root=args.data_root, output=args.output, seed=args.seed, progress=not args.no_progress)
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    run_demo(cfg)
    return 0
