"""Where the real data sets live.

The data root is, in order: an explicit argument, ``$BROADFACE_DATA``, then the
first ``shared/data`` found beside the current directory or the package's
checkout (``../shared/data`` from the project root). Nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "BROADFACE_DATA"


def _candidates() -> list[Path]:
    here = Path(__file__).resolve()
    roots = [Path.cwd(), *Path.cwd().parents, *here.parents]
    seen, out = set(), []
    for r in roots:
        c = r / "shared" / "data"
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Return the data root, or raise FileNotFoundError saying how to set it."""
    if root is not None:
        p = Path(root).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"data root {p} is not a directory")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"${ENV_VAR}={env} is not a directory")
        return p
    for c in _candidates():
        if c.is_dir():
            return c
    raise FileNotFoundError(
        f"no data root found: set ${ENV_VAR} or pass --data-root (looked for shared/data "
        "beside the working directory and the package checkout)"
    )
