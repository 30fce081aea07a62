"""Training logs: progress bar, CSV files, TensorBoard, in-memory history, callbacks, JSON summary.

Two kinds of record, both plain dicts with a ``step``:

- train records (every ``log_every`` steps): step, epoch, lr, batch_loss,
  union_loss, queue_fill, compensation_norm, grad_norm, samples_per_s, elapsed_s and
  interval_steps (the steps the means cover: fewer than ``log_every`` in the first
  interval after a resume and in the last one);
- eval records: step, ``val_recall@K`` and ``<set>_accuracy`` metrics.

They go to ``train.csv`` / ``eval.csv`` and TensorBoard under the output
directory (when one is given), to ``history`` / ``evals`` and to each callback as
``callback(kind, record)``. The CSV files are only appended to; on resume the rows
past the resumed step (written by the interrupted run after its last checkpoint)
are cut off by one truncate (see :class:`CsvLog`).
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from broadface.fileio import atomic_write_text

Callback = Callable[[str, dict[str, Any]], None]

TRAIN_FIELDS = ["step", "epoch", "lr", "batch_loss", "union_loss", "queue_fill", "compensation_norm",
                "grad_norm", "samples_per_s", "elapsed_s", "interval_steps"]


def _csv_value(v: Any) -> Any:
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)


class CsvLog:
    """Append-only CSV with a fixed header, each row flushed as it is written.

    On resume the rows past ``keep_until`` (logged by an interrupted run after its last checkpoint,
    or cut short by a kill) are cut off with one ``truncate``; the rows before them are never
    rewritten, so no kill can lose them. ``kept`` holds those rows (dicts of strings)."""

    def __init__(self, path: Path, fields: list[str] | None, keep_until: int):
        self.path, self.fields = path, fields
        self.kept: list[dict[str, str]] = []
        self._file = None
        if path.exists() and path.stat().st_size:
            self._continue(keep_until)
        elif self.fields:
            self._open(write_header=True)

    def _continue(self, keep_until: int) -> None:
        with self.path.open("rb") as f:
            header = f.readline()
            offset, fields = f.tell(), next(csv.reader([header.decode("utf-8", "replace")]), [])
            for line in iter(f.readline, b""):
                row = dict(zip(fields, next(csv.reader([line.decode("utf-8", "replace")]), [])))
                step = row.get("step", "")
                if not line.endswith(b"\n") or not step.isdigit() or int(step) > keep_until:
                    break
                self.kept.append(row)
                offset = f.tell()
        if not header.endswith(b"\n") or "step" not in fields:  # not a log of ours, or cut in its header
            raise ValueError(f"{self.path}: not a broadface log (header {header[:80]!r}); move it away")
        os.truncate(self.path, offset)
        self.fields = fields
        self._open(write_header=False)

    def _open(self, write_header: bool) -> None:
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields, extrasaction="ignore")
        if write_header:
            self._writer.writeheader()
            self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:  # header taken from the first record
            self.fields = list(record)
            self._open(write_header=True)
        self._writer.writerow({k: _csv_value(record.get(k)) for k in self.fields})
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class TrainLogger:
    """Fan-out of train / eval records. Only the main process should get ``output``."""

    def __init__(self, output: Path | None, total_steps: int, start_step: int = 0, progress: bool = True,
                 tensorboard: bool = True, callbacks: list[Callback] | None = None,
                 eval_fields: list[str] | None = None):
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.callbacks = list(callbacks or [])
        self.output = output
        self._csv: dict[str, CsvLog] = {}
        self._tb = None
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            self._csv["train"] = CsvLog(output / "train.csv", TRAIN_FIELDS, start_step)
            self._csv["eval"] = CsvLog(output / "eval.csv", eval_fields, start_step)
            if tensorboard:
                self._tb = _summary_writer(output / "tensorboard", start_step)
        self.kept_evals = self._csv["eval"].kept if "eval" in self._csv else []
        self.progress = progress
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step",
                        dynamic_ncols=True, leave=True)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, kind: str, record: dict[str, Any]) -> None:
        """Record a ``"train"`` or ``"eval"`` row everywhere."""
        (self.history if kind == "train" else self.evals).append(record)
        if kind in self._csv:
            self._csv[kind].write(record)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])
        if kind == "train":
            self.bar.set_postfix_str(format_record(record), refresh=False)
        elif self.progress:
            self.bar.write(f"step {record['step']}: {format_record(record)}")
        for cb in self.callbacks:
            cb(kind, record)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.bar.close()
        for c in self._csv.values():
            c.close()
        if self._tb is not None:
            self._tb.close()
        if summary is not None and self.output is not None:
            write_summary(self.output, summary)


def write_summary(output: Path, summary: dict[str, Any]) -> Path:
    """``output/summary.json``, atomically."""
    return atomic_write_text(output / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def format_record(r: dict[str, Any]) -> str:
    """One short line: losses, queue, lr and speed of a train record; the metrics of an eval record."""
    if "batch_loss" not in r:
        return "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "step" and isinstance(v, float))
    parts = [f"loss {r['batch_loss']:.3f}"]
    if r.get("queue_fill"):
        parts.append(f"union {r['union_loss']:.3f}")
        parts.append(f"queue {r['queue_fill']}")
        if r.get("compensation_norm") is not None:
            parts.append(f"comp {r['compensation_norm']:.3g}")
    if r.get("distill_loss") is not None:
        parts.append(f"distill {r['distill_loss']:.4f}")
    parts.append(f"lr {r['lr']:.3g}")
    parts.append(f"{r['samples_per_s']:.0f} img/s")
    return ", ".join(parts)


def _summary_writer(path: Path, start_step: int):
    """TensorBoard writer, or None when tensorboard is not installed (``pip install broadface[logging]``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=start_step if start_step > 0 else None)


class IntervalMeter:
    """Averages the losses over one log interval (and measures samples/s); other stats are the last step's.

    Values may be device tensors: they are summed on the device and turned into Python numbers in
    :meth:`flush` with a single host sync, the only one of the interval.
    """

    MEAN = ("batch_loss", "union_loss", "distill_loss")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n, self.samples, self.seconds, self.sums, self.last = 0, 0, 0.0, {}, {}

    def add(self, stats: dict[str, Any], samples: int, seconds: float) -> None:
        self.n, self.samples, self.seconds = self.n + 1, self.samples + samples, self.seconds + seconds
        for k in self.MEAN:
            if stats.get(k) is not None:
                self.sums[k] = stats[k] if k not in self.sums else self.sums[k] + stats[k]
        self.last = stats

    def flush(self) -> dict[str, Any]:
        out = {**self.last, **{k: v / self.n for k, v in self.sums.items()},
               "samples_per_s": self.samples / self.seconds if self.seconds > 0 else 0.0, "interval_steps": self.n}
        keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        if keys:
            values = torch.stack([out[k].detach().double().reshape(()) for k in keys]).tolist()  # the one sync
            out.update(zip(keys, values))
        self.reset()
        return out
