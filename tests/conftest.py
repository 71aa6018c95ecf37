"""Shared test tables: tolerances per dtype, layouts, shapes, helpers.

The comparisons against the reference take their tolerance per dtype from
``TOL`` here; tests of a particular numerical bound state their own.
"""

from __future__ import annotations

import importlib.util
import os

# Keras 3 runs on the backend named here when it is first imported
# (tests/test_oracles.py): PyTorch, which the compare extra installs.
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

import numbn

#: (rtol, atol) per dtype of the input, for values of order one.
TOL = {
    np.dtype(np.float16): (3e-3, 3e-3),
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float64): (1e-10, 1e-10),
}

DTYPES = [np.float16, np.float32, np.float64]

#: (shape, axis): PyTorch's 1d/2d/3d layouts, channels-last, other axes.
SHAPES = [
    ((16, 5), 1),
    ((4, 3, 7), 1),
    ((3, 4, 5, 6), 1),
    ((3, 5, 6, 4), -1),
    ((2, 3, 2, 3, 4), 1),
    ((5, 4, 3), 0),
    ((3, 4, 5, 2), 2),
    ((2, 1, 40, 30), 1),
    ((300, 2), 1),
]



@pytest.fixture(autouse=True)
def fresh_plans():
    """Every test plans its CPU launches anew (``numbn._cpu._plan``): a test
    that replaces one of ``numbn._cpu``'s planning helpers (settings of
    ``numbn._config`` drop the plans themselves) leaves no plan made with
    it to later tests. Without Numba there are no plans to drop."""
    plans = getattr(importlib.import_module("numbn._cpu"), "_plans", {}) if _HAS_NUMBA else {}
    plans.clear()
    yield
    plans.clear()


_HAS_NUMBA = importlib.util.find_spec("numba") is not None

def _contiguous(a):
    return np.ascontiguousarray(a)


def _fortran(a):
    return np.asfortranarray(a)


def _transposed(a):
    """Same values and shape, memory in reversed axis order (a transposed view)."""
    return np.ascontiguousarray(a.T).T


def _sliced(a):
    """Same values and shape, a strided view into a larger array (every other
    element of the first axis, and of the last one)."""
    big = np.zeros((a.shape[0] * 2,) + a.shape[1:-1] + (a.shape[-1] * 2,), a.dtype)
    view = big[::2, ..., ::2]
    view[...] = a
    return view


def _cropped(a):
    """A view cropped in two axes: no two-run canonical view exists, so the
    kernels get a documented dense copy."""
    pad = [(0, 0)] * a.ndim
    pad[0] = (1, 1)
    pad[-1] = (1, 2)
    big = np.pad(a, pad)
    return big[1:-1, ..., 1:-2]


LAYOUTS = {"contiguous": _contiguous, "fortran": _fortran, "transposed": _transposed,
           "sliced": _sliced, "cropped": _cropped}

HAS_TORCH = importlib.util.find_spec("torch") is not None
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed "
                                    "(pip install -e '.[compare]')")


#: Biases that are the fused ReLU's whole input where x equals the mean:
#: float16 stores the first two as 0 (2**-25 is the tie, to even), the next
#: two as 2**-24; the last is the boundary itself.
TINY_BIASES = [1e-8, 2.0 ** -25, float(np.nextafter(np.float32(2.0 ** -25), np.float32(1))),
               2.0 ** -24, 0.0]


def assert_mask_follows_output(y, dx, db, dy, axis, training):
    """For x equal to its mean with :data:`TINY_BIASES` (host arrays): the
    backward passed ``dy`` exactly where the float16 output ``y`` is positive,
    two of the five channels; in eval, dx is 0 everywhere else."""
    passed = y > 0
    assert passed.sum() == 2 * y.size // y.shape[axis]
    reduce = tuple(k for k in range(y.ndim) if k != axis % y.ndim)
    expected = np.where(passed, dy, 0).astype(np.float64).sum(axis=reduce)
    np.testing.assert_allclose(db, expected, rtol=1e-6, atol=1e-6)
    if not training:
        assert np.all(dx[~passed] == 0)


def close(actual, expected, dtype, scale=1.0, err=""):
    rtol, atol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol * scale, err_msg=err)


def make(rng, shape, dtype, mean=0.5, std=2.0):
    return (rng.standard_normal(shape) * std + mean).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_tasks(monkeypatch):
    """Shrink the CPU tunables so that small inputs still split every channel
    over several tasks and blocks (the paths large inputs take)."""
    from numbn import _config

    monkeypatch.setattr(_config, "CPU_MIN_TASK", 8)
    monkeypatch.setattr(_config, "CPU_PARALLEL_MIN", 0)
    monkeypatch.setattr(_config, "CPU_BLOCK", 7)
    monkeypatch.setattr(_config, "CPU_ROWS_BLOCK", 9)
    monkeypatch.setattr(_config, "CPU_ROWS_BLOCK_MIN_ROWS", 1)
    monkeypatch.setattr(_config, "CPU_ROWS_TASKS_PER_THREAD", 4)


HOST_BACKENDS = [b for b in numbn.available_backends() if b != "cuda"]


@pytest.fixture(params=["fused", "two-pass", "serial"])
def cpu_path(request, monkeypatch):
    """Run a test through the cache-blocked fused kernels (every channel
    small enough, and channel-major input kept channel-major however short
    its runs), through the parallel two-pass kernels (fusion off, and every
    input treated as too large for the cache, so the loops meant for input
    streamed from memory run, every output the kernels can store
    non-temporally is, and channel-major reductions split the outer axis
    however short it is; contiguous channel-major input with short runs
    takes the rows kernels, numbn._cpu._row_views), and through the serial
    twins of the kernels (channel-major reductions one channel at a time)."""
    from numbn import _config

    monkeypatch.setattr(_config, "CPU_FUSED_MAX_SLAB_BYTES",
                        1 << 40 if request.param == "fused" else 0)
    if request.param == "fused":
        monkeypatch.setattr(_config, "CPU_ROWS_MAX_INNER", 0)
    if request.param == "two-pass":
        monkeypatch.setattr(_config, "CPU_CACHE_BYTES", 0)
        monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", 0)
        monkeypatch.setattr(_config, "CPU_OUTER_ROWS_PER_THREAD", 0)
    if request.param == "serial":
        monkeypatch.setattr(_config, "CPU_PARALLEL_MIN", 1 << 62)
        monkeypatch.setattr(_config, "CPU_OUTER_ROWS_PER_THREAD", 1 << 62)
    return request.param
