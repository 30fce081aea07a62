"""``broadface eval CHECKPOINT``: benchmark protocols (LFW/.bin pairs, IJB-B/C, retrieval, identification)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Evaluate a checkpoint's backbone with the community's standard protocols and print a table.
  pairs:          --lfw  |  --pairs pairs.txt --images DIR  |  --bin lfw.bin [--bin cfp_fp.bin ...]
                  10-fold accuracy ± std, VAL@FAR=1e-3 and thresholds (insightface protocol)
  IJB-B/C 1:1:    --ijb DIR --ijb-name IJBC    TAR@FAR (insightface rule) from meta/ + loose_crop/
  retrieval:      --retrieval DIR|celeba299|omniglot   Recall@1/2/4/8 and MAP@R, every image queries the rest
  identification: --identification DIR|celeba299      CMC rank-1/5/10 (first image of each identity = gallery)
Images are embedded with flip test-time augmentation unless --no-flip. Named data sets come from the
data root ($BROADFACE_DATA or ../shared/data) and use their test split."""


CMC_RANKS = (1, 2, 3, 5, 10, 20, 50)  # plotted; the table shows 1, 5, 10


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint (LFW, .bin, IJB-B/C, retrieval, identification)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="broadface checkpoint (.pt) holding 'model' and 'backbone'")
    g = p.add_argument_group("benchmarks (at least one)")
    g.add_argument("--lfw", action="store_true", help="LFW View 2 from the data root (pairs.txt + aligned-112x112)")
    g.add_argument("--pairs", metavar="TXT", help="LFW-format pairs.txt (needs --images)")
    g.add_argument("--images", metavar="DIR", help="image folder <Name>/<Name>_NNNN.jpg for --pairs")
    g.add_argument("--bin", metavar="FILE", action="append", default=[],
                   help="insightface verification .bin (repeatable); read without unpickling code")
    g.add_argument("--ijb", metavar="DIR", help="IJB root holding meta/ and loose_crop/ (or images/)")
    g.add_argument("--ijb-name", default="IJBC", help="IJBB or IJBC: meta file prefix (default IJBC)")
    g.add_argument("--retrieval", metavar="SET", help="folder-per-identity DIR, or a named set (celeba299, omniglot, lfw)")
    g.add_argument("--identification", metavar="SET", help="folder-per-identity DIR or a named set")
    o = p.add_argument_group("options")
    o.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="flip test-time augmentation: embedding = f(x) + f(flip x) (default on)")
    o.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    o.add_argument("--folds", type=int, default=10, help="folds of the pair protocol (default 10)")
    o.add_argument("--max-pairs", type=int, help="evaluate only N evenly spaced pairs (quick checks)")
    o.add_argument("--mask-one", action="store_true",
                   help="also report the masked-face setting (MFR): a synthetic mask on the second image of "
                        "every pair, as a '<set>-masked' row beside the unmasked one")
    o.add_argument("--mask-seed", type=int, default=0, help="seed of the synthetic masks (default 0)")
    o.add_argument("--device", default="cpu", help="torch device (default cpu)")
    o.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    o.add_argument("--data-root", help="data root for --lfw and named sets (default: $BROADFACE_DATA or shared/data)")
    o.add_argument("--json", metavar="FILE", help="write all results (without raw scores) as JSON")
    o.add_argument("--plots", metavar="DIR", help="write ROC (pairs, IJB) and CMC PNGs into DIR")
    p.set_defaults(func=run)


def _named_or_folder(spec: str, size: int, data_root: str | None):
    """A FaceFolder for a directory, else a named data set's test split."""
    from broadface.data import DATASETS, EvalTransform, FaceFolder, open_dataset

    transform = EvalTransform(size)
    if Path(spec).is_dir():
        return FaceFolder(spec, transform), spec
    if spec in DATASETS:
        return open_dataset(spec, "test", transform, data_root), f"{spec} (test split)"
    raise FileNotFoundError(f"{spec} is neither a folder nor a named data set ({', '.join(DATASETS)})")


