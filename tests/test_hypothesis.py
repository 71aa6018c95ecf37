"""Property-based tests: random shapes, axes, layouts and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbn
from numbn import _reference as ref

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def inputs(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:
        shape = (shape[0] + 1,) + shape[1:] if axis % ndim != 0 else shape[:1] + (
            shape[1] + 1,) + shape[2:]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype) * 3
    perm = draw(st.permutations(range(ndim)))
    x = np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
    if draw(st.booleans()):
        x = x[..., ::-1] if shape[-1] > 1 else x
    return x, axis


@SETTINGS
@given(inputs())
def test_random_shapes_axes_layouts(args):
    x, axis = args
    c = x.shape[axis]
    w = np.linspace(0.5, 1.5, c)
    y, mean, invstd = numbn.batch_norm_forward(x, w, axis=axis)
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, w, axis=axis)
    close(y, y_ref, x.dtype, scale=3)
    dy = np.cos(np.arange(x.size)).reshape(x.shape).astype(x.dtype)
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, True, axis)
    close(dx, dx_ref, x.dtype, scale=3)
    close(db, db_ref, x.dtype, scale=np.sqrt(x.size))


@SETTINGS
@given(st.integers(2, 5), st.integers(-12, 12))
def test_axis_validation(ndim, axis):
    x = np.ones((2,) * ndim, np.float32)
    if -ndim <= axis < ndim:
        y = numbn.batch_norm(x, np.zeros(2), np.ones(2), axis=axis)
        assert y.shape == x.shape
    else:
        with pytest.raises(ValueError, match="out of range"):
            numbn.batch_norm(x, np.zeros(2), np.ones(2), axis=axis)


@SETTINGS
@given(st.sampled_from(["int8", "int64", "bool", "complex64", "uint16"]))
def test_non_floating_dtypes_refused(dtype):
    with pytest.raises(TypeError):
        numbn.batch_norm(np.ones((3, 2), dtype=dtype), np.zeros(2), np.ones(2))
