"""MXNet RecordIO byte format in pure Python (no mxnet), as used by insightface face sets.

Framing (dmlc-core ``recordio``), little-endian::

    uint32 magic = 0xced7230a | uint32 lrec = cflag << 29 | length | data[length] | zero pad to 4 bytes

``cflag`` 0 is a whole record. The writer splits a record wherever the magic number occurs
at a 4-byte-aligned offset inside it (the magic itself is dropped): parts get cflag 1
(first), 2 (middle), 3 (last), and the reader re-inserts the magic between parts.

Index (``.idx``): text lines ``key<TAB>byte offset of the record's first frame``.

Payload (``mxnet.recordio.pack``): ``IRHeader`` struct ``<IfQQ`` = (flag, label, id, id2),
then, if ``flag > 0``, ``flag`` float32 labels (the ``label`` field is then 0), then the
image bytes.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24

Label = Union[float, Sequence[float], np.ndarray]


@dataclass(frozen=True)
class IRHeader:
    """Image-record header. ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def pack(label: Label, payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Header + payload, as ``mxnet.recordio.pack``: a scalar label gives flag 0, a sequence
    gives ``flag = len(label)`` followed by the float32 values."""
    if np.ndim(label) == 0:
        return struct.pack(IR_FORMAT, 0, float(label), id, id2) + payload  # type: ignore[arg-type]
    arr = np.asarray(label, dtype="<f4").ravel()
    return struct.pack(IR_FORMAT, arr.size, 0.0, id, id2) + arr.tobytes() + payload


def unpack(record: bytes, name: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record into its :class:`IRHeader` and payload (``mxnet.recordio.unpack``)."""
    if len(record) < IR_SIZE:
        raise ValueError(f"{name}: {len(record)} bytes, shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, record)
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if len(record) < end:
            raise ValueError(f"{name}: header flag={flag} needs {end} bytes, record has {len(record)}")
        return IRHeader(flag, np.frombuffer(record, "<f4", flag, IR_SIZE).copy(), id_, id2), record[end:]
    return IRHeader(flag, label, id_, id2), record[IR_SIZE:]


def frame(record: bytes) -> bytes:
    """Encode one record into dmlc RecordIO frames (splitting at aligned magic numbers)."""
    if len(record) >= 1 << _LEN_BITS:
        raise ValueError(f"record of {len(record)} bytes exceeds the RecordIO limit of 2^29")
    out, start = [], 0
    for i in range(0, len(record) - len(record) % 4, 4):
        if record[i:i + 4] == _MAGIC_BYTES:
            out += [_MAGIC_BYTES, struct.pack("<I", (1 if start == 0 else 2) << _LEN_BITS | (i - start)),
                    record[start:i]]
            start = i + 4
    tail = len(record) - start
    out += [_MAGIC_BYTES, struct.pack("<I", (3 if start else 0) << _LEN_BITS | tail), record[start:],
            b"\0" * (-tail % 4)]
    return b"".join(out)


class RecordReader:
    """Random-access reader of a ``.rec`` file. Opens its file lazily, once per process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"RecordIO file {self.path} does not exist")
        self.size = self.path.stat().st_size
        self._fd: int | None = None
        self._pid = -1

    def _pread(self, n: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise ValueError(f"{self.path}: truncated at byte {offset} (wanted {n} bytes, file has {self.size})")
        return data

    def read(self, offset: int, limit: int | None = None) -> bytes:
        """The record whose first frame starts at ``offset`` (only ``limit`` bytes of a
        single-frame record are read when given: enough for a header)."""
        parts, pos = [], offset
        while True:
            magic, lrec = struct.unpack("<II", self._pread(8, pos))
            if magic != MAGIC:
                raise ValueError(f"{self.path}: no RecordIO magic at byte {pos} (found {magic:#010x}); "
                                 "wrong .idx offset or not a RecordIO file")
            cflag, length = lrec >> _LEN_BITS, lrec & _LEN_MASK
            if cflag > 3 or (pos == offset) != (cflag in (0, 1)):
                raise ValueError(f"{self.path}: unexpected frame flag {cflag} at byte {pos}")
            if cflag == 0 and limit is not None:
                return self._pread(min(length, limit), pos + 8)
            parts.append(self._pread(length, pos + 8))
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


def read_index(path: str | os.PathLike) -> dict[int, int]:
    """``.idx`` file -> {key: offset}, in file order; ValueError naming file:line if malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RecordIO index {path} does not exist (a .idx file is needed for random access)")
    index: dict[int, int] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = int(fields[0]), int(fields[1])
                if len(fields) != 2 or offset < 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{lineno}: expected 'key<TAB>offset', got {line.strip()[:60]!r}") from None
            if key in index:
                raise ValueError(f"{path}:{lineno}: duplicate key {key}")
            index[key] = offset
    return index


class RecordWriter:
    """Append records to a ``.rec`` stream and remember their offsets for the ``.idx``."""

    def __init__(self, rec: BinaryIO):
        self.rec = rec
        self.index: list[tuple[int, int]] = []

    def write(self, key: int, record: bytes) -> None:
        self.index.append((key, self.rec.tell()))
        self.rec.write(frame(record))

    def write_index(self, idx: BinaryIO) -> None:
        idx.write("".join(f"{k}\t{off}\n" for k, off in self.index).encode())
