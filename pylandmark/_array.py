"""Turn numpy / torch / cupy / DLPack arrays into the specs the native extension reads.

A spec is ``(ptr, dtype, shape, strides_in_elements, device_type, device_id, readonly)``; the
extension never imports a framework, so any of them (or none but numpy) can be installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import framework_of

__all__ = ["CPU", "CUDA", "SUPPORTED", "Array", "framework_of", "as_array", "dtype_name", "require_float",
           "empty_like_framework", "current_stream", "contiguous", "gem_layout"]

CPU, CUDA = 1, 2
SUPPORTED = ("float16", "bfloat16", "float32")


@dataclass
class Array:
    """An input array with its framework, seen through one interface.

    A torch view with the negative or conjugate bit set (``x.conj().imag``, ``torch._neg_view``)
    shares its base's memory but stands for other values; it is resolved into a tensor holding
    those values, because the native code reads raw memory."""

    obj: Any  # the numpy array / torch tensor / cupy array actually passed to _C
    framework: str
    name: str

    def __post_init__(self) -> None:
        if self.framework == "torch" and (self.obj.is_neg() or self.obj.is_conj()):
            self.obj = self.obj.resolve_conj().resolve_neg()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.obj.shape)

    @property
    def ndim(self) -> int:
        return len(self.obj.shape)

    @property
    def dtype(self) -> str:
        return dtype_name(self.obj)

    @property
    def device(self) -> tuple[int, int]:
        if self.framework == "torch":
            dev = self.obj.device
            return (CUDA, dev.index or 0) if dev.type == "cuda" else (CPU, 0)
        if self.framework == "cupy":
            return CUDA, int(self.obj.device.id)
        return CPU, 0

    def device_str(self) -> str:
        kind, idx = self.device
        return "cpu" if kind == CPU else f"cuda:{idx}"

    def strides(self) -> tuple[int, ...]:
        """Strides in elements; raises ValueError when a byte stride is not a whole element."""
        if self.framework == "torch":
            return tuple(self.obj.stride())
        itemsize = self.obj.dtype.itemsize
        out = []
        for s in self.obj.strides:
            if s % itemsize:
                raise ValueError(f"{self.name}: strides that are not a multiple of the element size "
                                 "are not supported; pass a contiguous copy")
            out.append(s // itemsize)
        return tuple(out)

    def spec(self) -> tuple:
        x = self.obj
        if self.framework == "torch":
            ptr, readonly = x.data_ptr(), False
        elif self.framework == "cupy":
            ptr, readonly = int(x.data.ptr), False
        else:
            ptr, readonly = x.__array_interface__["data"]
        kind, idx = self.device
        return (int(ptr), self.dtype, self.shape, self.strides(), kind, idx, bool(readonly))


def dtype_name(x: Any) -> str:
    name = str(x.dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


def as_array(x: Any, name: str) -> Array:
    """Wrap x without copying; numpy-convertible objects with __dlpack__ become numpy arrays."""
    fw = framework_of(x)
    if fw == "torch":
        return Array(x.detach(), fw, name)
    if fw in ("numpy", "cupy"):
        return Array(x, fw, name)
    if fw == "dlpack":
        try:
            return Array(np.from_dlpack(x), "numpy", name)
        except (TypeError, BufferError, RuntimeError) as err:
            raise TypeError(f"{name}: could not read {type(x).__name__} through DLPack ({err}); "
                            "pass a numpy array, a torch tensor or a cupy array") from err
    raise TypeError(f"{name} must be a numpy array, torch tensor or cupy array, "
                    f"got {type(x).__name__}; wrap lists with np.asarray(..., dtype=np.float32)")


def require_float(a: Array) -> None:
    if a.dtype not in SUPPORTED:
        raise TypeError(f"{a.name} has dtype {a.dtype}; supported are float16, bfloat16 and float32 "
                        f"(convert with .astype(np.float32) or .float())")


def empty_like_framework(ref: Array, shape: tuple[int, ...], dtype: str) -> Any:
    """A new C-contiguous array of `dtype` in ref's framework and on ref's device."""
    if ref.framework == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=ref.obj.device)
    if ref.framework == "cupy":
        import cupy

        with cupy.cuda.Device(ref.device[1]):
            return cupy.empty(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


def to_host(a: Array) -> Any:
    """A CPU copy of a CUDA array (a torch tensor for torch, numpy for cupy)."""
    if a.framework == "torch":
        return a.obj.cpu()
    if a.framework == "cupy":
        return a.obj.get()
    return a.obj


def to_device_of(x: np.ndarray, ref: Array) -> Any:
    """A copy of the numpy array x in ref's framework and on ref's device."""
    if ref.framework == "torch":
        import torch

        return torch.from_numpy(x).to(ref.obj.device)
    if ref.framework == "cupy":
        import cupy

        with cupy.cuda.Device(ref.device[1]):
            return cupy.asarray(x)
    return x


def current_stream(a: Array) -> int:
    """The caller's current CUDA stream (cudaStream_t as an int) on the device holding a."""
    if a.framework == "torch":
        import torch

        return torch.cuda.current_stream(a.obj.device).cuda_stream
    if a.framework == "cupy":
        import cupy

        with cupy.cuda.Device(a.device[1]):
            return cupy.cuda.get_current_stream().ptr
    raise ValueError(f"{a.name} is not a CUDA array")


def contiguous(a: Array) -> Array:
    x = a.obj
    if a.framework == "torch":
        return Array(x.contiguous(), a.framework, a.name)
    if a.framework == "cupy":
        import cupy

        return Array(cupy.ascontiguousarray(x), a.framework, a.name)
    return Array(np.ascontiguousarray(x), a.framework, a.name)


def gem_layout(a: Array) -> Array:
    """Checks a (B, C, H, W) input and returns it, or a contiguous copy when neither the spatial
    nor the channel axis is contiguous."""
    if a.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {a.shape}")
    if a.dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"x has dtype {a.dtype}; supported are float16, bfloat16, float32 and float64")
    B, C, H, W = a.shape
    if H * W == 0:
        raise ValueError(f"x must have H, W >= 1, got shape {a.shape}")
    sb, sc, sh, sw = a.strides()
    mergeable = H == 1 or W == 1 or sh == W * sw
    shw = sw if W > 1 else (sh if H > 1 else 1)
    if mergeable and (shw == 1 or H * W == 1 or sc == 1 or C == 1):
        return a
    return contiguous(a)
