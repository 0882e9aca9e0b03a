"""Losses over training tuples (query, positive, negatives).

With ``D(a, b) = ||a - b||_2`` on the L2-normalised descriptors:

- contrastive (Radenovic et al.): ``0.5 * D(q, p)^2`` for the positive pair plus
  ``0.5 * max(0, margin - D(q, n))^2`` for every negative n, summed over pairs and tuples;
- triplet (the alternative): ``max(0, margin + D(q, p)^2 - D(q, n)^2)`` for every negative,
  summed over negatives and tuples.

Tuples are batched: queries ``(B, D)``, positives ``(B, D)``, negatives ``(B, N, D)``, with an
optional ``(B, N)`` boolean mask for tuples that carry fewer than N negatives. The losses are
sums (as the reference trains: every tuple's loss is back-propagated and the gradients add up);
divide by the number of tuples for a mean.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._checks import check_number

__all__ = ["contrastive_loss", "triplet_loss", "ContrastiveLoss", "TripletLoss", "make_loss", "LOSSES"]


def _check(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
           neg_mask: torch.Tensor | None, margin: float) -> torch.Tensor:
    for name, t in (("query", query), ("positive", positive), ("negatives", negatives)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if query.dim() != 2:
        raise ValueError(f"query must be (B, D), got shape {tuple(query.shape)}")
    if positive.shape != query.shape:
        raise ValueError(f"positive must have the query's shape {tuple(query.shape)}, got {tuple(positive.shape)}")
    if negatives.dim() != 3 or negatives.shape[0] != query.shape[0] or negatives.shape[2] != query.shape[1]:
        raise ValueError(f"negatives must be (B, N, D) = ({query.shape[0]}, N, {query.shape[1]}), got shape "
                         f"{tuple(negatives.shape)}")
    check_number(margin, "margin", minimum=0)
    if neg_mask is None:
        return torch.ones(negatives.shape[:2], dtype=torch.bool, device=negatives.device)
    if not isinstance(neg_mask, torch.Tensor) or neg_mask.dtype != torch.bool:
        raise TypeError("neg_mask must be a bool tensor (B, N): True where a negative is present")
    if neg_mask.shape != negatives.shape[:2]:
        raise ValueError(f"neg_mask must be (B, N) = {tuple(negatives.shape[:2])}, got {tuple(neg_mask.shape)}")
    return neg_mask


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).sum(-1)


def contrastive_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                     margin: float = 0.7, neg_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive loss summed over the tuples' pairs (a 0-d tensor, float32 or wider).

    Args:
        query: (B, D) query descriptors.
        positive: (B, D) positive descriptors.
        negatives: (B, N, D) negative descriptors.
        margin: negatives closer than ``margin`` are pushed away (0.7 in the reference code,
            0.85 in its ResNet-101 command).
        neg_mask: optional (B, N) bool, False where a tuple has no negative in that slot.
    """
    mask = _check(query, positive, negatives, neg_mask, margin)
    q, p, n = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (query, positive, negatives))
    pos = 0.5 * _sq_dist(q, p)
    # D = sqrt(d^2); the clamp keeps the gradient finite when a negative equals the query
    d = _sq_dist(q.unsqueeze(1), n).clamp(min=1e-12).sqrt()
    neg = 0.5 * (margin - d).clamp(min=0).pow(2)
    return pos.sum() + torch.where(mask, neg, torch.zeros_like(neg)).sum()


def triplet_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                 margin: float = 0.1, neg_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Triplet loss ``max(0, margin + D(q,p)^2 - D(q,n)^2)`` summed over negatives and tuples.

    Args as :func:`contrastive_loss`.
    """
    mask = _check(query, positive, negatives, neg_mask, margin)
    q, p, n = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (query, positive, negatives))
    dp = _sq_dist(q, p).unsqueeze(1)
    dn = _sq_dist(q.unsqueeze(1), n)
    per = (margin + dp - dn).clamp(min=0)
    return torch.where(mask, per, torch.zeros_like(per)).sum()


class _MarginLoss(nn.Module):
    """A tuple loss function with a fixed margin, as a module."""

    loss_fn: Callable[..., torch.Tensor]

    def __init__(self, margin: float):
        super().__init__()
        self.margin = check_number(margin, "margin", minimum=0)

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                neg_mask: torch.Tensor | None = None) -> torch.Tensor:
        return type(self).loss_fn(query, positive, negatives, self.margin, neg_mask)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class ContrastiveLoss(_MarginLoss):
    """:func:`contrastive_loss` as a module with a fixed margin."""

    loss_fn = staticmethod(contrastive_loss)

    def __init__(self, margin: float = 0.7):
        super().__init__(margin)


class TripletLoss(_MarginLoss):
    """:func:`triplet_loss` as a module with a fixed margin."""

    loss_fn = staticmethod(triplet_loss)

    def __init__(self, margin: float = 0.1):
        super().__init__(margin)


LOSSES = {"contrastive": ContrastiveLoss, "triplet": TripletLoss}


def make_loss(name: str, margin: float) -> nn.Module:
    """A loss module by name ("contrastive" or "triplet")."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name](margin)
