"""``python -m tests.reliability.killer POINT [train args]``: ``broadface train`` that SIGKILLs itself at POINT.

Points (each the worst moment for one of issue 16's kills):

- ``log-write``: right after the first write-open or truncate of ``train.csv`` / ``eval.csv`` (the resume
  of a killed run rewrites or truncates them there);
- ``publish``: between the last checkpoint and publishing ``final.pt``;
- ``mid-checkpoint``: halfway through writing the checkpoint of step ``KILL_STEP`` (default 4).
"""
from __future__ import annotations

import os
import pathlib
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    if point == "log-write":
        real_open, real_truncate = pathlib.Path.open, os.truncate

        def open_(self, mode="r", *args, **kwargs):
            f = real_open(self, mode, *args, **kwargs)
            if self.name in ("train.csv", "eval.csv") and any(c in mode for c in "wa+"):
                die()
            return f

        def truncate(path, length):
            real_truncate(path, length)
            if pathlib.Path(path).name in ("train.csv", "eval.csv"):
                die()
        pathlib.Path.open, os.truncate = open_, truncate
    elif point == "publish":
        import broadface.train.checkpoint as ckpt

        ckpt.publish = lambda *a, **k: die()
    elif point == "mid-checkpoint":
        import torch

        real_save, step = torch.save, int(os.environ.get("KILL_STEP", "4"))

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == step:
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                die()
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1])
    from broadface.cli.main import main

    sys.exit(main(["train", *sys.argv[2:]]))
