"""Cost of synthetic face masks per image, next to decoding the same JPEG (the loader's own cost).

Run: python bench/masks_speed.py [--data-root DIR] [--n 200]
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from PIL import Image

from broadface.data.masks import MASK_STYLES, MaskAugment, apply_mask
from broadface.paths import data_root


def _ms(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return 1000 * (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    path = data_root(args.data_root) / "lfw" / "aligned-112x112" / "AJ_Cook" / "AJ_Cook_0001.jpg"
    face = np.asarray(Image.open(path).convert("RGB"))
    decode = _ms(lambda: np.asarray(Image.open(path).convert("RGB")), args.n)
    print(f"\n{'operation':<34} {'112x112 ms':>10} {'224x224 ms':>10} {'x decode':>9}")
    print(f"{'JPEG decode (PIL), 112x112':<34} {decode:>10.2f} {'':>10} {1.0:>9.2f}")
    big = cv2.resize(face, (224, 224), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(0)
    for style in (*MASK_STYLES, None):
        small_ms = _ms(lambda: apply_mask(face, rng, style=style), args.n)
        big_ms = _ms(lambda: apply_mask(big, rng, style=style), max(1, args.n // 4))
        name = f"apply_mask style={style or 'random'}"
        print(f"{name:<34} {small_ms:>10.2f} {big_ms:>10.2f} {small_ms / decode:>9.2f}")
    aug = MaskAugment(prob=0.35, seed=0)
    per = _ms(lambda: aug(face), args.n)
    print(f"{'MaskAugment(prob=0.35) average':<34} {per:>10.2f} {'':>10} {per / decode:>9.2f}")


if __name__ == "__main__":
    main()
