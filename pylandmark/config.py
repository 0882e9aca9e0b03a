"""Shared behaviour of the dataclass configs (backbones, LandmarkNet, training)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """Mixin for dataclass configs: ``to_dict`` is JSON-friendly (tuple fields become lists) and
    ``from_dict`` is strict (an unknown field is an error, not silently dropped)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        return cls(**d)
