"""Revisited mAP / mP@k, AP, GAP and accuracy against plain-python references."""
from __future__ import annotations

import math
import pickle
import re
import time

import numpy as np
import pytest

from pylandmark.evaluate import metrics as ev

KAPPAS = (1, 5, 10)
PROTO_SETS = {  # protocol -> (positive keys, junk keys), as REFERENCE.md section 3 defines them
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


# ------------------------------------------------------------------------ plain references


def ref_query(ranking, ok, junk, kappas=KAPPAS):
    """One query, by the definitions: walk the ranking, skip junk, count positives."""
    ok, junk = set(int(i) for i in ok), set(int(i) for i in junk)
    if not ok:
        return None
    pos_ranks = []
    adjusted = 0
    for idx in ranking:
        idx = int(idx)
        if idx < 0:
            continue
        if idx in junk:
            continue
        if idx in ok:
            pos_ranks.append(adjusted)
        adjusted += 1
    ap = 0.0
    for j, r in enumerate(pos_ranks):
        before = 1.0 if r == 0 else j / r
        after = (j + 1) / (r + 1)
        ap += (before + after) / 2
    ap /= len(ok)
    prs = {}
    for k in kappas:
        if not pos_ranks:
            prs[k] = 0.0
            continue
        kq = min(max(pos_ranks) + 1, k)
        prs[k] = sum(1 for r in pos_ranks if r + 1 <= kq) / kq
    return ap, prs


def ref_revisited(ranks, gnd, kappas=KAPPAS):
    out = {}
    for proto, (ok_keys, junk_keys) in PROTO_SETS.items():
        aps, prs = [], {k: [] for k in kappas}
        per_q = []
        for q, g in enumerate(gnd):
            ok = [i for key in ok_keys for i in g[key]]
            junk = [i for key in junk_keys for i in g[key]]
            res = ref_query(ranks[q], ok, junk, kappas)
            per_q.append(res)
            if res is None:
                continue
            aps.append(res[0])
            for k in kappas:
                prs[k].append(res[1][k])
        out[proto] = {
            "map": sum(aps) / len(aps) if aps else math.nan,
            "mp": {k: (sum(v) / len(v) if v else math.nan) for k, v in prs.items()},
            "ap": [math.nan if r is None else r[0] for r in per_q],
            "pr": {k: [math.nan if r is None else r[1][k] for r in per_q] for k in kappas},
        }
    return out


def random_gnd(rng, n_db, n_q, empty_every=4):
    gnd = []
    for q in range(n_q):
        perm = rng.permutation(n_db)
        ne, nh, nj = rng.integers(0, 9, size=3)
        if q % empty_every == 1:
            ne = 0
        if q % empty_every == 2:
            nh = 0
        if q % (2 * empty_every) == 3:
            ne = nh = 0
        gnd.append({"easy": perm[:ne].tolist(), "hard": perm[ne:ne + nh].tolist(),
                    "junk": perm[ne + nh:ne + nh + nj].tolist(), "bbx": [0, 0, 1, 1]})
    return gnd


def assert_matches(got, want, kappas=KAPPAS):
    for proto in ev.PROTOCOLS:
        g, w = got[proto], want[proto]
        np.testing.assert_allclose(g["ap"], np.array(w["ap"], dtype=float), rtol=0, atol=1e-12)
        if math.isnan(w["map"]):
            assert math.isnan(g["map"])
        else:
            assert g["map"] == pytest.approx(w["map"], abs=1e-12)
        assert g["n_queries"] == sum(not math.isnan(a) for a in w["ap"])
        for k in kappas:
            np.testing.assert_allclose(g["pr"][k], np.array(w["pr"][k], dtype=float), atol=1e-12)
            if math.isnan(w["mp"][k]):
                assert math.isnan(g["mp"][k])
            else:
                assert g["mp"][k] == pytest.approx(w["mp"][k], abs=1e-12)


@pytest.fixture(scope="module")
def roxford(shared_data):
    with open(shared_data / "revisited" / "gnd_roxford5k.pkl", "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def rparis(shared_data):
    with open(shared_data / "revisited" / "gnd_rparis6k.pkl", "rb") as f:
        return pickle.load(f)


# ------------------------------------------------------------------------ against references


@pytest.mark.parametrize("n_db,n_q", [(97, 13), (1, 3), (251, 7)])
def test_full_rankings_match_reference(rng, n_db, n_q):
    for _ in range(3):
        gnd = random_gnd(rng, n_db, n_q)
        ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])
        assert_matches(ev.revisited(ranks, gnd), ref_revisited(ranks, gnd))


