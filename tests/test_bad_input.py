"""SPEC's "Bad input": clear errors before anything is written, inputs and
running statistics untouched, NaN and Inf confined to their channel."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST_BACKENDS

import numbn


@pytest.fixture
def arrays(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    return dict(x=x, rm=np.zeros(3, np.float32), rv=np.ones(3, np.float32),
                w=np.full(3, 2.0, np.float32), b=np.full(3, 0.5, np.float32))


def _snapshot(d):
    return {k: v.copy() for k, v in d.items()}


BAD_CALLS = [
    # (description, call, error, message pattern)
    ("integer x", lambda a: numbn.batch_norm(a["x"].astype(np.int32), a["rm"], a["rv"]),
     TypeError, "float16, float32 or float64"),
    ("list x", lambda a: numbn.batch_norm(a["x"].tolist(), a["rm"], a["rv"]),
     TypeError, "NumPy array"),
    ("masked x", lambda a: numbn.batch_norm(np.ma.masked_less(a["x"], 0), a["rm"], a["rv"],
                                            training=True),
     TypeError, "x is a numpy.ma.MaskedArray, which numbn does not take"),
    ("x of the other byte order", lambda a: numbn.batch_norm(
        a["x"].astype(a["x"].dtype.newbyteorder()), a["rm"], a["rv"], training=True),
     TypeError, "x is float32 of the other byte order"),
    ("running_var of the other byte order", lambda a: numbn.batch_norm(
        a["x"], a["rm"], a["rv"].astype(a["rv"].dtype.newbyteorder()), training=True),
     TypeError, "running_var is float32 of the other byte order"),
    ("1-D x", lambda a: numbn.batch_norm(a["x"][0, 0], a["rm"], a["rv"], training=True),
     ValueError, "at least 2 dimensions"),
    ("axis out of range", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], axis=3),
     ValueError, "out of range"),
    ("weight length", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], a["w"][:2],
                                                 training=True),
     ValueError, r"weight must have shape \(3,\)"),
    ("bias length", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], a["w"],
                                               np.zeros(4, np.float32), training=True),
     ValueError, "bias must have shape"),
    ("running stats length", lambda a: numbn.batch_norm(a["x"], np.zeros(2), a["rv"],
                                                        training=True),
     ValueError, "running_mean must have shape"),
    ("integer weight", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], np.ones(3, int),
                                                  training=True),
     TypeError, "weight must be float"),
    ("one value per channel", lambda a: numbn.batch_norm(a["x"][:1, :, :1], a["rm"], a["rv"],
                                                         training=True),
     ValueError, "Expected more than 1 value per channel when training"),
    ("empty batch", lambda a: numbn.batch_norm(a["x"][:0], a["rm"], a["rv"], training=True),
     ValueError, "empty batch"),
    ("eval without running stats", lambda a: numbn.batch_norm(a["x"], training=False),
     ValueError, "required when training=False"),
    ("only one running stat", lambda a: numbn.batch_norm(a["x"], a["rm"], None, training=True),
     ValueError, "both running_mean and running_var"),
    ("read-only running stat", lambda a: numbn.batch_norm(
        a["x"], np.broadcast_to(np.float32(0), (3,)), a["rv"], training=True),
     ValueError, "read-only"),
    ("out wrong shape", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], training=True,
                                                   out=np.empty((4, 3, 4), np.float32)),
     ValueError, "out must have the shape"),
    ("out wrong dtype", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], training=True,
                                                   out=np.empty((4, 3, 5))),
     TypeError, "out must have x's dtype"),
    ("out overlapping x", lambda a: numbn.batch_norm(
        a["x"], a["rm"], a["rv"], training=True, out=a["x"][::-1]),
     ValueError, "overlaps"),
    ("unknown backend", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], backend="tpu"),
     ValueError, "unknown backend"),
    ("unknown activation", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"],
                                                      activation="gelu"),
     ValueError, "activation"),
    ("backward dy shape", lambda a: numbn.batch_norm_backward(
        a["x"][:2], a["x"], a["rm"], a["rv"], a["w"]), ValueError, "dy must have the shape"),
    ("backward mean length", lambda a: numbn.batch_norm_backward(
        a["x"], a["x"], a["rm"][:2], a["rv"], a["w"]), ValueError, "mean must have shape"),
    ("backward integer dy", lambda a: numbn.batch_norm_backward(
        a["x"].astype(np.int64), a["x"], a["rm"], a["rv"]), TypeError, "dy must be float"),
    ("forward one value", lambda a: numbn.batch_norm_forward(a["x"][:1, :, :1]),
     ValueError, "more than 1 value per channel"),
    ("eps a string", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], training=True,
                                                eps="1e-5"),
     TypeError, "eps must be a real number, got '1e-5'"),
    ("eps None", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], eps=None),
     TypeError, "eps must be a real number, got None"),
    ("eps an array", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], training=True,
                                                eps=np.full(3, 1e-5)),
     TypeError, "eps must be a real number"),
    ("negative eps in eval", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], eps=-1.0),
     ValueError, "eps must be non-negative, got -1.0"),
    ("NaN eps in training", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], training=True,
                                                       eps=float("nan")),
     ValueError, "eps must be non-negative, got nan"),
    ("forward negative eps", lambda a: numbn.batch_norm_forward(a["x"], eps=-1e-5),
     ValueError, "eps must be non-negative"),
    ("momentum a string", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], training=True,
                                                     momentum="0.1"),
     TypeError, "momentum must be a real number, got '0.1'"),
    ("momentum None", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"], training=True,
                                                 momentum=None),
     TypeError, "momentum must be a real number, got None"),
    ("momentum None in eval", lambda a: numbn.batch_norm(a["x"], a["rm"], a["rv"],
                                                         momentum=None),
     TypeError, "momentum must be a real number, got None"),
    ("out with a zero stride", lambda a: numbn.batch_norm(
        a["x"], a["rm"], a["rv"], training=True,
        out=np.lib.stride_tricks.as_strided(np.empty(15, np.float32), (4, 3, 5), (0, 20, 4))),
     ValueError, "out repeats its elements"),
]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("what,call,error,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_error_and_nothing_written(arrays, backend, what, call, error, pattern):
    before = _snapshot(arrays)
    with numbn.set_backend(backend), pytest.raises(error, match=pattern):
        call(arrays)
    for k, v in before.items():
        np.testing.assert_array_equal(arrays[k], v, err_msg=f"{k} changed by a failed call")


def test_matrix_is_refused(rng):
    """np.matrix stays 2-D under every reshape: a TypeError that says what
    to pass (it was an IndexError from inside the views)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        m = np.asmatrix(rng.standard_normal((4, 3)))
    for backend in HOST_BACKENDS:
        with pytest.raises(TypeError, match="x is a numpy.matrix, which numbn does not take"):
            numbn.batch_norm(m, training=True, backend=backend)


