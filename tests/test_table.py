"""The comparison table: backend x dtype x shape x axis x layout, each case
checked against the float64 reference (numbn._reference) with the
tolerances of conftest.TOL."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import DTYPES, HOST_BACKENDS, LAYOUTS, SHAPES, close, make

import numbn
from numbn import _reference as ref

CASES = [(b, d, s, a, lay) for b in HOST_BACKENDS for d in DTYPES for (s, a) in SHAPES
         for lay in LAYOUTS]


def _ids(case):
    b, d, s, a, lay = case
    return f"{b}-{np.dtype(d).name}-{'x'.join(map(str, s))}-axis{a}-{lay}"


@pytest.fixture(params=CASES, ids=[_ids(c) for c in CASES])
def case(request, rng, tiny_tasks, cpu_path):
    backend, dtype, shape, axis, layout = request.param
    c = shape[axis]
    x = LAYOUTS[layout](make(rng, shape, dtype))
    pdt = np.float32 if dtype == np.float16 else dtype  # float16: mixed precision
    w = make(rng, c, pdt, 1.0, 0.5)
    b = make(rng, c, pdt, 0.0, 0.5)
    dy = LAYOUTS[layout](make(rng, shape, dtype, 0.0, 1.0))
    return backend, dtype, x, axis, w, b, dy


def test_forward_train(case):
    backend, dtype, x, axis, w, b, _ = case
    x_before = x.copy()
    y, mean, invstd = numbn.batch_norm_forward(x, w, b, axis=axis, backend=backend)
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, w, b, 1e-5, axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    close(y, y_ref, dtype, err="y")
    close(mean, mean_ref, dtype, scale=2.0, err="mean")
    close(invstd, invstd_ref, dtype, err="invstd")
    np.testing.assert_array_equal(x, x_before)


def test_running_update(case):
    backend, dtype, x, axis, w, b, _ = case
    c = x.shape[axis]
    rm, rv = np.full(c, 0.3, np.float32), np.full(c, 1.7, np.float32)
    numbn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.25, axis=axis, backend=backend)
    mean, var, n = ref.batch_stats(x, axis)
    close(rm, 0.75 * 0.3 + 0.25 * mean, np.float32, err="running_mean")
    close(rv, 0.75 * 1.7 + 0.25 * var * n / (n - 1), np.float32, scale=4.0, err="running_var")


def test_eval(case):
    backend, dtype, x, axis, w, b, _ = case
    c = x.shape[axis]
    rm = np.linspace(-1, 1, c).astype(np.float32)
    rv = np.linspace(0.5, 2, c).astype(np.float32)
    y = numbn.batch_norm(x, rm, rv, w, b, training=False, axis=axis, backend=backend)
    close(y, ref.normalize(x, rm, rv, w, b, 1e-5, axis), dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward(case, training):
    backend, dtype, x, axis, w, b, dy = case
    if training:
        _, mean, invstd = numbn.batch_norm_forward(x, w, b, axis=axis, backend="numpy")
    else:
        c = x.shape[axis]
        mean = np.linspace(-1, 1, c).astype(np.float32)
        invstd = np.linspace(0.5, 2, c).astype(np.float32)
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                           axis=axis, backend=backend)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, training, axis)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    close(dx, dx_ref, dtype, scale=2.0, err="dx")
    # dweight and dbias are sums over N*H*W values: scale the tolerance with it.
    n = x.size // x.shape[axis]
    close(dw, dw_ref, dtype, scale=np.sqrt(n), err="dweight")
    close(db, db_ref, dtype, scale=np.sqrt(n), err="dbias")


@pytest.mark.parametrize("x_layout,dy_layout", [("contiguous", "fortran"),
                                                 ("contiguous", "cropped"),
                                                 ("transposed", "contiguous"),
                                                 ("sliced", "fortran")])
@pytest.mark.parametrize("axis", [1, -1])
def test_backward_dy_in_another_layout(x_layout, dy_layout, axis, rng, cpu_path):
    """``dy`` laid out unlike ``x`` is read through x's ``(outer, C, inner)``
    plan, whether x took the contiguous short cut or the general path."""
    x = LAYOUTS[x_layout](make(rng, (4, 3, 6, 5), np.float32))
    dy = LAYOUTS[dy_layout](make(rng, (4, 3, 6, 5), np.float32, 0.0, 1.0))
    _, mean, invstd = numbn.batch_norm_forward(x, axis=axis, backend="numpy")
    dx, _, _ = numbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, backend="cpu")
    close(dx, ref.backward(dy, x, mean, invstd, None, True, axis)[0], np.float32, scale=2.0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_out_may_be_x(backend, rng):
    x = make(rng, (6, 3, 5), np.float64)
    expected = numbn.batch_norm_forward(x.copy(), backend="numpy")[0]
    y = numbn.batch_norm(x, training=True, out=x, backend=backend)
    assert y is x
    close(x, expected, np.float64)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_out_any_layout(layout, rng):
    x = make(rng, (4, 3, 5, 6), np.float32)
    out = LAYOUTS[layout](np.zeros_like(x))
    y = numbn.batch_norm(x, training=True, out=out)
    assert y is out
    close(out, ref.forward_train(x)[0], np.float32)


@pytest.mark.parametrize("axis", [1, -1])
def test_output_keeps_memory_layout(axis, rng):
    shape = (2, 3, 4, 5) if axis == 1 else (2, 4, 5, 3)
    x = make(rng, shape, np.float32)
    if axis == -1:
        y = numbn.batch_norm_forward(x, axis=-1)[0]
        assert y.flags.c_contiguous
    xt = _channels_last_view(x) if axis == 1 else x
    y = numbn.batch_norm_forward(xt, axis=axis)[0]
    assert np.argsort(y.strides).tolist() == np.argsort(xt.strides).tolist()


def _channels_last_view(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def test_mixed_precision_float16_with_float32_parameters(rng):
    x = make(rng, (8, 4, 3, 3), np.float16)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    w, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    y = numbn.batch_norm(x, rm, rv, w, b, training=True)
    assert y.dtype == np.float16 and rm.dtype == np.float32
    close(y, ref.forward_train(x)[0], np.float16)
    _, mean, invstd = numbn.batch_norm_forward(x, w, b)
    assert mean.dtype == np.float32 and invstd.dtype == np.float32


def test_large_channel_count_and_tiny_batch(rng):
    x = make(rng, (2, 4096), np.float32)
    close(numbn.batch_norm_forward(x)[0], ref.forward_train(x)[0], np.float32)


def test_eval_empty_batch_returns_empty(rng):
    x = np.zeros((0, 3, 4), np.float32)
    y = numbn.batch_norm(x, np.zeros(3), np.ones(3))
    assert y.shape == x.shape


def test_one_channel_is_one_long_run():
    """C=1 must not become a million rows of one value (a 20x cliff, measured)."""
    from numbn._layout import Plan

    assert Plan.of(np.zeros((256, 1, 64, 64), np.float32), 1).dims == (1, 1, 256 * 64 * 64)
    assert Plan.of(np.zeros((8, 4, 4, 1), np.float32), 3).dims == (1, 1, 128)


@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (6, 7), (2, 1, 3, 4), (1, 5, 1, 1),
                                   (3, 4, 2, 1, 5), (2, 3, 0, 4)])
def test_contiguous_view_is_the_plans_view(shape):
    """The short cut for C-contiguous NumPy input (one reshape) gives the
    plan's own ``(outer, C, inner)`` view, on every axis, and declines where
    the plan differs (one channel: one long run) or there is nothing to view."""
    from numbn._layout import Plan, contiguous_view

    a = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    for axis in range(len(shape)):
        v = contiguous_view(a, axis)
        if shape[axis] < 2 or a.size == 0:
            assert v is None
            continue
        plan = Plan.of(a, axis)
        p = plan.view(a)
        assert plan.empty(a.dtype)[0].flags.c_contiguous  # its outputs: C order too
        assert v.shape == p.shape == plan.dims
        assert np.shares_memory(v, a) and np.array_equal(v, p)
    assert contiguous_view(np.asfortranarray(np.zeros((3, 4, 5))), 1) is None


@pytest.mark.parametrize("backend", [b for b in numbn.available_backends() if b != "cuda"])
def test_no_channels_in_eval(backend):
    """C = 0: an empty result in eval mode, as PyTorch gives (the reference's
    reshape(-1, 0) was ambiguous and raised)."""
    x, empty = np.ones((4, 0, 3), np.float32), np.zeros(0, np.float32)
    y = numbn.batch_norm(x, empty, empty.copy(), training=False, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_large_output_is_prefaulted_and_correct(rng, monkeypatch):
    from numbn import _config

    monkeypatch.setattr(_config, "CPU_PREFAULT_BYTES", 1024)
    x = make(rng, (4, 8, 32, 32), np.float32)
    close(numbn.batch_norm_forward(x)[0], ref.forward_train(x)[0], np.float32)
