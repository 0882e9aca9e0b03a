"""The one way pylandmark reads pickles: restricted, bounded, and checked.

The dataset files the library reads as pickles (revisited ground truth, SfM-120k dbs and
whitening pairs) hold only dicts, lists, tuples, strings, bytes and numbers, sometimes numpy
arrays in re-saved copies. Such a file comes from elsewhere, so reading it must neither run code
nor do unbounded work:

- no global may be loaded except numpy's array reconstruction (and only when asked for), so
  nothing in the file can run;
- the file is at most ``max_bytes`` long;
- the loaded structure is walked once, each container once however often the pickle memo
  reuses it, to bound its nesting depth and the number of elements a consumer walking it as a
  tree would see (``x = [0]; for _ in range(40): x = [x, x]`` pickles into a few hundred bytes
  but stands for 2^41 elements); cycles and any other type are refused.

The validators below (:func:`index_array`, :func:`str_list`, :func:`mapping`) then check the
parts a reader uses. Every refusal raises :class:`PickleRefused`, a ``pickle.UnpicklingError``
that is also a ``ValueError``.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PickleRefused", "load", "loads", "index_array", "str_list", "mapping", "MAX_BYTES",
           "MAX_DEPTH", "MAX_ITEMS"]

MAX_BYTES = 1 << 30   # the official SfM-120k db is ~30 MB, the ground-truth files < 1 MB
MAX_DEPTH = 16        # the official files nest 3 or 4 levels deep
MAX_ITEMS = 20_000_000  # SfM-120k holds ~0.7M elements

# the only globals a pickle may reference, and only with numpy=True: array reconstruction
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles (numpy array data)
    ("builtins", "bytes"),
    ("__builtin__", "bytes"),
}
_SCALARS = (str, bytes, int, float, bool, type(None))
_ARRAY_KINDS = "biufUS"  # numbers and fixed-width strings; never objects


class PickleRefused(pickle.UnpicklingError, ValueError):
    """A pickle was not read: it needs code, is too large or too deep, or is not a pickle."""


class _Refusals:
    """What both unpicklers refuse: every global but numpy's reconstruction ones, persistent ids."""

    _what: str
    _numpy: bool

    def find_class(self, module: str, name: str) -> Any:
        if self._numpy and (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)  # type: ignore[misc]
        raise PickleRefused(f"{self._what}: refusing to load {module}.{name}: this file should hold only dicts, "
                            "lists, strings and numbers; it is not the expected file, or was tampered with")

    def persistent_load(self, pid: Any) -> Any:
        raise PickleRefused(f"{self._what}: refusing a persistent id; not the expected file")


class _Restricted(_Refusals, pickle.Unpickler):
    """Plain data only (no globals at all): the C unpickler."""

    def __init__(self, data: bytes, what: str, numpy: bool):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self._what, self._numpy = what, numpy


def _check_dtype_state(state: Any, what: str) -> None:
    """numpy.dtype.__setstate__ trusts its argument: a crafted one (element size -1 on a
    version-3 tuple of 6, found by tests/test_fuzz.py) corrupts memory. Only the state numpy
    itself writes for a plain (not structured) dtype passes."""
    ok = (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
          and state[2] is None and state[3] is None and state[4] is None
          and all(type(v) is int for v in state[5:])
          and (state[5] == -1 or 0 < state[5] <= 1 << 20) and state[6] in (-1, 1, 2, 4, 8, 16) and state[7] in (0, 8))
    if not ok:
        raise PickleRefused(f"{what}: refusing a numpy dtype state numpy does not write ({state!r:.80}); "
                            "not the expected file")


