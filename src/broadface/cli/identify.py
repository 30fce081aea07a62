"""``broadface identify MODEL probe.jpg --gallery DIR``: rank gallery identities for a probe face."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broadface.cli._inference import add_embed_args

if TYPE_CHECKING:
    import numpy as np

CACHE_VERSION = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "identify",
        help="rank gallery identities (folder per identity) for a probe face",
        description="Embed every gallery image (DIR/<identity>/<images>), average each identity's "
        "L2-normalised embeddings into one template (re-normalised), and rank the identities by cosine "
        "similarity to the probe. --gallery-cache stores the templates (.npz, no pickles) and reuses "
        "them while the model file, gallery files and options are unchanged.",
    )
    add_embed_args(p)
    p.add_argument("probe", help="probe face image")
    p.add_argument("--gallery", required=True, metavar="DIR", help="gallery folder: one sub-folder per identity")
    p.add_argument("--top-k", type=int, default=5, help="identities to print (default 5)")
    p.add_argument("--gallery-cache", metavar="NPZ", help="gallery template cache (.npz), created or reused")
    p.add_argument("--json", action="store_true", help="print the ranking as one JSON object")
    p.set_defaults(func=run)


def _gallery_files(root: Path) -> list[tuple[str, Path]]:
    """(identity, image path) for every image of the identity folders of ``root`` (the FaceFolder listing)."""
    from broadface.data.folder import FaceFolder

    try:
        folder = FaceFolder(root)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"--gallery {err}") from None
    return [(folder.classes[label], Path(path)) for path, label in folder.samples]


def _fingerprint(model, items: list[tuple[str, Path]], args: argparse.Namespace) -> str:
    """Hash of everything the templates depend on: model file, preprocessing, gallery files, options."""
    h = hashlib.sha256(f"v{CACHE_VERSION} flip={args.flip} align={args.align} model={model.sha256} "
                       f"input={model.preprocessing.describe()}\n".encode())
    for ident, p in items:
        st = p.stat()
        h.update(f"{ident}/{p.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build_templates(emb: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean template per identity (L2-normalised): (identities, templates K x D, image counts)."""
    import numpy as np

    names, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    sums = np.zeros((len(names), emb.shape[1]), np.float64)
    np.add.at(sums, inverse, emb.astype(np.float64))
    templates = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return names, templates.astype(np.float32), counts


def _load_cache(path: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Cached (identities, templates, counts), or None when missing or stale."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                print(f"gallery cache {path} is stale (model, gallery or options changed): re-embedding",
                      file=sys.stderr)
                return None
            return z["identities"], z["templates"], z["counts"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a broadface gallery cache ({err}); delete it or pick another file") from None


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from broadface.cli._inference import check_images, embed_paths, load_model, make_detector
    from broadface.fileio import atomic_write_bytes, check_output

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    probe = Path(args.probe)
    check_images([probe], "probe image")
    cache = Path(args.gallery_cache) if args.gallery_cache else None
    if cache is not None and cache.suffix != ".npz":
        raise ValueError(f"--gallery-cache {cache}: expected a .npz file name")
    if cache is not None:
        check_output(cache, "--gallery-cache", inputs=(args.model, probe))
    items = _gallery_files(Path(args.gallery))
    model = load_model(args)
    detector = make_detector(args.align)

    fingerprint = _fingerprint(model, items, args) if cache else ""
    cached = _load_cache(cache, fingerprint) if cache else None
    if cached is None:
        emb = embed_paths(model, [p for _, p in items], args, detector)
        names, templates, counts = build_templates(emb, [ident for ident, _ in items])
        if cache:
            import io

            buf = io.BytesIO()
            np.savez(buf, fingerprint=np.array(fingerprint), identities=names, templates=templates, counts=counts)
            atomic_write_bytes(cache, buf.getvalue())
            print(f"gallery cache written: {cache} ({len(names)} identities, {len(items)} images)", file=sys.stderr)
    else:
        names, templates, counts = cached
        print(f"gallery cache reused: {cache} ({len(names)} identities)", file=sys.stderr)
    if templates.shape[1] != model.dim:
        raise ValueError(f"{cache}: templates are {templates.shape[1]}-d but the model embeds to {model.dim}-d")

    query = embed_paths(model, [probe], args, detector)[0]
    scores = templates @ query
    order = np.argsort(-scores, kind="stable")[: args.top_k]
    if args.json:
        print(json.dumps({"probe": str(probe), "model": model.describe(), "ranking": [
            {"rank": r + 1, "identity": str(names[i]), "score": round(float(scores[i]), 6), "images": int(counts[i])}
            for r, i in enumerate(order)]}, allow_nan=False))
        return 0
    width = max(8, *(len(str(names[i])) for i in order))
    print(f"model: {model.summary()}")
    print(f"probe {probe} vs {len(names)} identities ({int(counts.sum())} gallery images)")
    print(f"{'rank':>4}  {'identity':<{width}}  {'cosine':>7}  {'images':>6}")
    for r, i in enumerate(order):
        print(f"{r + 1:>4}  {str(names[i]):<{width}}  {scores[i]:>7.4f}  {int(counts[i]):>6}")
    return 0
