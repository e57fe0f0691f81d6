"""One (de)serialisation helper for every typed record: plans, reports, checkpoints, metrics.

``to_data`` turns a frozen dataclass (nested dataclasses, tuples, enums, paths) into plain
YAML/JSON values; ``from_data(cls, data)`` is its inverse, driven by the dataclass's type hints.
It refuses unknown and missing keys and values of the wrong type, naming the key path
(``candidates[3].memory.params_bytes: expected int, got 'abc'``), and then the dataclass's own
``__post_init__`` checks its invariants. So every record is checked the same way whether it is
built in code or read from a file.

A dataclass may list read-only properties in a ``__derived__`` class attribute: ``to_data``
writes them after the fields (for people reading the file), and ``from_data`` checks that a
file's values equal the ones recomputed from the fields, so a hand-edited derived number is
refused rather than believed.

Supported field types: ``bool``, ``int``, ``float`` (ints are accepted), ``str``, ``Path``,
``Literal[...]``, ``Enum`` subclasses, nested dataclasses, ``tuple[X, ...]``, ``tuple[X, Y]``,
``dict[str, X]``, ``X | None``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from executor.errors import ContractError

__all__ = ["from_data", "to_data", "to_yaml"]

T = TypeVar("T")


def to_data(value: Any) -> Any:
    """Plain values for YAML/JSON: dataclasses become dicts in field order, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in getattr(value, "__derived__", ()):
            data[name] = to_data(getattr(value, name))
        return data
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_data(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    for kind in (bool, int, float, str):  # e.g. torch's TorchVersion is a str subclass
        if isinstance(value, kind):
            return kind(value)
    if value is None:
        return None
    raise ContractError(f"cannot serialise a {type(value).__name__}")


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, flow style for short lists of numbers and strings
    (``image_shape_px: [8192, 8192]``), so that files read well."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flat = all(isinstance(v, int | float | str | bool) or v is None for v in value)
    return dumper.represent_sequence(
        "tag:yaml.org,2002:seq", value, flow_style=flat and len(value) <= 16
    )


_Dumper.add_representer(list, _represent_list)


def to_yaml(data: Any, header: str = "") -> str:
    """YAML text of plain values (``to_data``'s output), keys in their order."""
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100)


def from_data(cls: type[T], data: Any, *, where: str = "") -> T:
    """Build ``cls`` from plain values, checking every key and type.

    Raises:
        ContractError: one line naming the key path and what is wrong.
    """
    return _convert(cls, data, where or cls.__name__)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fail(where: str, expected: str, value: Any) -> typing.NoReturn:
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    raise ContractError(f"{where}: expected {expected}, got {shown}")


def _convert(kind: Any, value: Any, where: str) -> Any:  # noqa: C901 (one branch per type form)
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        rest = [o for o in options if o is not type(None)]
        if len(rest) == 1:
            return _convert(rest[0], value, where)
        raise ContractError(f"{where}: unsupported union {kind}")
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            _fail(where, "one of " + ", ".join(map(repr, allowed)), value)
        return value
    if origin is tuple:
        return _tuple(kind, value, where)
    if origin is dict:
        _, item = typing.get_args(kind)
        if not isinstance(value, Mapping):
            _fail(where, "a mapping", value)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, where)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            _fail(where, "one of " + ", ".join(repr(m.value) for m in kind), value)
    return _scalar(kind, value, where)


def _scalar(kind: Any, value: Any, where: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            _fail(where, "true or false", value)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, "an integer", value)
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(where, "a number", value)
        if not math.isfinite(value):
            _fail(where, "a finite number", value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            _fail(where, "a string", value)
        return value
    if kind is Path:
        if not isinstance(value, str):
            _fail(where, "a path", value)
        return Path(value)
    raise ContractError(f"{where}: unsupported field type {kind}")


def _tuple(kind: Any, value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        _fail(where, "a list", value)
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        _fail(where, f"a list of {len(args)} values", value)
    return tuple(
        _convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
    )


def _dataclass(cls: type, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        _fail(where, f"a mapping ({cls.__name__})", value)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    derived = tuple(getattr(cls, "__derived__", ()))
    unknown = sorted(set(map(str, value)) - set(fields) - set(derived))
    if unknown:
        raise ContractError(f"{where}: unknown key(s) {', '.join(unknown)}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ContractError(f"{where}: missing key {name}")
    try:
        built = cls(**kwargs)
    except ContractError as err:
        raise ContractError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ContractError(f"{where}: {err}") from None
    for name in derived:
        if name in value and to_data(getattr(built, name)) != value[name]:
            raise ContractError(
                f"{where}.{name}: states {value[name]!r} but its fields give "
                f"{to_data(getattr(built, name))!r}"
            )
    return built