def _check_array_state(state: Any, what: str) -> None:
    """ndarray.__setstate__'s argument: (1, shape, dtype, fortran, bytes) of a numeric or string
    dtype, the bytes exactly the array's size."""
    ok = (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[1], tuple)
          and all(type(n) is int and 0 <= n <= MAX_ITEMS for n in state[1]) and isinstance(state[2], np.dtype)
          and state[2].kind in _ARRAY_KINDS and type(state[3]) is bool and isinstance(state[4], bytes))
    if ok:
        count = int(np.prod(state[1], dtype=np.int64)) if state[1] else 1
        ok = count <= MAX_ITEMS and len(state[4]) == count * state[2].itemsize
    if not ok:
        raise PickleRefused(f"{what}: refusing a numpy array state numpy does not write; not the expected file")


class _RestrictedNumpy(_Refusals, pickle._Unpickler):
    """With numpy's reconstruction globals: the pure-Python unpickler, whose BUILD opcode can be
    checked before numpy's __setstate__ sees its argument (the files that need it are small)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, what: str, numpy: bool):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self._what, self._numpy = what, numpy

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]  # type: ignore[attr-defined]
        if isinstance(inst, np.dtype):
            if inst.kind not in _ARRAY_KINDS:  # the same answer as the walk gives such arrays
                raise PickleRefused(f"{self._what}: holds a numpy {inst} array; only numeric and string arrays "
                                    "are read")
            _check_dtype_state(state, self._what)
        elif isinstance(inst, np.ndarray):
            _check_array_state(state, self._what)
        else:
            raise PickleRefused(f"{self._what}: refusing to set the state of a {type(inst).__name__}; "
                                "not the expected file")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]


def _check_memo_indexes(data: bytes, what: str) -> None:
    """Refuses memo indexes no real pickle of this size uses. CPython's unpickler keeps its memo
    as an array, so ``LONG_BINPUT 1561162084`` alone allocates gigabytes (found by
    tests/test_fuzz.py): an index never exceeds the number of opcodes, which is below the byte
    count. One linear pass over the opcodes, before anything is built."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (isinstance(arg, int) and 0 <= arg <= len(data)):
                raise PickleRefused(f"{what}: memo index {arg!r:.20} is beyond what a {len(data)}-byte pickle "
                                    "holds; not the expected file")
            if op.name == "STOP":
                return
    except PickleRefused:
        raise
    except Exception as err:  # noqa: BLE001 - a malformed stream raises many kinds of errors
        raise PickleRefused(f"{what} is not a readable pickle: {type(err).__name__}: {err}") from None


def loads(data: bytes, what: str, *, numpy: bool = False, max_depth: int = MAX_DEPTH,
          max_items: int = MAX_ITEMS) -> Any:
    """Unpickles ``data`` (named ``what`` in messages) with the restrictions above.

    Args:
        numpy: allow numeric numpy arrays and scalars (numpy's reconstruction globals).
        max_depth: deepest nesting of containers accepted.
        max_items: most elements (containers and scalars, counted with repetition) accepted.
    """
    _check_memo_indexes(data, what)
    try:
        obj = (_RestrictedNumpy if numpy else _Restricted)(data, what, numpy).load()
    except PickleRefused:
        raise
    except RecursionError:
        raise PickleRefused(f"{what}: nested too deeply to be the expected file") from None
    except Exception as err:  # noqa: BLE001 - a malformed stream raises many kinds of errors
        raise PickleRefused(f"{what} is not a readable pickle: {type(err).__name__}: {err}") from None
    _Walk(what, max_depth, max_items).size(obj, 0)
    return obj


