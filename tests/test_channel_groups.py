"""Groups of adjacent channels in the fused backward (numbn._cpu._channel_group):
a group walked in memory order sums each channel chunk for chunk as a task
of one channel does, so the results agree to rounding (the compiler may
order the additions within a chunk differently in the two loops)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, close, make

import numbn
from numbn import _config, _cpu
from numbn import _reference as ref

#: (N, C, H, W): C not a multiple of the groups below; runs of 25 and 33
#: elements, longer than ``CPU_BLOCK`` under ``tiny_tasks`` (several chunks a
#: run), and of 4.
SHAPES = [(6, 7, 5, 5), (4, 9, 3, 11), (10, 5, 2, 2)]


@pytest.fixture
def fused(monkeypatch):
    """Channel-major input of any run length through the fused kernels."""
    monkeypatch.setattr(_config, "CPU_ROWS_MAX_INNER", 0)
    monkeypatch.setattr(_config, "CPU_FUSED_MAX_SLAB_BYTES", 1 << 40)


def _backwards(x, w, b, dy, mean, invstd, activation):
    """dx, dweight, dbias of the training backward, then of the eval one."""
    out = []
    for training in (True, False):
        out += numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b, training=training,
                                         activation=activation, backend="cpu")
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("group", [2, 3, 64])
def test_a_group_gives_what_one_channel_a_task_gives(rng, tiny_tasks, fused, monkeypatch, shape,
                                                     dtype, activation, group):
    c = shape[1]
    pdt = np.float32 if dtype == np.float16 else dtype
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.0, 1.0)
    w, b = make(rng, c, pdt, 1.0, 0.5), make(rng, c, pdt, 0.0, 0.5)
    x[1, 2, 0] = np.nan  # confined to its channel, in the middle of a group
    calls = []

    def chosen(size):
        def _group(x3):
            calls.append(size)
            return size
        return _group

    y, mean, invstd = numbn.batch_norm_forward(x, w, b, activation=activation, backend="cpu")
    monkeypatch.setattr(_cpu, "_channel_group", chosen(1))
    alone = _backwards(x, w, b, dy, mean, invstd, activation)
    monkeypatch.setattr(_cpu, "_channel_group", chosen(group))
    _cpu._plans.clear()  # plans are kept per layout (_cpu._plan): replan with this group
    grouped = _backwards(x, w, b, dy, mean, invstd, activation)
    # The fused kernel's plan, made once for both backwards of a layout.
    assert calls == [1, group]
    names = ("dx", "dweight", "dbias", "dx eval", "dweight eval", "dbias eval")
    for got, want, name in zip(grouped, alone, names):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps,
                                   atol=4 * np.finfo(dtype).eps * np.nanmax(abs(want)),
                                   err_msg=name)

    finite = np.arange(c) != 2
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, w, b, 1e-5, 1, activation)
    assert np.isnan(mean[2]) and np.isfinite(mean[finite]).all()
    close(y[:, finite], y_ref[:, finite], dtype, err="y")
    close(mean[finite], mean_ref[finite], dtype, scale=2.0, err="mean")
    close(invstd[finite], invstd_ref[finite], dtype, err="invstd")
    for k, training in enumerate((True, False)):
        want = ref.backward(dy, x, mean, invstd, w, training, 1, b, activation)
        for got, exp, name in zip(grouped[3 * k:3 * k + 3], want, ("dx", "dweight", "dbias")):
            got, exp = (got[:, finite], exp[:, finite]) if name == "dx" else (got[finite],
                                                                             exp[finite])
            close(got, exp, dtype, scale=2.0 if name == "dx" else np.sqrt(x.size / c),
                  err=f"{name} training={training}")


def test_group_size(monkeypatch):
    """As many channels as keep their slabs of x and dy within the budget,
    ``ceil(C / (threads * k))`` for the least k; one for long runs or no
    budget."""
    threads = _cpu._threads()
    x3 = np.zeros((4, 64, 10), np.float32)
    slabs = 2 * 4 * 10 * 4  # x and dy
    whole = -(-64 // threads)
    half = -(-64 // (2 * threads))

    def group(budget):
        monkeypatch.setattr(_config, "CPU_FUSED_GROUP_BYTES", budget)
        return _cpu._channel_group(x3)

    assert group(1 << 40) == whole
    assert group(half * slabs) == half
    smaller = group(half * slabs - 1)
    assert 1 <= smaller < half
    assert group(0) == 1
    many = np.zeros((2, 100_000, 3), np.float32)  # 48 bytes of x and dy a channel
    monkeypatch.setattr(_config, "CPU_FUSED_GROUP_BYTES", 10 * 48)
    assert 5 <= _cpu._channel_group(many) <= 10
    monkeypatch.setattr(_config, "CPU_FUSED_GROUP_BYTES", 1 << 40)
    monkeypatch.setattr(_config, "CPU_FUSED_GROUP_MAX_RUN_BYTES", 40)  # runs of 40 bytes
    assert _cpu._channel_group(x3) == 1
    monkeypatch.setattr(_config, "CPU_FUSED_GROUP_MAX_RUN_BYTES", 41)
    assert _cpu._channel_group(x3) == whole


def test_short_runs_past_the_cache_stay_fused():
    """The fused backward takes short runs however many and however large x
    (the two-pass kernels once took them past the cache: grouped, the fused
    kernel is as fast or faster there, `_config.CPU_FUSED_GROUP_BYTES`)."""
    x3 = np.zeros((128, 512, 49), np.float32)  # ResNet's (128, 512, 7, 7): 12.25 MiB
    v = np.ones(512, np.float32)
    assert _cpu._row_views(x3) is None
    assert _cpu.backward_ready(np.zeros_like(x3), x3, v, v, v, v, False, True,
                               np.empty_like(x3)) is not None
