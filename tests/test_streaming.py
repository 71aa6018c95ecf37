"""Non-temporal stores (numbn._cpu._stream_line, _stream_apply_line): large
outputs are written a cache line at a time past the cache. The streamed
kernels must give what the ordinary ones give (to the bit, but for the
rounding of the fused backward's plain dx), for every dtype, the
fused ReLU (its boundary and NaN included), outputs at any alignment, and
every kernel that streams: the fused training forward and backward, the
two-pass normalisation and apply, and the eval forward."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, close, make

import numbn
from numbn import _config, _cpu
from numbn import _reference as ref

#: (N, C, L): channel slabs fused (C >= 4), two-pass (C < 4), runs shorter
#: than a cache line, runs of several lines with a partial one at each end.
SHAPES = [(4, 8, 1000), (5, 3, 901), (3, 6, 11), (2, 16, 515)]


def _both(monkeypatch, call):
    """``call()`` with ordinary stores, then with every output streamed."""
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 1 << 62)
    plain = call()
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 0)
    return plain, call()


def _inputs(rng, shape, dtype):
    x = make(rng, shape, dtype)
    x.flat[::53] = np.nan
    c = shape[1]
    pdt = np.float32 if dtype == np.float16 else dtype
    return x, make(rng, c, pdt, 1.0, 0.5), make(rng, c, pdt, 0.0, 0.5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_forward_streamed_as_stored(rng, monkeypatch, shape, dtype, activation, training,
                                    offset):
    x, w, b = _inputs(rng, shape, dtype)
    c = shape[1]
    rm, rv = make(rng, c, w.dtype, 0.0, 1.0), make(rng, c, w.dtype, 2.0, 0.5)
    buf = np.empty(x.size + offset, dtype)  # an output at any alignment

    def run():
        out = buf[offset:].reshape(shape)
        numbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training, activation=activation,
                         out=out, backend="cpu")
        return out.copy()

    plain, streamed = _both(monkeypatch, run)
    np.testing.assert_array_equal(streamed, plain)
    assert np.isnan(streamed).any()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward_streamed_as_stored(rng, monkeypatch, shape, dtype, activation, training):
    x, w, b = _inputs(rng, shape, dtype)
    x = np.nan_to_num(x)
    dy = make(rng, shape, dtype, 0.0, 1.0)
    _, mean, invstd = numbn.batch_norm_forward(x, w, b, backend="cpu")
    # Inputs exactly at the ReLU's boundary, x_hat * w + b == 0: bias 0 and
    # x equal to a mean that x's dtype holds exactly.
    mean = mean.astype(dtype).astype(mean.dtype)
    b[0] = 0
    x[:, 0, ::7] = mean[0]

    def run():
        return numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b, training=training,
                                         activation=activation, backend="cpu")

    plain, streamed = _both(monkeypatch, run)
    # dx to rounding: with reassociation allowed (fastmath), LLVM contracts
    # the multiply-adds of the fused kernel's plain loop in another order
    # than the streamed lines' (a few units in the last place, measured).
    eps = np.finfo(dtype).eps
    scale = np.abs(plain[0]).max()
    np.testing.assert_allclose(streamed[0], plain[0], rtol=8 * eps, atol=8 * eps * scale)
    if activation or not training:  # these loops compile alike: to the bit
        np.testing.assert_array_equal(streamed[0], plain[0])
    for got, want in zip(streamed[1:], plain[1:]):  # the sums: not streamed
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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_runs_are_not_streamed(rng, monkeypatch, training):
    """Runs with a stride (a view of every other element) take the ordinary
    stores, whatever the threshold."""
    x = make(rng, (3, 5, 400), np.float32)[:, :, ::2]
    w, b = make(rng, 5, np.float32, 1.0, 0.5), make(rng, 5, np.float32)
    rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
    plain, streamed = _both(monkeypatch, lambda: numbn.batch_norm(
        x, rm.copy(), rv.copy(), w, b, training, backend="cpu"))
    np.testing.assert_array_equal(streamed, plain)
    want = (ref.forward_train(x, w, b)[0] if training
            else ref.normalize(x, rm, rv, w, b))
    close(streamed, want, np.float32)
