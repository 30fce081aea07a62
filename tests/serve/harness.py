"""A real ``broadface serve`` process on localhost and the reference the service is checked against."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from broadface.data.images import read_rgb
from tests.helpers import free_port

KEY = "test-key-0123456789"


class Server:
    """``python -m broadface serve MODEL --gallery DB --port P ...`` with its log in ``log``."""

    def __init__(self, model: Path, gallery: Path, log_dir: Path, *args: str, env: dict | None = None):
        self.model, self.gallery, self.args = Path(model), Path(gallery), list(args)
        self.log_dir, self.env = Path(log_dir), env
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> Server:
        self.port = free_port()
        self.log = self.log_dir / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "broadface", "serve", str(self.model), "--gallery", str(self.gallery),
               "--port", str(self.port), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(self.env or {})}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"server did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def stop(self) -> int:
        """SIGTERM (uvicorn's graceful shutdown) and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


def files(paths: list[Path], field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx multipart ``files=`` for real image files."""
    return [(field, (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def reference_embeddings(model: torch.nn.Module, paths: list[Path], size: int) -> np.ndarray:
    """The convention the service must follow, computed here from scratch: RGB resized to ``size``
    (Pillow bilinear, antialiased when shrinking, as training), (x/255 - 0.5)/0.5, f(x) + f(flip(x))
    in float64, L2-normalised."""
    from PIL import Image

    batch = []
    for p in paths:
        rgb = read_rgb(p)
        if rgb.shape[:2] != (size, size):
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
        batch.append((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5)
    x = torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = model.eval()(x).double() + model(torch.flip(x, dims=[3])).double()
    out = out.numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def reference_ranking(templates: dict[str, np.ndarray], query: np.ndarray) -> list[tuple[str, float]]:
    """Identities by cosine of the query with each mean-direction template, best first."""
    scores = {}
    for name, emb in templates.items():
        t = emb.sum(0)
        scores[name] = float(t @ query / np.linalg.norm(t))
    return sorted(scores.items(), key=lambda kv: -kv[1])


def assert_error(resp: httpx.Response, status: int, *fragments: str) -> None:
    """A client error: that status, a JSON ``detail`` line that names what was wrong."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail, resp.text
    for f in fragments:
        assert f in detail, (f, detail)