def test_layer_errors_leave_state_untouched(rng):
    bn = numbn.BatchNorm(3)
    bn(rng.standard_normal((4, 3)).astype(np.float32))
    state = bn.state_dict()
    bad = [rng.standard_normal((4, 2)), rng.standard_normal((1, 3)),
           rng.standard_normal((4, 3)).astype(np.int8), rng.standard_normal(3)]
    for x in bad:
        with pytest.raises((ValueError, TypeError)):
            bn(x)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_layer_eps_is_checked_when_made():
    with pytest.raises(TypeError, match="eps must be a real number, got '0.001'"):
        numbn.BatchNorm(3, eps="0.001")
    with pytest.raises(ValueError, match="eps must be non-negative, got -0.001"):
        numbn.BatchNorm(3, convention="keras", eps=-1e-3)


@pytest.mark.parametrize("eps", [0, 0.0, 1e-3, np.float32(1e-3), np.float64(1e-3),
                                 np.array(1e-3), np.int64(0)])
@pytest.mark.parametrize("momentum", [0.1, np.float32(0.25), np.array(0.5), 1])
def test_eps_and_momentum_of_any_real_type(eps, momentum, rng):
    """NumPy scalars, 0-d arrays and ints are taken as the floats they hold."""
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = numbn.batch_norm(x, rm, rv, training=True, momentum=momentum, eps=eps)
    rm_ref, rv_ref = np.zeros(3, np.float32), np.ones(3, np.float32)
    y_ref = numbn.batch_norm(x, rm_ref, rv_ref, training=True, momentum=float(momentum),
                             eps=float(eps), backend="numpy")
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-6, atol=1e-7)
    assert numbn.BatchNorm(3, eps=eps, momentum=momentum).eps == float(eps)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="forward"):
        numbn.BatchNorm(3).backward(np.ones((2, 3)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad", ["wrong C", "int dtype", "one value"])
def test_backward_after_a_failed_forward_raises(training, bad):
    """A forward that raises leaves backward() nothing to differentiate: it
    raises, not the gradient of the forward before (whose dy has the same
    shape here), until a forward succeeds again."""
    bn = numbn.BatchNorm(3).train(training)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    bn(x)
    bad_x = {"wrong C": np.ones((4, 2), np.float32), "int dtype": np.ones((4, 3), int),
             "one value": np.ones((1, 3), np.float32)}[bad]
    if bad == "one value" and not training:
        bad_x = np.ones((4, 3, 1), np.float32)[:, :2]  # eval: two channels of three
    with pytest.raises((TypeError, ValueError)):
        bn(bad_x)
    with pytest.raises(RuntimeError, match="last one raised"):
        bn.backward(np.ones((4, 3), np.float32))
    bn(x)
    assert bn.backward(np.ones((4, 3), np.float32)).shape == (4, 3)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("shape,axis", [((6, 3, 4, 4), 1), ((6, 4, 4, 3), -1)])
def test_nan_confined_to_channel(backend, bad, shape, axis, rng):
    x = rng.standard_normal(shape)
    idx = [2, 1, 1, 1]
    idx[axis] = 1
    x[tuple(idx)] = bad
    c = shape[axis]
    rm, rv = np.zeros(c), np.ones(c)
    y = numbn.batch_norm(x, rm, rv, training=True, axis=axis, backend=backend)
    yc = np.moveaxis(y, axis, 0)
    assert not np.isfinite(yc[1]).all()
    assert np.isfinite(yc[[0, 2]]).all()
    assert np.isfinite(rm[[0, 2]]).all() and not np.isfinite(rm[1])
    _, mean, invstd = numbn.batch_norm_forward(x, axis=axis, backend=backend)
    dx, dw, db = numbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, np.ones(c),
                                           axis=axis, backend=backend)
    dxc = np.moveaxis(dx, axis, 0)
    assert np.isfinite(dxc[[0, 2]]).all() and not np.isfinite(dxc[1]).all()
    # NaN gradients propagate in plain BatchNorm (no activation masks them).
    dy = np.ones_like(x)
    dy[tuple(idx)] = np.nan
    dx, dw, db = numbn.batch_norm_backward(dy, x, np.zeros(c), np.ones(c), np.ones(c),
                                           training=False, axis=axis, backend=backend)
    assert np.isnan(dx[tuple(idx)]) and np.isnan(db[1]) and np.isfinite(db[[0, 2]]).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((6, 3), 1), ((2, 4, 4, 3), -1)])
