"""Data-layer benchmark: listing, packing and loading speed, measured side by side in one run.

    python bench/data.py --quick   # ~1 minute on 2 CPU cores
    python bench/data.py           # more images per loader measurement

Prints one table: time to list LFW (13,233 files, nothing decoded), to open Omniglot from its
zips, to pack CelebA-299 (6,300 JPEGs) into RecordIO and to scan its labels, then loader
throughput (images/s, 112x112 train transform) for an image folder vs the same images packed
as RecordIO, with 0 and 2 workers, interleaved so machine load affects all alike.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from broadface.data import FaceFolder, RecordIODataset, TrainTransform, make_loader, open_dataset, pack_folder
from broadface.paths import data_root


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(ds, images: int, workers: int, batch: int = 64) -> float:
    loader = make_loader(ds, batch, seed=0, num_workers=workers, drop_last=True)
    t, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
        if n >= images:
            break
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    images, rounds = (1024, 2) if args.quick else (4096, 3)
    root = data_root()
    rows = [("list LFW folder (13,233 files)", f"{timed(lambda: FaceFolder(root / 'lfw/aligned-112x112')):.3f} s")]
    rows.append(("open Omniglot (2 zips, dedupe)", f"{timed(lambda: open_dataset('omniglot', 'all')):.3f} s"))
    celeba = root / "celeba299/aligned-112x112"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        s = pack_folder(celeba, tmp)
        rows.append((f"pack CelebA-299 -> RecordIO ({s.num_images} images)", f"{time.perf_counter() - t:.2f} s"))
        rows.append(("RecordIO: open + scan all labels", f"{timed(lambda: RecordIODataset(tmp).targets):.3f} s"))
        tf = TrainTransform(112)
        sets = {"folder": FaceFolder(celeba, tf), "recordio": RecordIODataset(tmp, tf)}
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for workers in (0, 2):
                for name, ds in sets.items():
                    rates.setdefault((name, workers), []).append(throughput(ds, images, workers))
        for (name, workers), r in rates.items():
            rows.append((f"load {name}, {workers} workers, 112px train tf", f"{statistics.median(r):.0f} img/s"))
        for workers in (0, 2):
            ratio = statistics.median(rates[("recordio", workers)]) / statistics.median(rates[("folder", workers)])
            rows.append((f"recordio / folder speed, {workers} workers", f"{ratio:.2f}x"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
