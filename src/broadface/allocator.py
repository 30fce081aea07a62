"""Keep freed memory for the next tensor: glibc's malloc tuned for a CPU training step.

glibc serves every block over its mmap threshold (32 MB at most, whatever is asked) with a fresh
``mmap`` and gives it back to the kernel on ``free``. A CPU step makes and drops dozens of such tensors
(the normalised (C, D) classifier and its gradients, activations, logit chunks), and each fresh one is
paid for again in page faults as it is first written: on the 2-core VMs of docs/performance.md a
176 MB tensor costs over 100 ms of faults against ~20 ms of arithmetic. :func:`keep_freed_memory`
makes glibc take large blocks from its heap and never shrink it, so a freed block is there, already
mapped, for the next step's tensor of that size. Same numbers bit for bit (only where memory comes
from changes); the price is a higher resident peak: freed blocks stay mapped, and since torch asks for
64-byte-aligned blocks a freed one is a little short for the next of its size until a few of them have
merged (``bench/allocator.py``, docs/performance.md: +16 % to +37 % peak RSS, for 1.25× to 1.9× faster steps).

The setting is the process's, so the library never makes it on import: every process broadface starts
(the ``broadface`` command, its worker pools, the ``bench/`` scripts) calls :func:`configure_from_env`,
which keeps freed memory unless ``BROADFACE_MALLOC=system``. A script of your own calls
:func:`keep_freed_memory` at its top. Elsewhere than glibc (macOS, musl) both do nothing.
"""
from __future__ import annotations

import ctypes
import os

ENV_VAR = "BROADFACE_MALLOC"
MODES = ("keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters of glibc's <malloc.h>
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: shrink the heap only once 2 GiB at its top lie free


def _glibc():
    """The process's C library when it is glibc (it has ``mallopt``), else None."""
    try:
        lib = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(lib, "gnu_get_libc_version") and hasattr(lib, "mallopt")):
        return None
    lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return lib


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap (no per-block ``mmap``) and keep freed ones mapped; True when
    applied (glibc), False where the C library is another. Affects blocks allocated from now on."""
    lib = _glibc()
    if lib is None:
        return False
    ok = lib.mallopt(_M_MMAP_MAX, 0) == 1
    return lib.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) == 1 and ok


def malloc_mode() -> str:
    """``$BROADFACE_MALLOC`` (default ``keep``); ValueError naming the variable on another value."""
    mode = os.environ.get(ENV_VAR, "keep").strip().lower() or "keep"
    if mode not in MODES:
        raise ValueError(f"environment variable {ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of "
                         f"{', '.join(MODES)} (keep: reuse freed memory, the default; system: glibc's own)")
    return mode


def configure_from_env() -> str:
    """What a process broadface starts calls first: :func:`keep_freed_memory` unless
    ``BROADFACE_MALLOC=system``. Returns the mode in effect (``system`` where glibc is absent)."""
    mode = malloc_mode()
    if mode == "keep" and not keep_freed_memory():
        return "system"
    return mode
