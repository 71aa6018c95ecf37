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


@st.composite
def layer_cases(draw):
    """A layer's keywords, its channel count and input shape (channels on its axis)."""
    convention = draw(st.sampled_from(sorted(numbn.CONVENTIONS)))
    kw = dict(convention=convention, affine=draw(st.booleans()),
              track_running_stats=draw(st.booleans()),
              activation=draw(st.sampled_from([None, "relu"])))
    if convention == "torch" and draw(st.booleans()):
        kw["momentum"] = None
    c = draw(st.sampled_from([1, 3, 8, 65]))
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 6)) for _ in range(ndim)]
    axis = numbn.CONVENTIONS[convention].axis
    shape[axis] = c
    shape[0] = max(shape[0], 2)
    return kw, c, tuple(shape)


@settings(max_examples=40, deadline=None)
@given(layer_cases(), st.sampled_from([np.float16, np.float32, np.float64]),
       st.lists(st.booleans(), min_size=1, max_size=3), st.integers(0, 2**32 - 1))
def test_layer_steps_cpu_as_reference(case, dtype, modes, seed):
    """A layer on the "cpu" backend and the same layer on the reference, through
    training and eval steps with their backwards: outputs, gradients, running
    statistics and counts agree. Where the fused ReLU's input sits so close
    to 0 that the two round it to different sides (float32 against float64),
    the gradients are not compared (the outputs are)."""
    kw, c, shape = case
    rng = np.random.default_rng(seed)
    pdt = np.float64 if dtype == np.float64 else np.float32
    layers = [numbn.BatchNorm(c, dtype=pdt, backend=b, **kw) for b in ("cpu", "numpy")]
    if kw["affine"]:
        w, b = rng.uniform(0.5, 2, c), rng.uniform(-1, 1, c)
        for bn in layers:
            bn.weight[...], bn.bias[...] = w, b
    scale = {np.float16: 30.0, np.float32: 20.0, np.float64: 10.0}[dtype]
    for training in modes:
        x = (rng.standard_normal(shape) * rng.uniform(0.5, 3) + rng.uniform(-3, 3)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        outs = []
        for bn in layers:
            bn.train(training)
            outs.append((bn(x), bn.backward(dy)))
        (y, dx), (y_ref, dx_ref) = outs
        close(y, y_ref, dtype, scale=scale)
        if kw["activation"] and not np.array_equal(y == 0, y_ref == 0):
            continue
        close(dx, dx_ref, dtype, scale=scale)
        got, ref_bn = layers
        n = x.size // c
        for name in ("grad_weight", "grad_bias"):
            if kw["affine"]:
                close(getattr(got, name), getattr(ref_bn, name), dtype, scale=scale * np.sqrt(n))
        for name in ("running_mean", "running_var"):
            if kw["track_running_stats"]:
                close(getattr(got, name), getattr(ref_bn, name), dtype, scale=scale)
        assert got.num_batches_tracked == ref_bn.num_batches_tracked


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
