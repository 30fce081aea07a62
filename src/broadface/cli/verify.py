"""``broadface verify MODEL a.jpg b.jpg``: are two faces the same person?"""
from __future__ import annotations

import argparse
import json

from broadface.cli._inference import DEFAULT_THRESHOLD, add_embed_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="cosine similarity of two faces and a same/different decision",
        description="Embed two face images (image + flip, L2-normalised) and compare their cosine similarity "
        f"with a threshold: --threshold T, --threshold-from eval.json (from `broadface eval --json`), or the "
        f"generic default {DEFAULT_THRESHOLD} (calibrate it for your model). Images must be aligned crops, "
        "or pass --align to detect and align raw photos.",
    )
    add_embed_args(p)
    p.add_argument("image_a", help="first face image")
    p.add_argument("image_b", help="second face image")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float,
                       help=f"cosine threshold: score >= T means same (default {DEFAULT_THRESHOLD})")
    group.add_argument("--threshold-from", metavar="JSON",
                       help="read the threshold from a `broadface eval --json` report")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from broadface.cli._inference import check_images, embed_paths, load_model, make_detector, resolve_threshold

    threshold, source = resolve_threshold(args)
    paths = [Path(args.image_a), Path(args.image_b)]
    check_images(paths)
    model = load_model(args)
    emb = embed_paths(model, paths, args, make_detector(args.align))
    score = float(emb[0] @ emb[1])
    same = score >= threshold
    if args.json:
        print(json.dumps({"image_a": str(paths[0]), "image_b": str(paths[1]), "score": round(score, 6),
                          "threshold": threshold, "same": same, "model": model.describe()}, allow_nan=False))
    else:
        print(f"model              {model.summary()}")
        print(f"cosine similarity  {score:.4f}")
        print(f"threshold          {threshold:.4f} ({source})")
        print(f"decision           {'SAME person' if same else 'DIFFERENT people'}")
    return 0
