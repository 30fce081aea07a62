"""``broadface embed MODEL FOLDER --out emb.npy``: embed every image in a folder."""
from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

from broadface.cli._inference import add_embed_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed every image in a folder into an .npy matrix plus a .csv index",
        description="Embed every image under FOLDER (recursively, sorted) with MODEL (a broadface checkpoint, "
        "an ONNX model or an insightface backbone.pth), prepared exactly as for training and `broadface eval`. "
        "Writes OUT (.npy, N x D float32, L2-normalised; image + flip summed by default) and OUT with "
        "suffix .csv (row, path relative to FOLDER, identity = first sub-folder), both atomically.",
    )
    add_embed_args(p)
    p.add_argument("folder", help="folder of (aligned) face images; sub-folders are identities")
    p.add_argument("--out", required=True, help="output .npy file; the index goes beside it as .csv")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from broadface.cli._inference import embed_paths, load_model, make_detector
    from broadface.data.folder import find_images
    from broadface.data.images import IMG_EXTENSIONS
    from broadface.fileio import atomic_write_bytes, check_output

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: expected a .npy file name")
    check_output(out, "--out", inputs=(args.model,))
    check_output(out.with_suffix(".csv"), "--out (its .csv index)", inputs=(args.model,))
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    root = Path(args.folder)
    paths = find_images(root)
    if not paths:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMG_EXTENSIONS)}) found")
    model = load_model(args)
    start = time.perf_counter()
    emb = embed_paths(model, paths, args, make_detector(args.align), args.workers)
    seconds = time.perf_counter() - start

    buf = io.BytesIO()
    np.save(buf, emb.astype(np.float32), allow_pickle=False)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["row", "path", "identity"])
    for i, p in enumerate(paths):
        rel = p.relative_to(root)
        writer.writerow([i, rel.as_posix(), rel.parts[0] if len(rel.parts) > 1 else ""])
    index = out.with_suffix(".csv")
    atomic_write_bytes(out, buf.getvalue())
    atomic_write_bytes(index, text.getvalue().encode())
    print(f"model: {model.summary()}")
    print(f"embedded {len(paths)} image(s) from {root} -> {out} ({emb.shape[0]} x {emb.shape[1]}, "
          f"flip={'on' if args.flip else 'off'}) and {index} in {seconds:.1f}s "
          f"({len(paths) / max(seconds, 1e-9):.1f} img/s)")
    return 0
