"""``broadface eval MODEL``: benchmark protocols (LFW/.bin pairs, IJB-B/C 1:1 and 1:N, retrieval, identification)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from broadface.cli._inference import add_model_args

DESCRIPTION = """\
Evaluate an embedding model with the community's standard protocols and print a table.
MODEL is a broadface checkpoint, an ONNX model or an insightface iResNet backbone.pth (see --format).
  pairs:          --lfw  |  --pairs pairs.txt --images DIR  |  --bin lfw.bin [--bin cfp_fp.bin ...]
                  10-fold accuracy ± std, VAL@FAR=1e-3 and thresholds (insightface protocol)
  IJB-B/C:        --ijb DIR --ijb-name IJBC [--ijb-protocol 1:1|1:N|both]
                  1:1 TAR@FAR (insightface rule); 1:N rank-1/5/10 and TPIR@FPIR on galleries G1, G2, G1+G2
  retrieval:      --retrieval DIR|celeba299|omniglot   Recall@1/2/4/8 and MAP@R, every image queries the rest
  identification: --identification DIR|celeba299      CMC rank-1/5/10 (first image of each identity = gallery)
Every set keeps its own row (a name used twice gets the file name or path instead) and a summary
table over all sets ends the output (--csv writes it). Images are embedded with flip test-time
augmentation unless --no-flip. Named data sets come from the data root ($BROADFACE_DATA or
../shared/data) and use their test split."""

CMC_RANKS = (1, 2, 3, 5, 10, 20, 50)  # plotted; the table shows 1, 5, 10


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (LFW, .bin, IJB-B/C, retrieval, identification)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("benchmarks (at least one)")
    g.add_argument("--lfw", action="store_true", help="LFW View 2 from the data root (pairs.txt + aligned-112x112)")
    g.add_argument("--pairs", metavar="TXT", help="LFW-format pairs.txt (needs --images)")
    g.add_argument("--images", metavar="DIR", help="image folder <Name>/<Name>_NNNN.jpg for --pairs")
    g.add_argument("--bin", metavar="FILE", action="append", default=[],
                   help="insightface verification .bin (repeatable); read without unpickling code")
    g.add_argument("--ijb", metavar="DIR", help="IJB root holding meta/ and loose_crop/ (or images/)")
    g.add_argument("--ijb-name", default="IJBC", help="IJBB or IJBC: meta file prefix (default IJBC)")
    g.add_argument("--ijb-protocol", choices=("1:1", "1:N", "both"), default="1:1",
                   help="IJB protocol(s) to run on the same image features (default 1:1)")
    g.add_argument("--retrieval", metavar="SET",
                   help="folder-per-identity DIR, or a named set (celeba299, omniglot, lfw)")
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
    o.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    o.add_argument("--data-root", help="data root for --lfw and named sets (default: $BROADFACE_DATA or shared/data)")
    o.add_argument("--json", metavar="FILE", help="write every result (without raw scores) and the summary as JSON")
    o.add_argument("--csv", metavar="FILE", help="write the summary table as CSV")
    o.add_argument("--scores", metavar="DIR", help="write each pair set's / IJB 1:1 raw scores as DIR/<set>.csv")
    o.add_argument("--plots", metavar="DIR", help="write ROC (pairs, IJB) and CMC PNGs into DIR")
    p.set_defaults(func=run)


def _named_or_folder(spec: str, preprocessing, data_root: str | None):
    """A FaceFolder for a directory, else a named data set's test split, prepared for the model."""
    from broadface.data import DATASETS, FaceFolder, open_dataset

    if Path(spec).is_dir():
        return FaceFolder(spec, preprocessing), spec
    if spec in DATASETS:
        return open_dataset(spec, "test", preprocessing, data_root), f"{spec} (test split)"
    raise FileNotFoundError(f"{spec} is neither a folder nor a named data set ({', '.join(DATASETS)})")


def _mask_hook():
    from broadface.cli.main import CLIError

    try:
        from broadface.data.masks import apply_mask
    except ImportError as err:
        raise CLIError(f"--mask-one needs broadface.data.masks ({err})") from None
    return apply_mask


def unique_name(taken: dict[str, Any] | list[str], *candidates: str) -> str:
    """The first candidate not yet taken (e.g. ``lfw``, ``lfw.bin``, the full path), else the last with #2, #3..."""
    for name in candidates:
        if name not in taken:
            return name
    k = 2
    while f"{candidates[-1]}#{k}" in taken:
        k += 1
    return f"{candidates[-1]}#{k}"


def _pair_sets(args: argparse.Namespace) -> list:
    """Every requested pair set, each under a name of its own."""
    from broadface import eval as ev

    sets: list = []
    if args.lfw:
        from broadface.paths import data_root

        lfw = data_root(args.data_root) / "lfw"
        sets.append(ev.lfw_pair_set(lfw / "pairs.txt", lfw / "aligned-112x112", "lfw"))
    if args.pairs:
        p = Path(args.pairs)
        sets.append(ev.lfw_pair_set(p, args.images, unique_name([s.name for s in sets], p.stem, p.name, str(p))))
    for b in args.bin:
        b = Path(b)
        sets.append(ev.bin_pair_set(b, unique_name([s.name for s in sets], b.stem, b.name, str(b))))
    return sets


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _line(r: dict[str, Any]) -> str:
    kind = r["protocol"]
    if kind == "pairs":
        return (f"accuracy {100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f} %   "
                f"VAL@FAR={r['far_target']:.0e} {100 * r['val']:.2f} ± {100 * r['val_std']:.2f} %   "
                f"cosine threshold {r['cosine_threshold']:.3f}   ({r['pairs']} pairs, {r['folds']} folds)")
    if kind == "ijb":
        return ("TAR@FAR " + "  ".join(f"{k}: {100 * v:.2f}" for k, v in r["tar_at_far"].items())
                + f"   ({r['templates']} templates, {r['pairs']} pairs)")
    if kind == "retrieval":
        return ("  ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k.startswith(("recall@", "map@")))
                + f"   ({r['queries']} images, {r['identities']} identities)")
    line = "  ".join(f"rank-{k} {v:.4f}" for k, v in r["cmc"].items() if int(k) in (1, 5, 10))
    if "tpir_at_fpir" in r:
        line += "   TPIR@FPIR " + "  ".join(f"{k}: {v:.4f}" for k, v in r["tpir_at_fpir"].items())
    return line + f"   ({r['probes']} probes, {r['mated_probes']} mated, gallery {r['gallery']})"


