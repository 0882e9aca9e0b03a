"""Argument checks shared by the package: integers, numbers, which framework an array is from,
and conversion to numpy. Python owns the user-facing messages (the native code keeps short
invariant guards): one format, ``"<argument> must be <what>, got <value>"``.

Imports numpy only, so every layer (ops, nn, retrieval, data, training) can use it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["ArgumentTypeError", "check_int", "check_number", "gem_p", "framework_of", "is_torch", "to_numpy",
           "check_scales", "check_image_size", "MAX_SCALES", "MAX_SCALE", "MAX_IMAGE_SIZE"]

#: image scales: at most this many, each in (0, MAX_SCALE] (up-scales such as sqrt 2 included)
MAX_SCALES = 16
MAX_SCALE = 4.0
#: the longest image side (pixels) anything is resized to (the paper uses 1024)
MAX_IMAGE_SIZE = 16384


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. A ``TypeError``, and a ``ValueError`` too, so callers that
    caught the ``ValueError`` some checks raised before they were unified still catch it."""


def _bounds(kind: str, minimum: float | None, maximum: float | None, above: bool, none_ok: bool) -> str:
    if minimum is not None and maximum is not None:
        what = f"{kind} in {'(' if above else '['}{minimum}, {maximum}]"
    elif minimum is not None:
        what = f"{kind} {'>' if above else '>='} {minimum}"
    elif maximum is not None:
        what = f"{kind} <= {maximum}"
    else:
        what = kind
    return what + " or None" if none_ok else what


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              none_ok: bool = False, hint: str = "") -> Any:
    """``value`` as a Python int, after checking it is an integer in ``[minimum, maximum]``.

    Python ints and numpy integers pass; bool, floats (even integral ones such as ``4.0``),
    strings and other objects do not. ``None`` passes through when ``none_ok``.

    Raises:
        ArgumentTypeError: not an integer (``"batch_size must be an int >= 1, got 4.0"``).
        ValueError: out of range (same message); ``hint`` is appended to it.
    """
    if value is None and none_ok:
        return None
    what = _bounds("an int", minimum, maximum, False, none_ok)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}{hint}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be {what}, got {v}{hint}")
    return v


def check_number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 above: bool = False, none_ok: bool = False, hint: str = "") -> Any:
    """``value`` as a finite Python float in ``[minimum, maximum]`` (``(minimum, maximum]`` when
    ``above``). Python and numpy ints and floats pass (and 0-d numpy arrays); bool does not.

    Raises:
        ArgumentTypeError: not a real number.
        ValueError: NaN, infinite or out of range; ``hint`` is appended to the message.
    """
    if value is None and none_ok:
        return None
    what = _bounds("a finite number", minimum, maximum, above, none_ok)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}{hint}")
    v = float(value)
    low = minimum is not None and (v <= minimum if above else v < minimum)
    if not math.isfinite(v) or low or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be {what}, got {v}{hint}")
    return v


def gem_p(p: Any) -> float:
    """GeM's exponent, a number or a 1-element array / tensor, as a finite float > 0."""
    if hasattr(p, "shape"):  # numpy, torch or cupy
        if math.prod(p.shape) != 1:
            raise ValueError(f"p must be a float or a 1-element tensor, got shape {tuple(p.shape)}")
        p = float(p.reshape(-1)[0])
    return check_number(p, "p", minimum=0, above=True)


def framework_of(x: Any) -> str:
    """'numpy', 'torch', 'cupy', 'dlpack' (another object exposing ``__dlpack__``) or 'other'.

    Decided by the type's module, so no framework is imported to ask.
    """
    if isinstance(x, np.ndarray):
        return "numpy"
    module = type(x).__module__.split(".")[0]
    if module in ("torch", "cupy"):
        return module
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return "other"


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    return framework_of(x) == "torch"


def to_numpy(x: Any, name: str, dtype: Any = None) -> np.ndarray:
    """A numpy view or copy of ``x``: torch tensors (any device; detached, bfloat16 read as
    float32), cupy arrays (copied to the host), numpy arrays, sequences and scalars.

    Raises:
        ArgumentTypeError: ``x`` cannot be read as an array (of ``dtype``), naming ``name``.
    """
    fw = framework_of(x)
    if fw == "torch":
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.cpu().numpy()
    elif fw == "cupy":
        x = x.get()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        want = "an array" if dtype is None else f"an array of {np.dtype(dtype).name}"
        raise ArgumentTypeError(f"{name} must be {want} (numpy, torch or cupy), got {type(x).__name__}") from err


def check_scales(scales: Any, name: str = "scales") -> tuple[float, ...]:
    """``scales`` (a number or a sequence) as a tuple of floats, after checking it holds 1 to
    :data:`MAX_SCALES` finite numbers in (0, :data:`MAX_SCALE`]: the one rule for image scales
    (``extract``, the CLI's ``--scales``, an index's recorded scales)."""
    if isinstance(scales, (int, float, np.integer, np.floating)) and not isinstance(scales, bool):
        scales = (scales,)
    what = f"{name} must be 1 to {MAX_SCALES} numbers in (0, {MAX_SCALE:g}]"
    try:
        if isinstance(scales, (str, bytes)) or any(isinstance(v, bool) for v in scales):
            raise TypeError
        out = tuple(float(v) for v in scales)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"{what}, got {scales!r:.80}") from None
    if not 0 < len(out) <= MAX_SCALES or not all(math.isfinite(v) and 0 < v <= MAX_SCALE for v in out):
        raise ValueError(f"{what}, got {scales!r:.80}; the paper's multi-scale setting is (1, 1/sqrt(2), 1/2)")
    return out


def check_image_size(value: Any, name: str = "image_size", *, none_ok: bool = False, hint: str = "") -> Any:
    """The longer image side in pixels: an int in [1, :data:`MAX_IMAGE_SIZE`] (or None when
    ``none_ok``): the one rule for the CLI's ``--image-size``, the service's and an index's."""
    return check_int(value, name, minimum=1, maximum=MAX_IMAGE_SIZE, none_ok=none_ok, hint=hint)
