"""``broadface demo``: ArcFace vs BroadFace on real data, many classes (Omniglot) and faces (the main job)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="ArcFace vs BroadFace on many classes (Omniglot) and on faces (CelebA-299 -> LFW)",
        description="Two tracks. Many classes: train ArcFace and BroadFace (queue 8,192) from scratch on the 964 "
        "background characters of Omniglot with paired seeds (same initialisation and data order) and print "
        "Recall@1/2/4/8 on the 659 unseen evaluation characters with the paired difference. Faces: a "
        "normalised-softmax warm start on CelebA-299's 149 training identities, continued as ArcFace and as "
        "BroadFace with the same seed and budget, evaluated on the 150 unseen identities and LFW (10-fold). "
        "Writes results.json and learning-curve / ROC plots. About 20 minutes on 2 CPU cores (--quick: about 3).")
    p.add_argument("--quick", action="store_true", help="short run (2 seeds of short runs, 1,200 LFW pairs)")
    p.add_argument("--data-root", default=None, help="folder holding omniglot/, celeba299/ and lfw/ (default: "
                   "$BROADFACE_DATA or shared/data beside the checkout)")
    p.add_argument("--output", default="runs/demo", help="where results.json, plots and checkpoints go")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --output")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the many-class track (default 0 1 2)")
    p.add_argument("--workers", type=int, default=None,
                   help="many-class runs in parallel processes (default: 2 where 2 cores exist; threads shared out)")
    p.add_argument("--no-faces", action="store_true", help="only the many-class track")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from broadface.cli.main import CLIError
    from broadface.demo import DemoConfig, prepare_output, run_demo

    kw = dict(data_root=args.data_root, output=args.output, progress=not args.no_progress, faces=not args.no_faces)
    if args.seeds:
        kw["seeds"] = args.seeds
    if args.workers is not None:
        if args.workers < 1:
            raise CLIError(f"--workers: expected a count ≥ 1, got {args.workers}")
        kw["workers"] = args.workers
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    try:
        prepare_output(cfg, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError, PermissionError) as err:
        raise CLIError(str(err)) from None
    run_demo(cfg)
    return 0
