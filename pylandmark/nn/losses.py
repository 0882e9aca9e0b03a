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

For labelled images there is also a classification loss over a head of class weights:

- ArcFace (additive angular margin, Deng et al. 2019; DELG and DOLG train with it on GLDv2):
  with ``cos t_j`` the cosine between a descriptor and class j's weight, the logits are
  ``scale * cos(t_y + margin)`` for the true class y and ``scale * cos t_j`` for the others,
  followed by cross-entropy (mean over the batch). Where ``t_y + margin > pi`` the margin would
  wrap the angle round and lower the penalty, so there the logit is ``scale * (cos t_y - margin
  * sin(margin))`` instead (the continuation insightface uses). The head (:class:`ArcFaceHead`)
  exists only for training: exported networks are the backbone, whose descriptors are searched.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .._checks import check_number

__all__ = ["contrastive_loss", "triplet_loss", "ContrastiveLoss", "TripletLoss", "make_loss", "LOSSES",
           "arcface_loss", "ArcFaceHead", "CLASSIFICATION_LOSSES"]


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
#: losses over labelled images through a classification head (ArcFaceHead), not over tuples
CLASSIFICATION_LOSSES = ("arcface",)


def make_loss(name: str, margin: float) -> nn.Module:
    """A loss module by name ("contrastive" or "triplet")."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name](margin)


def arcface_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, scale: float = 30.0,
                 margin: float = 0.5) -> torch.Tensor:
    """ArcFace loss (module docstring): mean cross-entropy over the batch, a 0-d tensor.

    Args:
        embeddings: (B, D) descriptors (normalised here; any norm).
        labels: (B,) int64 class of each descriptor, in [0, C).
        weight: (C, D) class weights (normalised here).
        scale: s, the logits' scale (30 in DELG / insightface for ~1000s of classes).
        margin: m, the additive angle in radians (0.5: about 29 degrees; 0.1-0.15 in DELG).
    """
    for name, t in (("embeddings", embeddings), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if embeddings.dim() != 2 or weight.dim() != 2 or weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"embeddings must be (B, D) and weight (C, D) with the same D, got "
                         f"{tuple(embeddings.shape)} and {tuple(weight.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be an int64 tensor of shape ({embeddings.shape[0]},), one class per "
                         "descriptor")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(f"labels must lie in [0, {weight.shape[0]}) (the head's classes), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    check_number(scale, "scale", minimum=0)
    check_number(margin, "margin", minimum=0, maximum=math.pi / 2)
    x = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings
    w = weight.to(x.dtype)
    cos = nn.functional.normalize(x, dim=1) @ nn.functional.normalize(w, dim=1).t()  # (B, C)
    # 1 - 1e-7 keeps sin's gradient finite where a descriptor lies on its class weight
    c = cos.gather(1, labels[:, None]).squeeze(1).clamp(-1 + 1e-7, 1 - 1e-7)
    sin = (1 - c * c).sqrt()
    wrapped = torch.arccos(c) + margin > math.pi
    target = torch.where(wrapped, c - margin * math.sin(margin), c * math.cos(margin) - sin * math.sin(margin))
    logits = cos.scatter(1, labels[:, None], target[:, None]) * scale
    return nn.functional.cross_entropy(logits, labels)


class ArcFaceHead(nn.Module):
    """The class weights of :func:`arcface_loss` as a trainable head (dropped at export).

    Args:
        dim: descriptor size D.
        classes: number of classes C.
        scale, margin: as :func:`arcface_loss`.
    """

    def __init__(self, dim: int, classes: int, scale: float = 30.0, margin: float = 0.5):
        super().__init__()
        if dim < 1 or classes < 2:
            raise ValueError(f"ArcFaceHead needs dim >= 1 and classes >= 2, got dim={dim}, classes={classes}")
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale = check_number(scale, "scale", minimum=0)
        self.margin = check_number(margin, "margin", minimum=0, maximum=math.pi / 2)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return arcface_loss(embeddings, labels, self.weight, self.scale, self.margin)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, classes={self.weight.shape[0]}, scale={self.scale}, margin={self.margin}"

