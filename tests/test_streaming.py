"""Non-temporal stores (numbn._cpu._stream_line, _stream_apply_line): large
outputs are written a cache line at a time past the cache. The streamed
kernels must give what the ordinary ones give, to the bit, for every dtype, the
fused ReLU (its boundary and NaN included), outputs at any alignment, and
every kernel that streams, channel-major and rows (channels last): the
fused training forward and backward, the two-pass normalisation and apply,
and the eval forward."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, close, make

import numbn
from numbn import _config, _cpu
from numbn import _reference as ref

#: (shape, channel axis). Channel-major (N, C, L): channel slabs fused
#: (C >= 4), two-pass (C < 4), runs shorter than a cache line (the rows
#: kernels take those), runs of several lines with a partial one at each end.
#: Channels last, the rows kernels: rows of whole lines (64 channels), rows
#: of several lines with partial ones at their ends (130), rows shorter than
#: a line (20), and lines that span several rows (7).
SHAPES = [((4, 8, 1000), 1), ((5, 3, 901), 1), ((3, 6, 11), 1), ((2, 16, 515), 1),
          ((37, 64), 1), ((5, 7, 48), -1), ((4, 33, 130), -1), ((3, 5, 20), -1),
          ((50, 3, 7), -1)]


def _id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + ("" if axis == 1 else "-last")


def _both(monkeypatch, call):
    """``call()`` with ordinary stores, then with every output streamed."""
    thresholds = _config.STORE_THRESHOLDS
    for name in thresholds:
        monkeypatch.setattr(_config, name, 1 << 62)
    plain = call()
    for name in thresholds:
        monkeypatch.setattr(_config, name, 0)
    return plain, call()


def _inputs(rng, shape, axis, dtype):
    x = make(rng, shape, dtype)
    x.flat[::53] = np.nan
    c = shape[axis]
    pdt = np.float32 if dtype == np.float16 else dtype
    return x, make(rng, c, pdt, 1.0, 0.5), make(rng, c, pdt, 0.0, 0.5)


@pytest.mark.parametrize("case", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_forward_streamed_as_stored(rng, monkeypatch, case, dtype, activation, training,
                                    offset):
    shape, axis = case
    x, w, b = _inputs(rng, shape, axis, dtype)
    c = shape[axis]
    rm, rv = make(rng, c, w.dtype, 0.0, 1.0), make(rng, c, w.dtype, 2.0, 0.5)
    buf = np.empty(x.size + offset, dtype)  # an output at any alignment

    def run():
        out = buf[offset:].reshape(shape)
        numbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training, activation=activation,
                         axis=axis, out=out, backend="cpu")
        return out.copy()

    plain, streamed = _both(monkeypatch, run)
    np.testing.assert_array_equal(streamed, plain)
    assert np.isnan(streamed).any()


@pytest.mark.parametrize("case", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward_streamed_as_stored(rng, monkeypatch, case, dtype, activation, training):
    shape, axis = case
    x, w, b = _inputs(rng, shape, axis, dtype)
    x = np.nan_to_num(x)
    dy = make(rng, shape, dtype, 0.0, 1.0)
    _, mean, invstd = numbn.batch_norm_forward(x, w, b, axis=axis, backend="cpu")
    # Inputs exactly at the ReLU's boundary, x_hat * w + b == 0: bias 0 and
    # x equal to a mean that x's dtype holds exactly.
    mean = mean.astype(dtype).astype(mean.dtype)
    b[0] = 0
    np.moveaxis(x, axis, 1)[:, 0][..., ::7] = mean[0]

    def run():
        return numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b, training=training,
                                         activation=activation, axis=axis, backend="cpu")

    plain, streamed = _both(monkeypatch, run)
    # dx to the bit: every loop and the streamed lines round its two
    # multiply-adds alike (numbn._cpu._fma).
    for got, want in zip(streamed, plain):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("offset", range(9))
@pytest.mark.parametrize("n", [0, 3, 40, 200])
def test_lines_split_a_run_at_cache_lines(dtype, offset, n):
    buf = np.zeros(n + offset + 64, dtype)
    yr = _cpu._bits(buf[offset:offset + n])  # float16 as the kernels see it
    head, body, line = _cpu._lines(yr)
    assert line * yr.itemsize == 64
    assert 0 <= head <= body <= n and (body - head) % line == 0
    assert n - body < line or head == n
    if body > head:
        assert (yr.ctypes.data + head * yr.itemsize) % 64 == 0
    assert head < line


def test_streaming_threshold(monkeypatch):
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 4096)
    x3 = np.empty((2, 4, 128), np.float32)
    assert _cpu._stream(x3, x3)
    assert not _cpu._stream(x3[:, :, :127])
    strided = np.empty((2, 4, 256), np.float32)[:, :, ::2]
    assert not _cpu._stream(x3, strided) and not _cpu._stream(strided)
    rows = np.empty((8, 128), np.float32)  # a rows view: streamed as one run
    assert _cpu._stream(rows, rows[:, :])
    assert not _cpu._stream(np.empty((16, 128))[::2])  # rows apart
    assert not _cpu._stream(rows, np.empty((8, 256), np.float32)[:, ::2])
    # A rows view streams from a size of its own when that is less.
    monkeypatch.setattr(_config, "CPU_ROWS_STREAM_MIN_BYTES", 2048)
    assert _cpu._stream(np.empty((4, 128), np.float32)) and not _cpu._stream(rows[:3])
    assert not _cpu._stream(np.empty((2, 2, 128), np.float32))  # channel-major: 4096
    monkeypatch.setattr(_config, "CPU_ROWS_STREAM_MIN_BYTES", 1 << 62)
    assert _cpu._stream(rows)  # 4096 still
    # What processes sharing the cache write counts too (SyncBatchNorm's ranks).
    small = x3[:1]
    assert not _cpu._stream(small, small)
    assert _cpu._stream(small, small, shared=4096)
    assert not _cpu._stream(small, small, shared=4095)
    assert not _cpu._stream(strided[:1], shared=4096)  # still whole vectors only


def test_slab_streaming_threshold(monkeypatch):
    """The one-task-per-channel kernels stream from a size of their own,
    for runs long enough; shorter runs wait for the general threshold."""
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 1 << 62)
    monkeypatch.setattr(_config, "CPU_SLAB_STREAM_MIN_BYTES", 4096)
    monkeypatch.setattr(_config, "CPU_SLAB_STREAM_MIN_RUN_BYTES", 448)
    long_runs = np.empty((2, 8, 112), np.float32)  # 448-byte runs, 7168 bytes
    assert _cpu._stream_slabs(long_runs, long_runs)
    assert not _cpu._stream_slabs(long_runs[:, :4], long_runs[:, :4])  # 3584 bytes
    assert not _cpu._stream(long_runs, long_runs)  # the general threshold: not yet
    short_runs = np.empty((2, 8, 111), np.float32)
    assert not _cpu._stream_slabs(short_runs, short_runs)
    strided = np.empty((2, 8, 224), np.float32)[:, :, ::2]
    assert not _cpu._stream_slabs(long_runs, strided)  # still whole vectors only
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 4096)
    assert _cpu._stream_slabs(short_runs, short_runs)  # as _stream from there


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("inner, streamed", [(112, True), (111, False)])
def test_fused_kernels_stream_from_slab_threshold(rng, monkeypatch, op, inner, streamed):
    """The fused training forward and backward ask :func:`_cpu._stream_slabs`
    and stream what it allows below the general threshold, with the
    ordinary stores' results."""
    x = make(rng, (6, 8, inner), np.float32)
    dy = make(rng, x.shape, np.float32)
    w, b = make(rng, 8, np.float32, 1.0, 0.5), make(rng, 8, np.float32)
    _, mean, invstd = numbn.batch_norm_forward(x, w, b, backend="cpu")
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 1 << 62)
    monkeypatch.setattr(_config, "CPU_SLAB_STREAM_MIN_RUN_BYTES", 448)
    asked = []
    judge = _cpu._stream_slabs
    monkeypatch.setattr(_cpu, "_stream_slabs", lambda *a: asked.append(judge(*a)) or asked[-1])

    def run():
        if op == "forward":
            return numbn.batch_norm_forward(x, w, b, backend="cpu")
        return numbn.batch_norm_backward(dy, x, mean, invstd, w, backend="cpu")

    monkeypatch.setattr(_config, "CPU_SLAB_STREAM_MIN_BYTES", 1 << 62)
    plain = run()
    monkeypatch.setattr(_config, "CPU_SLAB_STREAM_MIN_BYTES", 4096)
    got = run()
    assert asked == [False, streamed]
    for p, g in zip(plain, got):
        np.testing.assert_array_equal(g, p)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("axis", [1, -1], ids=["runs", "channels-last"])
