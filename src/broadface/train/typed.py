"""Typed dataclasses from plain YAML data: a strict YAML loader and field-by-field coercion with errors
that name the file and the key (generic: nothing here knows broadface's config sections)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what PyYAML found wrong and where."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if problem and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(err).split())


class StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]}): merge the two into one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def from_dict(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value type."""
    where = prefix.rstrip(".") or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"{source}: unknown config key '{prefix}{unknown[0]}' "
                         f"(valid {where} keys: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, data[name], source, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return value as type tp or raise ValueError naming key and source."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ValueError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{source}: {key}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know
        raise TypeError(f"config field {key} has unsupported type {tp}")
    raise ValueError(f"{source}: {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
