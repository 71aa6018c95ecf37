"""Gradients against central finite differences of sum(dy * y), float64."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST_BACKENDS

import numbn


def _numeric(f, a, h=1e-6):
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_finite_differences(backend, shape, axis, training, rng):
    x = rng.standard_normal(shape) * 2 + 1
    c = shape[axis]
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    dy = rng.standard_normal(shape)
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5

    def loss():
        if training:
            y = numbn.batch_norm_forward(x, w, b, axis=axis, backend=backend)[0]
        else:
            y = numbn.batch_norm(x, rm, rv, w, b, axis=axis, backend=backend)
        return float(np.sum(dy * y))

    if training:
        _, mean, invstd = numbn.batch_norm_forward(x, w, b, axis=axis, backend=backend)
    else:
        mean, invstd = rm, 1 / np.sqrt(rv + 1e-5)
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, w, training=training, axis=axis,
                                           backend=backend)
    np.testing.assert_allclose(dx, _numeric(loss, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, _numeric(loss, w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, _numeric(loss, b), rtol=1e-5, atol=1e-6)


def test_without_weight_returns_none(rng):
    x = rng.standard_normal((4, 3))
    _, mean, invstd = numbn.batch_norm_forward(x)
    dx, dw, db = numbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    assert dw is None and db is None
    np.testing.assert_allclose(dx, 0, atol=1e-12)  # a constant dy has zero gradient