def test_strided_runs_are_not_streamed(rng, monkeypatch, training, axis):
    """Runs (or channels-last rows) with a stride, views of every other
    element, take the ordinary stores, whatever the threshold."""
    x = make(rng, (3, 5, 400) if axis == 1 else (3, 40, 80), np.float32)[:, :, ::2]
    c = x.shape[axis]
    w, b = make(rng, c, np.float32, 1.0, 0.5), make(rng, c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    plain, streamed = _both(monkeypatch, lambda: numbn.batch_norm(
        x, rm.copy(), rv.copy(), w, b, training, axis=axis, backend="cpu"))
    np.testing.assert_array_equal(streamed, plain)
    want = (ref.forward_train(x, w, b, axis=axis)[0] if training
            else ref.normalize(x, rm, rv, w, b, axis=axis))
    close(streamed, want, np.float32)


def _unaligned(shape, dtype, byte_offset):
    """An array of ``shape`` at ``byte_offset`` bytes into a buffer: not
    aligned to its item size (NumPy's ``flags.aligned`` False) for an offset
    that is no multiple of it."""
    dtype = np.dtype(dtype)
    buf = bytearray(int(np.prod(shape)) * dtype.itemsize + byte_offset)
    return np.frombuffer(buf, dtype, offset=byte_offset).reshape(shape)


@pytest.mark.parametrize("case", [((4, 8, 1000), 1), ((4, 33, 130), -1)], ids=_id)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("byte_offset", [1])
def test_unaligned_arrays_are_not_streamed(rng, monkeypatch, case, dtype, training,
                                           byte_offset):
    """An output (and an input) at an odd byte offset into its buffer: no
    whole element starts a cache line, so the aligned line stores would
    fault (they crashed the process); it takes the ordinary stores, and the
    results are those of aligned arrays."""
    shape, axis = case
    x, w, b = _inputs(rng, shape, axis, dtype)
    c = shape[axis]
    rm, rv = make(rng, c, w.dtype, 0.0, 1.0), make(rng, c, w.dtype, 2.0, 0.5)
    xu = _unaligned(shape, dtype, byte_offset)
    xu[...] = x
    assert not xu.flags.aligned
    out = _unaligned(shape, dtype, byte_offset)
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 0)  # every aligned output streams
    assert not _cpu._stream(out) and _cpu._stream(np.empty_like(x))

    def run(x, out=None):
        return numbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training, axis=axis, out=out,
                                backend="cpu")

    want = run(x)
    np.testing.assert_array_equal(run(xu, out), want)
    np.testing.assert_array_equal(run(xu), want)


