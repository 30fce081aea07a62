"""Plain structural checks (docs/architecture.md): the layering, file and function sizes, one union loss,
one image resize."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "broadface"

# subpackage (or top-level module) -> the ones it may import (docs/architecture.md, "Layers")
LOW = {"paths", "fileio", "metrics", "allocator"}
ALLOWED = {
    "paths": set(), "fileio": set(), "metrics": set(), "allocator": set(),
    "data": LOW,
    "dist": LOW | {"data"},
    "models": LOW | {"data"},
    "heads": LOW | {"data", "dist", "models"},
    "eval": LOW | {"data", "models"},
    "train": LOW | {"data", "dist", "models", "heads", "eval"},
    "infer": LOW | {"data", "dist", "models", "heads", "eval", "train"},
    "serve": LOW | {"data", "models", "eval", "infer"},
    "study": LOW | {"data", "dist", "models", "heads", "eval", "train", "infer"},
    "demo": LOW | {"data", "dist", "models", "heads", "eval", "train", "infer", "study"},
}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """broadface units imported anywhere in ``path`` (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "broadface" and len(parts) > 1:
                out.add(parts[1])
            if parts[0] in ("tests", "bench"):
                out.add(parts[0])
    return out


def _graph() -> dict[str, dict[str, set[str]]]:
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in SRC.rglob("*.py"):
        unit = _unit(path)
        if unit in ("__init__", "__main__"):
            continue
        for dep in _imports(path) - {unit}:
            graph[unit][dep].add(str(path.relative_to(ROOT)))
    return graph


def test_no_import_cycle_between_subpackages():
    graph = _graph()
    seen, stack = set(), []

    def visit(u: str) -> None:
        if u in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(u):] + [u])}")
        if u in seen:
            return
        stack.append(u)
        for v in graph.get(u, {}):
            visit(v)
        stack.pop()
        seen.add(u)

    for unit in list(graph):
        visit(unit)


def test_every_import_follows_the_layers():
    bad = [f"{unit} imports {dep} ({', '.join(sorted(files))})" for unit, deps in _graph().items() if unit != "cli"
           for dep, files in deps.items() if dep not in ALLOWED.get(unit, set())]
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_library_never_imports_tests_or_bench_and_bench_never_imports_tests():
    assert not [p for p in SRC.rglob("*.py") if _imports(p) & {"tests", "bench"}]
    assert not [p for p in (ROOT / "bench").glob("*.py") if "tests" in _imports(p)]


def test_no_library_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"files over 400 lines: {long}"


def test_no_library_function_over_60_lines():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in SRC.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def _calls(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return sorted(f"{p.relative_to(ROOT)}:{i}" for p in SRC.rglob("*.py")
                  for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line.split("#")[0]))


def test_one_definition_of_the_union_loss():
    assert len(_calls(r"^\s*def chunked_margin_ce\(")) == 1
    assert len(_calls(r"^class \w*MarginCE\w*\(torch\.autograd\.Function\)")) <= 1


def test_one_image_resize_call_site():
    """Every image on its way to a model is resized by data/pipeline.resize; masks.py only resamples its own
    generated noise and alpha layers (not an input image)."""
    sites = _calls(r"\.resize\(|cv2\.resize\(|F\.interpolate\(|interpolate\(")
    pipeline = [s for s in sites if s.startswith("src/broadface/data/pipeline.py")]
    others = [s for s in sites if not s.startswith(("src/broadface/data/pipeline.py", "src/broadface/data/masks.py"))]
    assert len(pipeline) == 1 and not others, sites


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_layer_table_names_real_units(unit):
    assert (SRC / unit).is_dir() or (SRC / f"{unit}.py").is_file()