def load(path: str | os.PathLike, what: str | None = None, *, max_bytes: int = MAX_BYTES, **kwargs: Any) -> Any:
    """Reads the pickle file at ``path`` (at most ``max_bytes``) with :func:`loads`.

    Raises:
        FileNotFoundError: no file there.
        PickleRefused: the file is too large or :func:`loads` refuses it.
    """
    p = Path(path)
    what = what or str(p)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file")
    with open(p, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PickleRefused(f"{what} is larger than {max_bytes} bytes; not the expected file")
    return loads(data, what, **kwargs)


class _Walk:
    """Counts the elements of a loaded structure as a tree walk would see them, visiting each
    container once (its count is cached), and refuses cycles, excess depth and foreign types."""

    def __init__(self, what: str, max_depth: int, max_items: int):
        self.what, self.max_depth, self.max_items = what, max_depth, max_items
        self.sizes: dict[int, int] = {}
        self.active: set[int] = set()

    def size(self, obj: Any, depth: int) -> int:
        if isinstance(obj, _SCALARS):
            return 1
        if isinstance(obj, (np.ndarray, np.generic)):
            if obj.dtype.kind not in _ARRAY_KINDS:
                raise PickleRefused(f"{self.what}: holds a numpy {obj.dtype} array; only numeric and string arrays "
                                    "are read")
            return 1
        if not isinstance(obj, (list, tuple, dict)):
            raise PickleRefused(f"{self.what}: holds a {type(obj).__name__}; only dicts, lists, strings and "
                                "numbers are read")
        key = id(obj)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.active:
            raise PickleRefused(f"{self.what}: holds a container that contains itself")
        if depth >= self.max_depth:
            raise PickleRefused(f"{self.what}: nested deeper than {self.max_depth} levels; not the expected file")
        self.active.add(key)
        total = 1
        children = (v for kv in obj.items() for v in kv) if isinstance(obj, dict) else obj
        for child in children:
            total += self.size(child, depth + 1)
            if total > self.max_items:
                raise PickleRefused(f"{self.what}: stands for more than {self.max_items} elements (shared or "
                                    "repeated parts included); not the expected file")
        self.active.discard(key)
        self.sizes[key] = total
        return total


# ---- validators of the loaded structure -----------------------------------------------------------

def mapping(value: Any, where: str, keys: tuple[str, ...] = ()) -> Mapping:
    """``value`` as a dict holding ``keys``; PickleRefused names what is missing."""
    if not isinstance(value, Mapping):
        wanted = f" with {list(keys)}" if keys else ""
        raise PickleRefused(f"{where} must be a dict{wanted}, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise PickleRefused(f"{where} lacks {missing}; expected keys {list(keys)}")
    return value


def index_array(values: Any, where: str, n: int | None = None, of: str = "") -> np.ndarray:
    """A flat list (or 1-d integer array) of ints as int64, each in [0, n) when n is given
    (indices into the list named ``of``)."""
    if isinstance(values, np.ndarray):
        arr = values
    elif isinstance(values, (list, tuple)):
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))), None)
        if bad is not None:
            raise PickleRefused(f"{where} must be a flat list of ints, holds {type(bad).__name__} {bad!r:.40}")
        try:
            arr = np.array(values, dtype=np.int64) if values else np.zeros(0, np.int64)
        except OverflowError:
            raise PickleRefused(f"{where} holds an int beyond int64") from None
    else:
        raise PickleRefused(f"{where} must be a list of ints, got {type(values).__name__}")
    if arr.ndim != 1:
        raise PickleRefused(f"{where} must be a flat list of ints, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise PickleRefused(f"{where} must hold ints, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if n is not None and arr.size and (arr.min() < 0 or arr.max() >= n):
        raise PickleRefused(f"{where} holds an index outside {of + ' ' if of else ''}[0, {n}) "
                            f"(min {arr.min()}, max {arr.max()})")
    return arr


def str_list(values: Any, where: str, min_len: int = 0) -> list[str]:
    """A list (or 1-d array) of strings (bytes decoded as latin-1), each at least min_len long."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise PickleRefused(f"{where} must be a list of strings, got {type(values).__name__}")
    out = [v.decode("latin1") if isinstance(v, bytes) else v for v in values]
    bad = next((v for v in out if not isinstance(v, str) or len(v) < min_len), None)
    if bad is not None:
        raise PickleRefused(f"{where} holds {bad!r:.60}; expected strings of at least {min_len} characters")
    return out
