"""Numerical stability: no E[x^2] - E[x]^2 cancellation, exact float64."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, HOST_BACKENDS, LAYOUTS, close, make

import numbn
from numbn import _reference as ref


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,axis", [((64, 3, 32, 32), 1), ((16, 8, 32, 32), 1),
                                        ((64, 32, 32, 3), -1), ((4096, 2), 1)])
def test_large_mean_small_std(backend, shape, axis, rng, cpu_path):
    """SPEC: mean 1e4, std 1e-2 in float32 still normalises correctly."""
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    y, mean, invstd = numbn.batch_norm_forward(x, axis=axis, eps=0.0, backend=backend)
    y_ref, mean_ref, invstd_ref, var_ref, _ = ref.forward_train(x, eps=0.0, axis=axis)
    # The float32 values are quantised at 1e4 (ulp ~1e-3), so compare with the
    # float64 statistics of the same float32 values, not of the ideal ones.
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-4)
    np.testing.assert_allclose(y, y_ref, atol=1e-3)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx = numbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, backend=backend)[0]
    dx_ref = ref.backward(dy, x, mean, invstd, axis=axis)[0]
    # dx is of order invstd (~100) here: compare relative to its scale.
    np.testing.assert_allclose(dx / invstd.max(), dx_ref / invstd.max(), atol=1e-4)
    # The naive one-pass formula in float32 is far off here: the check can fail.
    x64 = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    naive = (x64 * x64).mean(0, dtype=np.float32) - x64.mean(0, dtype=np.float32) ** 2
    assert np.max(np.abs(naive - var_ref) / var_ref) > 0.1


def _moving(kind, n, c, rng):
    """``(n, c)`` values whose level moves along the reduction order."""
    r = np.arange(n, dtype=np.float64)[:, None]
    noise = rng.standard_normal((n, c))
    if kind == "ramp":
        return r * 10.0 + noise * 0.01
    if kind == "sorted":
        return np.sort(noise * 3.0 + 1.0, axis=0)
    # a step to a level far beyond the spread before it, with a tiny spread
    return np.where(r < n // 10, noise, 1e3 + noise * 1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kind", ["ramp", "sorted", "step"])
def test_statistics_of_moving_data(kind, axis, dtype, rng, cpu_path, monkeypatch):
    """The CPU kernels sum every block in one pass, shifted by a value near
    the mean (channels-last: the mean of the blocks before it; channel-major:
    the first block's probe, kept while the blocks stay near it), and fall
    back to two passes for a block whose mean is too far from that shift
    (channel-major: its mean then becomes the shift): data whose level moves
    along the batch keeps the reference's statistics to the dtype's tolerance."""
    from numbn import _config

    monkeypatch.setattr(_config, "CPU_BLOCK", 64)  # many blocks per channel
    monkeypatch.setattr(_config, "CPU_ROWS_BLOCK", 96)
    n, c = 6000, 3
    flat = _moving(kind, n, c, rng)
    # Reduction order: (N, H*W) per channel for NCHW, rows for channels-last.
    x = (flat.T.reshape(c, 40, 150).transpose(1, 0, 2) if axis == 1 else flat).astype(dtype)
    y, mean, invstd = numbn.batch_norm_forward(x, axis=axis, eps=0.0, backend="cpu")
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, eps=0.0, axis=axis)
    spread = 1.0 / invstd_ref
    close(mean / spread, mean_ref / spread, dtype)
    close(invstd * spread, np.ones(c), dtype)
    close(y, y_ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("outliers", ["one channel", "every channel"])
def test_first_block_probe_far_from_the_mean(outliers, axis, dtype, rng, cpu_path):
    """The CPU kernels shift a reduction's first block by the mean of a few
    values spread evenly over it (``numbn._cpu._PROBE`` of them, at
    ``j * n // _PROBE``). Here those values are outliers, so the shift lies
    far from the block's mean and the block is summed again from its own
    mean: one channel of 8 on its own (channels-last), or every channel at
    once. The shifted sums alone would lose about 9 bits to cancellation
    (float32 variance off by ~4e-5, measured); redone, the variance keeps
    float32 precision, checked here tighter than the usual tolerance."""
    n, c = 4096, 8  # one block per channel: _config.CPU_BLOCK, CPU_ROWS_BLOCK // c
    flat = rng.standard_normal((n, c))
    flat[np.arange(8) * n // 8, 5 if outliers == "one channel" else slice(None)] += 1e3
    # Reduction order: one run of n per channel for NCHW, rows for channels-last.
    x = (np.ascontiguousarray(flat.T)[None] if axis == 1 else flat).astype(dtype)
    y, mean, invstd = numbn.batch_norm_forward(x, axis=axis, eps=0.0, backend="cpu")
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, eps=0.0, axis=axis)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=2e-6 if dtype == np.float32 else 1e-12)
    close(mean * invstd_ref, mean_ref * invstd_ref, dtype)
    close(y, y_ref, dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_float64_exact(backend, rng):
    x = rng.standard_normal((16, 8, 9, 9)) * 1e3 + 1e6
    y, mean, invstd = numbn.batch_norm_forward(x, backend=backend)
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-14)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-10)
    np.testing.assert_allclose(y, y_ref, atol=1e-9)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,axis", [((64, 8, 16, 16), 1), ((64, 16, 16, 8), -1)])
def test_float64_large_mean_against_extended_precision(backend, shape, axis, rng):
    """Both host backends, the reference (the oracle) included, give the
    mean of float64 input of mean 1e4 and spread 1e-2 to within two units
    in its last place, and invstd to 1e-10, checked against long double:
    the reference's first mean alone, NumPy's element-by-element sum over
    the batch axis, was off by 5e-9 of the spread, about 27 units
    (``_reference.batch_stats``' corrected two-pass)."""
    x = 1e4 + 1e-2 * rng.standard_normal(shape)
    flat = np.moveaxis(x, axis, -1).reshape(-1, shape[axis]).astype(np.longdouble)
    m = flat.mean(axis=0)
    v = ((flat - m) ** 2).mean(axis=0)
    _, mean, invstd = numbn.batch_norm_forward(x, axis=axis, eps=0.0, backend=backend)
    assert (np.abs(mean - m) <= 2 * np.spacing(mean)).all()
    assert np.abs(invstd * np.sqrt(v) - 1).max() < 1e-10


@pytest.mark.parametrize("C", [1, 2, 3])
def test_small_c_split_over_threads(C, rng, tiny_tasks):
    """Small C with a large N*H*W splits each channel over tasks (merged by
    Chan's formula); the result must not depend on the split."""
    x = rng.standard_normal((8, C, 33, 17)) * 3 + 5
    y, mean, invstd = numbn.batch_norm_forward(x)
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x)
    close(y, y_ref, np.float64)
    close(mean, mean_ref, np.float64)


def test_thread_count_follows_numba(rng):
    import numba

    x = rng.standard_normal((16, 4, 64, 64)).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    for n in sorted({1, before}):
        numba.set_num_threads(n)
        results.append(numbn.batch_norm_forward(x)[0])
    numba.set_num_threads(before)
    close(results[0], results[-1], np.float32)


@pytest.mark.parametrize("shape", [(0, 8, 16), (0, 3, 16), (0, 8, 1), (1, 8, 0), (1, 3, 0)])
def test_kernels_take_an_empty_batch(shape, cpu_path):
    """SyncBatchNorm gives the kernels a rank's empty batch: no division by
    zero, empty outputs, zero sums."""
    from numbn import _cpu

    x = np.zeros(shape, np.float32)
    c = shape[1]
    m, a, t = np.zeros(c), np.ones(c), np.zeros(c)
    mean, var = _cpu.stats(x)
    assert np.isnan(var).all()
    out = np.empty_like(x)
    _cpu.normalize(x, m, a, t, False, out)
    assert _cpu.train_fused(x, a, t, 1e-5, False, out) is None
    assert _cpu.backward_fused(x, x, m, a, t, False, a, True, out) is None
    sums = _cpu.backward_sums(x, x, m, a, t, True)
    np.testing.assert_array_equal(sums, np.zeros((2, c)))
    _cpu.backward_apply(x, x, m, a, t, True, m, m, out)


def test_frozen_layer_takes_an_empty_batch():
    bn = numbn.BatchNorm(4).eval()
    y = bn(np.ones((0, 4, 3, 3), np.float32))  # numpy gives empty arrays zero strides
    assert y.shape == (0, 4, 3, 3)
    assert bn.backward(np.ones_like(y)).shape == y.shape
    np.testing.assert_array_equal(bn.grad_bias, np.zeros(4, np.float32))


@pytest.mark.parametrize("xdt", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("gdt", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((64, 8, 4, 4), 1), ((4, 5, 3), -1),
                                        ((300, 64), 1)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_backward_with_dy_of_another_float_dtype(xdt, gdt, shape, axis, layout, rng, cpu_path):
    """dy of any float dtype with x of any other (float64 dy with float32 x
    used to fail inside Numba): dx of x's dtype, as the float64 reference
    gives it to x's precision, through the functions and the layer."""
    x = make(rng, shape, xdt)
    dy = make(rng, shape, gdt, mean=0.0, std=1.0)
    if layout == "transposed":
        x, dy = LAYOUTS["transposed"](x), LAYOUTS["transposed"](dy)
    c = shape[axis]
    w = rng.standard_normal(c).astype(np.float32)
    _, mean, invstd = numbn.batch_norm_forward(x, w, axis=axis, backend="cpu")
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, backend="cpu")
    ex, ew, eb = numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, backend="numpy")
    assert dx.dtype == xdt and dw.dtype == np.float32
    scale = np.abs(ex).max() + 1  # dx is rounded to x's dtype
    close(dx, ex, xdt, scale=scale)
    close(dw, ew, xdt, scale=np.abs(ew).max() + 1)
    close(db, eb, xdt, scale=np.abs(eb).max() + 1)
    bn = numbn.BatchNorm(c, axis=axis, dtype=np.float32, backend="cpu")
    bn.weight[...] = w
    bn(x)
    close(bn.backward(dy), ex, xdt, scale=scale)


def test_float32_dy_with_float16_x_is_not_rounded(rng, cpu_path):
    """float32 dy with float16 x (mixed precision) reaches the kernels as
    float32: a dy of 1 plus noise of 1e-3, rounded to float16 first, lost
    the noise (dweight 2.4% off, dx wrong); the sums hold float32 accuracy."""
    x = make(rng, (64, 8, 16), np.float16)
    dy = (1 + 1e-3 * rng.standard_normal(x.shape)).astype(np.float32)
    _, mean, invstd = numbn.batch_norm_forward(x, backend="cpu")
    w = np.ones(8, np.float32)
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, w, backend="cpu")
    ex, ew, eb = numbn.batch_norm_backward(dy, x, mean, invstd, w, backend="numpy")
    close(dw, ew, np.float32, scale=10, err="dweight")
    close(db, eb, np.float32, scale=100, err="dbias")  # sums of 1024 values near 1
    close(dx, ex, np.float16, scale=np.abs(ex).max(), err="dx")


@pytest.mark.parametrize("shape,axis", [((131072, 2), 1), ((16384, 16), 1), ((8, 64, 64, 3), -1)])
def test_one_outlier_among_many_rows(shape, axis, rng, cpu_path):
    """One value of 1e6 among unit normals in a few columns of many rows:
    each column of a rows block is summed in one float32 accumulator, and
    with 16384 rows a block (C=2) the outlier's square swallowed the rest
    (invstd off by 3e-5 relative, y by 1e-2). Blocks of at most
    ``CPU_ROWS_BLOCK_MAX_ROWS`` rows keep the float32 results within their
    tolerance of the float64 reference, forward and backward."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[(0,) * len(shape)] = 1e6
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = numbn.batch_norm_forward(x, axis=axis, backend="cpu")
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, axis=axis)
    close(invstd, invstd_ref, np.float32, err="invstd")
    close(y, y_ref, np.float32, scale=np.abs(y_ref).max(), err="y")
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, np.ones(shape[axis], np.float32),
                                           axis=axis, backend="cpu")
    ex, ew, eb = ref.backward(dy, x, mean, invstd, np.ones(shape[axis]), True, axis)
    close(dw, ew, np.float32, scale=np.abs(ew).max(), err="dweight")
    close(db, eb, np.float32, scale=np.abs(eb).max(), err="dbias")
    close(dx, ex, np.float32, scale=np.abs(ex).max(), err="dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 3, 16, 60, 64, 100, 128, 129, 1024, 1029])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_rows_in_tiles(dtype, C, layout, activation, rng, cpu_path):
    """Short rows of a rows view are taken in flat tiles of whole rows
    (``numbn._cpu._TILE`` elements, several rows each when C is short; the
    rows of a block or task that fill no tile one by one): the backward's
    sums (without the ReLU) and the elementwise passes of the forward, the
    eval and the backward. Every C around the tile sizes, a row count that
    is no multiple of any tile's rows and spans several blocks; a strided
    view has no flat run and goes row by row. Long rows
    (``numbn._cpu._FOUR_ROWS_MIN_COLUMNS`` and more) have their backward
    sums taken four rows at a time, as the ReLU's are, each block's last
    rows one by one (71 rows of 1029 columns: four tasks of 17 or 18 rows)."""
    shape = (1037 if C < 1024 else 71, C)
    x = make(rng, shape, dtype)
    dy = make(rng, shape, dtype, mean=0.2, std=1.0)
    if layout == "sliced":
        x, dy = LAYOUTS["sliced"](x), LAYOUTS["sliced"](dy)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    got_f = numbn.batch_norm_forward(x, w, b, backend="cpu", activation=activation)
    want_f = numbn.batch_norm_forward(x, w, b, backend="numpy", activation=activation)
    for g, e in zip(got_f, want_f):
        close(g, e, dtype, scale=np.abs(e).max() + 1)
    got_e = numbn.batch_norm(x, rm, rv, w, b, backend="cpu", activation=activation)
    want_e = numbn.batch_norm(x, rm, rv, w, b, backend="numpy", activation=activation)
    close(got_e, want_e, dtype, scale=np.abs(want_e).max() + 1)
    _, mean, invstd = want_f
    got = numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b, backend="cpu",
                                    activation=activation)
    want = numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b, backend="numpy",
                                     activation=activation)
    for g, e in zip(got, want):
        close(g, e, dtype, scale=np.abs(e).max() + 1)


def _batch_sliced(a):
    """``a``'s values as every other sample of a larger array: runs along the
    inner axes stay dense, the view is not C-contiguous."""
    big = np.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype)
    big[::2] = a
    return big[::2]


@pytest.mark.parametrize("shape,axis", [((2, 33, 17, 16, 7), 1), ((4, 24, 30, 30), 1)])
def test_strided_view_as_accurate_as_contiguous(shape, axis, rng, cpu_path):
    """A channel-major view that is not C-contiguous but whose runs are dense
    (here a batch slice; F-ordered input too) is summed as contiguous input
    is, several float32 accumulators wide (``numbn._cpu._dense``): its
    statistics and the backward's sums keep the contiguous input's accuracy.
    Summed one element at a time into one float32 accumulator, as they were,
    the first case's invstd was 1.2e-6 off, its dbias 8.9e-7 (contiguous:
    1.4e-7 and 1.5e-7)."""
    x = (rng.standard_normal(shape) + 2.45).astype(np.float32)
    dy = (rng.standard_normal(shape) + 0.5).astype(np.float32)
    xs, dys = _batch_sliced(x), _batch_sliced(dy)
    assert not xs.flags.c_contiguous
    _, mean, invstd = numbn.batch_norm_forward(xs, axis=axis, backend="cpu")
    w = np.ones(shape[axis], np.float32)
    _, _, db = numbn.batch_norm_backward(dys, xs, mean, invstd, w, axis=axis, backend="cpu")
    rest = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean_ref, var_ref = x64.mean(axis=rest), x64.var(axis=rest)
    db_ref = dy64.sum(axis=rest)
    assert np.max(np.abs(mean - mean_ref) / np.sqrt(var_ref)) < 4e-7
    assert np.max(np.abs(invstd * np.sqrt(var_ref + 1e-5) - 1)) < 4e-7
    assert np.max(np.abs(db / db_ref - 1)) < 4e-7


@pytest.mark.parametrize("big_shape,axis,view", [
    ((12, 10, 10, 16), -1, lambda big: big[::2]),  # channels-last, every other sample
    ((4, 8, 12, 20), 1, lambda big: big[..., ::2]),  # a step in the innermost axis
    ((8, 8, 12, 20), 1, lambda big: big[::2, :, :, ::-2]),
    ((4, 6, 6, 32), -1, lambda big: big[..., ::2]),  # channels-last, every other channel
])
def test_views_without_dense_runs_are_copied_first(big_shape, axis, view, rng, cpu_path):
    """An input whose ``(outer, C, inner)`` view has no dense runs is copied
    in its own memory order first (``numbn.functional._dense_runs``): the
    results are those of its C-contiguous copy, bit for bit, and ``out=``
    of the same kind receives them."""
    shape = view(np.empty(big_shape)).shape
    x = view(rng.standard_normal(big_shape).astype(np.float32))
    dy = view(rng.standard_normal(big_shape).astype(np.float32))
    assert x.shape == shape and not x.flags.c_contiguous
    xc, dyc = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    y, mean, invstd = numbn.batch_norm_forward(x, axis=axis, backend="cpu")
    yc, mean_c, invstd_c = numbn.batch_norm_forward(xc, axis=axis, backend="cpu")
    np.testing.assert_array_equal(y, yc)
    np.testing.assert_array_equal(mean, mean_c)
    np.testing.assert_array_equal(invstd, invstd_c)
    grads = numbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, backend="cpu")
    grads_c = numbn.batch_norm_backward(dyc, xc, mean, invstd, axis=axis, backend="cpu")
    for g, gc in zip(grads, grads_c):
        np.testing.assert_array_equal(g, gc)
    out = view(np.zeros(big_shape, np.float32))
    rm, rv = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32) * 2
    numbn.batch_norm(x, rm, rv, training=False, axis=axis, backend="cpu", out=out)
    np.testing.assert_array_equal(out, numbn.batch_norm(xc, rm, rv, training=False, axis=axis,
                                                        backend="cpu"))
