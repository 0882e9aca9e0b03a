"""Contrastive and triplet losses against hand-computed values and hand-derived gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pylandmark.nn.losses import ContrastiveLoss, TripletLoss, contrastive_loss, make_loss, triplet_loss


def _case():
    # one tuple in 2-d: q = (1, 0), p = (0.6, 0.8), negatives n1 = (0, 1), n2 = (0.8, 0.6)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    n = torch.tensor([[[0.0, 1.0], [0.8, 0.6]]], dtype=torch.float64)
    return q, p, n


def test_contrastive_hand_computed():
    q, p, n = _case()
    # ||q - p||^2 = 0.4^2 + 0.8^2 = 0.8 -> positive term 0.4
    # ||q - n1|| = sqrt(2) = 1.414 > 0.7 -> 0
    # ||q - n2||^2 = 0.2^2 + 0.6^2 = 0.4, D = 0.6324555320 -> 0.5 * (0.7 - 0.6324555320)^2 = 0.0022811266
    expected = 0.4 + 0.0022811266
    got = contrastive_loss(q, p, n, margin=0.7)
    assert got.item() == pytest.approx(expected, abs=1e-9)
    # with margin 0.85 (the reference command) n2 contributes 0.5 * (0.85 - 0.6324555320)^2 = 0.0236628
    assert contrastive_loss(q, p, n, margin=0.85).item() == pytest.approx(0.4 + 0.0236628, abs=1e-7)
    # margin 0: negatives never contribute
    assert contrastive_loss(q, p, n, margin=0.0).item() == pytest.approx(0.4, abs=1e-12)


def test_contrastive_sums_over_tuples_and_respects_mask():
    q, p, n = _case()
    # second tuple: q = p exactly (no positive loss), one negative at distance 0.5, one padded slot
    q2 = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    n2 = torch.tensor([[[0.0, 0.5], [0.0, 1.0]]], dtype=torch.float64)
    qs, ps, ns = torch.cat([q, q2]), torch.cat([p, q2]), torch.cat([n, n2])
    mask = torch.tensor([[True, True], [True, False]])
    # tuple 2: 0.5 * (0.7 - 0.5)^2 = 0.02; the masked slot (equal to the query, D = 0) would add 0.245
    got = contrastive_loss(qs, ps, ns, margin=0.7, neg_mask=mask)
    assert got.item() == pytest.approx(0.4022811266 + 0.02, abs=1e-9)
    unmasked = contrastive_loss(qs, ps, ns, margin=0.7)
    # (the masked slot's distance is clamped to sqrt(1e-12) = 1e-6: 0.5 * (0.7 - 1e-6)^2, not 0.245;
    # abs=1e-9 for the 10 digits of 0.4022811266)
    assert unmasked.item() == pytest.approx(0.4022811266 + 0.02 + 0.5 * (0.7 - 1e-6) ** 2, abs=1e-9)
    # the module form agrees
    assert ContrastiveLoss(0.7)(qs, ps, ns, mask).item() == pytest.approx(got.item(), abs=1e-12)


def test_contrastive_gradient_matches_hand_derivation(rng):
    b, k, d, margin = 3, 4, 7, 0.9
    q = torch.tensor(rng.normal(size=(b, d)), dtype=torch.float64, requires_grad=True)
    p = torch.tensor(rng.normal(size=(b, d)), dtype=torch.float64)
    # negatives: some inside the margin, some outside
    n = q.detach().unsqueeze(1) + torch.tensor(rng.normal(size=(b, k, d)) * rng.uniform(0.05, 0.6, (b, k, 1)))
    loss = contrastive_loss(q, p, n, margin=margin)
    loss.backward()
    qn, pn, nn_ = q.detach().numpy(), p.numpy(), n.numpy()
    # d/dq [0.5 |q-p|^2] = q - p ; d/dq [0.5 (m - D)^2] = -(m - D) (q - n) / D for D < m
    grad = qn - pn
    value = 0.5 * ((qn - pn) ** 2).sum()
    for i in range(b):
        for j in range(k):
            diff = qn[i] - nn_[i, j]
            dist = math.sqrt((diff ** 2).sum())
            if dist < margin:
                grad[i] -= (margin - dist) * diff / dist
                value += 0.5 * (margin - dist) ** 2
    assert loss.item() == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(q.grad.numpy(), grad, rtol=1e-10, atol=1e-12)


def test_contrastive_gradient_finite_when_negative_equals_query():
    q = torch.tensor([[0.6, 0.8]], requires_grad=True)
    n = q.detach().clone().reshape(1, 1, 2)
    loss = contrastive_loss(q, q.detach(), n, margin=0.7)
    loss.backward()
    # D = sqrt(clamp(0, 1e-12)) = 1e-6. In float32 (u = 2^-24): the margin, 1e-12 and the sqrt round
    # (D off by 2u relative), e = 0.7 - D by u 0.7 + 2u D + u e < 2.01u e, e^2 / 2 by 2 x that + u:
    # 5.02u relative; the positive term is exactly 0 and adding it exact.
    assert loss.item() == pytest.approx(0.5 * (0.7 - 1e-6) ** 2, rel=5.02 * 2.0 ** -24, abs=0)
    assert torch.isfinite(q.grad).all()


def test_triplet_hand_computed():
    q, p, n = _case()
    # ||q-p||^2 = 0.8; ||q-n1||^2 = 2.0 -> max(0, 0.1 + 0.8 - 2.0) = 0; ||q-n2||^2 = 0.4 -> 0.1 + 0.8 - 0.4 = 0.5
    assert triplet_loss(q, p, n, margin=0.1).item() == pytest.approx(0.5, abs=1e-12)
    assert TripletLoss(0.3)(q, p, n).item() == pytest.approx(0.7, abs=1e-12)
    mask = torch.tensor([[True, False]])
    assert triplet_loss(q, p, n, margin=0.1, neg_mask=mask).item() == pytest.approx(0.0, abs=1e-12)


def test_half_inputs_are_computed_in_float32():
    q, p, n = (t.to(torch.float16) for t in _case())
    got = contrastive_loss(q, p, n, margin=0.7)
    assert got.dtype == torch.float32
    # Checked against the float64 loss of the float16-rounded inputs (0.6 -> 0.5996, 0.8 -> 0.7998
    # move it ~5e-4 from 0.4022811266) within the float32 arithmetic's error on those (exact in
    # float32) inputs, u = 2^-24: the differences of these halves are exact; 0.5 |q-p|^2 sums 2
    # rounded squares (gamma_2 relative; halving is exact); a negative's distance D = sqrt(sum of 2
    # squares) is off by gamma_2 relative (the sqrt halves the sum's error, then rounds), so
    # e = margin - D (margin rounded to float32) by u m + gamma_2 D + u e <= gamma_3 (m + D), and
    # 0.5 e^2 by (e + de/2) de plus one rounding (u of it); adding up the terms rounds twice more.
    qd, pd, nd = (t.double().numpy() for t in (q, p, n))
    margin, u = 0.7, 2.0 ** -24

    def g(k):
        return k * u / (1 - k * u)

    pos = 0.5 * ((qd - pd) ** 2).sum()
    dist = np.sqrt(((qd[:, None] - nd) ** 2).sum(-1))
    inside = dist < margin
    e = np.where(inside, margin - dist, 0.0)
    de = np.where(inside, g(3) * (margin + dist), 0.0)
    neg = 0.5 * e ** 2
    want = pos + neg.sum()
    bound = g(2) * pos + ((e + de / 2) * de * (1 + u) + u * neg).sum() + g(2) * want
    assert abs(got.item() - want) <= bound, (got.item(), want, bound)


@pytest.mark.parametrize("fn", [contrastive_loss, triplet_loss])
def test_bad_inputs(fn):
    q, p, n = _case()
    with pytest.raises(ValueError, match="positive"):
        fn(q, p[:, :1], n)
    with pytest.raises(ValueError, match="negatives"):
        fn(q, p, n[0])
    with pytest.raises(ValueError, match="margin"):
        fn(q, p, n, margin=-1.0)
    with pytest.raises(TypeError, match="neg_mask"):
        fn(q, p, n, neg_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="neg_mask"):
        fn(q, p, n, neg_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="query"):
        fn(q.numpy(), p, n)
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("hinge", 0.5)


# ---- ArcFace (classification loss for labelled photos) ----------------------------------------

def arcface_reference(x, labels, w, scale, margin):
    """ArcFace in float64 numpy from the angles themselves: arccos, add the margin, cos."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = x @ w.T
    logits = scale * cos
    for i, y in enumerate(labels):
        theta = math.acos(cos[i, y])
        target = math.cos(theta + margin) if theta + margin <= math.pi else cos[i, y] - margin * math.sin(margin)
        logits[i, y] = scale * target
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))


