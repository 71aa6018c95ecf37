"""Channel-major input with short runs (small H*W) taken by the rows kernels
as rows of C * H*W columns (numbn._cpu._row_views): the same results as the
channel-major kernels and the float64 reference, on every route through
the drivers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, close, make

import numbn
from numbn import _config, _cpu
from numbn import _reference as ref

#: (N, C, H, W): runs of 1x2, 2x2, 3x3 and 7x7 elements, one channel, and
#: more columns than the rows kernels' block (CPU_ROWS_BLOCK) holds.
SHAPES = [(64, 8, 1, 2), (33, 5, 2, 2), (9, 3, 3, 3), (12, 6, 7, 7), (40, 1, 4, 4),
          (3, 700, 4, 4)]


@pytest.fixture(params=["rows", "channel-major"])
def route(request, monkeypatch):
    """Short runs through the rows kernels (the default) or, with the
    threshold at 0, through the channel-major kernels."""
    if request.param == "channel-major":
        monkeypatch.setattr(_config, "CPU_ROWS_MAX_INNER", 0)
    return request.param


def _inputs(rng, shape, dtype):
    c = shape[1]
    pdt = np.float32 if dtype == np.float16 else dtype
    return (make(rng, shape, dtype), make(rng, c, pdt, 1.0, 0.5), make(rng, c, pdt, 0.0, 0.5),
            make(rng, shape, dtype, 0.0, 1.0))


def test_short_runs_take_the_rows_kernels():
    x3 = np.zeros((12, 6, 49), np.float32)
    views = _cpu._row_views(x3)
    assert views is not None and views[0].shape == (12, 6 * 49)
    assert np.shares_memory(views[0], x3)
    assert _cpu._row_views(np.zeros((12, 6, 64), np.float32)) is None  # long runs
    assert _cpu._row_views(np.zeros((2, 4096, 49), np.float32)) is None  # long rows
    assert _cpu._row_views(np.zeros((12, 6, 98), np.float32)[:, :, ::2]) is None  # no view


def test_elementwise_passes_take_rows_for_shorter_runs():
    """The eval and the two-pass normalisation read channel-major input as
    rows for runs shorter than ``CPU_ROWS_ELEMENTWISE_MAX_INNER`` only; the
    reductions up to ``CPU_ROWS_MAX_INNER``."""
    limit = _config.CPU_ROWS_ELEMENTWISE_MAX_INNER
    assert 1 < limit <= _config.CPU_ROWS_MAX_INNER
    longer, shorter = np.zeros((12, 6, limit)), np.zeros((12, 6, limit - 1))
    assert _cpu._row_views(longer, max_inner=limit) is None
    assert _cpu._row_views(longer) is not None
    assert _cpu._row_views(shorter, max_inner=limit) is not None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_against_the_reference(rng, tiny_tasks, route, shape, dtype, activation):
    x, w, b, dy = _inputs(rng, shape, dtype)
    x_before = x.copy()
    y, mean, invstd = numbn.batch_norm_forward(x, w, b, activation=activation, backend="cpu")
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, w, b, 1e-5, 1, activation)
    close(y, y_ref, dtype, err="y")
    close(mean, mean_ref, dtype, scale=2.0, err="mean")
    close(invstd, invstd_ref, dtype, err="invstd")

    c = shape[1]
    rm, rv = np.full(c, 0.3, np.float32), np.full(c, 1.7, np.float32)
    numbn.batch_norm(x, rm, rv, w, b, True, 0.25, activation=activation, backend="cpu")
    m, v, n = ref.batch_stats(x, 1)
    close(rm, 0.75 * 0.3 + 0.25 * m, np.float32, err="running_mean")
    close(rv, 0.75 * 1.7 + 0.25 * v * n / (n - 1), np.float32, scale=4.0, err="running_var")

    y = numbn.batch_norm(x, rm, rv, w, b, False, activation=activation, backend="cpu")
    close(y, ref.normalize(x, rm, rv, w, b, 1e-5, 1, activation), dtype, err="eval")

    for training in (True, False):
        grads = numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b, training=training,
                                          activation=activation, backend="cpu")
        want = ref.backward(dy, x, mean, invstd, w, training, 1, b, activation)
        for got, exp, name in zip(grads, want, ("dx", "dweight", "dbias")):
            close(got, exp, dtype, scale=2.0 if name == "dx" else np.sqrt(x.size / c),
                  err=f"{name} training={training}")
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True])
def test_two_pass_drivers_agree_across_routes(rng, tiny_tasks, monkeypatch, shape, relu):
    """The drivers that SyncBatchNorm and the general path call (statistics,
    normalisation, backward sums and apply), float64, on both routes."""
    x, w, b, dy = _inputs(rng, shape, np.float64)
    x3, dy3 = x.reshape(shape[0], shape[1], -1), dy.reshape(shape[0], shape[1], -1)
    c = shape[1]
    m, a, t = make(rng, c, np.float64), make(rng, c, np.float64, 1.0), make(rng, c, np.float64)
    bb, d = make(rng, c, np.float64), make(rng, c, np.float64)

    def run():
        y3, dx3 = np.empty_like(x3), np.empty_like(x3)
        mean, var = _cpu.stats(x3)
        _cpu.normalize(x3, m, a, t, relu, y3)
        sums = _cpu.backward_sums(dy3, x3, m, a, t, relu)
        _cpu.backward_apply(dy3, x3, m, a, t, relu, bb, d, dx3)
        return mean, var, y3, *sums, dx3

    rows = run()
    monkeypatch.setattr(_config, "CPU_ROWS_MAX_INNER", 0)
    channel_major = run()
    mean_ref, var_ref, _ = ref.batch_stats(x, 1)
    np.testing.assert_allclose(rows[0], mean_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rows[1], var_ref, rtol=1e-12)
    for r, cm in zip(rows, channel_major):
        np.testing.assert_allclose(r, cm, rtol=1e-11, atol=1e-11)


def test_large_mean_small_spread_in_short_runs():
    """The merge of a channel's columns keeps the shifted sums' accuracy: a
    mean of 1e4 with a spread of 1e-2, float32, in 2x2 runs."""
    rng = np.random.default_rng(7)
    x64 = 1e4 + 1e-2 * rng.standard_normal((256, 16, 2, 2))
    x = x64.astype(np.float32)
    y, mean, invstd = numbn.batch_norm_forward(x, backend="cpu")
    m, v, _ = ref.batch_stats(x, 1)
    np.testing.assert_allclose(1 / invstd.astype(np.float64) ** 2 - 1e-5, v, rtol=1e-4)
    np.testing.assert_allclose(mean, m, rtol=1e-7)
    close(y, ref.forward_train(x, None, None, 1e-5, 1)[0], np.float32)


@pytest.mark.parametrize("isplit", [1, 2, 3])
def test_task_span(isplit):
    """Elementwise task ``task`` covers part ``task % isplit`` of run
    ``task // isplit`` (rows in memory order); the tasks of a run tile it."""
    C, inner = 5, 7
    covered = np.zeros((3, C, inner), int)
    for task in range(3 * C * isplit):
        o, c, i0, i1 = _cpu._task_span(task, isplit, C, inner)
        assert (o, c) == divmod(task // isplit, C)
        covered[o, c, i0:i1] += 1
    assert (covered == 1).all()