def test_truncated_and_padded_rankings_match_reference(rng):
    n_db, n_q = 131, 11
    gnd = random_gnd(rng, n_db, n_q)
    full = np.stack([rng.permutation(n_db) for _ in range(n_q)])
    for n in (1, 6, 23, 130):
        ranks = full[:, :n]
        assert_matches(ev.revisited(ranks, gnd), ref_revisited(ranks, gnd))
    # trailing -1 padding (as search pads k > N) counts as absent
    padded = np.concatenate([full[:, :17], -np.ones((n_q, 9), dtype=np.int64)], axis=1)
    assert_matches(ev.revisited(padded, gnd), ref_revisited(full[:, :17], gnd))


def test_other_kappas_and_int_types(rng):
    n_db, n_q = 59, 9
    gnd = random_gnd(rng, n_db, n_q)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)]).astype(np.int32)
    kappas = (3, 2, 50)
    assert_matches(ev.revisited(ranks, gnd, kappas=kappas), ref_revisited(ranks, gnd, kappas),
                   kappas)
    torch = pytest.importorskip("torch")
    got = ev.revisited(torch.from_numpy(ranks.astype(np.int64)), gnd)
    assert_matches(got, ref_revisited(ranks, gnd))
    got = ev.revisited(ranks.tolist(), gnd)
    assert_matches(got, ref_revisited(ranks, gnd))


def test_a_subset_of_protocols_gives_the_same_numbers(rng):
    n_db, n_q = 71, 8
    gnd = random_gnd(rng, n_db, n_q)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])
    full = ev.revisited(ranks, gnd)
    medium = ev.revisited(ranks, gnd, protocols=("medium",))
    assert list(medium) == ["medium"]
    assert_matches({p: medium["medium"] for p in ev.PROTOCOLS},
                   {p: ref_revisited(ranks, gnd)["medium"] for p in ev.PROTOCOLS})
    assert medium["medium"]["map"] == full["medium"]["map"]
    for bad in ((), ("medium", "extreme"), "medium"):
        with pytest.raises(ValueError, match="protocols"):
            ev.revisited(ranks, gnd, protocols=bad)


def test_small_label_chunks_give_same_answer(rng, monkeypatch):
    n_db, n_q = 83, 10
    gnd = random_gnd(rng, n_db, n_q)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])
    monkeypatch.setattr(ev, "_CHUNK_CELLS", 3 * (n_db + 1))  # 3 queries per chunk
    assert_matches(ev.revisited(ranks, gnd), ref_revisited(ranks, gnd))


# ------------------------------------------------------------------------ real ground truth


def test_known_answer_roxford_imlist_order(roxford):
    ranks = np.tile(np.arange(len(roxford["imlist"])), (len(roxford["qimlist"]), 1))
    res = ev.revisited(ranks, roxford["gnd"])
    assert round(100 * res["easy"]["map"], 4) == 0.9472
    assert round(100 * res["medium"]["map"], 4) == 1.7114
    assert round(100 * res["hard"]["map"], 4) == 0.8679
    # the two rOxford queries with an empty easy list are skipped under Easy only
    assert np.isnan(res["easy"]["ap"]).sum() == 2
    assert res["easy"]["n_queries"] == 68 and res["medium"]["n_queries"] == 70
    assert_matches(res, ref_revisited(ranks, roxford["gnd"]))