def _arcface_case(rng, B=7, D=13, C=5):
    x = rng.standard_normal((B, D)) * rng.uniform(0.2, 5.0, (B, 1))  # any norm
    w = rng.standard_normal((C, D))
    labels = rng.integers(0, C, B)
    x[0] = -w[labels[0]] + 0.05 * rng.standard_normal(D)  # t_y + margin > pi: the continuation
    return x, labels, w


@pytest.mark.parametrize("scale,margin", [(30.0, 0.5), (16.0, 0.15), (1.0, 0.0)])
def test_arcface_equals_the_angle_reference(rng, scale, margin):
    from pylandmark.nn.losses import arcface_loss

    x, labels, w = _arcface_case(rng)
    got = arcface_loss(torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(w), scale, margin)
    # float64 throughout; the loss's clamp of cos to 1 - 1e-7 is far from these cosines
    assert got.item() == pytest.approx(arcface_reference(x, labels, w, scale, margin), rel=1e-9, abs=1e-9)
    if margin:  # the wrapped sample is there
        cos0 = x[0] @ w[labels[0]] / np.linalg.norm(x[0]) / np.linalg.norm(w[labels[0]])
        assert math.acos(cos0) + margin > math.pi


def test_arcface_gradient_matches_finite_differences(rng):
    from pylandmark.nn.losses import arcface_loss

    x, labels, w = _arcface_case(rng, B=5, D=7, C=3)
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(w).requires_grad_()
    lt = torch.from_numpy(labels)
    assert torch.autograd.gradcheck(lambda a, b: arcface_loss(a, lt, b, 8.0, 0.3), (xt, wt), eps=1e-6, atol=1e-6)


