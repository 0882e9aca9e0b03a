"""How a network's feature maps become one descriptor per image at extraction time: the
network's own GeM, or SuperGlobal's training-free pooling (Shao et al., ICCV 2023).

A :class:`Pooling` is written as a short spec, recorded in an index's metadata and given on the
command line (``--pooling``): comma-separated parts, each ``name[:value[:value]]``:

- ``gem``: the network's own GeM (its learned p) and, over several scales, its power mean
  (:func:`pylandmark.extraction.multiscale_combine`). The default; the empty combination.
- ``gem+[:p]``: GeM+, GeM with a fixed, higher p (4.6) instead of the network's.
- ``rgem[:p[:size]]``: regional GeM (:func:`pylandmark.nn.functional.regional_gem`, p 2.5 over
  a 5 x 5 window) on the feature map before the global pooling.
- ``sgem[:p]``: scale GeM (:func:`pylandmark.nn.functional.scale_gem`), the per-scale
  descriptors combined by a maximum (``inf``, the default) or a power mean with that p.
- ``superglobal``: ``rgem,gem+,sgem``, the reference's extraction.

The order of operations per scale is the reference's: regional GeM on the map, GeM (+),
L2N, the network's whitening layer (if any), L2N; then the combination over scales.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .._checks import check_int, check_number

__all__ = ["Pooling", "POOLING_PRESETS", "GEM_PLUS_P", "REGIONAL_P", "REGIONAL_SIZE", "SCALE_P"]

#: the reference's defaults
GEM_PLUS_P = 4.6
REGIONAL_P = 2.5
REGIONAL_SIZE = 5
SCALE_P = math.inf

_MAX_SPEC = 200  # characters: a spec may come from an index file


@dataclass(frozen=True)
class Pooling:
    """Extraction-time pooling (see the module docstring for the spec syntax).

    Attributes:
        gem_p: the GeM exponent; None: the network's own (learned) p. GeM+ sets 4.6.
        regional_p: the regional GeM's exponent, or None (off).
        regional_size: the regional GeM's window side (odd).
        scale_p: the scale GeM's exponent (``inf``: the maximum), or None: the network's power
            mean over scales.
    """

    gem_p: float | None = None
    regional_p: float | None = None
    regional_size: int = REGIONAL_SIZE
    scale_p: float | None = None

    def __post_init__(self) -> None:
        for name in ("gem_p", "regional_p"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_number(value, name, minimum=0, maximum=1e3, above=True))
        size = check_int(self.regional_size, "regional_size", minimum=1, maximum=99)
        if size % 2 == 0:
            raise ValueError(f"regional_size must be odd (the window is centred on each activation), got {size}")
        object.__setattr__(self, "regional_size", size)
        if self.scale_p is not None and not (isinstance(self.scale_p, float) and self.scale_p == math.inf):
            object.__setattr__(self, "scale_p", check_number(self.scale_p, "scale_p", minimum=0, maximum=1e3,
                                                             above=True, hint=" (or inf for the maximum)"))

    @property
    def is_default(self) -> bool:
        """Whether this is the network's own pooling (``"gem"``)."""
        return self == Pooling()

    def multiscale_p(self, network_p: float, whitened: bool) -> float:
        """The power of the mean over scales when ``scale_p`` is None: 1 after a whitening layer,
        else the GeM exponent in use (cirtorch's rule)."""
        return 1.0 if whitened else float(self.gem_p if self.gem_p is not None else network_p)

    def __str__(self) -> str:
        """The canonical spec, e.g. ``"rgem:2.5:5,gem+:4.6,sgem:inf"`` (``"gem"`` by default)."""
        parts = []
        if self.regional_p is not None:
            parts.append(f"rgem:{self.regional_p:g}:{self.regional_size}")
        if self.gem_p is not None:
            parts.append(f"gem+:{self.gem_p:g}")
        if self.scale_p is not None:
            parts.append(f"sgem:{self.scale_p:g}")
        return ",".join(parts) or "gem"

    @classmethod
    def parse(cls, spec: Any, name: str = "pooling") -> Pooling:
        """A Pooling from a spec string, a preset name, a Pooling or None (the default).

        Raises:
            ValueError: (one line, naming ``name``) an unknown part, a bad value, a part given
                twice.
        """
        if spec is None:
            return cls()
        if isinstance(spec, Pooling):
            return spec
        if not isinstance(spec, str) or len(spec) > _MAX_SPEC:
            raise ValueError(f"{name} must be a pooling spec such as 'superglobal' or 'gem+,rgem', "
                             f"got {spec!r:.60}")
        fields: dict[str, Any] = {}
        for part in (p.strip() for p in spec.strip().lower().split(",")):
            key, *values = part.split(":")
            if key in POOLING_PRESETS and not values:
                preset = POOLING_PRESETS[key]
                updates = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
                           if getattr(preset, f.name) != getattr(cls(), f.name)}
            elif key in _PARTS:
                updates = _part(key, values, name)
            else:
                raise ValueError(f"{name}: unknown part {part!r} in {spec!r}; use comma-separated parts of "
                                 f"{', '.join(_PARTS)} (each name[:value]) or a preset: {', '.join(POOLING_PRESETS)}")
            for field, value in updates.items():
                if field in fields and fields[field] != value:
                    raise ValueError(f"{name}: {spec!r} sets {field} twice")
                fields[field] = value
        try:
            return cls(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} {spec!r}: {err}") from None


#: the parts of a spec and the fields their values set, in order
_PARTS = {"gem": (), "gem+": ("gem_p",), "rgem": ("regional_p", "regional_size"), "sgem": ("scale_p",)}
_DEFAULTS = {"gem_p": GEM_PLUS_P, "regional_p": REGIONAL_P, "regional_size": REGIONAL_SIZE, "scale_p": SCALE_P}


def _part(key: str, values: list[str], name: str) -> dict[str, Any]:
    fields = _PARTS[key]
    if len(values) > len(fields):
        raise ValueError(f"{name}: {key} takes at most {len(fields)} value(s) ({', '.join(fields) or 'none'}), "
                         f"got {':'.join(values)!r}")
    out: dict[str, Any] = {f: _DEFAULTS[f] for f in fields}
    for field, text in zip(fields, values):
        try:
            out[field] = int(text) if field == "regional_size" else float(text)
        except ValueError:
            raise ValueError(f"{name}: {key}'s {field} must be a number, got {text!r}") from None
    return out


#: named poolings (``--pooling NAME``)
POOLING_PRESETS: dict[str, Pooling] = {
    "gem": Pooling(),
    "gem+": Pooling(gem_p=GEM_PLUS_P),
    "rgem": Pooling(regional_p=REGIONAL_P),
    "sgem": Pooling(scale_p=SCALE_P),
    "superglobal": Pooling(gem_p=GEM_PLUS_P, regional_p=REGIONAL_P, scale_p=SCALE_P),
}
