"""Load test of ``broadface serve`` on localhost: search requests/s and latency, exact vs faiss.

For each gallery size (1k, 10k, 100k identities) a gallery file is written with SYNTHETIC template
vectors (random unit vectors, one image per identity; no faces are embedded to build it), plus one
planted identity per probe whose vector has cosine 0.6 with that probe's real embedding. A real
server process is started on 127.0.0.1 with ``--index exact`` and then ``--index faiss``, and search
requests with real aligned LFW faces are sent by 1 and by 8 concurrent clients (threads, one HTTP
connection each). Each request is the whole path: upload, decode, embed (a tinycnn, 512-d, 112x112,
image + flip), search, JSON. The load is bounded: ``--requests`` per configuration, ``--max-seconds``
per configuration, warm-up requests excluded.

Both servers run side by side and every configuration is measured in alternating rounds (exact,
faiss, faiss, exact, ...), so the load of a shared machine falls on both alike. Columns: req/s =
requests / wall time; p50 / p99 latency per request; rank-1 = exact: share of responses whose
rank-1 identity is the one an exact search in this process finds (1.00 for the exact server by
construction, a check of the service; below 1 where faiss IVF misses); index ms = median time of
one query on the index alone (no HTTP, no model), in this process, same vectors.

    python bench/serve.py --quick    # 1k and 10k, ~3 minutes
    python bench/serve.py            # 1k, 10k, 100k (the table in docs/serving.md), ~10 minutes
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_model(tmp: Path):
    import torch

    from broadface.fileio import atomic_torch_save
    from broadface.models import build_model
    from broadface.serve.model import FaceModel

    torch.manual_seed(0)
    net = build_model("tinycnn", embedding_size=512, input_size=112, width=8)
    path = atomic_torch_save({"format": "broadface", "version": 1, "model": net.config,
                              "backbone": net.state_dict()}, tmp / "bench-tinycnn512.pt")
    return path, FaceModel.load(path)


def make_gallery(path: Path, model, n: int, probes: np.ndarray, seed: int = 0) -> None:
    """``n`` identities: one planted match per probe (cosine 0.6 with it), the rest random unit vectors."""
    from broadface.serve.store import GalleryStore

    rng = np.random.default_rng(seed)
    store = GalleryStore(path, model.describe())
    noise = unit(rng.standard_normal((len(probes), probes.shape[1])))
    noise = unit(noise - (noise * probes).sum(1, keepdims=True) * probes)  # orthogonal to each probe
    planted = unit(0.6 * probes + 0.8 * noise)
    rest = unit(rng.standard_normal((n - len(probes), probes.shape[1])))

    def items():
        for i, v in enumerate(planted):
            yield f"match-{i}", v
        for i, v in enumerate(rest):
            yield f"random-{i:06d}", v

    store.import_identities(items())
    store.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: Path, gallery: Path, index: str, nprobe: int, log: Path, timeout: float = 600):
    """Start ``broadface serve`` and wait for /health; (process, base url, seconds to ready)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "broadface", "serve", str(model), "--gallery", str(gallery), "--port", str(port),
           "--index", index, "--nprobe", str(nprobe)]
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError(f"server not ready after {timeout}s")


def load(url: str, images: list[tuple[str, bytes]], expected: list[str], clients: int, requests: int,
         max_seconds: float) -> tuple[list[float], list[bool], float]:
    """``requests`` searches over ``clients`` threads (stopping early after ``max_seconds``):
    (latencies in s, rank-1 == ``expected[probe]`` per request, wall seconds)."""
    import httpx

    latencies: list[float] = []
    agree: list[bool] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds
    counter = iter(range(requests))

    def client():
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                probe = i % len(images)
                t0 = time.perf_counter()
                r = c.post("/search", files={"image": images[probe]}, data={"top_k": "5"})
                dt = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    latencies.append(dt)
                    agree.append(r.json()["matches"][0]["identity"] == expected[probe])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, agree, time.perf_counter() - t0


def summary(latencies: list[float], agree: list[bool], wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "rps": len(ms) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "agree": float(np.mean(agree))}


def index_ms(vectors: np.ndarray, probes: np.ndarray, mode: str, nprobe: int) -> float:
    """Median ms of one query on the index alone (no HTTP, no model)."""
    from broadface.serve.index import SearchIndex

    index = SearchIndex(vectors.shape[1], mode, nprobe=nprobe)
    index.bulk(np.arange(len(vectors)), vectors)
    times = []
    for q in np.tile(probes, (4, 1)):
        t0 = time.perf_counter()
        index.search(q, 5)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def gallery_vectors(path: Path) -> np.ndarray:
    import sqlite3

    with sqlite3.connect(path) as db:
        return np.stack([np.frombuffer(e, "<f4") for (e,) in db.execute("SELECT embedding FROM images ORDER BY id")])


