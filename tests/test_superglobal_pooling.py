"""SuperGlobal's regional GeM and scale GeM (pylandmark.nn.functional) against their formulas
written out in float64 loops, on odd sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pylandmark.nn.functional import regional_gem, scale_gem


def regional_reference(x: np.ndarray, p: float, size: int) -> np.ndarray:
    """Per activation: 0.5 x + 0.5 (power mean of the size x size window, indices reflected at
    the borders, repeated where the map is too small to reflect)."""
    b, c, h, w = x.shape
    r = size // 2

    def at(i, n):
        if n <= r:  # replicate
            return min(max(i, 0), n - 1)
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # reflect, edge not repeated

    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = [x[:, :, at(i + di, h), at(j + dj, w)] for di in range(-r, r + 1) for dj in range(-r, r + 1)]
            out[:, :, i, j] = 0.5 * x[:, :, i, j] + 0.5 * np.mean([v ** p for v in win], axis=0) ** (1 / p)
    return out


@pytest.mark.parametrize("shape, p, size", [((2, 3, 7, 9), 2.5, 5), ((1, 4, 5, 3), 3.0, 3), ((1, 2, 2, 6), 2.5, 5),
                                            ((2, 1, 4, 4), 1.0, 1)])
def test_regional_gem_matches_the_formula(rng, shape, p, size):
    x = rng.random(shape) * 2
    ref = regional_reference(x, p, size)
    np.testing.assert_allclose(regional_gem(torch.from_numpy(x), p, size).numpy(), ref, rtol=1e-12, atol=0)
    # float32: a mean of size^2 powers and two roots, each a few float32 roundings (2^-24) of the
    # result's magnitude; 64 size^2 ulps bounds them
    got = regional_gem(torch.from_numpy(x.astype(np.float32)), p, size).numpy()
    np.testing.assert_allclose(got, ref, rtol=64 * size * size * 2.0 ** -24, atol=1e-30)


def test_regional_gem_is_half_an_lp_pool_of_the_scaled_map(rng):
    # the reference's construction with torch's own layers: an Lp pool (p-norm of the window)
    # of the map divided by size^(2/p), after reflection padding, averaged with the map
    x = torch.from_numpy(rng.random((2, 3, 9, 8)))
    lp = torch.nn.LPPool2d(2.5, 5, stride=1)(torch.nn.ReflectionPad2d(2)(x / 25 ** (1 / 2.5)))
    torch.testing.assert_close(regional_gem(x), 0.5 * lp + 0.5 * x, rtol=1e-12, atol=0)


def test_regional_gem_gradient_and_bad_arguments(rng):
    x = torch.from_numpy(rng.random((1, 2, 6, 5)) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: regional_gem(t, 2.5, 3), (x,))
    with pytest.raises(ValueError, match="odd"):
        regional_gem(x, 2.5, 4)
    with pytest.raises(TypeError, match=r"\(B, C, H, W\)"):
        regional_gem(x[0], 2.5, 3)


@pytest.mark.parametrize("p", [float("inf"), 10.0, 3.0])
def test_scale_gem_matches_the_formula(rng, p):
    d = rng.normal(size=(3, 4, 11))
    got = scale_gem(torch.from_numpy(d), p).numpy()
    for b in range(4):
        if p == float("inf"):
            unit = [d[s, b] / np.linalg.norm(d[s, b]) for s in range(3)]
            ref = np.max(unit, axis=0)
        else:
            g = d[:, b].min()
            ref = np.mean([(d[s, b] - g) ** p for s in range(3)], axis=0) ** (1 / p) + g
        np.testing.assert_allclose(got[b], ref, rtol=1e-12, atol=1e-15)
    # an image's result does not depend on the other images of its batch
    np.testing.assert_allclose(scale_gem(torch.from_numpy(d[:, 1:2]), p).numpy()[0], got[1], rtol=1e-13, atol=0)
    assert scale_gem(torch.from_numpy(d[:, 0]), p).shape == (11,)
    with pytest.raises(ValueError):
        scale_gem(torch.from_numpy(d), 0.0)
