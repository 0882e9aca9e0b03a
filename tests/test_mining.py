"""Hard-negative mining against a brute-force float64 reference of the cluster rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pylandmark.data import SfM120k, make_sfm_dataset
from pylandmark.extraction import extract
from pylandmark.models import LandmarkNet
from pylandmark.training.mining import Tuples, draw_pool, draw_queries, mine_negatives, mine_tuples, select_negatives

TINY = {"backbone_args": {"stem_chs": 8, "depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 16, 24, 24]}}


def brute_force(q, pool, qc, pc, n_neg):
    """The rule, written out: rank the pool by float64 Euclidean distance (stable, ties to the lower
    index) and walk it, keeping an image if its cluster is new and not the query's."""
    q = np.asarray(q, dtype=np.float64)
    pool = np.asarray(pool, dtype=np.float64)
    out = np.full((len(q), n_neg), -1)
    for i in range(len(q)):
        d = np.sqrt(((pool - q[i]) ** 2).sum(axis=1))
        seen = {qc[i]}
        k = 0
        for j in np.argsort(d, kind="stable"):
            if pc[j] not in seen:
                seen.add(pc[j])
                out[i, k] = j
                k += 1
                if k == n_neg:
                    break
    return out


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_mine_negatives_matches_brute_force(rng):
    q, pool = _unit(rng, 37, 19), _unit(rng, 301, 19)
    qc, pc = rng.integers(0, 40, size=37), rng.integers(0, 40, size=301)
    pos, sims = mine_negatives(q, pool, qc, pc, 5)
    ref = brute_force(q, pool, qc, pc, 5)
    np.testing.assert_array_equal(pos, ref)
    # the rule itself: clusters differ from the query's and from each other
    for i in range(37):
        clusters = pc[pos[i]]
        assert qc[i] not in clusters and len(set(clusters)) == 5
    np.testing.assert_allclose(sims, np.take_along_axis(q @ pool.T, pos, axis=1), atol=1e-5)


def test_deep_walk_beyond_the_first_search(rng):
    # the 400 nearest pool images of every query share its cluster: the first top-k search
    # (k = 256) holds no negative, the rule must go down the whole ranking
    d = 8
    q = _unit(rng, 6, d)
    near = np.repeat(q, 70, axis=0) + 0.01 * rng.normal(size=(420, d)).astype(np.float32)
    far = -np.repeat(q, 30, axis=0) + 0.3 * rng.normal(size=(180, d)).astype(np.float32)
    pool = np.concatenate([near, far]).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    qc = np.zeros(6, dtype=np.int64)
    pc = np.concatenate([np.zeros(420, dtype=np.int64), rng.integers(1, 50, size=180)])
    pos, _ = mine_negatives(torch.from_numpy(q), torch.from_numpy(pool), qc, pc, 4)
    np.testing.assert_array_equal(pos, brute_force(q, pool, qc, pc, 4))
    assert (pos >= 420).all()