def test_constant_channel_without_eps(backend, dtype, shape, axis, rng, cpu_path):
    """eps=0 on a channel of zero variance divides by zero: NaN (and inf) in
    that channel, as in NumPy and PyTorch, never an exception (Numba's
    default error model raised ZeroDivisionError in the kernels) nor a
    warning (the suite makes them errors), on every CPU route."""
    x = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    np.moveaxis(x, axis, 0)[1] = 3.0
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y = numbn.batch_norm(x, rm, rv, training=True, eps=0.0, axis=axis, backend=backend)
    yc = np.moveaxis(y, axis, 0)
    assert np.isnan(yc[1]).all() and np.isfinite(yc[[0, 2]]).all()
    np.testing.assert_allclose([rm[1], rv[1]], [0.3, 0.9], rtol=1e-6)  # momentum 0.1
    y, mean, invstd = numbn.batch_norm_forward(x, eps=0.0, axis=axis, backend=backend)
    assert invstd[1] == np.inf and np.isnan(np.moveaxis(y, axis, 0)[1]).all()
    dx, dw, db = numbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, np.ones(c, dtype),
                                           axis=axis, backend=backend)
    dxc = np.moveaxis(dx, axis, 0)
    assert np.isnan(dxc[1]).all() and np.isfinite(dxc[[0, 2]]).all()
    rm[1], rv[1] = 3.0, 0.0  # eval: running variance 0, running mean the constant
    y = numbn.batch_norm(x, rm, rv, training=False, eps=0.0, axis=axis, backend=backend)
    yc = np.moveaxis(y, axis, 0)
    assert np.isnan(yc[1]).all() and np.isfinite(yc[[0, 2]]).all()


def test_reference_is_quiet_on_nan_and_inf(rng):
    """The reference's functions take NaN and Inf without NumPy's warnings (the
    suite makes warnings errors), as the kernels do. The functional API
    silences its own calls, so this calls the reference directly; an
    infinite mean makes x - mean inf - inf."""
    from numbn import _reference as ref

    x = rng.standard_normal((5, 3))
    x[1, 1], x[2, 2] = np.nan, np.inf
    y, mean, invstd, _, _ = ref.forward_train(x)
    assert np.isfinite(y[:, 0]).all() and not np.isfinite(y[:, 1:]).any()
    dx, dw, db = ref.backward(np.ones_like(x), x, mean, invstd, np.ones(3), activation="relu")
    assert np.isfinite(dx[:, 0]).all() and np.isnan(dx[:, 1:]).all()
