"""Checks shared by the GPU search tests and the emulated GPU search tests: a float64
reference built from the very values searched, and what an exact top-k result must satisfy."""
from __future__ import annotations

import numpy as np
import torch

import pylandmark as plm

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # plm::DType, for the emulator libraries


def make(rng, shape, dtype, device="cuda"):
    """Random unit-norm rows (last axis), rounded to dtype, on device."""
    x = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)), dim=-1)
    return x.to(device=device, dtype=getattr(torch, dtype))


def make_db(rng, shape, dtype, metric="cosine", device="cuda"):
    """Unit rows for inner product; for cosine, rows of norms 0.25 .. 4, so that a wrong row norm
    changes the ranking."""
    db = make(rng, shape, dtype, "cpu")
    if metric == "cosine":
        scale = torch.from_numpy(2.0 ** rng.uniform(-2, 2, size=(shape[0], 1))).float()
        db = (db.float() * scale).to(db.dtype)
    return db.to(device)


def tolerance(qdtype, dbdtype):
    """Absolute score tolerance for unit-norm rows; float32 queries against a bfloat16 db get more."""
    return 3e-5 if (qdtype, dbdtype) == ("float32", "bfloat16") else 1e-5


def reference(q, db, metric):
    """(Q, N) float64 scores on the CPU from the same values; cosine scores zero vectors 0."""
    q = q.detach().cpu().double().reshape(-1, db.shape[1])
    db = db.detach().cpu().double()
    if metric == "cosine":
        q, db = unit(q), unit(db)
    return q @ db.T


def unit(x):
    """Rows divided by their norm; zero rows stay zero."""
    n = x.norm(dim=1, keepdim=True)
    return x / n.masked_fill(n == 0, 1)


def check(scores, idx, ref, k, atol):
    """(Q, k) results against (Q, N) float64 reference scores: the exact top-k up to near-ties."""
    Q, N = ref.shape
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert tuple(scores.shape) == tuple(idx.shape) == (Q, k)
    s, i = scores.cpu().double(), idx.cpu()
    kk = min(k, N)
    assert (i[:, kk:] == -1).all() and torch.isneginf(s[:, kk:]).all(), "padding beyond N"
    s, i = s[:, :kk], i[:, :kk]
    assert ((i >= 0) & (i < N)).all(), "index out of range"
    assert (i.sort(dim=1).values.diff(dim=1) != 0).all(), "duplicate indices"
    torch.testing.assert_close(s, ref.gather(1, i), atol=atol, rtol=0, msg="scores of the returned rows")
    assert (s.diff(dim=1) <= 0).all(), "not best first"
    assert (i.diff(dim=1)[s.diff(dim=1) == 0] > 0).all(), "equal scores not in index order"
    best = ref.topk(kk, dim=1).values
    assert (s >= best[:, -1:] - atol).all(), "a better row was missed"
    torch.testing.assert_close(s, best, atol=atol, rtol=0, msg="j-th score is not the true j-th best")


def check_matches_cpu(q, db, idx, ref, k, metric, atol):
    """The CPU kernel on .cpu() copies returns the same rows, except where the reference scores of
    the two rows are within 2 * atol (each side may err by atol)."""
    _, cpu_idx = plm.search(q.detach().cpu(), db.detach().cpu(), k=k, metric=metric)
    gpu_idx, cpu_idx = idx.cpu().reshape(-1, k), cpu_idx.reshape(-1, k)
    near = (ref.gather(1, gpu_idx.clamp(min=0)) - ref.gather(1, cpu_idx.clamp(min=0))).abs() <= 2 * atol
    assert ((gpu_idx == cpu_idx) | near).all(), "GPU and CPU disagree on well-separated rows"
