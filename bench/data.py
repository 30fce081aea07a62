"""Data-layer benchmark: listing, packing and loading speed, measured side by side in one run.

    python bench/data.py --quick   # a few minutes on 2 CPU cores
    python bench/data.py           # more images per loader measurement

Prints three tables. The first: time to list LFW (13,233 files, nothing decoded), to open Omniglot from its
zips, to pack CelebA-299 (6,300 JPEGs) into RecordIO and to scan its labels. The second: decoded images/s of
the training loader (112x112 train transform, batch 64) over the CelebA-299 folder and the same images
packed as RecordIO, in two forms: ``uint8`` is what the trainer loads (``FaceTransform(pixels=True)``: uint8
batches, normalised once per batch by ``BatchNormalizer``, counted here) and ``float`` float32 batches
(``FaceTransform()``); ``batched`` is the loader's batched fetch (:mod:`broadface.data.batched`) with 0 workers
and 1 or 2 fetch threads, and 1 or 2 workers of one thread each; ``per-sample`` the same loader made to take
its per-sample path (items collated), 0 workers. Beside them the raw JPEG decode rate of the same files,
bytes already in memory, nothing else: with Pillow (open + RGB + load) and with libjpeg-turbo straight into
an array (``simplejpeg``, the loaders' decoder for plain JPEGs), each on one thread, and libjpeg-turbo on two
threads (it releases the GIL); ``vs raw decode`` is against the faster decoder on one thread and on two; and
the rate at which a backbone consumes images in training (forward + backward at 112 px, batch 32, fp32:
iResNet-50 and MobileFaceNet). Loader and raw rows are interleaved over rounds so machine load affects all
alike; each value is the median over rounds. The third: the 0-worker uint8 folder loader's microseconds per
image, stage by cumulative stage from the bare decode to the full rate, so the gap to the raw decode has its
parts named.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from broadface.data import FaceFolder, RecordIODataset, TrainTransform, make_loader, open_dataset, pack_folder
from broadface.data.loader import collate_images
from broadface.data.pipeline import BatchNormalizer
from broadface.paths import data_root


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def per_sample(batch):
    """The package's collate under another name: make_loader then takes the per-sample path (no batched fetch)."""
    return collate_images(batch)


def throughput(ds, images: int, workers: int, threads: int = 1, batched: bool = True, batch: int = 64) -> float:
    """Steady images/s out of the loader, as float32 batches (uint8 batches normalised here, as the step does).

    The clock starts at the first batch: the workers' start-up (once per epoch in training) is not counted."""
    it = iter(make_loader(ds, batch, seed=0, num_workers=workers, drop_last=True, threads=threads,
                          collate_fn=None if batched else per_sample))
    normalize = BatchNormalizer()
    next(it)
    t, n = time.perf_counter(), 0
    for x, _ in it:
        if x.dtype == torch.uint8:
            x = normalize(x)
        n += len(x)
        if n >= images:
            break
    return n / (time.perf_counter() - t)


def raw_decoder(decoder: str):
    """JPEG bytes -> RGB pixels with one decoder alone, nothing else."""
    if decoder == "pillow":
        return lambda b: Image.open(io.BytesIO(b)).convert("RGB").load()
    import simplejpeg

    return lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")


def raw_decode(blobs: list[bytes], decoder: str, threads: int = 1) -> float:
    """The raw decode rate of ``decoder`` (the bytes already in memory) on ``threads`` threads: images/s."""
    one = raw_decoder(decoder)

    def part(chunk: list[bytes]) -> None:
        for b in chunk:
            one(b)

    with ThreadPoolExecutor(threads) as pool:
        pool.submit(len, blobs).result()  # the threads exist before the clock starts
        t = time.perf_counter()
        list(pool.map(part, [blobs[i::threads] for i in range(threads)]))
        return len(blobs) / (time.perf_counter() - t)


def stage_costs(ds, blobs: list[bytes], rounds: int) -> list[tuple[str, float]]:
    """Microseconds per image of the 0-worker uint8 loader, stage by cumulative stage (median over rounds):
    where the time between the bare decode and the loader's rate goes."""
    import numpy as np

    from broadface.data.batched import _direct, fetch_batch
    from broadface.data.seeding import derive_seed

    n, normalize = len(blobs), BatchNormalizer()
    seeds, scratch = [derive_seed("sample", 0, 0, i) for i in range(n)], np.empty((112, 112, 3), np.uint8)

    def loader(norm: bool, threads: int = 1) -> None:
        k = 0
        for x, _ in make_loader(ds, 64, seed=0, num_workers=0, drop_last=True, threads=threads):
            k += len(normalize(x) if norm else x)
            if k >= n:
                return

    bare = raw_decoder(_decoders()[-1])
    stages = {f"bare decode from memory ({_decoders()[-1]})": lambda: [bare(b) for b in blobs],
              "+ file read, checks, into the scratch array": lambda: [_direct(ds, i, (112, 112), scratch)
                                                                     for i in range(n)],
              "+ the draw, flip, C x H x W into the batch": lambda: [fetch_batch(ds, range(i, i + 64), seeds[i:i + 64])
                                                                 for i in range(0, n, 64)],
              "+ sampler, DataLoader (the loader)": lambda: loader(False),
              "+ batch normalisation (the rate, 1 thread)": lambda: loader(True),
              "the same, 2 threads": lambda: loader(True, 2)}
    times: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(rounds):
        for name, fn in stages.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / n * 1e6)
    return [(k, statistics.median(v)) for k, v in times.items()]


