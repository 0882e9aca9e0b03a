"""Shared behaviour of the dataclass configs (backbones, LandmarkNet, training): JSON round trips
and one registry of named presets per config class."""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

C = TypeVar("C", bound="JsonConfig")

__all__ = ["JsonConfig", "Presets", "check_values"]

#: longest list accepted for a variable-length tuple field (e.g. per-stage depths)
MAX_SEQUENCE = 64


class Presets(Mapping[str, C], Generic[C]):
    """Read-only name -> config view of one config class's presets.

    Entries are added with :meth:`register` (once per name); :meth:`get_config` hands out an
    independent copy with fields overridden, so no caller can change a preset in place.
    """

    def __init__(self, config_cls: type[C]):
        self._cls = config_cls
        self._items: dict[str, C] = {}

    def __getitem__(self, name: str) -> C:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Presets({self._cls.__name__}: {sorted(self._items)})"

    def register(self, name: str, config: C) -> C:
        """Adds ``config`` under ``name`` and returns it; a name is registered once."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: a preset name must be a non-empty str, got {name!r}")
        if not isinstance(config, self._cls):
            raise TypeError(f"config: a {self._cls.__name__} preset must be a {self._cls.__name__}, "
                            f"got {type(config).__name__}")
        if name in self._items:
            raise ValueError(f"name: {self._cls.__name__} preset {name!r} is already registered; pick another name")
        self._items[name] = config
        return config

    def get_config(self, name: str, overrides: Mapping[str, Any] | None = None, *,
                   argument: str = "name") -> C:
        """A copy of preset ``name`` with the fields in ``overrides`` changed (and validated by the
        dataclass). ``argument``: the caller's parameter name, for the error on an unknown name."""
        if not isinstance(name, str) or name not in self._items:
            raise ValueError(f"{argument}: unknown preset {name!r} for {self._cls.__name__}; "
                             f"choose one of {sorted(self._items)}")
        base: Any = copy.deepcopy(self._items[name])  # a dataclass instance (JsonConfig is a mixin)
        return dataclasses.replace(base, **dict(overrides or {}))


class JsonConfig:
    """Mixin for dataclass configs: ``to_dict`` is JSON-friendly (tuple fields become lists),
    ``from_dict`` is strict (an unknown field is an error, not silently dropped), and every
    subclass owns a :class:`Presets` registry, ``cls.presets``, read by :meth:`from_preset`."""

    presets: ClassVar[Presets[Any]]
    #: field name -> (lowest, highest) accepted value from a dict or file (each element of a
    #: sequence field); configs set their own
    BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.presets = Presets(cls)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        check_values(cls, d)
        return cls(**d)

    @classmethod
    def coerce(cls: type[C], value: Any, argument: str = "cfg") -> C:
        """``value`` as a config: a preset name gives a copy of that preset, a config of this
        class is returned as it is; ``argument`` names the caller's parameter in errors."""
        if isinstance(value, str):
            return cls.presets.get_config(value, argument=argument)
        if not isinstance(value, cls):
            raise TypeError(f"{argument} must be a {cls.__name__} or a preset name, got {type(value).__name__}")
        return value

    @classmethod
    def from_preset(cls: type[C], name: str, /, **overrides: Any) -> C:
        """The preset ``name`` of :attr:`presets` with fields overridden, e.g.
        ``TrainConfig.from_preset("test", epochs=2)``."""
        return cls.presets.get_config(name, overrides)


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
