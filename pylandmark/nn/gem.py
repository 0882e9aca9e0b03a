"""GeM pooling as a module with a learnable exponent."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import _p_value, eps_value
from .functional import gem_torch


class GeM(nn.Module):
    """Generalized-mean pooling, (B, C, H, W) -> (B, C), with one learnable p (init 3.0).

    Args:
        p: initial exponent.
        eps: clamp floor before the power.
        learn_p: whether p is a trainable parameter (otherwise a buffer).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True):
        super().__init__()
        p = _p_value(p)
        eps = eps_value(eps)
        value = torch.full((1,), float(p))
        if learn_p:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem_torch(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps:g}, learn_p={isinstance(self.p, nn.Parameter)}"
