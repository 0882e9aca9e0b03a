"""Top-k voting: ties, weights, unknowns, and accuracy / GAP on synthetic descriptors."""
from __future__ import annotations

import numpy as np
import pytest

import pylandmark as plm
from pylandmark import evaluate as ev
from pylandmark.retrieval.recognition import LabelledIndex, Recognition, recognize


class FixedIndex:
    """An index whose search returns fixed neighbours (tests the voting alone)."""

    def __init__(self, labels, scores, idx):
        self.labels = np.asarray(labels)
        self.descriptors = np.zeros((len(labels), 2), dtype=np.float32)
        self._scores = np.asarray(scores, dtype=np.float32)
        self._idx = np.asarray(idx, dtype=np.int64)
        self.calls = []

    def search(self, queries, k):
        self.calls.append(k)
        return self._scores[:, :k], self._idx[:, :k]


def test_protocol_is_satisfied_by_an_index_shape():
    assert isinstance(FixedIndex(["a"], [[1.0]], [[0]]), LabelledIndex)
    assert not isinstance(np.zeros((2, 2)), LabelledIndex)


def test_majority_tie_broken_by_summed_similarity():
    labels = ["a", "b", "b", "a", "c"]
    idx = FixedIndex(labels, [[0.9, 0.8, 0.7, 0.5, 0.4]], [[0, 1, 2, 3, 4]])
    res = recognize(idx, np.zeros((1, 2), np.float32), k=5)
    assert isinstance(res, Recognition) and idx.calls == [5]
    # a and b have 2 votes each; b sums 1.5 > a's 1.4 although a is nearest
    assert res.labels.tolist() == ["b"] and res.votes.tolist() == [2]
    assert res.confidences.tolist() == [pytest.approx(2 / 5)]
    assert res.neighbors.tolist() == [[0, 1, 2, 3, 4]]
    assert res.neighbor_labels.tolist() == [labels]
    assert res.known.tolist() == [True]


def test_majority_tie_in_votes_and_sum_goes_to_nearer_neighbour():
    # dyadic scores: both labels sum to exactly 1.0
    idx = FixedIndex(["a", "b", "b", "a"], [[0.75, 0.5, 0.5, 0.25], [0.75, 0.5, 0.5, 0.25]],
                     [[0, 1, 2, 3], [1, 0, 3, 2]])
    res = recognize(idx, np.zeros((2, 2), np.float32), k=4)
    assert res.labels.tolist() == ["a", "b"]
    assert res.confidences.tolist() == [0.5, 0.5]


def test_weighted_vote_differs_from_majority():
    labels = ["a", "b", "b", "b", "a"]
    idx = FixedIndex(labels, [[0.9, 0.3, 0.3, 0.2, 0.8]], [[0, 1, 2, 3, 4]])
    q = np.zeros((1, 2), np.float32)
    assert recognize(idx, q, k=5).labels.tolist() == ["b"]
    res = recognize(idx, q, k=5, vote="weighted")
    assert res.labels.tolist() == ["a"]
    # the scores are float32 (0.9 and 0.8 rounded); the votes sum them in float64
    assert res.confidences[0] == (float(np.float32(0.9)) + float(np.float32(0.8))) / 5
    # weighted tie in summed similarity: more votes win, then the nearer neighbour
    idx = FixedIndex(["a", "b", "b"], [[0.5, 0.25, 0.25]], [[0, 1, 2]])
    assert recognize(idx, q, k=3, vote="weighted").labels.tolist() == ["b"]
    idx = FixedIndex(["a", "b"], [[0.5, 0.5]], [[1, 0]])
    assert recognize(idx, q, k=2, vote="weighted").labels.tolist() == ["b"]


def test_unknown_below_min_score_and_label_types():
    idx = FixedIndex([3, 4, 3], [[0.6, 0.5, 0.4], [0.2, 0.1, 0.05]], [[0, 1, 2], [1, 0, 2]])
    q = np.zeros((2, 2), np.float32)
    res = recognize(idx, q, k=3, min_score=0.3)
    assert res.labels.tolist() == [3, "unknown"] and res.known.tolist() == [True, False]
    assert res.labels.dtype == object
    res = recognize(idx, q, k=3, min_score=0.3, unknown=-1)
    assert res.labels.tolist() == [3, -1] and res.labels.dtype.kind == "i"
    res = recognize(idx, q, k=3, min_score=0.2)  # equal to the best: accepted
    assert res.known.tolist() == [True, True]
    res = recognize(idx, q, k=3, min_score=0.3, labels=np.array(["x", "yy", "x"]))
    assert res.labels.tolist() == ["x", "unknown"]  # str dtype widened, not truncated
    with pytest.raises(ValueError, match="also a database label"):
        recognize(idx, q, k=3, labels=["unknown", "b", "c"])