def _runs_with_step(a, step):
    """``a``'s values as an ``(outer, C, inner)`` view whose runs have a step
    (2: every other element of a larger array; -1: reversed)."""
    if step == -1:
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    big = np.zeros(a.shape[:2] + (2 * a.shape[2],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


@pytest.mark.parametrize("step", [2, -1])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5, 300), (1, 3, 5000), (40, 4, 90)])
def test_kernels_take_runs_that_are_not_dense(shape, dtype, step, rng, cpu_path):
    """The channel-major kernels type every run dense (``_cpu._dense``); the
    four primitives give them a dense copy of an input whose runs are not,
    and a dense buffer for such an output: a strided or reversed
    ``(outer, C, inner)`` view gives what its contiguous copy gives, and the
    output view receives it."""
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    xv, dyv = _runs_with_step(x, step), _runs_with_step(dy, step)
    assert xv.strides[2] != xv.itemsize
    mean, var = _cpu.stats(x)
    np.testing.assert_array_equal(_cpu.stats(xv)[0], mean)
    np.testing.assert_array_equal(_cpu.stats(xv)[1], var)
    a = 1 / np.sqrt(var + 1e-5)
    t = np.linspace(-1, 1, shape[1])
    y = np.empty_like(x)
    _cpu.normalize(x, mean, a, t, False, y)
    yv = _runs_with_step(np.zeros_like(x), step)
    _cpu.normalize(xv, mean, a, t, False, yv)
    np.testing.assert_array_equal(yv, y)
    sums = _cpu.backward_sums(dy, x, mean, a, t, True)
    sums_v = _cpu.backward_sums(dyv, xv, mean, a, t, True)
    np.testing.assert_array_equal(sums_v[0], sums[0])
    np.testing.assert_array_equal(sums_v[1], sums[1])
    b, d = -a * 0.5, 0.1 * t
    dx = np.empty_like(x)
    _cpu.backward_apply(dy, x, mean, a, t, True, b, d, dx)
    dxv = _runs_with_step(np.zeros_like(x), step)
    _cpu.backward_apply(dyv, xv, mean, a, t, True, b, d, dxv)
    np.testing.assert_array_equal(dxv, dx)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("rows", [64, 5000])
