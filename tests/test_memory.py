"""Memory: the CPU backend allocates nothing the size of x beyond the outputs.

NumPy reports its allocations to ``tracemalloc``, so the traced peak of a call
counts every temporary array the host side makes. The outputs (y, dx) are the
only arrays the size of x that a call may leave behind or need on the way;
anything else, such as a float32 copy of float16 input, shows up as another
|x| or more. (The asv suite's ``peakmem_`` benchmark tracks the same for the
layer, float32; this pins it for every dtype.)
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import numbn

LAYOUTS = {"NCHW": ((8, 32, 32, 32), 1), "NHWC": ((8, 32, 32, 32), -1),
           "2-D": ((8192, 32), 1)}
DTYPES = (np.float16, np.float32, np.float64)
# Per-channel vectors, partials and the like: small beside |x| (256 KiB or more).
SLACK = 0.1


def peak_bytes(fn) -> int:
    """The traced peak of ``fn()`` above what was live before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def data(layout, dtype):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    return x, rng.standard_normal(shape).astype(dtype), axis


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_step_allocates_only_its_outputs(layout, dtype):
    x, dy, axis = data(layout, dtype)
    bn = numbn.BatchNorm(x.shape[axis], axis=axis, backend="cpu")
    kept = []

    def step():  # a user's training step: y is still alive when dx is made
        y = bn(x)
        kept.append((y, bn.backward(dy)))

    step()  # compile, and let the layer make its state
    kept.clear()
    peak = peak_bytes(step)
    assert peak <= (2 + SLACK) * x.nbytes, f"peak {peak / x.nbytes:.2f} |x|"


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_functions_allocate_only_their_output(layout, dtype, relu):
    x, dy, axis = data(layout, dtype)
    c = x.shape[axis]
    act = "relu" if relu else None
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    w, b = np.full(c, 1.5, np.float32), np.full(c, 0.25, np.float32)
    _, mean, invstd = numbn.batch_norm_forward(x, w, b, axis=axis, activation=act)
    calls = {
        "training forward": lambda: numbn.batch_norm(x, rm, rv, w, b, True, axis=axis,
                                                     activation=act),
        "eval": lambda: numbn.batch_norm(x, rm, rv, w, b, False, axis=axis, activation=act),
        "backward": lambda: numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b,
                                                      axis=axis, activation=act),
    }
    for name, call in calls.items():
        call()
        peak = peak_bytes(call)
        assert peak <= (1 + SLACK) * x.nbytes, f"{name}: peak {peak / x.nbytes:.2f} |x|"