@pytest.mark.parametrize("n_clusters, n_neg", [(4, 3), (3, 5)])
def test_few_large_landmarks(rng, n_clusters, n_neg):
    # labelled photos of a few landmarks with many photos each: the first 256 of a query's
    # ranking are mostly its own landmark's, so negatives come from further down (searched
    # without its own photos); with fewer other landmarks than negatives wanted, a query ends
    # short (3 clusters, 5 negatives: 2 each)
    d = 12
    centres = _unit(rng, n_clusters, d)
    qc, pc = rng.integers(0, n_clusters, size=23), rng.integers(0, n_clusters, size=1500)
    q = centres[qc] + 0.2 * rng.normal(size=(23, d)).astype(np.float32)
    pool = centres[pc] + 0.2 * rng.normal(size=(1500, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    for framework in (np.asarray, torch.from_numpy):
        pos, sims = mine_negatives(framework(q), framework(pool), qc, pc, n_neg)
        np.testing.assert_array_equal(pos, brute_force(q, pool, qc, pc, n_neg))
    assert ((pos >= 0).sum(axis=1) == min(n_neg, n_clusters - 1)).all()
    found = pos >= 0
    ref = np.take_along_axis(q @ pool.T, np.maximum(pos, 0), axis=1)
    # |error| of a float32 dot of unit vectors: < D u (u = 2^-24) + the search's own, both tiny
    np.testing.assert_allclose(sims[found], ref[found], atol=1e-5)
    assert np.isnan(sims[~found]).all()


def test_many_clusters_walk_then_take_the_best_of_each(rng):
    # > 256 clusters: rankings are walked; the queries of the one big landmark (2100 photos near
    # them) find no negative in their first 256, nor in their first 2048, and take the best
    # image of every other cluster
    d = 10
    big = _unit(rng, 1, d)
    q = np.concatenate([big + 0.05 * rng.normal(size=(9, d)), rng.normal(size=(8, d))]).astype(np.float32)
    pool = np.concatenate([big + 0.05 * rng.normal(size=(2100, d)), rng.normal(size=(700, d))]).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    qc = np.concatenate([np.zeros(9, np.int64), rng.integers(1, 350, size=8)])
    pc = np.concatenate([np.zeros(2100, np.int64), 1 + np.arange(700) % 349])
    for framework in (np.asarray, torch.from_numpy):
        pos, _ = mine_negatives(framework(q), framework(pool), qc, pc, 5)
        np.testing.assert_array_equal(pos, brute_force(q, pool, qc, pc, 5))
    assert (pos[:9] >= 2100).all()


def test_short_rankings_are_padded(rng):
    q, pool = _unit(rng, 4, 6), _unit(rng, 30, 6)
    qc = np.array([0, 1, 2, 0])
    pc = rng.integers(0, 3, size=30)  # only clusters 0, 1, 2: two other clusters per query
    pos, sims = mine_negatives(q, pool, qc, pc, 3)
    np.testing.assert_array_equal(pos, brute_force(q, pool, qc, pc, 3))
    assert (pos[:, 2] == -1).all() and np.isnan(sims[:, 2]).all() and (pos[:, :2] >= 0).all()


def test_select_negatives_follows_the_given_ranking():
    ranks = np.array([[3, 0, 1, 2, 4, 5], [5, -1, 4, 3, 2, 1]])
    pool_clusters = np.array([7, 7, 8, 9, 9, 10])
    out = select_negatives(ranks, [9, 7], pool_clusters, 2)
    # query 0 (cluster 9): skip 3 (own cluster), take 0 (7), skip 1 (7 again), take 2 (8)
    # query 1 (cluster 7): take 5 (10), skip -1, take 4 (9)
    np.testing.assert_array_equal(out, [[0, 2], [5, 4]])
    with pytest.raises(ValueError, match="negatives"):
        select_negatives(ranks, [9, 7], pool_clusters, 0)
    with pytest.raises(ValueError, match="ranks"):
        select_negatives(ranks, [9], pool_clusters, 2)
    with pytest.raises(ValueError, match="pool size"):
        select_negatives(ranks + 10, [9, 7], pool_clusters, 2)
    with pytest.raises(TypeError, match="query_clusters"):
        select_negatives(ranks, [9.5, 7.0], pool_clusters, 2)


def test_draws_are_seeded_subsets():
    a = draw_queries(50, 20, np.random.default_rng(1))
    b = draw_queries(50, 20, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 20 and a.max() < 50
    assert draw_pool(10, 99, np.random.default_rng(0)).size == 10
    assert not np.array_equal(draw_pool(1000, 50, np.random.default_rng(0)),
                              draw_pool(1000, 50, np.random.default_rng(2)))


def test_mine_tuples_on_a_dataset(tmp_path):
    root = make_sfm_dataset(tmp_path, n_clusters=10, images_per_cluster=5, image_size=48, seed=5, val_clusters=2)
    ds = SfM120k(root, "train")
    torch.manual_seed(0)
    model = LandmarkNet("cspdarknet53-gem", **TINY)
    model.train()
    tuples = mine_tuples(model, ds, query_size=12, pool_size=30, negatives=3, image_size=40,
                         rng=np.random.default_rng(7), batch_size=8, progress=False)
    assert model.training  # restored after describing in eval mode
    assert isinstance(tuples, Tuples) and len(tuples) == 12 and tuples.nidxs.shape == (12, 3)
    # reference: the same draws, every image described once, the rule applied by brute force
    rng = np.random.default_rng(7)
    pairs = draw_queries(ds.qidxs.size, 12, rng)
    pool = draw_pool(len(ds), 30, rng)
    np.testing.assert_array_equal(tuples.qidxs, ds.qidxs[pairs])
    np.testing.assert_array_equal(tuples.pidxs, ds.pidxs[pairs])
    desc = extract(model, ds.images, image_size=40, progress=False).astype(np.float32)
    ref = brute_force(desc[tuples.qidxs], desc[pool], ds.clusters[tuples.qidxs], ds.clusters[pool], 3)
    np.testing.assert_array_equal(tuples.nidxs, pool[ref])
    for i in range(len(tuples)):
        imgs = tuples.images(i)
        clusters = ds.clusters[imgs]
        assert clusters[0] == clusters[1]
        assert len(set(clusters[2:].tolist()) | {clusters[0]}) == len(imgs) - 1
    assert tuples.stats["mining_s"] > 0 and tuples.stats["n_short"] == 0
    with pytest.raises(ValueError, match="pool_size"):
        mine_tuples(model, ds, pool_size=0, rng=np.random.default_rng(0))