def _ijb(model, args: argparse.Namespace, common: dict, results: dict) -> None:
    from broadface.eval.ijb import ijb_image_features, read_ijb_meta
    from broadface.eval.ijb_search import search_templates
    from broadface.eval.templates import verify_templates

    name = args.ijb_name
    print(f"evaluating {name} {args.ijb_protocol} ...", file=sys.stderr)
    meta = read_ijb_meta(args.ijb, name)
    feats, detector = ijb_image_features(model, meta, **common)
    extra = {"flip": args.flip, "norm_score": True, "detector_score": detector}
    if args.ijb_protocol in ("1:1", "both"):
        results[unique_name(results, name)] = {"protocol": "ijb", **verify_templates(feats, meta, name), **extra}
    if args.ijb_protocol in ("1:N", "both"):
        for gallery, r in search_templates(feats, meta, name)["searches"].items():
            results[unique_name(results, f"{name} 1:N {gallery}")] = {"protocol": "ijb-1:N", **r, **extra}


def _evaluate(model, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every requested benchmark, in command-line order of kinds, each result under its own name."""
    from broadface import eval as ev

    common = dict(flip=args.flip, batch_size=args.batch_size, num_workers=args.workers)
    results: dict[str, dict[str, Any]] = {}
    hook = _mask_hook() if args.mask_one else None
    for ps in _pair_sets(args):
        for h in (None, hook) if hook else (None,):  # --mask-one: the masked row beside the unmasked one
            key = unique_name(results, ps.name + ("-masked" if h else ""))
            print(f"evaluating {key} ...", file=sys.stderr)
            results[key] = {"protocol": "pairs", **ev.evaluate_pairs(model, ps.subset(args.max_pairs),
                                                                     folds=args.folds, image_hook=h,
                                                                     hook_seed=args.mask_seed, **common)}
    if args.ijb:
        _ijb(model, args, common, results)
    for kind, spec in (("retrieval", args.retrieval), ("identification", args.identification)):
        if not spec:
            continue
        data, label = _named_or_folder(spec, model.preprocessing, args.data_root)
        print(f"evaluating {kind} on {label} ...", file=sys.stderr)
        r = (ev.evaluate_retrieval(model, data, **common) if kind == "retrieval"
             else ev.evaluate_identification(model, data, ranks=CMC_RANKS, **common))
        results[unique_name(results, f"{kind}:{Path(spec).name}", f"{kind}:{spec}")] = {"protocol": kind, **r}
    return results


def _check(args: argparse.Namespace) -> None:
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
    from broadface.fileio import check_output

    for flag, path, folder in (("--json", args.json, False), ("--csv", args.csv, False),
                               ("--scores", args.scores, True), ("--plots", args.plots, True)):
        if path:  # before the evaluation runs, so that its results are never lost to a bad path
            check_output(path, flag, folder=folder, inputs=(args.model, *args.bin))


def _write_scores(results: dict[str, dict[str, Any]], folder: Path) -> None:
    from broadface.fileio import atomic_write_text

    for name, r in results.items():
        if "scores" in r:
            lines = ["index,issame,score"] + [f"{i},{int(s)},{v!r}" for i, (s, v) in
                                             enumerate(zip(r["issame"], r["scores"].tolist()))]
            path = folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".csv")
            print(f"wrote {atomic_write_text(path, chr(10).join(lines) + chr(10))}")


def _outputs(model, args: argparse.Namespace, results: dict[str, dict[str, Any]], rows: list) -> None:
    from broadface import eval as ev
    from broadface.eval.summary import write_csv
    from broadface.fileio import atomic_write_json

    title = Path(args.model).name
    if args.plots:
        rocs = {k: r for k, r in results.items() if "scores" in r}
        if rocs:
            print(f"wrote {ev.plot_roc(rocs, Path(args.plots) / 'roc.png', title=title)}")
        cmcs = {k: r["cmc"] for k, r in results.items() if "cmc" in r}
        if cmcs:
            print(f"wrote {ev.plot_cmc(cmcs, Path(args.plots) / 'cmc.png', title=title)}")
    if args.scores:
        _write_scores(results, Path(args.scores))
    if args.csv:
        print(f"wrote {write_csv(rows, args.csv)}")
    if args.json:
        clean = {k: {f: v for f, v in r.items() if f not in ("scores", "issame")} for k, r in results.items()}
        report = {"model": model.describe(), "flip": args.flip, "results": clean, "summary": rows}
        print(f"wrote {atomic_write_json(args.json, report)}")


def run(args: argparse.Namespace) -> int:
    from broadface.cli._inference import load_model
    from broadface.eval.summary import format_table, summary_rows

    _check(args)
    model = load_model(args)
    print(f"model: {model.summary()}")
    results = _evaluate(model, args)
    width = max(24, *(len(k) for k in results))
    for name, r in results.items():
        print(f"{name:<{width}} {_line(r)}")
    rows = summary_rows(results)
    print("\nsummary\n" + format_table(rows))
    _outputs(model, args, results, rows)
    return 0
