"""Copies between memory orders (``numbn._cpu.copy_into``): a ``dy`` whose
memory order is not x's (F-ordered, channels-last, reversed, broadcast) is
copied into x's order in tiles, and the backward gives what it gives for a
``dy`` already in x's order."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make

import numbn
from numbn import _config, _cpu
from numbn._bench import MEMORY_ORDERS


@pytest.fixture
def tiled(monkeypatch):
    """Counts the launches of the tiled copy kernel, and lets small arrays take it."""
    monkeypatch.setattr(_config, "CPU_TILED_COPY_MIN", 64)
    seen = []
    real = _cpu._tile_copy.on

    def on(n):
        seen.append(n)
        return real(n)

    monkeypatch.setattr(_cpu._tile_copy, "on", on)
    return seen


def _sources(rng, dtype):
    """Views in orders other than C, each with whether the tiled kernel takes it."""
    a = make(rng, (5, 6, 7, 9), dtype)
    yield a.transpose(0, 2, 3, 1), True  # channels-last from NCHW memory
    yield np.asfortranarray(a), True
    yield a.transpose(3, 1, 2, 0)[::-1, :, ::2], True  # reversed and stepped
    yield make(rng, (3, 4, 5, 6, 7), dtype).transpose(4, 0, 2, 1, 3), True  # five axes
    yield make(rng, (9, 2, 3, 4, 5, 6), dtype).transpose(5, 4, 3, 2, 1, 0), False  # six
    yield np.broadcast_to(make(rng, (1, 7, 1), dtype), (40, 7, 30)).transpose(2, 1, 0), True
    yield a[:, ::2], False  # C order, sliced: NumPy's assignment
    yield make(rng, (300, 11), dtype).T, True  # 2-D


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_copy_into_equals_assignment(dtype, tiled):
    rng = np.random.default_rng(3)
    for k, (src, takes) in enumerate(_sources(rng, dtype)):
        before = len(tiled)
        dst = np.full(src.shape, np.nan, dtype)
        _cpu.copy_into(dst, src)
        np.testing.assert_array_equal(dst, src, err_msg=f"source {k}")
        assert (len(tiled) > before) == takes, k


def test_copy_into_other_dtypes_and_orders_take_assignment(tiled):
    """A conversion, or a destination that is not C-contiguous, is NumPy's
    assignment (the kernel moves bits into C order only)."""
    rng = np.random.default_rng(4)
    src = make(rng, (6, 7, 8), np.float32).transpose(2, 0, 1)
    for dst in (np.empty(src.shape, np.float64), np.empty(src.shape, np.float32, order="F")):
        _cpu.copy_into(dst, src)
        np.testing.assert_array_equal(dst, src.astype(dst.dtype))
    assert tiled == []


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("x_order,dy_order", [
    ("F", "C"), ("C", "F"), ("channels_last", "C"), ("C", "channels_last"), ("C", "reversed")])
def test_backward_with_dy_in_another_order(x_order, dy_order, dtype, tiled, cpu_path):
    """The backward of a ``dy`` in another memory order than x's: bit for
    bit that of the same ``dy`` in x's order, through the tiled copy."""
    rng = np.random.default_rng(5)
    shape = (6, 5, 7, 8)
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.0, 1.0)
    orders = {**MEMORY_ORDERS,
              "reversed": lambda a: np.ascontiguousarray(a[::-1, :, ::-1])[::-1, :, ::-1]}
    xs = orders[x_order](x)
    w = make(rng, 5, np.float32, 1.0, 0.5)
    _, mean, invstd = numbn.batch_norm_forward(xs, w)
    want = numbn.batch_norm_backward(orders[x_order](dy), xs, mean, invstd, w)
    kept = dy.copy()
    before = len(tiled)
    got = numbn.batch_norm_backward(orders[dy_order](dy), xs, mean, invstd, w)
    if dy_order != "reversed":
        assert len(tiled) > before
    np.testing.assert_array_equal(dy, kept)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)
    ref = numbn.batch_norm_backward(dy, x, mean, invstd, w, backend="numpy")
    tol = 2e-2 if dtype == np.float16 else 1e-4
    np.testing.assert_allclose(got[0].astype(np.float64), ref[0].astype(np.float64),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("x_order,out_order", [("channels_last", "C"), ("F", "C"), ("C", "F")])
def test_out_in_another_order(x_order, out_order, tiled):
    """``out=`` in another memory order than x's receives the result through
    the copy (tiled into a C-ordered ``out``), the same values as without it."""
    rng = np.random.default_rng(6)
    x = make(rng, (6, 5, 7, 8), np.float32)
    xs = MEMORY_ORDERS[x_order](x)
    rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
    for training in (True, False):
        want = numbn.batch_norm(xs, rm.copy(), rv.copy(), training=training)
        out = MEMORY_ORDERS[out_order](np.full(x.shape, np.nan, np.float32))
        before = len(tiled)
        got = numbn.batch_norm(xs, rm.copy(), rv.copy(), training=training, out=out)
        assert got is out
        assert (len(tiled) > before) == (out_order == "C")
        np.testing.assert_array_equal(got, want)
