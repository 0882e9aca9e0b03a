"""GeM for torch tensors: the native CPU kernels under torch autograd."""
from __future__ import annotations

from typing import Any

import torch

from .. import _C
from .._array import Array
from ..ops import _p_value, gem_layout


def gem_reference(x: torch.Tensor, p: Any, eps: float) -> torch.Tensor:
    """Plain torch GeM with float32 accumulation for half inputs; used where no native kernel
    runs (CUDA tensors until the fused kernel lands)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(p, torch.Tensor):
        p = p.reshape(()).to(xf.dtype)
    y = xf.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return y.to(x.dtype)


class _GeMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
        a = gem_layout(Array(x.detach(), "torch", "x"))
        pf = _p_value(p)
        y = torch.empty(x.shape[:2], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        _C.gem_forward(a.spec(), Array(y, "torch", "y").spec(), pf, eps)
        ctx.save_for_backward(a.obj, y, p)
        ctx.eps = eps
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, p = ctx.saved_tensors
        need_x, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gy = grad_out.to(y.dtype).contiguous()
        dx = torch.empty_like(x)
        dp = _C.gem_backward(Array(x, "torch", "x").spec(), Array(gy, "torch", "grad_output").spec(),
                             Array(y, "torch", "y").spec(), Array(dx, "torch", "grad_input").spec(),
                             float(p), ctx.eps, bool(need_p))
        grad_p = torch.full_like(p, dp) if need_p else None
        return (dx if need_x else None), grad_p, None


def gem_torch(x: torch.Tensor, p: Any = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM on a (B, C, H, W) tensor -> (B, C); differentiable for x and for p (tensor p)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(p, torch.Tensor):
        if p.numel() != 1:
            raise ValueError(f"p must be a float or a 1-element tensor, got shape {tuple(p.shape)}")
        if p.device != x.device and x.device.type != "cpu":
            raise ValueError(f"p is on {p.device} but x is on {x.device}")
    if x.device.type != "cpu":
        return gem_reference(x, p, eps)
    p_t = p if isinstance(p, torch.Tensor) else torch.tensor(_p_value(p), dtype=torch.float64)
    return _GeMFunction.apply(x, p_t, eps)
