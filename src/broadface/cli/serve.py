"""``broadface serve MODEL --gallery PATH``: the face-search HTTP service (docs/serving.md)."""
from __future__ import annotations

import argparse
import os

from broadface.cli._inference import DEFAULT_THRESHOLD, add_model_args

API_KEY_ENV = "BROADFACE_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP face-search service with a persistent gallery (SQLite)",
        description="Serve a model (broadface checkpoint, ONNX, or insightface backbone.pth) as an HTTP JSON API: "
        "enrol images under identities, search, verify, list and delete; a web page at /, OpenAPI at /docs. "
        "The gallery is an SQLite file (created if absent) tied to the model that built it. Listens on "
        f"loopback only by default; with an API key (--api-key-file, or ${API_KEY_ENV}) writes need the "
        "X-API-Key header.",
    )
    add_model_args(p)  # the model and how to feed it, as for eval / embed / verify / identify
    p.add_argument("--gallery", required=True, metavar="PATH", help="gallery database (SQLite), created if absent")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help=f"cosine threshold for 'same' (default {DEFAULT_THRESHOLD})")
    group.add_argument("--threshold-from", metavar="JSON", help="read the threshold from `broadface eval --json`")
    p.add_argument("--api-key-file", metavar="FILE",
                   help=f"file holding the API key for writes (or set ${API_KEY_ENV})")
    p.add_argument("--index", choices=("auto", "exact", "faiss"), default="auto",
                   help="search index: exact matrix product, faiss IVF, or auto (faiss from --faiss-min identities "
                   "when installed; default)")
    p.add_argument("--faiss-min", type=int, default=20000, help="auto index: identities from which faiss is used")
    p.add_argument("--nprobe", type=int, default=16, help="faiss IVF cells searched per query (default 16)")
    p.add_argument("--max-image-mb", type=float, default=8.0, help="largest uploaded image file in MB (default 8)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest decoded image in pixels (default 40M)")
    p.add_argument("--max-files", type=int, default=16, help="images per enrol request (default 16)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="embed the image only, not image + flip")
    p.add_argument("--threads", type=int, default=1, help="torch / faiss threads per request (default 1; "
                   "requests run in parallel)")
    p.set_defaults(func=run)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        path = args.api_key_file
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--api-key-file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"--api-key-file {path} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def config_from_args(args: argparse.Namespace):
    """The :class:`ServeConfig` the command line asks for (threshold resolved, key read)."""
    from broadface.cli._inference import resolve_threshold
    from broadface.fileio import check_output
    from broadface.serve.config import ServeConfig

    check_output(args.gallery, "--gallery", inputs=(args.model,))  # an SQLite file, created if absent
    threshold, source = resolve_threshold(args)
    if args.max_image_mb <= 0:
        raise ValueError(f"--max-image-mb must be positive, got {args.max_image_mb}")
    return ServeConfig(model=args.model, gallery=args.gallery, host=args.host, port=args.port, threshold=threshold,
                       threshold_source=source, api_key=_api_key(args), index=args.index, faiss_min=args.faiss_min,
                       nprobe=args.nprobe, max_image_bytes=int(args.max_image_mb * (1 << 20)),
                       max_pixels=args.max_pixels, max_files=args.max_files, flip=args.flip,
                       input_size=args.input_size, bgr=bool(args.bgr), mean=args.mean, std=args.std,
                       format=args.format, device=args.device, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    from broadface.serve.server import serve

    serve(config_from_args(args))
    return 0
