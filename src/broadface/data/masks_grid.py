"""``broadface data masks --grid out.png``: a contact sheet of real LFW faces wearing synthetic masks.

Meant for a person to judge whether the masks look plausible (cover nose and
mouth, follow the face). Wired into ``broadface data`` by
``add_masks_parser(subparsers)``; the work is done by :func:`render_grid`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

STYLES = ("surgical", "n95", "cloth")  # = masks.MASK_STYLES, spelled out so building the parser stays light


def sample_faces(root: Path, n: int, rng: np.random.Generator) -> list[Path]:
    """``n`` aligned faces from ``root`` (a folder per identity), one per randomly chosen identity."""
    people = sorted(p for p in root.iterdir() if p.is_dir())
    if not people:
        raise FileNotFoundError(f"{root}: no identity folders with aligned faces")
    picks = rng.choice(len(people), size=min(n, len(people)), replace=False)
    from broadface.data.folder import list_images

    out = []
    for i in sorted(picks):
        files = list_images(people[i])
        if files:
            out.append(people[i] / files[rng.integers(len(files))])
    return out


def render_grid(paths: list[Path], seed: int = 0, cols: int = 8, scale: int = 2, style: str | None = None,
                with_original: bool = False) -> np.ndarray:
    """Masked faces tiled into one RGB uint8 image (``scale``x enlarged for viewing by the pipeline's resize)."""
    from PIL import Image

    from broadface.data.images import read_rgb
    from broadface.data.masks import apply_mask
    from broadface.data.pipeline import resize

    tiles = []
    for i, p in enumerate(paths):
        face = read_rgb(p)
        masked = apply_mask(face, np.random.default_rng([seed, i]), style=style)
        tile = np.hstack([face, masked]) if with_original else masked
        tiles.append(np.asarray(resize(Image.fromarray(tile), (tile.shape[0] * scale, tile.shape[1] * scale))))
    if not tiles:
        raise ValueError("no faces to render")
    cols = max(1, min(cols, len(tiles)))
    rows = -(-len(tiles) // cols)
    th, tw = tiles[0].shape[:2]
    sheet = np.full((rows * th + (rows - 1) * 2, cols * tw + (cols - 1) * 2, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * (th + 2) : r * (th + 2) + th, c * (tw + 2) : c * (tw + 2) + tw] = tile
    return sheet


def add_masks_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``masks`` to the ``broadface data`` sub-commands."""
    p = subparsers.add_parser(
        "masks",
        help="render a grid of real aligned faces wearing synthetic masks",
        description="Put synthetic masks (surgical, N95/KN95, cloth) on randomly chosen real aligned faces "
        "(default: LFW) and save a contact sheet, to judge the masked-face augmentation by eye.",
    )
    p.add_argument("--grid", required=True, metavar="PNG", help="output image (PNG or JPEG)")
    p.add_argument("--n", type=int, default=24, help="number of faces (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed for the faces and masks (default 0)")
    p.add_argument("--cols", type=int, default=8, help="faces per row (default 8)")
    p.add_argument("--scale", type=int, default=2, help="upsampling factor for viewing (default 2)")
    p.add_argument("--style", choices=STYLES, help="only this mask style (default: a random mix)")
    p.add_argument("--with-original", action="store_true", help="show each face before and after")
    p.add_argument("--faces", metavar="DIR", help="folder of aligned faces, one sub-folder per identity "
                   "(default: <data-root>/lfw/aligned-112x112)")
    p.add_argument("--data-root", help="data root (default: $BROADFACE_DATA or ../shared/data)")
    p.set_defaults(func=masks_command)
    return p


def masks_command(args: argparse.Namespace) -> int:
    from broadface.data.images import write_image
    from broadface.paths import data_root

    if not 1 <= args.n <= 1000:
        raise ValueError(f"--n must be between 1 and 1000, got {args.n}")
    if not 1 <= args.scale <= 8:
        raise ValueError(f"--scale must be between 1 and 8, got {args.scale}")
    faces = Path(args.faces) if args.faces else data_root(args.data_root) / "lfw" / "aligned-112x112"
    if not faces.is_dir():
        raise FileNotFoundError(f"faces folder {faces} does not exist")
    paths = sample_faces(faces, args.n, np.random.default_rng(args.seed))
    sheet = render_grid(paths, args.seed, args.cols, args.scale, args.style, args.with_original)
    out = Path(args.grid)
    write_image(sheet, out)
    print(f"wrote {out}: {len(paths)} masked faces ({sheet.shape[1]}x{sheet.shape[0]} px) from {faces}")
    return 0
