"""GeM for torch tensors: the native kernels (CPU, and CUDA when built) under torch autograd."""
from __future__ import annotations

from typing import Any

import torch

from .._array import Array, gem_layout
from .._checks import check_number, gem_p
from .._native import extension

_C = extension()

HAVE_CUDA_KERNELS = hasattr(_C, "gem_forward_cuda")


def gem_reference(x: torch.Tensor, p: Any, eps: float) -> torch.Tensor:
    """Plain torch GeM with float32 accumulation for half inputs; used where no native kernel
    runs (CUDA tensors in a build without CUDA kernels)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(p, torch.Tensor):
        p = p.reshape(()).to(xf.dtype)
    y = xf.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return y.to(x.dtype)


def _spec(t: torch.Tensor, name: str) -> tuple:
    return Array(t, "torch", name).spec()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


class _GeMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
        xa = gem_layout(Array(x.detach(), "torch", "x")).obj
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.empty(x.shape[:2], dtype=out_dtype, device=x.device)
        if x.is_cuda:
            # p stays on the device (no host sync); the kernel reads it there
            p_dev = p.detach().reshape(1).to(device=x.device, dtype=torch.float32)
            _C.gem_forward_cuda(_spec(xa, "x"), _spec(y, "y"), _spec(p_dev, "p"), eps, _stream(xa))
            ctx.save_for_backward(xa, y, p, p_dev)
        else:
            _C.gem_forward(_spec(xa, "x"), _spec(y, "y"), gem_p(p), eps)
            ctx.save_for_backward(xa, y, p)
        ctx.eps = eps
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, p = ctx.saved_tensors[:3]
        need_x, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gy = grad_out.to(y.dtype).contiguous()
        dx = torch.empty_like(x)
        if x.is_cuda:
            p_dev = ctx.saved_tensors[3]
            terms = torch.empty(y.numel(), dtype=torch.float32, device=x.device) if need_p else None
            _C.gem_backward_cuda(_spec(x, "x"), _spec(gy, "grad_output"), _spec(y, "y"),
                                 _spec(dx, "grad_input"), None if terms is None else _spec(terms, "terms"),
                                 _spec(p_dev, "p"), ctx.eps, _stream(x))
            grad_p = terms.sum().to(device=p.device, dtype=p.dtype).reshape(p.shape) if terms is not None else None
        else:
            dp = _C.gem_backward(_spec(x, "x"), _spec(gy, "grad_output"), _spec(y, "y"),
                                 _spec(dx, "grad_input"), gem_p(p), ctx.eps, bool(need_p))
            grad_p = torch.full_like(p, dp) if need_p else None
        return (dx if need_x else None), grad_p, None


def gem_torch(x: torch.Tensor, p: Any = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM on a (B, C, H, W) tensor -> (B, C); differentiable for x and for p (tensor p).

    CPU tensors run the native kernels; CUDA tensors the fused CUDA kernels on the current
    stream when this build has them (plain torch ops otherwise)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor, got {type(x).__name__}")
    eps = check_number(eps, "eps", minimum=0, above=True)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(p, torch.Tensor):
        if p.numel() != 1:
            raise ValueError(f"p must be a float or a 1-element tensor, got shape {tuple(p.shape)}")
        if x.device.type == "cpu" and p.device.type != "cpu":
            raise ValueError(f"p is on {p.device} but x is on the CPU; move p to the CPU")
    if x.device.type == "cuda" and not HAVE_CUDA_KERNELS:
        return gem_reference(x, p, eps)
    if x.device.type not in ("cpu", "cuda"):
        return gem_reference(x, p, eps)
    if isinstance(p, torch.Tensor):
        p_t = p
    else:
        p_t = torch.tensor(gem_p(p), dtype=torch.float64)
    if x.is_cuda and x.dtype == torch.float64:
        return gem_reference(x, p_t, eps)  # the CUDA kernels take 16- and 32-bit floats
    return _GeMFunction.apply(x, p_t, eps)
