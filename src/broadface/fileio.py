"""Files that are either wholly written or not there: one helper for every file broadface writes.

Checkpoints, embeddings, JSON reports, plots, ONNX models, RecordIO packs and caches all go
through :func:`atomic_write`: the bytes go to a temporary file in the target's directory
(``.<name>.<pid>.<random>.tmp``), are flushed and fsync'ed, get the permissions of an
ordinary new file (``0o666`` minus the umask, as ``open()`` would give; ``mkstemp``'s
0600 is never left behind) and are then ``os.replace``d over the target. A crash leaves the
old file or the new one, never half of one; the temporary file is removed on any error, and
one left by a killed process (its pid gone) is removed by :func:`remove_stale_temps`.

Untrusted torch files are read with :func:`load_torch` (``weights_only=True``: tensors and
plain containers only, never code). :func:`check_output` says, before any work starts, why a path
cannot be written (a directory where a file is expected, a file in the way of a folder, no
permission, a read-only file system, the command's own input).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

_UMASK_LOCK = threading.Lock()
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def file_mode() -> int:
    """Permissions of an ordinary new file under the current umask (``0o666 & ~umask``)."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (ONNX export, a
    memory map); when the block succeeds it is fsync'ed and published as ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as err:  # name the file being written, not its temporary (disk full, quota, ...)
        tmp.unlink(missing_ok=True)
        if err.errno is None:
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(f)`` on a temporary binary file, then publish it as ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """JSON with a trailing newline; non-JSON numbers (numpy scalars) are written as floats.

    NaN and infinity are refused (``allow_nan=False``): they are not JSON."""
    text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """A matplotlib figure saved atomically (format from the suffix)."""
    fmt = kwargs.pop("format", Path(path).suffix.lstrip(".") or "png")
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs))


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``: an untrusted file can hold data, never code.

    Errors name the file and never repeat torch's advice to retry with ``weights_only=False``."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, another format, or objects outside the allow-list
        raise ValueError(f"{path}: not a loadable torch file ({_load_reason(err)})") from None


def _load_reason(err: Exception) -> str:
    """One line saying why ``torch.load`` refused a file, without torch's advice to unpickle it anyway."""
    text = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it holds a Python object ({m.group(1)}) other than tensors and plain containers; never unpickled"
    if "central directory" in text or "zip archive" in text:
        return "truncated or corrupt: not a complete torch zip archive"
    m = re.search(r"WeightsUnpickler error: (?:\s*)([^\n]+)", text)
    if m and m.group(1).strip():
        return f"not a torch file, or a corrupt one ({m.group(1).strip()})"
    lines = [x for x in text.strip().splitlines() if "weights_only" not in x]
    return lines[0] if lines else type(err).__name__


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names it and says why."""


def check_output(path: str | os.PathLike, what: str, *, folder: bool = False,
                 inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """``path`` if a file (``folder=False``) or folder could be written there, else :class:`OutputPathError`
    ``"{what} {path}: {reason}"``. Nothing is created. ``inputs`` are files the command reads: writing
    over one of them is refused (``export onnx X.pt X.pt``)."""
    path = Path(path)
    reason = _output_problem(path, folder, [Path(i) for i in inputs if i is not None])
    if reason:
        raise OutputPathError(f"{what} {path}: {reason}")
    return path


def _output_problem(path: Path, folder: bool, inputs: list[Path]) -> str | None:
    if path.is_dir() and not folder:
        return "is a directory, expected a file name"
    if path.exists() and not path.is_dir() and folder:
        return "is a file, expected a folder"
    for src in inputs:
        if path.exists() and src.exists() and os.path.samefile(path, src):
            return f"is the input {src}: writing it would replace it (choose another output name)"
    if path.is_file() and not (path.stat().st_mode & 0o222 and os.access(path, os.W_OK)):
        return "is read-only; remove it or choose another name"
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest folder that exists
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        if hasattr(os, "statvfs") and os.statvfs(parent).f_flag & getattr(os, "ST_RDONLY", 1):
            return f"{parent} is on a read-only file system"
        return f"{parent} is not writable (permission denied)"
    return None


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove this module's temporary files in ``folder`` whose writing process no longer exists."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