def probe_images(n: int) -> list[tuple[str, bytes]]:
    from broadface.paths import data_root

    root = data_root() / "lfw" / "aligned-112x112"
    people = sorted(p for p in root.iterdir() if p.is_dir())[::97][:n]
    return [(f.name, f.read_bytes()) for f in (min(p.iterdir()) for p in people)]


def names(n: int, probes: int) -> list[str]:
    return [f"match-{i}" for i in range(probes)] + [f"random-{i:06d}" for i in range(n - probes)]


def run_size(args, tmp: Path, model_path: Path, model, images, probes, n: int) -> list[dict]:
    """Both indexes served at once; each configuration measured in alternating rounds (exact, faiss,
    faiss, exact, ...) so that the load of a shared machine falls on both alike."""
    from broadface.serve.index import ExactIndex

    gallery = tmp / f"gallery-{n}.db"
    t0 = time.perf_counter()
    make_gallery(gallery, model, n, probes)
    print(f"\n{n} identities: gallery written in {time.perf_counter() - t0:.1f} s", flush=True)
    vectors, ident = gallery_vectors(gallery), names(n, len(probes))
    exact = ExactIndex(vectors.shape[1])
    for key, v in enumerate(vectors):
        exact.upsert(key, v)
    expected = [ident[int(exact.search(q, 1)[0][0])] for q in probes]  # the exact rank-1 of each probe
    servers = {}
    try:
        for index in args.indexes:
            servers[index] = launch(model_path, gallery, index, args.nprobe, tmp / f"server-{n}-{index}.log")
            load(servers[index][1], images, expected, 1, args.warmup, args.max_seconds)
        rows = []
        for clients in args.clients:
            got = {index: ([], [], 0.0) for index in args.indexes}
            for r in range(args.rounds):
                for index in (args.indexes if r % 2 == 0 else args.indexes[::-1]):
                    lat, agree, wall = load(servers[index][1], images, expected, clients, args.requests // args.rounds,
                                            args.max_seconds / args.rounds)
                    old = got[index]
                    got[index] = (old[0] + lat, old[1] + agree, old[2] + wall)
            for index in args.indexes:
                res = summary(*got[index])
                row = {"identities": n, "index": index, "clients": clients, "startup_s": servers[index][2],
                       "index_ms": index_ms(vectors, probes, index, args.nprobe), **res}
                rows.append(row)
                print(f"  {index:5s} x{clients}: {res['rps']:6.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                      f"p99 {res['p99_ms']:7.1f} ms  =exact {res['agree']:.2f}  index {row['index_ms']:.2f} ms  "
                      f"(ready in {servers[index][2]:.1f} s)", flush=True)
    finally:
        for proc, _, _ in servers.values():
            proc.kill()
            proc.wait()
    gallery.unlink()
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| identities | index | clients | requests | req/s | p50 ms | p99 ms | rank-1 = exact | index ms "
          "| ready s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['identities']:,} | {r['index']} | {r['clients']} | {r['requests']} | {r['rps']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['agree']:.2f} | {r['index_ms']:.2f} | "
              f"{r['startup_s']:.1f} |")
    print("\nfaiss / exact, same size and clients (req/s ratio, p50 ratio):")
    for r in rows:
        if r["index"] != "faiss":
            continue
        ex = next((e for e in rows if e["index"] == "exact" and e["identities"] == r["identities"]
                   and e["clients"] == r["clients"]), None)
        if ex:
            print(f"  {r['identities']:>7,} x{r['clients']}: req/s x{r['rps'] / ex['rps']:.2f}, "
                  f"p50 x{r['p50_ms'] / ex['p50_ms']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--indexes", nargs="+", default=["exact", "faiss"], choices=["exact", "faiss"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=160, help="requests per configuration")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=90.0, help="cap per configuration")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per configuration")
    p.add_argument("--probes", type=int, default=16, help="distinct real LFW faces sent as queries")
    p.add_argument("--quick", action="store_true", help="1k and 10k identities, 48 requests per configuration")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.requests = [1000, 10000], 48
    from broadface.serve.server import set_threads

    set_threads(1)  # as the servers run (--threads 1), for the in-process index timings
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        model_path, model = make_model(tmp)
        images = probe_images(args.probes)
        from broadface.data.images import decode_image

        probes = model.embed([np.asarray(decode_image(data, name)) for name, data in images])
        rows = []
        for n in args.sizes:
            rows += run_size(args, tmp, model_path, model, images, probes, n)
    print_table(rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        from broadface.fileio import atomic_write_json

        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
