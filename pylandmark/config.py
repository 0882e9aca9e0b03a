"""Shared behaviour of the dataclass configs (backbones, LandmarkNet, training)."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from typing import Any, Mapping, TypeVar

C = TypeVar("C", bound="JsonConfig")

#: longest list accepted for a variable-length tuple field (e.g. per-stage depths)
MAX_SEQUENCE = 64


class JsonConfig:
    """Mixin for dataclass configs: ``to_dict`` is JSON-friendly (tuple fields become lists) and
    ``from_dict`` is strict (an unknown field is an error, not silently dropped; values must
    have their field's type and lie within the class's ``BOUNDS``)."""

    #: field name -> (lowest, highest) accepted value from a dict or file (each element of a
    #: sequence field); configs set their own
    BOUNDS: typing.ClassVar[dict[str, tuple[float, float]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        check_values(cls, d)
        return cls(**d)


def check_values(cls: type, d: Mapping[str, Any]) -> None:
    """Checks config values (from a file, a dict or overrides) against the dataclass ``cls``:
    each value must match its field's annotation (``bool`` only True/False, ``int`` no bool or
    float, finite floats, tuples as lists of the element type) and lie within ``cls.BOUNDS``.
    Raises ValueError naming the field and what it accepts."""
    hints = typing.get_type_hints(cls)
    bounds = getattr(cls, "BOUNDS", {})
    for name, value in d.items():
        if name not in hints:
            continue
        tp = hints[name]
        if not _matches(value, tp):
            raise ValueError(f"{cls.__name__}.{name} must be {_describe(tp)}, got {value!r:.80}")
        if name in bounds:
            low, high = bounds[name]
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(v, numbers.Real) and not isinstance(v, bool) and not low <= v <= high:
                    raise ValueError(f"{cls.__name__}.{name} must lie in [{low}, {high}], got {value!r:.80}")


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, (str, os.PathLike))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return len(value) <= MAX_SEQUENCE and all(_matches(v, args[0] if args else Any) for v in value)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
    if origin is typing.Literal:
        return value in args
    return True  # a type this checker does not know: the dataclass checks it


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        if args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of at most {MAX_SEQUENCE} ({_describe(args[0]) if args else 'values'})"
    if origin in (dict, Mapping) or tp is dict:
        return "an object with string keys"
    return str(tp)