class IdIndex(FixedIndex):
    """``search`` returns ids, ``search_rows`` row positions: labels follow the rows."""

    ids = np.array([100, 205, 307])

    def search(self, queries, k):
        raise AssertionError("search_rows must be preferred")

    def search_rows(self, queries, k):
        return self._scores[:, :k], self._idx[:, :k]


def test_index_rows_and_ids():
    idx = IdIndex(["a", "b", "b"], [[0.9, 0.5, 0.4, -np.inf]], [[0, 2, 1, -1]])
    res = recognize(idx, np.zeros((1, 2), np.float32), k=4)
    assert res.labels.tolist() == ["b"] and res.votes.tolist() == [2]
    assert res.neighbors.tolist() == [[0, 2, 1, -1]]
    assert res.neighbor_ids.tolist() == [[100, 307, 205, -1]]
    assert res.confidences.tolist() == [pytest.approx(2 / 3)]


def test_with_the_library_index(rng):
    index_mod = pytest.importorskip("pylandmark.retrieval.index")
    db = rng.standard_normal((19, 8)).astype(np.float32)
    labels = rng.choice(["x", "y", "z"], 19).tolist()
    q = rng.standard_normal((5, 8)).astype(np.float32)
    index = index_mod.Index(8)
    index.add(db, labels=labels)
    got = recognize(index, q, k=3)
    # the index keeps unit rows in float16: search the same matrix directly
    stored = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float16)
    want = recognize(stored, q, k=3, labels=labels)
    assert got.labels.tolist() == want.labels.tolist()
    np.testing.assert_array_equal(got.neighbors, want.neighbors)


def ref_winners(nb_labels, sims, errs, vote):
    """Plain loop over the neighbours: the labels a vote on scores within errs of sims may elect
    (majority: most votes, then the larger summed similarity; weighted: the larger sum), each
    label's sum known only to within the sum of its neighbours' errs, so where two labels' sums
    are that close either may win (as may the nearer-neighbour rule after them)."""
    stats = {}
    for lab, s, e in zip(nb_labels, sims, errs):
        n, total, err = stats.get(lab, (0, 0.0, 0.0))
        stats[lab] = (n + 1, total + s, err + e)
    if vote == "majority":
        top = max(n for n, _, _ in stats.values())
        cands = {lab: v for lab, v in stats.items() if v[0] == top}
    else:
        cands = stats
    floor = max(total - err for _, total, err in cands.values())
    return {lab: v for lab, v in cands.items() if v[1] + v[2] >= floor}


def test_matches_reference_on_plain_database(rng):
    from test_search import reference_scores, score_bounds

    n, d, q = 61, 13, 17
    db = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.choice(["cse", "hh", "rg", "wb"], n)
    queries = rng.standard_normal((q, d)).astype(np.float32)
    # float64 similarities from the descriptors, not from the search under test; the search's
    # float32 scores are within score_bounds of them (any summation order), and the votes add
    # them in float64 (exact enough: 2^-53)
    sims_all = reference_scores(queries, db, "cosine")
    errs_all = score_bounds(queries, db, "cosine")
    for k in (1, 4, 7):
        _, nb = plm.search(queries, db, k=k)
        for vote in ("majority", "weighted"):
            res = recognize(db, queries, k=k, vote=vote, labels=labels)
            for i in range(q):
                winners = ref_winners(labels[nb[i]].tolist(), sims_all[i, nb[i]], errs_all[i, nb[i]], vote)
                assert res.labels[i] in winners, (res.labels[i], winners)
                votes, total, err = winners[res.labels[i]]
                if vote == "majority":
                    assert res.confidences[i] == votes / k
                else:
                    assert abs(res.confidences[i] - total / k) <= err / k + (k + 1) * 2.0 ** -53
            np.testing.assert_array_equal(res.neighbors, nb)
    torch = pytest.importorskip("torch")
    res_t = recognize((torch.from_numpy(db), list(labels)), torch.from_numpy(queries), k=5)
    res_n = recognize(db, queries, k=5, labels=labels)
    assert res_t.labels.tolist() == res_n.labels.tolist()
    # the same search on the same values, the same votes: equal, not merely close
    np.testing.assert_array_equal(res_t.confidences, res_n.confidences)


