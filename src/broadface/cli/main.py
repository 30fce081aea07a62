"""``broadface`` entry point: discovers sub-command modules and dispatches."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings

import broadface.cli as _cli_pkg


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broadface",
        description="Train, evaluate, export and serve face-recognition / metric-learning "
        "models with BroadFace (compensated embedding queue).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_cli_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "main":
            continue
        module = importlib.import_module(f"broadface.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, except that KEY=VALUE overrides may also follow an option placed after CONFIG
    (``broadface train CONFIG --no-progress optim.lr=0.1``), which argparse alone rejects."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def one_line(err: BaseException) -> str:
    """The message of an error as one line: an OSError as 'path: reason', a DataLoader worker's
    re-raised exception as its last line (not the worker's 27-line traceback)."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    text = str(err).strip()
    if "Original Traceback" in text:  # torch.utils.data's ExceptionWrapper
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith(("Error", "Exception")) \
            else last
    return text


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one plain line (``broadface: warning: ...``), not Python's file:line form."""
    print(f"broadface: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError) as err:
        # Errors we raise on bad input carry a message naming the file/field; show it plainly.
        print(f"broadface {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The ``broadface`` command and ``python -m broadface``: the process's allocator set up first
    (:func:`broadface.allocator.configure_from_env`: freed memory kept unless BROADFACE_MALLOC=system),
    then :func:`main`. Tests call :func:`main`, which leaves the allocator of their process alone."""
    from broadface.allocator import configure_from_env

    try:
        configure_from_env()
    except ValueError as err:
        print(f"broadface: error: {err}", file=sys.stderr)
        return 2
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