def test_rparis_random_ranking_matches_reference(rparis, rng):
    n = len(rparis["imlist"])
    ranks = np.stack([rng.permutation(n) for _ in range(len(rparis["qimlist"]))])
    assert_matches(ev.revisited(ranks, rparis["gnd"]), ref_revisited(ranks, rparis["gnd"]))


@pytest.mark.parametrize("proto", ev.PROTOCOLS)
def test_perfect_ranking_gives_one(roxford, rng, proto):
    ok_keys, junk_keys = PROTO_SETS[proto]
    n = len(roxford["imlist"])
    rows = []
    for g in roxford["gnd"]:
        ok = [i for key in ok_keys for i in g[key]]
        junk = [i for key in junk_keys for i in g[key]]
        rng.shuffle(ok)
        rest = np.setdiff1d(np.arange(n), ok + junk)
        rng.shuffle(rest)
        # junk interleaved with the positives must not matter
        head = list(ok) + list(junk)
        rng.shuffle(head)
        rows.append(np.array(head + list(rest)))
    res = ev.revisited(np.stack(rows), roxford["gnd"])
    assert res[proto]["map"] == 1.0
    assert all(v == 1.0 for v in res[proto]["mp"].values())


def test_timing_all_roxford_queries(roxford, rng):
    n = len(roxford["imlist"])
    ranks = np.argsort(rng.random((70, n)), axis=1)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        ev.revisited(ranks, roxford["gnd"])
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0, f"revisited() took {best:.3f} s on 70 x {n}"


# ------------------------------------------------------------------------ by hand


def one(easy=(), hard=(), junk=()):
    return [{"easy": list(easy), "hard": list(hard), "junk": list(junk)}]


def test_junk_before_and_between_positives():
    # ranking: junk, P, neg, junk, P  -> adjusted positive ranks 0 and 2
    gnd = one(easy=[1, 4], junk=[0, 3])
    res = ev.revisited(np.array([[0, 1, 2, 3, 4]]), gnd)["easy"]
    ap = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert res["map"] == pytest.approx(ap, abs=1e-15)
    # mP@k: 1-based ranks 1 and 3; kq = min(3, k)
    assert res["mp"] == {1: 1.0, 5: pytest.approx(2 / 3), 10: pytest.approx(2 / 3)}


def test_hard_images_are_junk_under_easy_and_positives_under_hard():
    gnd = one(easy=[2], hard=[0], junk=[1])
    res = ev.revisited(np.array([[0, 1, 2, 3]]), gnd)
    # Easy: 0 and 1 are junk, the easy image is first after removal
    assert res["easy"]["map"] == 1.0
    # Medium: positives at 0 and (2 - 1 junk) = 1
    assert res["medium"]["map"] == 1.0
    # Hard: the easy image is junk; hard image first
    assert res["hard"]["map"] == 1.0
    res = ev.revisited(np.array([[3, 2, 1, 0]]), gnd)
    assert res["easy"]["map"] == pytest.approx(((0 + 1 / 2) / 2) / 1)
    assert res["hard"]["map"] == pytest.approx((0 + 1 / 2) / 2)  # 3 ahead; 2, 1 junk -> rank 1


def test_empty_positive_lists_are_skipped():
    gnd = one(easy=[], hard=[2]) + one(easy=[0], hard=[])
    res = ev.revisited(np.array([[0, 1, 2], [0, 1, 2]]), gnd)
    assert np.isnan(res["easy"]["ap"][0]) and res["easy"]["ap"][1] == 1.0
    assert res["easy"]["map"] == 1.0 and res["easy"]["n_queries"] == 1
    # Hard: query 0's only positive at rank 2 -> (0 / 2 + 1 / 3) / 2; query 1 skipped
    assert np.isnan(res["hard"]["ap"][1]) and res["hard"]["map"] == pytest.approx(1 / 6)
    assert np.isnan(res["easy"]["pr"][1][0])


def test_all_queries_skipped_gives_nan():
    res = ev.revisited(np.array([[0, 1]]), one(easy=[1]))
    assert math.isnan(res["hard"]["map"]) and math.isnan(res["hard"]["mp"][5])
    assert res["hard"]["n_queries"] == 0 and res["easy"]["map"] == pytest.approx(0.25)