def _decoders() -> list[str]:
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return ["pillow"]
    return ["pillow", "libjpeg-turbo"]


def consumption(name: str, steps: int, batch: int = 32) -> float:
    """Training images/s of a backbone at 112 px (forward + backward, SGD step excluded), fp32."""
    from broadface.models import build_model

    model = build_model(name, embedding_size=512, input_size=112).train()
    x = torch.randn(batch, 3, 112, 112)
    model(x).sum().backward()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return steps * batch / (time.perf_counter() - t)


def setup_rows(root, tmp) -> list[tuple[str, str]]:
    rows = [("list LFW folder (13,233 files)", f"{timed(lambda: FaceFolder(root / 'lfw/aligned-112x112')):.3f} s")]
    rows.append(("open Omniglot (2 zips, dedupe)", f"{timed(lambda: open_dataset('omniglot', 'all')):.3f} s"))
    t = time.perf_counter()
    s = pack_folder(root / "celeba299/aligned-112x112", tmp)
    rows.append((f"pack CelebA-299 -> RecordIO ({s.num_images} images)", f"{time.perf_counter() - t:.2f} s"))
    rows.append(("RecordIO: open + scan all labels", f"{timed(lambda: RecordIODataset(tmp).targets):.3f} s"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="fetch threads of the 0-worker loader")
    args = ap.parse_args()
    images, rounds, steps = (1024, 2, 2) if args.quick else (3072, 3, 3)
    root = data_root()
    celeba = root / "celeba299/aligned-112x112"
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        rows = setup_rows(root, tmp)
        width = max(len(r[0]) for r in rows)
        print(f"| {'measure':<{width}} | value |\n|---|---:|")
        for k, v in rows:
            print(f"| {k:<{width}} | {v} |")
        sets = {}
        for form, tf in (("uint8", TrainTransform(112, pixels=True)), ("float", TrainTransform(112))):
            sets[f"folder, {form}"], sets[f"recordio, {form}"] = FaceFolder(celeba, tf), RecordIODataset(tmp, tf)
        files = [p for p, _ in sets["folder, uint8"].samples[:images]]
        blobs = [open(p, "rb").read() for p in files]
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for dec in _decoders():
                rates.setdefault(("raw", dec, 1), []).append(raw_decode(blobs, dec))
            rates.setdefault(("raw", _decoders()[-1], 2), []).append(raw_decode(blobs, _decoders()[-1], 2))
            for name, ds in sets.items():
                rates.setdefault((name, "per-sample", 0, 1), []).append(throughput(ds, images, 0, batched=False))
            for workers in args.workers:
                for threads in args.threads if workers == 0 else (1,):
                    for name, ds in sets.items():
                        rates.setdefault((name, "batched", workers, threads), []).append(
                            throughput(ds, images, workers, threads))
        raws = {key[1:]: statistics.median(rates.pop(key)) for key in [k for k in rates if k[0] == "raw"]}
        raw1 = max(r for (_, t), r in raws.items() if t == 1)
        raw2 = raws[(_decoders()[-1], 2)]
        stages = stage_costs(sets["folder, uint8"], blobs, rounds)
        eat = {m: consumption(m, steps) for m in ("iresnet50", "mobilefacenet")}
    print(f"\nraw JPEG decode of the same {len(blobs)} files (one process): "
          + ", ".join(f"{dec} on {t} thread{'s' * (t > 1)} {r:,.0f} img/s" for (dec, t), r in raws.items()))
    print("training consumption at 112 px, batch 32, fp32: "
          + ", ".join(f"{m} {r:,.1f} img/s" for m, r in eat.items()) + "\n")
    print("| loader | fetch | workers | threads | img/s | vs raw decode, 1 thread | 2 threads | vs iResNet-50 "
          "| vs MobileFaceNet |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, fetch, workers, threads), r in rates.items():
        m = statistics.median(r)
        print(f"| {name} | {fetch} | {workers} | {threads} | {m:,.0f} | {m / raw1:.0%} | {m / raw2:.0%} "
              f"| {m / eat['iresnet50']:,.0f}× | {m / eat['mobilefacenet']:,.0f}× |")
    print("\n| folder, uint8, 0 workers: stage (cumulative) | µs per image | decode's share of the time |")
    print("|---|---:|---:|")
    for name, us in stages:
        print(f"| {name} | {us:.1f} | {stages[0][1] / us:.0%} |")


if __name__ == "__main__":
    from broadface.allocator import configure_from_env

    configure_from_env()  # as the broadface command: freed memory kept unless BROADFACE_MALLOC=system
    main()