def _mask_hook():
    from broadface.cli.main import CLIError

    try:
        from broadface.data.masks import apply_mask
    except ImportError as err:
        raise CLIError(f"--mask-one needs broadface.data.masks ({err})") from None
    return apply_mask


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    for name, r in results.items():
        kind = r["protocol"]
        if kind == "pairs":
            line = (f"accuracy {100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f} %   "
                    f"VAL@FAR={r['far_target']:.0e} {100 * r['val']:.2f} ± {100 * r['val_std']:.2f} %   "
                    f"cosine threshold {r['cosine_threshold']:.3f}   ({r['pairs']} pairs, {r['folds']} folds)")
        elif kind == "ijb":
            line = "TAR@FAR " + "  ".join(f"{k}: {100 * v:.2f}" for k, v in r["tar_at_far"].items())
            line += f"   ({r['templates']} templates, {r['pairs']} pairs)"
        elif kind == "retrieval":
            line = "  ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k.startswith(("recall@", "map@")))
            line += f"   ({r['queries']} images, {r['identities']} identities)"
        else:
            line = "  ".join(f"rank-{k} {v:.4f}" for k, v in r["cmc"].items() if k in (1, 5, 10))
            line += f"   ({r['probes']} probes, gallery {r['gallery']})"
        print(f"{name:<24} {line}")


def run(args: argparse.Namespace) -> int:
    from broadface.cli.main import CLIError

    wanted = [args.lfw, args.pairs, args.bin, args.ijb, args.retrieval, args.identification]
    if not any(wanted):
        raise CLIError("choose a benchmark: --lfw, --pairs/--images, --bin, --ijb, --retrieval or --identification")
    if bool(args.pairs) != bool(args.images):
        raise CLIError("--pairs and --images go together (pairs.txt and the image folder it refers to)")
    if args.batch_size < 1 or args.folds < 1 or args.workers < 0:
        raise ValueError("--batch-size and --folds must be >= 1, --workers >= 0")
    if args.mask_one and not (args.lfw or args.pairs or args.bin):
        raise CLIError("--mask-one applies to pair benchmarks (--lfw, --pairs, --bin)")

    import torch

    from broadface import eval as ev
    from broadface.models.checkpoint import load_backbone

    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r}: {err}") from None
    model = load_backbone(args.checkpoint).to(device)
    size = ev.verification.model_input_size(model)
    common = dict(flip=args.flip, batch_size=args.batch_size, device=device, num_workers=args.workers)

    pair_sets = []
    if args.lfw:
        from broadface.paths import data_root

        lfw = data_root(args.data_root) / "lfw"
        pair_sets.append(ev.lfw_pair_set(lfw / "pairs.txt", lfw / "aligned-112x112", "lfw"))
    if args.pairs:
        pair_sets.append(ev.lfw_pair_set(args.pairs, args.images, Path(args.pairs).stem))
    pair_sets += [ev.bin_pair_set(b) for b in args.bin]

    results: dict[str, dict[str, Any]] = {}
    hook = _mask_hook() if args.mask_one else None
    for ps in pair_sets:
        for h in (None, hook) if hook else (None,):  # --mask-one: the masked row beside the unmasked one
            key = ps.name + ("-masked" if h else "")
            print(f"evaluating {key} ...", file=sys.stderr)
            results[key] = {"protocol": "pairs", **ev.evaluate_pairs(model, ps.subset(args.max_pairs),
                                                                     folds=args.folds, image_hook=h,
                                                                     hook_seed=args.mask_seed, **common)}
    if args.ijb:
        print(f"evaluating {args.ijb_name} ...", file=sys.stderr)
        results[args.ijb_name] = {"protocol": "ijb", **ev.evaluate_templates(model, args.ijb, args.ijb_name, **common)}
    if args.retrieval:
        data, label = _named_or_folder(args.retrieval, size, args.data_root)
        print(f"evaluating retrieval on {label} ...", file=sys.stderr)
        results[f"retrieval:{Path(args.retrieval).name}"] = {"protocol": "retrieval",
                                                            **ev.evaluate_retrieval(model, data, **common)}
    if args.identification:
        data, label = _named_or_folder(args.identification, size, args.data_root)
        print(f"evaluating identification on {label} ...", file=sys.stderr)
        results[f"identification:{Path(args.identification).name}"] = {
            "protocol": "identification", **ev.evaluate_identification(model, data, ranks=CMC_RANKS, **common)}

    _print_table(results)
    if args.plots:
        rocs = {k: r for k, r in results.items() if "scores" in r}
        if rocs:
            print(f"wrote {ev.plot_roc(rocs, Path(args.plots) / 'roc.png', title=Path(args.checkpoint).name)}")
        cmcs = {k: r["cmc"] for k, r in results.items() if "cmc" in r}
        if cmcs:
            print(f"wrote {ev.plot_cmc(cmcs, Path(args.plots) / 'cmc.png', title=Path(args.checkpoint).name)}")
    if args.json:
        clean = {k: {f: v for f, v in r.items() if f not in ("scores", "issame")} for k, r in results.items()}
        report = {"checkpoint": str(args.checkpoint), "flip": args.flip, **clean}
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {out}")
    return 0
