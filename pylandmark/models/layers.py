"""Small building blocks shared by the backbones and the retrieval head."""
from __future__ import annotations

import torch
from torch import nn


class ConvNormAct(nn.Module):
    """Conv2d (no bias, "same" padding ``k // 2``) -> BatchNorm2d -> optional LeakyReLU.

    ``(B, in_chs, H, W) -> (B, out_chs, ceil(H / stride), ceil(W / stride))`` for odd kernels.
    State-dict keys: ``conv.weight`` and ``bn.{weight, bias, running_mean, running_var,
    num_batches_tracked}`` (the activation holds no state), which is timm's layout.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        kernel_size: odd square kernel size.
        stride: convolution stride.
        act: apply LeakyReLU after the norm.
        negative_slope: LeakyReLU slope for x < 0.
        bn_eps: BatchNorm epsilon.
    """

    _conv_bn_pairs = (("conv", "bn"),)

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
                 act: bool = True, negative_slope: float = 0.01, bn_eps: float = 1e-5):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size}")
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=bn_eps)
        self.act = nn.LeakyReLU(negative_slope, inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class L2N(nn.Module):
    """L2 normalisation of the last axis: ``x / (||x||_2 + eps)``, (B, D) -> (B, D)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / (||x||_2 + eps)`` over the last axis; (..., D) -> (..., D)."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal (fan_out) conv weights, unit/zero BatchNorm affine, N(0, 0.01) linears."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d (with bias) equal to ``bn(conv(x))`` with ``bn`` in eval mode (running stats)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("bn: folding needs running statistics; this BatchNorm has track_running_stats=False")
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
        1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                      stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                      dilation=conv.dilation, groups=conv.groups, bias=True,  # type: ignore[arg-type]
                      padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    assert fused.bias is not None  # built with bias=True
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        b = conv.bias.detach() * scale if conv.bias is not None else 0.0
        fused.bias.copy_(b + shift)
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Folds every BatchNorm that directly follows a convolution into it, in place; for
    inference only (the result uses the running statistics and no longer trains BatchNorm).

    Covered: modules declaring ``_conv_bn_pairs`` (ConvNormAct, ResNet blocks and stem) and
    ``nn.Sequential(Conv2d, BatchNorm2d)`` shortcuts. Returns ``model``.
    """
    for mod in list(model.modules()):
        pairs = getattr(mod, "_conv_bn_pairs", ())
        for conv_name, bn_name in pairs:
            conv, bn = getattr(mod, conv_name), getattr(mod, bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(mod, conv_name, fold_conv_bn(conv, bn))
                setattr(mod, bn_name, nn.Identity())
        if isinstance(mod, nn.Sequential) and len(mod) == 2 and isinstance(mod[0], nn.Conv2d) \
                and isinstance(mod[1], nn.BatchNorm2d):
            mod[0] = fold_conv_bn(mod[0], mod[1])
            mod[1] = nn.Identity()
    return model
