"""GeM for torch tensors: the native kernels (CPU, and CUDA when built) under torch autograd; and
SuperGlobal's two other poolings (Shao et al., ICCV 2023) in plain torch: :func:`regional_gem`
on the feature map before global pooling, :func:`scale_gem` over the descriptors of several
image scales."""
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


def regional_gem(x: torch.Tensor, p: float = 2.5, size: int = 5) -> torch.Tensor:
    """SuperGlobal's regional GeM: each activation mixed half and half with the power mean of
    the ``size`` x ``size`` window around it,
    ``y = 0.5 * (mean_window x^p)^(1/p) + 0.5 * x`` (the window reflected at the borders; a map
    smaller than the padding in a dimension repeats its edge there instead, where reflection is
    undefined).

    Args:
        x: (B, C, H, W) activations, floating point: after a ReLU in the reference; negative
            ones (a Mish, as CSPDarknet ends in) count as 0 in the window's power mean, where a
            fractional power of them is undefined, and keep their value in the mix.
        p: the window's power (2.5 in the reference).
        size: the window's side, odd (5).

    Returns:
        (B, C, H, W) in x's dtype (half inputs computed in float32).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise TypeError("x must be a (B, C, H, W) floating-point torch tensor")
    p = check_number(p, "p", minimum=0, above=True)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be an odd int >= 1 (the window's side), got {size!r}")
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    pad = size // 2
    powered = xf.clamp(min=0).pow(p)
    if pad:  # the width, then the height, each reflected where it is longer than the padding
        for widths, n in (((pad, pad, 0, 0), xf.shape[-1]), ((0, 0, pad, pad), xf.shape[-2])):
            powered = torch.nn.functional.pad(powered, widths, mode="reflect" if n > pad else "replicate")
    window = torch.nn.functional.avg_pool2d(powered, size, stride=1).pow(1.0 / p)
    return (0.5 * window + 0.5 * xf).to(x.dtype)


def scale_gem(descriptors: torch.Tensor, p: float = float("inf")) -> torch.Tensor:
    """SuperGlobal's scale GeM: the descriptors of one image at S scales combined into one.

    ``p = inf`` (the reference's default): the element-wise maximum of the L2-normalised
    descriptors. Finite p: ``(mean_s (x_s - g)^p)^(1/p) + g`` with g the image's smallest value
    over its scales (the reference takes the smallest of the whole batch, which makes an image's
    result depend on the others in its batch; per image it does not).

    Args:
        descriptors: (S, B, D) or (S, D) descriptors of B images (or one) at S scales.
        p: inf, or a power > 0 (10 in the reference's finite variant).

    Returns:
        (B, D) or (D,) descriptors, not normalised.
    """
    if not isinstance(descriptors, torch.Tensor) or not descriptors.is_floating_point() or \
            descriptors.dim() not in (2, 3) or descriptors.shape[0] < 1:
        raise TypeError("descriptors must be an (S, B, D) or (S, D) floating-point torch tensor with S >= 1")
    if not (isinstance(p, float) and p == float("inf")):
        p = check_number(p, "p", minimum=0, above=True, hint=" (or float('inf') for the maximum)")
    x = descriptors.float() if descriptors.dtype in (torch.float16, torch.bfloat16) else descriptors
    if p == float("inf"):
        out = torch.nn.functional.normalize(x, dim=-1).amax(dim=0)
    else:
        g = x.amin(dim=(0, -1), keepdim=True)  # (1, B, 1): each image's smallest value
        out = ((x - g).pow(p).mean(dim=0, keepdim=True).pow(1.0 / p) + g)[0]
    return out.to(descriptors.dtype)