def test_truncated_ranking_missing_positives_add_zero():
    gnd = one(easy=[0, 7, 9])
    res = ev.revisited(np.array([[0, 1]]), gnd)["easy"]
    assert res["map"] == pytest.approx(1 / 3)
    assert res["mp"] == {1: 1.0, 5: 1.0, 10: 1.0}  # kq shrinks to the only ranked positive


def test_no_positive_in_truncated_ranking():
    res = ev.revisited(np.array([[1, 2, 3]]), one(easy=[5], junk=[2]))["easy"]
    assert res["map"] == 0.0 and res["mp"] == {1: 0.0, 5: 0.0, 10: 0.0}
    res = ev.revisited(np.zeros((1, 0), dtype=np.int64), one(easy=[5]))["easy"]
    assert res["map"] == 0.0


def test_compute_ap_matches_reference(rng):
    for _ in range(20):
        n_pos = int(rng.integers(1, 12))
        found = np.sort(rng.choice(40, size=int(rng.integers(0, n_pos + 1)), replace=False))
        ranking = np.arange(1000, 1040)  # negatives
        positives = list(range(100, 100 + n_pos))
        for j, r in enumerate(found):
            ranking[r] = positives[j]
        want = ref_query(ranking, positives, [])[0]
        assert ev.compute_ap(rng.permutation(found), n_pos) == pytest.approx(want, abs=1e-15)
    assert ev.compute_ap([0, 1, 2], 3) == 1.0
    with pytest.raises(ValueError, match="n_positives"):
        ev.compute_ap([0], 0)
    with pytest.raises(ValueError, match="n_positives"):
        ev.compute_ap([0, 1], 1)
    with pytest.raises(ValueError, match="distinct"):
        ev.compute_ap([1, 1], 2)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("ranks,gnd,exc,pattern", [
    (np.zeros((3, 4), dtype=np.int64), one(easy=[0]) * 2, ValueError, "rows but gnd"),
    (np.zeros((5, 2), dtype=np.int64), one(easy=[0]) * 2, ValueError, r"ranks\.T"),
    (np.zeros((1, 2), dtype=np.float32), one(easy=[0]), TypeError, "integer"),
    (np.zeros(3, dtype=np.int64), one(easy=[0]), ValueError, r"\(Q, n\)"),
    (np.array([[0, 1, 0]]), one(easy=[0]), ValueError, "more than once"),
    (np.array([[0, -1, 1]]), one(easy=[0]), ValueError, "-1"),
    (np.array([[0, -3]]), one(easy=[0]), ValueError, ">= 0"),
    (np.array([[0, 1]]), [{"easy": [0], "hard": []}], ValueError, "junk"),
    (np.array([[0, 1]]), one(easy=[0], junk=[0]), ValueError, "disjoint"),
    (np.array([[0, 1]]), one(easy=[-1]), ValueError, "negative"),
    (np.array([[0, 1]]), {"gnd": one(easy=[0]), "imlist": []}, TypeError, "cfg\\['gnd'\\]"),
])
def test_bad_input(ranks, gnd, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ev.revisited(ranks, gnd)


@pytest.mark.parametrize("kappas", [(0, 5), (1.5,), ("a",)])
def test_bad_kappas(kappas):
    with pytest.raises((ValueError, TypeError), match="kappas"):
        ev.revisited(np.array([[0]]), one(easy=[0]), kappas=kappas)


# ------------------------------------------------------------------------ table


def test_format_table_shows_percentages(rng):
    gnd = random_gnd(rng, 61, 9)
    ranks = np.stack([rng.permutation(61) for _ in range(9)])
    res = ev.revisited(ranks, gnd)
    text = ev.format_table(res, title="toy")
    lines = text.splitlines()
    assert lines[0] == "toy"
    assert lines[1].split() == ["mAP", "mP@1", "mP@5", "mP@10"]
    for line, proto in zip(lines[2:], ev.PROTOCOLS):
        cells = line.split()
        assert cells[0] == proto.capitalize()
        values = [float(c) for c in cells[1:]]
        want = [res[proto]["map"]] + [res[proto]["mp"][k] for k in KAPPAS]
        np.testing.assert_allclose(values, 100 * np.array(want), atol=0.005 + 1e-9)
    assert len(lines) == 5
    one_proto = {"medium": {"map": float("nan"), "mp": {1: 0.5}}}
    assert re.search(r"Medium\s+-\s+50\.0\b", ev.format_table(one_proto, digits=1))
    with pytest.raises(ValueError, match="protocols"):
        ev.format_table({"x": {}})


# ------------------------------------------------------------------------ GAP and accuracy


def ref_gap(pred, conf, truth, unknown="unknown"):
    """GLR challenge definition: sort predictions by confidence (stable), micro-AP over queries
    with a landmark."""
    m = sum(1 for t in truth if t is not None and t != unknown)
    items = [(c, i) for i, (p, c) in enumerate(zip(pred, conf)) if p is not None and p != unknown]
    items.sort(key=lambda ci: -ci[0])  # Python's sort is stable
    total, correct = 0.0, 0
    for n, (_, i) in enumerate(items, start=1):
        t = truth[i]
        if t is not None and t != unknown and pred[i] == t:
            correct += 1
            total += correct / n
    return total / m


def test_gap_by_hand():
    # sorted: a (right), b (wrong), c (right); third query has no prediction; M = 4
    pred = ["a", "b", "c", "unknown"]
    conf = [0.9, 0.8, 0.7, 0.95]
    truth = ["a", "x", "c", "d"]
    assert ev.gap(pred, conf, truth) == pytest.approx((1 / 1 + 2 / 3) / 4)
    # a query without a landmark: not counted in M, and its prediction is wrong
    truth2 = ["a", None, "c", "d"]
    assert ev.gap(pred, conf, truth2) == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert ev.gap(["a"], [1.0], ["a"]) == 1.0
    assert ev.gap(["unknown"], [1.0], ["a"]) == 0.0
    assert math.isnan(ev.gap(["a"], [1.0], [None]))


def test_gap_matches_reference_random(rng):
    labels = np.array(["cse", "hh", "rg", "wb", "wjj"])
    for _ in range(10):
        n = int(rng.integers(1, 40))
        truth = list(rng.choice(labels, n))
        pred = [t if rng.random() < 0.6 else str(rng.choice(labels)) for t in truth]
        for i in rng.choice(n, size=n // 5, replace=False):
            pred[i] = "unknown"
        conf = np.round(rng.random(n), 1)  # many ties
        assert ev.gap(pred, conf, truth) == pytest.approx(ref_gap(pred, conf, truth), abs=1e-12)
        acc = sum(p == t for p, t in zip(pred, truth)) / n
        assert ev.accuracy(pred, truth) == pytest.approx(acc)
        assert ev.accuracy(np.array(pred), np.array(truth)) == pytest.approx(acc)


def test_gap_and_accuracy_errors():
    with pytest.raises(ValueError, match="one entry per query"):
        ev.gap(["a"], [0.5, 0.4], ["a"])
    with pytest.raises(ValueError, match="finite"):
        ev.gap(["a"], [float("nan")], ["a"])
    with pytest.raises(ValueError, match="truth"):
        ev.accuracy(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="predictions"):
        ev.accuracy("ab", ["a", "b"])


def test_recognition_metrics_on_result_object():
    class R:
        labels = np.array(["a", "unknown", "b"], dtype=object)
        confidences = np.array([0.5, 0.9, 0.4])

    m = ev.recognition_metrics(R(), ["a", "b", "c"])
    assert m == {"accuracy": pytest.approx(1 / 3), "gap": pytest.approx(1 / 3), "n_queries": 3,
                 "n_unknown": 1}
    with pytest.raises(TypeError, match="Recognition"):
        ev.recognition_metrics(object(), ["a"])
