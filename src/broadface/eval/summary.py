"""One summary table over every result of an evaluation run (as insightface prints after its sets).

Each named result (``{"protocol": ..., **figures}``) becomes one row: ``set``, ``protocol``
and that protocol's headline figures as fractions in [0, 1]; columns are the union over all
rows in first-seen order, blank where a protocol has no such figure.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from broadface.fileio import atomic_write_text

__all__ = ["summary_rows", "format_table", "write_csv"]


def _pairs(r: dict) -> dict[str, Any]:
    return {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"], f"VAL@FAR={r['far_target']:.0e}": r["val"],
            "n": r["pairs"]}


def _ranks(r: dict) -> dict[str, Any]:
    out: dict[str, Any] = {f"rank{k}": v for k, v in r["cmc"].items() if int(k) in (1, 5, 10)}
    out.update({f"TPIR@FPIR={k}": v for k, v in r.get("tpir_at_fpir", {}).items()})
    return {**out, "n": r.get("probes")}


def _row(name: str, r: dict) -> dict[str, Any]:
    kind = r.get("protocol", "")
    if kind == "pairs":
        figures = _pairs(r)
    elif kind == "ijb":
        figures = {**{f"TAR@FAR={k}": v for k, v in r["tar_at_far"].items()}, "n": r["pairs"]}
    elif kind == "retrieval":
        figures = {k: v for k, v in r.items() if k.startswith(("recall@", "map@"))} | {"n": r["queries"]}
    else:  # identification, IJB 1:N searches
        figures = _ranks(r)
    return {"set": name, "protocol": kind, **figures}


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per result, in the order given (see module doc)."""
    return [_row(name, r) for name, r in results.items()]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols and k != "n"]
    return cols + ["n"]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (figures to 4 decimals; ``n`` = pairs / queries / probes)."""
    cols = _columns(rows)
    cells = [cols] + [[_cell(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The rows as CSV (full precision), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())