def test_arcface_head_learns_synthetic_classes():
    from pylandmark.nn.losses import ArcFaceHead

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=gen)

    def batch(n):
        y = torch.randint(0, 5, (n,), generator=gen)
        return centers[y] + 0.5 * torch.randn(n, 16, generator=gen), y

    torch.manual_seed(0)
    embed, head = torch.nn.Linear(16, 8), ArcFaceHead(8, 5, scale=16.0, margin=0.3)
    opt = torch.optim.Adam([*embed.parameters(), *head.parameters()], lr=0.03)
    losses = []
    for _ in range(80):
        x, y = batch(64)
        loss = head(embed(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    x, y = batch(500)
    with torch.no_grad():
        cos = torch.nn.functional.normalize(embed(x), dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).t()
    accuracy = (cos.argmax(1) == y).float().mean().item()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert accuracy > 0.9


def test_arcface_bad_inputs():
    from pylandmark.nn.losses import ArcFaceHead, arcface_loss

    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        arcface_loss(x, torch.tensor([0, 1, 2, 3]), w)
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        arcface_loss(x, torch.tensor([0, 1]), w)
    with pytest.raises(ValueError, match="same D"):
        arcface_loss(x, torch.tensor([0, 1, 2, 0]), torch.randn(3, 7))
    with pytest.raises(ValueError, match="classes >= 2"):
        ArcFaceHead(8, 1)
