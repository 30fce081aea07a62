"""``broadface data ACTION``: inspect and convert data sets.

Actions (one ``_add_<action>`` function each; add new ones to ``ACTIONS``):

* ``pack FOLDER OUT``   -- folder-per-identity tree -> insightface RecordIO (train.rec/.idx/property)
* ``info PATH_OR_NAME`` -- classes, images and per-class min/median/max of a folder, RecordIO set,
  verification ``.bin`` or named set (lfw, celeba299, omniglot)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from broadface.data.masks_grid import add_masks_parser


def _add_pack(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "pack", help="pack an image folder into insightface RecordIO",
        description="Pack FOLDER (one sub-folder per identity, labels = sorted folder names) into OUT/train.rec, "
        "train.idx, property ('classes,h,w') and classes.txt, readable by mxnet/insightface and by "
        "broadface's RecordIODataset. Images are stored byte-for-byte after checking that they decode.",
    )
    p.add_argument("folder", metavar="FOLDER", help="image folder ROOT/<identity>/<image>")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--skip-bad", action="store_true", help="leave out undecodable images (listed) instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/train.rec")
    p.set_defaults(func=run_pack)


def _add_info(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "info", help="summarise a data set: classes, images, images per class",
        description="PATH_OR_NAME is a named set (lfw, celeba299, omniglot; found under the data root), an image "
        "folder, a RecordIO folder/prefix, or a verification .bin file. Nothing is decoded unless --check.",
    )
    p.add_argument("target", metavar="PATH_OR_NAME")
    p.add_argument("--split", choices=("train", "test", "all"), default="all",
                   help="split of a named set (default all)")
    p.add_argument("--data-root", help="data root for named sets (default $BROADFACE_DATA or ../shared/data)")
    p.add_argument("--check", action="store_true", help="decode every image and list the unreadable ones")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_info)


ACTIONS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_pack, add_masks_parser]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="inspect, convert and preview data sets (info, pack, masks)",
        description="Inspect and convert data sets. Run `broadface data ACTION -h` for an action's options.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    for add in ACTIONS:
        add(actions)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run_pack(args: argparse.Namespace) -> int:
    from broadface.data.recordio import pack_folder
    from broadface.fileio import check_output

    check_output(args.out, "OUT", folder=True)  # before every image is read and checked

    def progress(i: int, n: int) -> None:
        if sys.stderr.isatty() and (i % 500 == 0 or i == n):
            print(f"\rchecked {i}/{n} images", end="\n" if i == n else "", file=sys.stderr)

    s = pack_folder(args.folder, args.out, skip_bad=args.skip_bad, overwrite=args.overwrite, progress=progress)
    print(f"wrote {s.out_dir}: {s.num_images} images, {s.num_classes} classes, "
          f"property {s.num_classes},{s.size[0]},{s.size[1]}")
    if s.mixed_sizes:
        print(f"note: {s.mixed_sizes} images differ from the {s.size[0]}x{s.size[1]} written to property")
    if s.skipped:
        print(f"skipped {len(s.skipped)} undecodable image(s):")
        for path in s.skipped:
            print(f"  {path}")
    return 0


def _open(target: str, split: str, data_root: str | None):
    """A dataset for ``target``: named set, RecordIO folder/prefix, or image folder."""
    from broadface.data.folder import FaceFolder
    from broadface.data.recordio import RecordIODataset
    from broadface.data.sets import DATASETS, open_dataset

    if target in DATASETS and not Path(target).exists():
        return f"{target} ({split})", open_dataset(target, split, data_root=data_root)
    if split != "all":
        raise ValueError(f"--split applies to named sets ({', '.join(DATASETS)}), not to {target}")
    p = Path(target)
    if (p.is_dir() and (p / "train.rec").is_file()) or p.suffix == ".rec" or Path(str(p) + ".rec").is_file():
        return f"RecordIO {target}", RecordIODataset(p)
    if p.is_dir():
        return f"image folder {target}", FaceFolder(p)
    raise FileNotFoundError(f"{target}: not a named set ({', '.join(DATASETS)}), folder, RecordIO set or .bin file")


def run_info(args: argparse.Namespace) -> int:
    import numpy as np

    info: dict[str, Any]
    if args.target.endswith(".bin"):
        from broadface.data.binfile import decode_bin_images, load_bin

        images, issame = load_bin(args.target)
        info = {"source": f"verification bin {args.target}", "pairs": int(len(issame)),
                "same": int(issame.sum()), "different": int((~issame).sum()), "images": len(images)}
        if args.check:
            decode_bin_images(images, args.target)
            info["unreadable"] = []
    else:
        label, ds = _open(args.target, args.split, args.data_root)
        counts = ds.class_counts()
        info = {"source": label, "classes": int(len(counts)), "images": int(counts.sum()),
                "per_class": {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}}
        if getattr(ds, "property", None):
            info["property"] = list(ds.property)
        if args.check:
            from broadface.data.images import ImageDecodeError

            bad = []
            for i in range(len(ds)):
                try:
                    ds.image(i)
                except ImageDecodeError as err:
                    bad.append(str(err))
            info["unreadable"] = bad
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        if key == "per_class":
            value = f"min {value['min']} / median {value['median']:g} / max {value['max']}"
        elif key == "unreadable":
            value = f"{len(value)}" + "".join(f"\n  {v}" for v in value)
        print(f"{key:<10} {value}")
    return 0
