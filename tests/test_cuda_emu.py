"""Self-test of the host-side CUDA emulator (tests/cuda_emu/emu.h).

tests/cuda_emu/selftest.cpp is compiled with g++ into a shared library (cached by source hash) and
driven through ctypes; every result is checked against numpy and against the PTX ISA semantics
written out independently here (shfl.sync pseudo-code, mma.m16n8k16 / ldmatrix fragment tables).
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
GARBAGE32 = 0xA5A5A5A5

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the emulator uses Linux ucontext fibers")


def _nd(dtype):
    return np.ctypeslib.ndpointer(dtype=dtype, flags="C_CONTIGUOUS")


@pytest.fixture(scope="module")
def emu(emu_library):
    lib = emu_library("selftest.cpp")

    c_int, c_uint, c_char_p, P = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.POINTER
    f32, i32, u32, i64, f64, u16 = (_nd(np.float32), _nd(np.int32), _nd(np.uint32), _nd(np.int64),
                                   _nd(np.float64), _nd(np.uint16))
    sig = {
        "st_set_seed": (None, [ctypes.c_uint64]),
        "st_set_mode": (None, [c_int]),
        "st_tree": (c_int, [i32, c_int, c_int, c_int, i32, c_char_p, c_int]),
        "st_lane_shift": (c_int, [c_int, c_int, c_int, i32, c_char_p, c_int]),
        "st_block_sum": (c_int, [f32, c_int, c_int, c_int, c_int, f32, c_char_p, c_int]),
        "st_divergence": (c_int, [c_int, c_int, c_int, i32, c_char_p, c_int]),
        "st_bad_block_shape": (c_int, [c_char_p, c_int]),
        "st_outside_kernel": (c_int, [c_char_p, c_int]),
        "st_thread_idx_outside": (c_uint, []),
        "st_shuffles": (c_int, [c_int, c_int, c_int, c_int, c_uint, c_int, i32, i32, i32, i32, i64, f64,
                                u32, i32, i32, u32, i32, u32, i32, i32, i32, c_char_p, c_int]),
        "st_ldmatrix": (c_int, [c_int, c_int, u16, c_int, u32, c_char_p, c_int]),
        "st_mma_frag": (c_int, [c_int, u32, u32, f32, c_char_p, c_int]),
        "st_mma_tile": (c_int, [c_int, u16, u16, f32, f32, c_char_p, c_int]),
        "st_cp_async": (c_int, [u32, u32, u32, c_char_p, c_int]),
        "st_static_shared": (c_int, [c_int, c_int, i32, c_char_p, c_int]),
        "st_bench": (c_int, [c_int, c_int, c_int, u32, P(ctypes.c_double), c_char_p, c_int]),
        "st_misc": (c_int, [c_int, f32, i32, f32, c_char_p, c_int]),
        "st_hfma": (ctypes.c_float, [ctypes.c_float, ctypes.c_float, ctypes.c_float, c_int]),
        "st_half_to_float": (ctypes.c_float, [ctypes.c_uint16]),
        "st_bf16_to_float": (ctypes.c_float, [ctypes.c_uint16]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    yield lib
    lib.st_set_seed(0)
    lib.st_set_mode(0)


def call(fn, *args):
    """Calls an st_* function; returns the emulator's error message, or None on success."""
    err = ctypes.create_string_buffer(4096)
    rc = fn(*args, err, len(err))
    return err.value.decode() if rc else None


def ok(fn, *args):
    msg = call(fn, *args)
    assert msg is None, msg


# ----------------------------------------------------------------------------------------------
def test_half_and_bf16_host_conversions(emu):
    bits = np.arange(0, 1 << 16, 97, dtype=np.uint16)
    want_h = bits.view(np.float16).astype(np.float32)
    got_h = np.array([emu.st_half_to_float(int(b)) for b in bits], np.float32)
    np.testing.assert_array_equal(got_h[np.isfinite(want_h)], want_h[np.isfinite(want_h)])
    assert np.array_equal(np.isnan(got_h), np.isnan(want_h))
    want_b = (bits.astype(np.uint32) << 16).view(np.float32)
    got_b = np.array([emu.st_bf16_to_float(int(b)) for b in bits], np.float32)
    fin = np.isfinite(want_b)
    np.testing.assert_array_equal(got_b[fin], want_b[fin])