def test_kernels_take_rows_that_are_not_dense(rows, dtype, rng, cpu_path):
    """Channels-last ``(outer, C, 1)`` views with a step in the channel axis
    are not given to the rows kernels, which type every row dense
    (``_cpu._row_views``): they give what the contiguous copy gives, to the
    dtype's rounding (another kernel family, another order of summation)."""
    shape = (rows, 6, 1)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)

    def stepped(a):
        big = np.zeros((a.shape[0], 2 * a.shape[1], 1), a.dtype)
        big[:, ::2] = a
        return big[:, ::2]

    xv, dyv = stepped(x), stepped(dy)
    tol = dict(rtol=1e-2 if dtype == np.float16 else 1e-5, atol=1e-5)
    mean, var = _cpu.stats(x)
    for got, want in zip(_cpu.stats(xv), (mean, var)):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    a, t = 1 / np.sqrt(var + 1e-5), np.linspace(-1, 1, 6)
    y, yv = np.empty_like(x), stepped(np.zeros_like(x))
    _cpu.normalize(x, mean, a, t, False, y)
    _cpu.normalize(xv, mean, a, t, False, yv)
    np.testing.assert_allclose(yv.astype(np.float64), y.astype(np.float64), **tol)
    for got, want in zip(_cpu.backward_sums(dyv, xv, mean, a, t, False),
                         _cpu.backward_sums(dy, x, mean, a, t, False)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    dx, dxv = np.empty_like(x), stepped(np.zeros_like(x))
    _cpu.backward_apply(dy, x, mean, a, t, False, -a * 0.5, 0.1 * t, dx)
    _cpu.backward_apply(dyv, xv, mean, a, t, False, -a * 0.5, 0.1 * t, dxv)
    np.testing.assert_allclose(dxv.astype(np.float64), dx.astype(np.float64), **tol)
