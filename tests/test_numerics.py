"""Numerical stability: no E[x^2] - E[x]^2 cancellation, exact float64."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST_BACKENDS, close

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


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_float64_exact(backend, rng):
    x = rng.standard_normal((16, 8, 9, 9)) * 1e3 + 1e6
    y, mean, invstd = numbn.batch_norm_forward(x, backend=backend)
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-14)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-10)
    np.testing.assert_allclose(y, y_ref, atol=1e-9)


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
