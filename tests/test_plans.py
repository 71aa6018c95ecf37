"""Launch plans of the direct path's kernels (``numbn._cpu._plan``): made once
per array layout and thread count, dropped when a setting changes or the
process forks, and never the reason a result differs."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import make

import numbn
from numbn import _config, _cpu, functional
from numbn._layout import contiguous_view

#: Channels-last rows, channel-major rows (short runs), fused channel-major.
CASES = [((4, 6, 5, 16), -1), ((8, 6, 3, 2), 1), ((4, 6, 80), 1)]


def _calls(x, axis, dy, w, b):
    """Eval forward, training forward, backward: the three planned launches."""
    c = x.shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y_eval = numbn.batch_norm(x, rm, rv, w, b, False, axis=axis, backend="cpu")
    y, mean, invstd = numbn.batch_norm_forward(x, w, b, axis=axis, backend="cpu")
    grads = numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, backend="cpu")
    return (y_eval, y, mean, invstd, *grads)


@pytest.mark.parametrize("shape, axis", CASES)
def test_a_plan_serves_every_call_of_its_layout(rng, shape, axis):
    x, dy = make(rng, shape, np.float32), make(rng, shape, np.float32)
    c = shape[axis]
    w, b = make(rng, c, np.float32, 1.0, 0.5), make(rng, c, np.float32)
    first = _calls(x, axis, dy, w, b)
    kinds = sorted(key[0] for key in _cpu._plans)
    assert kinds == ["backward dense", "infer dense", "train dense"]
    plans = dict(_cpu._plans)
    other_x, other_dy = make(rng, shape, np.float32), make(rng, shape, np.float32)
    again = _calls(other_x, axis, other_dy, w, b)  # other data, same layout
    assert _cpu._plans == plans  # no new plan, the same plans
    _cpu._plans.clear()
    fresh = _calls(other_x, axis, other_dy, w, b)
    for got, want in zip(again, fresh):
        np.testing.assert_array_equal(got, want)
    assert not all(np.array_equal(p, q) for p, q in zip(first, again))


def test_a_setting_drops_the_plans(rng, monkeypatch):
    """A plan holds values computed from ``numbn._config``: assigning any
    setting (as ``monkeypatch`` does, and undoes) drops every plan, so the
    next call plans with the new value."""
    x = make(rng, (64, 32), np.float32)
    numbn.batch_norm_forward(x, backend="cpu")
    assert _cpu._plans
    monkeypatch.setattr(_config, "CPU_ROWS_BLOCK", 96)
    assert not _cpu._plans
    numbn.batch_norm_forward(x, backend="cpu")
    (plan,) = _cpu._plans.values()
    assert plan[6] == _cpu._block_rows(x) == 64  # planned with the new setting (512 before)
    monkeypatch.undo()
    assert not _cpu._plans


def test_plans_follow_the_thread_count(rng):
    """The calling thread's Numba thread count is part of a plan's key: the
    rows kernels split their rows into one task a thread."""
    x = make(rng, (4096, 16), np.float32)
    y = numbn.batch_norm_forward(x, backend="cpu")
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        y_one = numbn.batch_norm_forward(x, backend="cpu")
    finally:
        numba.set_num_threads(before)
    splits = sorted(plan[5] for plan in _cpu._plans.values())
    assert splits == sorted({1, _cpu._row_tasks(x.reshape(4096, 16, 1))})
    for a, b in zip(y, y_one):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_fork_drops_the_plans(rng):
    """A forked child plans anew: a plan holds the parent's choice of
    parallel or serial kernels (``numbn._cpu._after_fork``)."""
    numbn.batch_norm_forward(make(rng, (64, 32), np.float32), backend="cpu")
    assert _cpu._plans
    _cpu._after_fork()
    assert not _cpu._plans


def test_unaligned_output_gets_its_own_plan(rng, monkeypatch):
    """Alignment of the output is part of the key: an output at an odd byte
    offset is never given the streamed stores (they would fault) even after
    an aligned one of the same layout was."""
    monkeypatch.setattr(_config, "CPU_ROWS_STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 0)
    x = make(rng, (512, 16), np.float32)
    rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    aligned = numbn.batch_norm(x, rm, rv, training=False, backend="cpu")
    buf = np.zeros(x.nbytes + 1, np.uint8)
    out = buf[1:].view(np.float32).reshape(x.shape)
    assert not out.flags.aligned
    numbn.batch_norm(x, rm, rv, training=False, backend="cpu", out=out)
    np.testing.assert_array_equal(out, aligned)
    streams = sorted(plan[-1] for plan in _cpu._plans.values())
    assert streams == [False, True]


@pytest.mark.parametrize("shape, axis", [CASES[0], CASES[2]])
def test_gradients_in_weight_dtype_are_the_float64_ones_rounded(rng, shape, axis):
    """``backward_ready(..., grads=np.float32)`` rounds the float64 sums once,
    as ``astype`` would."""
    x, dy = make(rng, shape, np.float32), make(rng, shape, np.float32)
    x3, dy3 = contiguous_view(x, axis), contiguous_view(dy, axis)
    c = x3.shape[1]
    mean, inv, w = (make(rng, c, np.float32, m, 0.1) for m in (0.5, 0.4, 1.0))
    dx64, dx32 = np.empty_like(x3), np.empty_like(x3)
    dw64, db64 = _cpu.backward_ready(dy3, x3, mean, inv, w, w, False, True, dx64)
    dw32, db32 = _cpu.backward_ready(dy3, x3, mean, inv, w, w, False, True, dx32, np.float32)
    assert dw32.dtype == db32.dtype == np.float32 and dw64.dtype == np.float64
    np.testing.assert_array_equal(dw32, dw64.astype(np.float32))
    np.testing.assert_array_equal(db32, db64.astype(np.float32))
    np.testing.assert_array_equal(dx32, dx64)


@pytest.mark.parametrize("shape, axis", [CASES[0], CASES[2]])
def test_float16_x_with_float32_dy_has_a_plan_of_its_own(rng, shape, axis):
    """Mixed precision reaches the one-call backward with float32 dy beside
    float16 x (``numbn.functional._kernel_backward``): the dtype of dy is in
    the key, and only the float16 arrays are taken as their bits."""
    x = make(rng, shape, np.float16)
    w = np.ones(shape[axis], np.float32)
    _, mean, invstd = numbn.batch_norm_forward(x, w, axis=axis, backend="cpu")
    for gdt in (np.float16, np.float32):
        dy = make(rng, shape, gdt, 0.0, 1.0)
        got = numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, backend="cpu")
        want = numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, backend="numpy")
        for g, e in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(e, np.float64),
                                       rtol=3e-3, atol=3e-3 * (np.abs(e).max() + 1))
    # float16 dy takes the direct path (its key: shape, axis, x's dtype, dy's),
    # float32 dy the general path's backward_ready (shape, strides, dtype, dy's).
    dtypes = sorted(str(key[4] if key[0] == "backward dense" else key[5])
                    for key in _cpu._plans if key[0].startswith("backward"))
    assert dtypes == ["float16", "float32"]


def test_direct_plans_are_keyed_on_shape_and_axis(rng, monkeypatch):
    """The direct path plans by x's shape and channel axis (``_cpu.infer_dense``
    and its kin; C-contiguity, which the path checks, fixes the strides): one
    shape with its channels on different axes gets plans of its own for each
    axis, each giving what the general path gives; an input of a planned
    shape that is not C-contiguous takes the general path, also right."""
    shape = (6, 8, 8, 6)
    x, dy = make(rng, shape, np.float32), make(rng, shape, np.float32)
    axes = (1, 3, -1, 2)
    params = {a: (make(rng, shape[a], np.float32, 1.0, 0.5), make(rng, shape[a], np.float32))
              for a in axes}
    direct = {a: _calls(x, a, dy, *params[a]) for a in axes}
    assert sorted(key[2] for key in _cpu._plans) == sorted(axes * 3)
    assert {key[0] for key in _cpu._plans} == {"infer dense", "train dense", "backward dense"}
    xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert xt.shape == shape and not xt.flags.c_contiguous
    planned = set(_cpu._plans)
    for a in (1, 3):  # other kernels there: equal to float32 rounding
        for g, e in zip(_calls(xt, a, dy, *params[a]), direct[a]):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    assert not any(key[0].endswith("dense") for key in set(_cpu._plans) - planned)
    monkeypatch.setattr(functional, "_direct_channels", lambda x, axis, backend: 0)
    for a in axes:
        for g, e in zip(_calls(x, a, dy, *params[a]), direct[a]):
            np.testing.assert_array_equal(g, e)
