"""The direct path of the functional API (``numbn.functional._direct_channels``):
the calls it takes give exactly what the general path gives, and it steps
aside for everything else (other backends, layouts, dtypes, bad input)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make

import numbn
from numbn import _cpu, functional

SHAPES = [((64, 16), 1), ((6, 8, 5, 7), 1), ((5, 4, 6, 12), 3), ((5, 4, 6, 12), -1),
          ((3, 2, 40), 1), ((2, 5), 0)]


@pytest.fixture
def spy(monkeypatch):
    """Counts the direct path's kernel launches by name: the kernel module the
    functions get (``functional._cpu_kernels``) with those three counted (the
    general path's own use of them, inside ``train_fused`` and
    ``backward_fused``, is not)."""
    seen = {"infer_dense": 0, "train_dense": 0, "backward_dense": 0}

    class Counted:
        def __getattr__(self, name):
            real = getattr(_cpu, name)
            if name not in seen:
                return real

            def counted(*args):
                seen[name] += 1
                return real(*args)

            return counted

    monkeypatch.setattr(functional, "_cpu_kernels", Counted)
    return seen


def _general(monkeypatch):
    monkeypatch.setattr(functional, "_direct_channels", lambda x, axis, backend: 0)


def _calls(x, dy, axis, vdt, activation, rng):
    """Every public call the direct path serves, with fresh running statistics."""
    c = x.shape[axis]
    w, b = make(rng, c, vdt, 1.0, 0.5), make(rng, c, vdt, 0.0, 0.5)
    rm, rv = make(rng, c, vdt, 0.0, 1.0), make(rng, c, vdt, 2.0, 0.5)
    y = numbn.batch_norm(x, rm, rv, w, b, True, 0.3, axis=axis, activation=activation)
    ye = numbn.batch_norm(x, rm, rv, w, b, False, axis=axis, activation=activation)
    yn = numbn.batch_norm(x, None, None, w, b, True, axis=axis, activation=activation)
    _, mean, invstd = numbn.batch_norm_forward(x, w, b, axis=axis, activation=activation)
    # out= (C-contiguous, not x's memory) takes the direct path too, and is what comes back.
    into = [np.full_like(x, np.nan) for _ in range(3)]
    rm_o, rv_o = rm.copy(), rv.copy()
    got = [numbn.batch_norm(x, rm_o, rv_o, w, b, True, 0.3, axis=axis, activation=activation,
                            out=into[0]),
           numbn.batch_norm(x, rm_o, rv_o, w, b, False, axis=axis, activation=activation,
                            out=into[1]),
           numbn.batch_norm_forward(x, w, b, axis=axis, activation=activation, out=into[2])[0]]
    assert all(g is o for g, o in zip(got, into))
    # Without weight or bias (ones and zeros stand in for them).
    rm_n, rv_n = rm.copy(), rv.copy()
    bare = [numbn.batch_norm(x, rm_n, rv_n, None, None, True, 0.3, axis=axis,
                             activation=activation),
            numbn.batch_norm(x, rm_n, rv_n, None, b, False, axis=axis, activation=activation),
            numbn.batch_norm_forward(x, w, axis=axis, activation=activation)[0], rm_n, rv_n]
    out = [y, ye, yn, rm, rv, *into, rm_o, rv_o, *bare]
    for training in (True, False):
        out += numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b, training=training,
                                         axis=axis, activation=activation)
        if activation is None:
            out += numbn.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                             axis=axis)
        dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, training=training,
                                               axis=axis, activation=activation)
        assert dw is None and db is None
        out.append(dx)
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("vdt", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_direct_equals_general(shape, axis, dtype, vdt, activation, spy, monkeypatch,
                               cpu_path):
    """Bitwise the same results, through every kernel family (``cpu_path``)."""
    rng = np.random.default_rng(7)
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.0, 1.0)
    direct = _calls(x, dy, axis, vdt, activation, np.random.default_rng(1))
    # mean and invstd come in x's dtype (float32 for float16): with weights of
    # another, the vectors are of two dtypes and the backward takes the
    # general path.
    stats_dtype = np.float32 if dtype == np.float16 else dtype
    backwards = (4 if activation is None else 2) if vdt == stats_dtype else 0
    # The backward without weight takes ones of mean's dtype: always the direct path.
    backwards += 2
    # The eval without weight takes ones of the running statistics' dtype (vdt),
    # bias of vdt too; the forward without bias, zeros of the weight's.
    assert spy == {"infer_dense": 3, "train_dense": 7, "backward_dense": backwards}
    _general(monkeypatch)
    general = _calls(x, dy, axis, vdt, activation, np.random.default_rng(1))
    assert len(direct) == len(general)
    for k, (p, q) in enumerate(zip(direct, general)):
        assert p.dtype == q.dtype and p.shape == q.shape, k
        np.testing.assert_array_equal(p, q, err_msg=f"result {k}")


def test_direct_path_declines(spy, rng):
    """Calls the direct path leaves to the general path, which validates and runs them."""
    x = make(rng, (8, 4, 3), np.float32)
    c = 4
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    ro = rv.copy()
    ro.flags.writeable = False
    numbn.batch_norm(x, rm, ro, w, b, training=False)  # a read-only vector
    numbn.batch_norm(x.transpose(0, 2, 1), rm, rv, w, b, training=False, axis=2)  # strided
    with pytest.raises(TypeError):  # not a float dtype: the general path refuses it
        numbn.batch_norm(x.astype(np.int32), rm, rv, w, b, training=False)
    numbn.batch_norm(x, rm, rv, w, b, training=False, backend="numpy")
    numbn.batch_norm(x, rm.astype(np.float64), rv, w, b, training=False)  # mixed dtypes
    numbn.batch_norm(x, rm, rv, w, b, training=False, out=np.empty_like(x, order="F"))
    xi = x.copy()
    numbn.batch_norm(xi, rm, rv, w, b, training=False, out=xi)  # in place: the general path
    with pytest.raises(TypeError):  # out of another dtype: the general path refuses it
        numbn.batch_norm(x, rm, rv, w, b, training=False, out=np.empty(x.shape))
    with pytest.raises(ValueError):  # out overlapping x: the general path refuses it
        big = np.zeros((9, 4, 3), np.float32)
        numbn.batch_norm(big[1:], rm, rv, w, b, training=False, out=big[:8])
    with numbn.set_backend("numpy"):
        numbn.batch_norm(x, rm, rv, w, b, training=False)
    assert spy == {"infer_dense": 0, "train_dense": 0, "backward_dense": 0}
    numbn.batch_norm(x, rm, rv, w, b, training=False)
    assert spy["infer_dense"] == 1


@pytest.mark.parametrize("call", [
    lambda x, v: numbn.batch_norm(x, v[:3], v, v, v, False),  # a short vector
    lambda x, v: numbn.batch_norm(x, v, v, v, v, False, axis=3),  # axis out of range
    lambda x, v: numbn.batch_norm(x, v, v, v, v, False, activation="tanh"),
    lambda x, v: numbn.batch_norm(x[:1, :, :1], v, v, v, v, True),  # one value per channel
    lambda x, v: numbn.batch_norm(x, v, v, v, v, True, momentum=None),
    lambda x, v: numbn.batch_norm(x, None, None, v, v, True, momentum="fast"),
    lambda x, v: numbn.batch_norm_forward(x[:1, :, :1], v, v),  # one value per channel
    lambda x, v: numbn.batch_norm_forward(x, v[:3], v),  # a short weight
    lambda x, v: numbn.batch_norm_forward(x, v, v, activation="gelu"),
    lambda x, v: numbn.batch_norm_backward(x[:, :, :2], x, v, v, v),  # dy of another shape
    lambda x, v: numbn.batch_norm_backward(x, x, v[:2], v, v),  # a short mean
    lambda x, v: numbn.batch_norm_backward(x, x, v, v, v, activation="relu6"),
])
def test_bad_input_through_the_direct_path_entry(call, rng):
    """Bad calls that reach the direct path's checks raise the general path's
    errors, and change nothing."""
    x = make(rng, (8, 4, 3), np.float32)
    v = np.ones(4, np.float32)
    kept = x.copy(), v.copy()
    with pytest.raises((ValueError, TypeError)):
        call(x, v)
    np.testing.assert_array_equal(x, kept[0])
    np.testing.assert_array_equal(v, kept[1])


def _layer_steps(convention, momentum, track, freeze_at, x_steps, dys):
    """Three forward/backward steps of a layer (eval at the last), and all it returns and holds."""
    kw = {} if momentum == "default" else {"momentum": momentum}
    axis = -1 if convention in ("keras", "flax") else 1
    bn = numbn.BatchNorm(x_steps[0].shape[axis], convention=convention,
                         track_running_stats=track, **kw)
    bn.weight[:] = np.linspace(0.5, 1.5, bn.num_features)
    bn.bias[:] = np.linspace(-0.3, 0.3, bn.num_features)
    out = []
    for k, (x, dy) in enumerate(zip(x_steps, dys)):
        if k == freeze_at:
            bn.freeze()
        if k == len(x_steps) - 1:
            bn.eval()
        out += [bn(x), bn.backward(dy), bn.grad_weight, bn.grad_bias]
        if track:
            out += [bn.running_mean.copy(), bn.running_var.copy(),
                    np.array(bn.num_batches_tracked)]
    return out


@pytest.mark.parametrize("convention", ["torch", "keras", "paddle", "flax"])
@pytest.mark.parametrize("momentum,track,freeze_at", [
    ("default", True, None), (None, True, None), ("default", False, None), ("default", True, 1)])
def test_layer_direct_equals_general(convention, momentum, track, freeze_at, spy, monkeypatch):
    """The layer's forward by the direct path: the same outputs, gradients,
    running statistics and counters, bit for bit, in every mode."""
    if momentum is None and convention != "torch":
        pytest.skip("momentum=None is a torch convention")
    rng = np.random.default_rng(11)
    channels_last = convention in ("keras", "flax")
    shape = (6, 5, 7, 4) if channels_last else (6, 4, 5, 7)
    xs = [make(rng, shape, np.float32) for _ in range(3)]
    dys = [make(rng, shape, np.float32, 0.0, 1.0) for _ in range(3)]
    direct = _layer_steps(convention, momentum, track, freeze_at, xs, dys)
    assert spy["infer_dense"] + spy["train_dense"] == 3  # every forward took it
    _general(monkeypatch)
    general = _layer_steps(convention, momentum, track, freeze_at, xs, dys)
    for k, (p, q) in enumerate(zip(direct, general)):
        if p is None or q is None:
            assert p is None and q is None, k
            continue
        np.testing.assert_array_equal(p, q, err_msg=f"item {k}")