def test_hfma_host_fallback(emu, rng):
    for a, b, c in rng.integers(-64, 65, size=(20, 3)) / 8.0:
        want = np.float16(np.float16(a) * np.float16(b) + np.float16(c))
        assert emu.st_hfma(a, b, c, 0) == float(want)
        want_bf = _from_bits(_to_bits(np.array([a * b + c]), True), True)[0]  # a*b+c exact in f64
        assert emu.st_hfma(a, b, c, 1) == want_bf


# ------------------------------------------ reduction ------------------------------------------
def _block_sum(emu, x, blocks, threads, racy, seed):
    emu.st_set_seed(seed)
    try:
        out = np.zeros(blocks, np.float32)
        ok(emu.st_block_sum, x, x.size // blocks, blocks, threads, racy, out)
        return out
    finally:
        emu.st_set_seed(0)


@pytest.mark.parametrize("threads", [256, 1024])
def test_block_reduction_matches_numpy_under_every_schedule(emu, rng, threads):
    blocks, n = 3, 1000
    x = rng.standard_normal(blocks * n).astype(np.float32)
    want = x.reshape(blocks, n).astype(np.float64).sum(1)
    results = [_block_sum(emu, x, blocks, threads, 0, seed) for seed in (0, 1, 2, 12345)]
    for r in results:
        np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(r, results[0])  # race-free: identical bits under any order


def test_missing_syncthreads_is_exposed(emu, rng):
    blocks, threads, n = 3, 256, 1000
    x = rng.standard_normal(blocks * n).astype(np.float32)
    good = _block_sum(emu, x, blocks, threads, 0, 0)
    racy = [_block_sum(emu, x, blocks, threads, 1, seed) for seed in (0, 1, 2, 3)]
    # in-order scheduling lets warp 0 read the other warps' partials before they are written:
    # it sees the 0xA5 fill (-2.9e-16f) and loses 7/8 of the sum
    assert any(not np.array_equal(r, good) for r in racy)
    assert not np.allclose(racy[0], good, rtol=1e-3)


WARP_PRIORITY, RANDOM = 0, 1  # emu::ScheduleMode, as st_set_mode takes it
SEEDS = (0, 1, 2, 3, 7)


def _scheduled(emu, fn, *args, seed, mode=WARP_PRIORITY):
    emu.st_set_seed(seed)
    emu.st_set_mode(mode)
    try:
        ok(fn, *args)
    finally:
        emu.st_set_seed(0)
        emu.st_set_mode(WARP_PRIORITY)


def _tree(emu, x, threads, racy, seed, mode=WARP_PRIORITY):
    blocks = x.size // threads
    out = np.zeros((blocks, 32), np.int32)
    _scheduled(emu, emu.st_tree, x, blocks, threads, racy, out, seed=seed, mode=mode)
    return out


def _tree_ref(x, threads):
    """tree_kernel in numpy: level by level, list[w] = sort(list[w] + list[w + half])."""
    lists = x.reshape(-1, threads // 32, 32).astype(np.int64)
    while lists.shape[1] > 1:
        half = lists.shape[1] // 2
        lists = np.sort(lists[:, :half] + lists[:, half:], axis=2)
    return lists[:, 0]


@pytest.mark.parametrize("threads", [128, 256])  # trees of 2 and 3 levels
def test_warp_priority_exposes_a_missing_trailing_barrier_in_a_tree(emu, rng, threads):
    """A merge tree without the __syncthreads that ends each level (as in the search's
    merge_lists): at the next level a warp parks its list over a slot that a lower warp has not
    read yet. That needs the overwriting warp to finish a whole warp sort (15 shuffles) first, so
    only a schedule that lets one warp run ahead to its next __syncthreads shows it."""
    blocks = 3
    x = rng.integers(-(1 << 20), 1 << 20, size=blocks * threads).astype(np.int32)
    want = _tree_ref(x, threads)
    for seed in SEEDS:
        np.testing.assert_array_equal(_tree(emu, x, threads, 0, seed), want, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(_tree(emu, x, threads, 0, seed, RANDOM), want, err_msg=f"seed {seed}")
    racy = {seed: _tree(emu, x, threads, 1, seed) for seed in SEEDS}
    np.testing.assert_array_equal(racy[0], want)  # in order, every warp reads before it is overwritten
    caught = [seed for seed in SEEDS if not np.array_equal(racy[seed], want)]
    assert caught, "no warp-priority seed exposed the missing barrier"


def test_lane_order_within_a_warp_exposes_a_missing_syncwarp(emu):
    blocks, threads = 2, 64
    tid = np.arange(threads)
    want = np.tile(np.where(tid % 32 == 0, tid, tid - 1) * 3 + 1, blocks)
    for mode in (WARP_PRIORITY, RANDOM):
        for seed in SEEDS:
            out = np.zeros(blocks * threads, np.int32)
            _scheduled(emu, emu.st_lane_shift, blocks, threads, 0, out, seed=seed, mode=mode)
            np.testing.assert_array_equal(out, want)
        racy = []
        for seed in SEEDS:
            out = np.zeros(blocks * threads, np.int32)
            _scheduled(emu, emu.st_lane_shift, blocks, threads, 1, out, seed=seed, mode=mode)
            racy.append(out)
        np.testing.assert_array_equal(racy[0], want)  # in order, lane l - 1 always ran first
        assert all(not np.array_equal(r, want) for r in racy[1:]), mode


# ----------------------------------------- divergence -----------------------------------------
DIVERGENT = {
    1: ("divergent", "exited"),         # half the block skips __syncthreads and exits
    2: ("divergent __syncthreads",),    # half the block skips one __syncthreads
    3: ("divergent warp collective", "exited"),
    4: ("divergent warp collective", "__ballot_sync", "__shfl_xor_sync"),
    5: ("divergent barriers", "__syncthreads", "__shfl_xor_sync"),
    6: ("mask 0x0000ffff",),
    7: ("boom from thread 5",),
    8: ("not 16-byte aligned", "ldmatrix"),
    9: ("not inside the block's dynamic shared memory", "stack"),
    10: ("__trap",),
    11: ("divergent warp collective", "8 bytes", "4 bytes"),
    12: ("divergent", "exited"),
}


def _divergence(emu, variant, blocks=2, threads=128):
    out = np.zeros(blocks * threads, np.int32)
    return call(emu.st_divergence, variant, blocks, threads, out), out


@pytest.mark.parametrize("seed", [0, 7])
def test_correct_kernel_runs(emu, seed):
    emu.st_set_seed(seed)
    try:
        msg, out = _divergence(emu, 0)
    finally:
        emu.st_set_seed(0)
    assert msg is None, msg
    tid = np.tile(np.arange(128), 2)
    np.testing.assert_array_equal(out, tid + (tid ^ 1))


@pytest.mark.parametrize("variant", sorted(DIVERGENT))
@pytest.mark.parametrize("seed", [0, 3])
def test_errors_are_reported_and_launch_recovers(emu, variant, seed):
    emu.st_set_seed(seed)
    try:
        msg, _ = _divergence(emu, variant)
    finally:
        emu.st_set_seed(0)
    assert msg is not None, f"variant {variant} was not detected"
    assert msg.startswith("emu:"), msg
    for word in DIVERGENT[variant]:
        assert word in msg, msg
    # the emulator is reusable after an abandoned launch
    msg, _ = _divergence(emu, 0)
    assert msg is None, msg


def test_divergent_syncthreads_message_names_threads_and_site(emu):
    msg, _ = _divergence(emu, 2, blocks=1, threads=64)
    assert "thread 0 waits at __syncthreads (selftest.cpp:" in msg, msg
    assert "thread 32 reached __syncthreads (selftest.cpp:" in msg, msg


def test_launch_argument_checks(emu):
    assert "1-D blocks" in call(emu.st_bad_block_shape)
    assert "outside emu::launch" in call(emu.st_outside_kernel)
    assert emu.st_thread_idx_outside() == 0xFFFFFFFF


# ------------------------------------------ shuffles ------------------------------------------
def _ptx_shfl(mode: str, vals: np.ndarray, b: np.ndarray, width: int, exists: np.ndarray):
    """shfl.sync per the PTX ISA pseudo-code, with c as CUDA's __shfl*_sync pass it."""
    out = []
    c = ((32 - width) << 8) | (0 if mode == "up" else 0x1F)
    segmask, cval = (c >> 8) & 0x1F, c & 0x1F
    for lane in range(len(vals)):
        min_lane = lane & segmask
        max_lane = min_lane | (cval & ~segmask & 0x1F)
        bb = int(b[lane]) & 0xFFFFFFFF
        if mode == "up":
            j = lane - bb
            pval = j >= max_lane
        elif mode == "down":
            j = lane + bb
            pval = j <= max_lane
        elif mode == "bfly":
            j = lane ^ bb
            pval = j <= max_lane
        else:
            j = min_lane | (bb & 0x1F & ~segmask)
            pval = j <= max_lane
        if not pval:
            j = lane
        out.append(vals[j] if exists[j] else None)
    return out


@pytest.mark.parametrize("threads", [64, 48])
@pytest.mark.parametrize("width,src_mul,src_add,delta,xmask",
                         [(32, 7, 3, 3, 5), (32, -1, 40, 0, 33), (16, 3, -2, 5, 9), (8, 5, 1, 7, 9),
                          (4, 1, 2, 1, 3), (1, 1, 0, 1, 1)])
def test_shuffles_votes_and_reductions(emu, threads, width, src_mul, src_add, delta, xmask):
    n = threads
    arrs = {"idx": np.int32, "up": np.int32, "down": np.int32, "xr": np.int32, "idx64": np.int64,
            "xr_dbl": np.float64, "ballot": np.uint32, "any": np.int32, "all": np.int32, "radd": np.uint32,
            "rmin": np.int32, "rmax": np.uint32, "count": np.int32, "sand": np.int32, "sor": np.int32}
    o = {k: np.zeros(n, t) for k, t in arrs.items()}
    ok(emu.st_shuffles, n, width, src_mul, src_add, delta, xmask, *o.values())

    tid = np.arange(n)
    var = tid * 10 + 1
    v64 = (tid.astype(np.int64) << 40) | (tid + 7)
    vdbl = 0.5 + tid
    garbage_i32 = np.array(GARBAGE32, np.uint32).view(np.int32)
    garbage_i64 = np.array(0xA5A5A5A5A5A5A5A5, np.uint64).view(np.int64)
    for w0 in range(0, n, 32):
        lanes = np.arange(min(32, n - w0))
        exists = np.zeros(32, bool)
        exists[: len(lanes)] = True
        def pad(a):
            return np.concatenate([a, np.zeros(32 - len(a), a.dtype)])

        src = lanes * src_mul + src_add
        deltas, xmasks = np.full(32, delta), np.full(32, xmask)
        for mode, key, vals, b, garbage in [
            ("idx", "idx", var, src, garbage_i32),
            ("up", "up", var, deltas, garbage_i32),
            ("down", "down", var, deltas, garbage_i32),
            ("bfly", "xr", var, xmasks, garbage_i32),
            ("idx", "idx64", v64, src, garbage_i64),
            ("bfly", "xr_dbl", vdbl, xmasks, None),
        ]:
            seg = pad(vals[w0:w0 + len(lanes)])
            want = _ptx_shfl(mode, seg, pad(np.asarray(b)), width, exists)[: len(lanes)]
            got = o[key][w0:w0 + len(lanes)]
            for lane, (g, wv) in enumerate(zip(got, want)):
                if wv is None:  # read from a lane that does not exist (partial warp): garbage
                    if garbage is not None:
                        assert g == garbage, (key, lane)
                else:
                    assert g == wv, (key, lane, g, wv)
        t = tid[w0:w0 + len(lanes)]
        ballot = sum(1 << int(lane) for lane in lanes if t[lane] % 3 == 0)
        assert (o["ballot"][t] == ballot).all()
        assert (o["any"][t] == int((t == 33).any())).all()
        assert (o["all"][t] == int((t != 5).all())).all()
        assert (o["radd"][t] == t.sum()).all()
        assert (o["rmin"][t] == (100 - t).min()).all()
        assert (o["rmax"][t] == (t * 7 % 11).max()).all()
    assert (o["count"] == (tid % 5 == 0).sum()).all()
    assert (o["sand"] == 1).all()
    assert (o["sor"] == 1).all()


# ------------------------------------------ ldmatrix ------------------------------------------
@pytest.mark.parametrize("num,trans", [(4, 0), (2, 0), (1, 0), (4, 1), (2, 1)])
@pytest.mark.parametrize("stride", [8, 24])
def test_ldmatrix_fragments_follow_ptx_layout(emu, num, trans, stride):
    mats = np.arange(4 * 64, dtype=np.uint16).reshape(4, 8, 8) + 1000  # unique values
    smem = np.zeros((4, 8, stride), np.uint16)
    smem[:, :, :8] = mats
    out = np.zeros((32, 4), np.uint32)
    ok(emu.st_ldmatrix, num, trans, np.ascontiguousarray(smem.reshape(-1)), stride, out)
    for lane in range(32):
        row, col = lane >> 2, 2 * (lane % 4)  # "each thread receives a row fragment: 2 elements"
        for i in range(4):
            if i >= num:
                assert out[lane, i] == 0xDEADBEEF
                continue
            m = mats[i].T if trans else mats[i]
            want = int(m[row, col]) | (int(m[row, col + 1]) << 16)
            assert out[lane, i] == want, (lane, i, hex(out[lane, i]), hex(want))


# -------------------------------------------- mma --------------------------------------------
def _to_bits(x: np.ndarray, bf16: bool) -> np.ndarray:
    if not bf16:
        return x.astype(np.float16).view(np.uint16)
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def _from_bits(b: np.ndarray, bf16: bool) -> np.ndarray:
    if not bf16:
        return b.view(np.float16).astype(np.float64)
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _frag_a(Abits):
    """Multiplicand A (16x16) per the PTX table: 4 .b32 registers of 2 elements (low half first)."""
    regs = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        for i in range(8):
            row = group if (i < 2 or 4 <= i < 6) else group + 8
            col = tig * 2 + (i & 1) if i < 4 else tig * 2 + (i & 1) + 8
            regs[lane, i // 2] |= np.uint32(int(Abits[row, col]) << (16 * (i % 2)))
    return regs


def _frag_b(Bbits):
    """Multiplicand B (16 k x 8 n) per the PTX table: 2 .b32 registers."""
    regs = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        for i in range(4):
            row = tig * 2 + (i & 1) if i < 2 else tig * 2 + (i & 1) + 8
            regs[lane, i // 2] |= np.uint32(int(Bbits[row, group]) << (16 * (i % 2)))
    return regs


def _frag_c_index():
    """(row, col) of accumulator element c_i held by each lane."""
    idx = np.zeros((32, 4, 2), np.int64)
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        for i in range(4):
            idx[lane, i] = (group if i < 2 else group + 8, tig * 2 + (i & 1))
    return idx


def _small_dyadic(rng, shape):
    return rng.integers(-16, 17, size=shape) / 8.0  # exact in f16 and bf16; sums exact in f32


@pytest.mark.parametrize("bf16", [0, 1], ids=["f16", "bf16"])
@pytest.mark.parametrize("values", ["dyadic", "normal"])
def test_mma_fragments_follow_ptx_layout(emu, rng, bf16, values):
    if values == "dyadic":
        A, B = _small_dyadic(rng, (16, 16)), _small_dyadic(rng, (16, 8))
        C = rng.integers(-64, 65, size=(16, 8)) / 64.0
    else:
        A, B, C = rng.standard_normal((16, 16)), rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    Ab, Bb = _to_bits(A, bf16), _to_bits(B, bf16)
    Aq, Bq = _from_bits(Ab, bf16), _from_bits(Bb, bf16)
    C = C.astype(np.float32)
    cidx = _frag_c_index()
    d = np.ascontiguousarray(C[cidx[..., 0], cidx[..., 1]].astype(np.float32))  # (32, 4)
    ok(emu.st_mma_frag, bf16, _frag_a(Ab), _frag_b(Bb), d)
    D = np.full((16, 8), np.nan)
    D[cidx[..., 0], cidx[..., 1]] = d
    want = Aq @ Bq + C
    if values == "dyadic":
        np.testing.assert_allclose(D, want, rtol=1e-6, atol=0)
    else:
        tol = 1e-5 * (np.abs(Aq) @ np.abs(Bq) + np.abs(C))
        assert (np.abs(D - want) <= tol).all(), np.abs(D - want).max()


@pytest.mark.parametrize("bf16", [0, 1], ids=["f16", "bf16"])
def test_ldmatrix_cp_async_mma_tile(emu, rng, bf16):
    """End to end: cp.async -> shared -> ldmatrix_x4 (A and two n8 tiles of B) -> mma_16816."""
    A = _small_dyadic(rng, (16, 16))
    B = _small_dyadic(rng, (16, 16))  # [n][k]
    C = (rng.integers(-64, 65, size=(16, 16)) / 64.0).astype(np.float32)
    Ab, Bb = _to_bits(A, bf16), _to_bits(B, bf16)
    D = np.zeros((16, 16), np.float32)
    ok(emu.st_mma_tile, bf16, np.ascontiguousarray(Ab), np.ascontiguousarray(Bb), C, D)
    want = _from_bits(Ab, bf16) @ _from_bits(Bb, bf16).T + C
    np.testing.assert_allclose(D, want, rtol=1e-6, atol=0)


# ------------------------------------------ cp.async ------------------------------------------
def test_cp_async_is_deferred_until_wait(emu, rng):
    src0 = rng.integers(0, 1 << 20, size=32 * 4).astype(np.uint32)
    src1 = rng.integers(0, 1 << 20, size=32 * 4).astype(np.uint32)
    orig0 = src0.copy()
    rec = np.zeros((6, 32), np.uint32)
    ok(emu.st_cp_async, src0, src1, rec)
    t = np.arange(32)
    valid = t % 4 != 3
    assert (rec[0] == GARBAGE32).all(), "stage 0 visible before any wait"
    assert (rec[1] == GARBAGE32).all(), "stage 1 visible before any wait"
    # wait<1> retires group 0 only; the copy reads the source when performed (after the bump)
    np.testing.assert_array_equal(rec[2][valid], orig0[4 * t[valid]] + 1000)
    assert (rec[2][~valid] == 0).all(), "src-size 0 must zero-fill"
    assert (rec[3] == GARBAGE32).all(), "group 1 performed by wait<1>"
    np.testing.assert_array_equal(rec[4], src1[4 * t])
    assert rec[5, 0] == GARBAGE32, "a never-waited copy became visible"
    np.testing.assert_array_equal(src0[4 * t[valid]], orig0[4 * t[valid]] + 1000)


# ------------------------------------------ misc ------------------------------------------
def test_static_shared_is_shared_by_the_block(emu):
    out = np.zeros(3 * 64, np.int32)
    ok(emu.st_static_shared, 3, 64, out)
    np.testing.assert_array_equal(out, np.repeat((np.arange(3) + 1) * 10, 64))


def test_keywords_and_intrinsics(emu, rng):
    blocks, threads = 2, 64
    pairs = rng.integers(0, 100, size=(threads, 4)).astype(np.float32)
    out = np.zeros((blocks, threads, 8), np.int32)
    fsum = np.zeros(1, np.float32)
    ok(emu.st_misc, blocks, pairs, out, fsum)
    tid = np.arange(threads, dtype=np.uint64)
    def popc(v):
        return np.array([int(x).bit_count() for x in v])

    ffs = np.array([0] + [(int(t) & -int(t)).bit_length() for t in tid[1:]])
    want = np.stack([
        popc((tid * 2654435761) & 0xFFFFFFFF),
        ffs,
        tid,
        np.minimum(tid, 40) + np.maximum(-1, (tid % 32).astype(np.int64) - 30) + 3,
        np.full(threads, blocks * threads),
        np.full(threads, threads),
        pairs[:, 0] + pairs[:, 3],
        popc(0xF0F0F0F0F0 << (tid % 8)) + np.array([32 - int(t + 1).bit_length() for t in tid]),
    ], axis=1).astype(np.int64)
    for b in range(blocks):
        np.testing.assert_array_equal(out[b], want)
    assert fsum[0] == 0.5 * blocks * threads


def _bench_ref(threads: int, iters: int) -> np.ndarray:
    v = np.arange(threads, dtype=np.uint32)
    lane = np.arange(threads)
    for i in range(iters):
        m = 1 + (i & 15)
        v = v + v[lane ^ m]
        if i % 4 == 3:
            v = v ^ np.roll(v, -1)
    return v


@pytest.mark.parametrize("seed", [0, 99])
def test_many_barriers_lockstep(emu, seed):
    blocks, threads, iters = 8, 256, 200
    out = np.zeros(blocks * threads, np.uint32)
    secs = ctypes.c_double()
    emu.st_set_seed(seed)
    try:
        ok(emu.st_bench, blocks, threads, iters, out, ctypes.byref(secs))
    finally:
        emu.st_set_seed(0)
    np.testing.assert_array_equal(out.reshape(blocks, threads), np.tile(_bench_ref(threads, iters), (blocks, 1)))
    assert secs.value < 30
