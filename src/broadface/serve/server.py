"""Start the service: load model and gallery, then serve the app with uvicorn until stopped."""
from __future__ import annotations

import importlib.util
import sys

from broadface.serve.config import ServeConfig


def check_installed() -> None:
    """ValueError saying how to install the ``serve`` extra when FastAPI / uvicorn are missing."""
    needed = ("fastapi", "fastapi_offline", "uvicorn", "threadpoolctl")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        missing.append("python-multipart")
    if missing:
        raise ValueError(f"serving needs {', '.join(missing)}: pip install 'broadface[serve]'")


def set_threads(n: int) -> None:
    """Threads of torch, faiss and BLAS (OpenMP and OpenBLAS pools), once, at start.

    The server runs requests in parallel on its thread pool, so each request's forward pass and
    search run on ``n`` threads (1 by default). Measured on the shared 2-core machine: a 2-thread
    forward of the bench model was 8-20x slower than a 1-thread one, and OpenBLAS's idle threads
    (after the exact search's matrix product) slowed every request of the exact index by half."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n)  # every BLAS and OpenMP runtime loaded so far (numpy's OpenBLAS, faiss)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


def serve(config: ServeConfig) -> None:
    """Blocking: run ``broadface serve`` with ``config`` (SIGINT / SIGTERM stop it cleanly)."""
    check_installed()
    import uvicorn

    from broadface.serve.app import create_app
    from broadface.serve.service import FaceService

    set_threads(config.threads)
    service = FaceService.open(config)  # closed by the app at shutdown
    try:
        info = service.info()
        counts, model, index = info["gallery"], info["model"], info["index"]
        print(f"broadface serve: model {model['file']} ({model['kind']}, {model['dim']}-d, sha256 "
              f"{model['fingerprint'][:12]}), gallery {config.gallery}: {counts['identities']} identities, "
              f"{counts['images']} images, index {index['kind']}; threshold {config.threshold:.4f} "
              f"({config.threshold_source})", file=sys.stderr, flush=True)
        if not config.loopback and config.api_key is None:
            print(f"broadface serve: warning: listening on {config.host} without an API key: anyone who can "
                  "reach this address can enrol and delete", file=sys.stderr, flush=True)
        app = create_app(service)
    except BaseException:
        service.close()
        raise
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=10)
