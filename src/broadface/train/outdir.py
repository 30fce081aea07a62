"""A run owns its output folder: checked before any work, locked while the run lives, never mixed.

- :func:`check_output` (fileio) first: a file in the way, no permission, a read-only file system are
  one-line errors before the data are even opened;
- ``.lock`` holds the pid, host and start time of the run that owns the folder, under an exclusive
  ``flock`` (released by the kernel when that process dies, so a crash never leaves a stale lock);
  a second run into the folder is refused, naming the owner;
- a fresh run refuses a folder that holds another run's results (:data:`RESULTS`) unless told to
  continue it (``train.resume``) or to replace them (``train.overwrite`` / ``--overwrite``, which
  removes exactly those files);
- temporary files of writes killed midway are removed at start (:func:`broadface.fileio.remove_stale_temps`);
- ``train.log`` is a plain-text account of the run, appended to and never rewritten: starts, resumes
  (and with which allowed changes), warnings, skipped images, stops.
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
from pathlib import Path

from broadface.fileio import check_output, remove_stale_temps
from broadface.train.config import Config, load_config

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the pid file alone
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"
RESULTS = ("checkpoints", "final.pt", "summary.json", "train.csv", "eval.csv", "config.yaml", "train.log",
           "tensorboard")
LOGS = frozenset({"train.csv", "eval.csv", "config.yaml", "train.log", "tensorboard", "summary.json"})


class RunFolder:
    """The output folder of one run (rank 0 only): :meth:`claim` it, :meth:`release` it at the end."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    # ------------------------------------------------------------------ ownership
    def claim(self) -> list[Path]:
        """Check and create the folder, take its lock, remove stale temporary files (returned)."""
        check_output(self.path, "train.output", folder=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"train.output {self.path}: cannot create it ({err.strerror})") from None
        self._lock()
        removed = []
        for folder in (self.path, self.path / "checkpoints"):
            removed += remove_stale_temps(folder)
        return removed

    def _lock(self) -> None:
        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    owner = _read(fd)
                    os.close(fd)
                    raise ValueError(f"train.output {self.path} is in use by another run ({owner or 'unknown'}); "
                                     "wait for it to finish or choose another train.output") from None
            try:  # the file may have been removed by its last owner between our open and our lock
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock (while still holding it) and let go of it."""
        if self._fd is None:
            return
        try:
            (self.path / LOCK).unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ results
    def results(self) -> list[str]:
        """The names of :data:`RESULTS` present (an empty ``checkpoints/`` does not count)."""
        found = []
        for name in RESULTS:
            p = self.path / name
            if p.is_dir() and not any(p.iterdir()):
                continue
            if p.exists():
                found.append(name)
        return found

    def refuse_results(self, why: str = "", resumable: bool = True) -> None:
        """ValueError when the folder holds results, saying how to continue or replace them."""
        found = self.results()
        if found:
            how = "continue it with train.resume=auto, " if resumable else ""
            raise ValueError(f"train.output {self.path} holds the results of another run ({', '.join(found)}); "
                             f"{why}{how}choose another train.output, or replace them with --overwrite "
                             "(train.overwrite=true)")

    def clear(self) -> list[str]:
        """Remove the results of an earlier run (``train.overwrite``); other files are left alone."""
        found = self.results()
        for name in found:
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return found


def claim_output(folder: RunFolder, cfg: Config, log: RunLog) -> None:
    """Claim ``folder`` for a run of ``cfg`` (rank 0): locked, stale temporary files removed, and another
    run's results refused unless ``train.resume`` continues them or ``train.overwrite`` replaces them."""
    removed = folder.claim()
    try:
        t = cfg.train
        ckpts = sorted((folder.path / "checkpoints").glob("step_*.pt"))
        if t.overwrite:
            cleared = folder.clear()
            if cleared:
                log.write(f"train.overwrite: removed the earlier run's {', '.join(cleared)}")
        elif t.resume is None:
            folder.refuse_results()
        elif t.resume == "auto" and not ckpts:  # only this run, stopped before its first checkpoint, restarts
            if not _restartable(folder, cfg):
                folder.refuse_results("it has no checkpoint to continue from and is another run's or finished; ",
                                      resumable=False)
        elif t.resume != "auto" and Path(t.resume).resolve().parent != (folder.path / "checkpoints").resolve():
            folder.refuse_results(f"train.resume={t.resume} is not one of its checkpoints; ")
    except BaseException:
        folder.release()
        raise
    if removed:
        log.write("removed temporary files of writes killed midway: " + ", ".join(p.name for p in removed))


def _restartable(folder: RunFolder, cfg: Config) -> bool:
    """Only logs of an unfinished run of this very config (killed or crashed before its first checkpoint)."""
    import json

    if not set(folder.results()) <= LOGS or not _same_run(folder.path / "config.yaml", cfg):
        return False
    try:
        status = json.loads((folder.path / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    return status != "completed"


def _same_run(config_yaml: Path, cfg: Config) -> bool:
    """True when ``config.yaml`` (of a run killed before its first checkpoint) describes a run of ``cfg``."""
    from broadface.train.guard import config_changes

    if not config_yaml.is_file():
        return True
    try:
        theirs = load_config(config_yaml).to_dict()
    except (ValueError, FileNotFoundError):
        return False
    return not config_changes(theirs, cfg.to_dict())


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


class RunLog:
    """``train.log``: timestamped lines, appended (each line flushed on its own), never rewritten."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, message: str) -> None:
        if self.path is None:
            return
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(f"{stamp} {line}\n" for line in message.splitlines() or [""]))
