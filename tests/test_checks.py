"""The shared argument checks: one notion of "integer" and of "number", one message format, one
framework test and one to-numpy conversion for the whole package."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pylandmark as plm
from pylandmark._checks import ArgumentTypeError, check_int, check_number, framework_of, gem_p, to_numpy


@pytest.mark.parametrize("value", [4, np.int64(4), np.int32(4), np.uint8(4)])
def test_python_and_numpy_integers_pass(value):
    out = check_int(value, "batch_size", minimum=1)
    assert out == 4 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 4.0, np.float32(4), "4", None, [4], torch.tensor(4)])
def test_everything_else_is_not_an_int(value):
    with pytest.raises(ArgumentTypeError, match=r"^batch_size must be an int >= 1, got "):
        check_int(value, "batch_size", minimum=1)
    # the type error is both a TypeError and a ValueError (callers of either keep working)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


def test_int_ranges_and_messages():
    with pytest.raises(ValueError, match=r"^dim must be an int in \[1, 8\] or None, got 9$"):
        check_int(np.int64(9), "dim", minimum=1, maximum=8, none_ok=True)
    assert check_int(None, "dim", minimum=1, none_ok=True) is None
    with pytest.raises(ValueError, match=r"^qe_k must be an int >= 0, got -1 \(0 turns the step off\)$"):
        check_int(-1, "qe_k", minimum=0, hint=" (0 turns the step off)")
    with pytest.raises(ValueError, match=r"^n must be an int <= 3, got 4$"):
        check_int(4, "n", maximum=3)
    assert check_int(-5, "offset") == -5


def test_numbers():
    assert check_number(np.float32(0.5), "margin", minimum=0) == 0.5
    assert type(check_number(3, "lr", minimum=0, above=True)) is float
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got 0.0$"):
        check_number(0, "lr", minimum=0, above=True)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite number"):
            check_number(bad, "margin", minimum=0)
    with pytest.raises(ArgumentTypeError, match="margin must be a finite number >= 0"):
        check_number(True, "margin", minimum=0)
    with pytest.raises(ArgumentTypeError, match="image_size must be a finite number >= 1 or None"):
        check_number("1024", "image_size", minimum=1, none_ok=True)


def test_gem_p_accepts_numbers_and_one_element_tensors():
    assert gem_p(3) == 3.0 and gem_p(torch.tensor([2.5])) == 2.5 and gem_p(np.full((1, 1), 4.0)) == 4.0
    with pytest.raises(ValueError, match="1-element"):
        gem_p(torch.ones(2))
    with pytest.raises(ValueError, match="p must be a finite number > 0"):
        gem_p(torch.tensor(-1.0))


def test_framework_of_and_to_numpy():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = torch.from_numpy(a)
    assert [framework_of(x) for x in (a, t, [1, 2], 3)] == ["numpy", "torch", "other", "other"]
    np.testing.assert_array_equal(to_numpy(t.requires_grad_(False) * 1, "x"), a)
    # bfloat16 has no numpy dtype: it is read as float32 (exact, every bfloat16 is a float32)
    b = torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16)
    got = to_numpy(b, "x")
    assert got.dtype == np.float32 and np.array_equal(got, b.float().numpy())
    assert to_numpy([1, 2], "ids", np.int64).dtype == np.int64
    with pytest.raises(ArgumentTypeError, match="x must be an array of float64"):
        to_numpy([[1.0], [2.0, 3.0]], "x", np.float64)


def test_public_functions_share_one_notion_of_integer(tmp_path):
    """The issue's example: numpy integers now pass everywhere an int is asked for."""
    db = np.eye(4, dtype=np.float32)
    s_py, i_py = plm.search(db[:2], db, k=2)
    s_np, i_np = plm.search(db[:2], db, k=np.int64(2))
    np.testing.assert_array_equal(i_py, i_np)
    assert plm.Index(np.int64(4)).dim == 4
    # k is also bounded above (the native kernels index with 32-bit k)
    with pytest.raises(TypeError, match=r"k must be an int in \[1, 2147483647\], got 2.0"):
        plm.search(db, db, k=2.0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 2147483647\], got 0"):
        plm.search(db, db, k=0)
    from pylandmark.retrieval.recognition import recognize

    res = recognize((db, ["a", "b", "c", "d"]), db[:1], k=np.int64(1))
    assert list(res.labels) == ["a"]