def test_k_larger_than_database_votes_with_all_rows(rng):
    db = rng.standard_normal((3, 5)).astype(np.float32)
    res = recognize(db, db[1], k=6, labels=["a", "b", "b"])
    assert res.neighbors.shape == (1, 6) and (res.neighbors[0, 3:] == -1).all()
    assert res.neighbor_labels[0, 3:].tolist() == [None] * 3
    assert res.labels.tolist() == ["b"] and res.confidences[0] == pytest.approx(2 / 3)


def clusters(rng, n_classes=5, per_db=7, per_q=3, d=33, noise=0.15):
    centers = rng.standard_normal((n_classes, d))
    names = ["cse", "hh", "rg", "wb", "wjj"][:n_classes]
    db = np.concatenate([centers[c] + noise * rng.standard_normal((per_db, d))
                         for c in range(n_classes)]).astype(np.float32)
    db_labels = np.repeat(names, per_db)
    q = np.concatenate([centers[c] + noise * rng.standard_normal((per_q, d))
                        for c in range(n_classes)]).astype(np.float32)
    q_labels = np.repeat(names, per_q)
    return db, db_labels, q, q_labels, centers


def test_synthetic_landmarks_accuracy_and_gap(rng):
    db, db_labels, q, q_labels, centers = clusters(rng)
    res = recognize(db, q, k=5, labels=db_labels)
    m = ev.recognition_metrics(res, q_labels)
    assert m["accuracy"] == 1.0 and m["gap"] == 1.0 and m["n_unknown"] == 0
    # move one query onto another class: 14 of 15 right
    q[0] = centers[2]
    res = recognize(db, q, k=5, labels=db_labels)
    assert res.labels[0] == "rg"
    m = ev.recognition_metrics(res, q_labels)
    assert m["accuracy"] == pytest.approx(14 / 15)
    # GAP from the definition: sort by confidence, precision at each right answer
    order = np.argsort(-res.confidences, kind="stable")
    right = (res.labels == q_labels)[order]
    want = sum(right[: i + 1].mean() for i in range(15) if right[i]) / 15
    assert m["gap"] == pytest.approx(want)
    # a far-away query is rejected by min_score and counts as wrong
    q[1] = -centers.sum(0)
    res = recognize(db, q, k=5, labels=db_labels, min_score=0.5)
    assert res.labels[1] == "unknown" and res.known.sum() == 14
    assert ev.accuracy(res.labels, q_labels) == pytest.approx(13 / 15)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({}, ValueError, "labels is required"),
    ({"labels": ["a"] * 4}, ValueError, "labels has 4 entries"),
    ({"labels": ["a"] * 5, "vote": "mean"}, ValueError, "vote"),
    ({"labels": ["a"] * 5, "k": 0}, ValueError, "k must be"),
    ({"labels": ["a"] * 5, "k": 1.5}, TypeError, "k must be"),
    ({"labels": ["a"] * 5, "metric": "l1"}, ValueError, "metric"),
    ({"labels": ["a"] * 5, "min_score": "high"}, TypeError, "min_score"),
    ({"labels": np.zeros((5, 2))}, ValueError, "1-d"),
])
def test_bad_input(rng, kwargs, exc, pattern):
    db = rng.standard_normal((5, 3)).astype(np.float32)
    with pytest.raises(exc, match=pattern):
        recognize(db, db[:2], **kwargs)


def test_bad_database_arguments(rng):
    db = rng.standard_normal((5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="labels given twice"):
        recognize((db, ["a"] * 5), db, labels=["a"] * 5)
    with pytest.raises(TypeError, match="index_or_db"):
        recognize([[1.0, 2.0, 3.0]], db, labels=["a"])
    idx = FixedIndex(["a", "b"], [[0.5, 0.4]], [[0, 7]])
    with pytest.raises(ValueError, match="one entry per database row"):
        recognize(idx, db[:1], k=2)
