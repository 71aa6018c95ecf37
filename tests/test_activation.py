"""Fused BatchNorm + ReLU (``activation="relu"``), forward and backward.

Checked against ``relu(batch_norm(...))`` and its autograd gradients in
PyTorch (when installed) and against the float64 reference, in training and
eval mode, NCHW, NHWC and 2-D, float32 and float64; and at the boundary where
``x_hat * w + b`` is exactly 0, where PyTorch's ReLU passes no gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_TORCH, TINY_BIASES, assert_mask_follows_output, close, requires_torch

import numbn

if HAS_TORCH:
    import torch
    import torch.nn.functional as F

needs_torch = requires_torch
DTYPES = [np.float32, np.float64]
# (name, shape, channel axis)
LAYOUTS = [("nchw", (4, 5, 6, 7), 1), ("nhwc", (4, 6, 7, 5), -1), ("2d", (64, 5), 1)]
LAYOUT_IDS = [name for name, _, _ in LAYOUTS]
EPS = 1e-5


def assert_close(actual, expected, dtype):
    """``close`` (conftest's per-dtype tolerance) on the scale of ``expected``."""
    close(actual, expected, dtype, scale=max(1.0, float(np.max(np.abs(expected)))))


def case(seed, shape, axis, dtype):
    """x, dy, weight (some negative), bias, running mean and variance."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.normal(0.5, 1.0, c).astype(dtype)
    b = rng.normal(0.0, 0.7, c).astype(dtype)
    rm = rng.normal(0.3, 0.5, c).astype(dtype)
    rv = rng.uniform(0.5, 3.0, c).astype(dtype)
    return x, dy, w, b, rm, rv


def to_torch(a, axis):
    """A NumPy array as a torch tensor with its channel axis at 1."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))


def from_torch(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


def torch_relu_bn(x, dy, w, b, rm, rv, training, axis):
    """PyTorch's ``relu(batch_norm(x))``, its gradients and updated running stats."""
    xt = to_torch(x, axis).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    bt = torch.from_numpy(b.copy()).requires_grad_(True)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    z = F.batch_norm(xt, rmt, rvt, wt, bt, training=training, momentum=0.1, eps=EPS)
    y = F.relu(z)
    y.backward(to_torch(dy, axis))
    return (from_torch(y, axis), from_torch(xt.grad, axis), wt.grad.numpy(), bt.grad.numpy(),
            rmt.numpy(), rvt.numpy(), from_torch(z, axis))


def numbn_relu_bn(x, dy, w, b, rm, rv, training, axis, backend="cpu"):
    """numbn's fused forward (``batch_norm``) and backward, plus updated running stats."""
    rm, rv = rm.copy(), rv.copy()
    y = numbn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=EPS, axis=axis,
                         backend=backend, activation="relu")
    if training:
        y2, mean, invstd = numbn.batch_norm_forward(x, w, b, eps=EPS, axis=axis, backend=backend,
                                                    activation="relu")
        np.testing.assert_array_equal(y2, y)
    else:
        mean, invstd = rm, (1.0 / np.sqrt(rv.astype(np.float64) + EPS)).astype(rv.dtype)
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, w, bias=b, training=training,
                                           axis=axis, backend=backend, activation="relu")
    return y, dx, dw, db, rm, rv


@needs_torch
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_fused_matches_torch(name, shape, axis, dtype, training):
    args = case(0, shape, axis, dtype)
    expected = torch_relu_bn(*args, training, axis)
    got = numbn_relu_bn(*args, training, axis)
    for g, e, what in zip(got, expected[:6], ("y", "dx", "dweight", "dbias", "rm", "rv"),
                            strict=True):
        assert g.dtype == dtype, what
        assert_close(g, e, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_fused_matches_reference(name, shape, axis, dtype, training, cpu_path):
    args = case(1, shape, axis, dtype)
    expected = numbn_relu_bn(*args, training, axis, backend="numpy")
    got = numbn_relu_bn(*args, training, axis, backend="cpu")
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_fused_equals_plain_then_relu(name, shape, axis, training):
    # Independent of both references: the fused backward is the plain backward of
    # dy masked where the plain output is positive.
    x, dy, w, b, rm, rv = case(2, shape, axis, np.float64)
    y, dx, dw, db, _, _ = numbn_relu_bn(x, dy, w, b, rm, rv, training, axis)
    if training:
        z, mean, invstd = numbn.batch_norm_forward(x, w, b, eps=EPS, axis=axis)
    else:
        z = numbn.batch_norm(x, rm, rv, w, b, eps=EPS, axis=axis)
        mean, invstd = rm, 1.0 / np.sqrt(rv + EPS)
    np.testing.assert_array_equal(y, np.maximum(z, 0.0))
    expected = numbn.batch_norm_backward(np.where(z > 0, dy, 0.0), x, mean, invstd, w,
                                         training=training, axis=axis)
    for g, e in zip((dx, dw, db), expected, strict=True):
        assert_close(g, e, np.float64)


# -- the boundary: x_hat * w + b exactly 0 --------------------------------------

def boundary_case(shape, axis, dtype):
    """Each channel holds -1, 0 and 1 equally often (mean exactly 0), bias 0: the
    ReLU's input is exactly 0 wherever x is 0."""
    n = int(np.prod(shape))
    values = np.resize(np.array([-1.0, 0.0, 1.0]), n)
    moved = np.moveaxis(np.empty(shape), axis, -1).shape
    per_channel = values.reshape(moved[-1], -1).T.reshape(moved)  # each channel: -1, 0, 1, ...
    x = np.ascontiguousarray(np.moveaxis(per_channel, -1, axis)).astype(dtype)
    c = shape[axis]
    rng = np.random.default_rng(3)
    dy = rng.standard_normal(shape).astype(dtype)
    w = np.linspace(0.5, 2.0, c).astype(dtype)
    w[0] = -1.5  # a negative weight flips which side passes
    return x, dy, w, np.zeros(c, dtype), np.zeros(c, dtype), np.full(c, 2.0 / 3.0, dtype)


BOUNDARY_LAYOUTS = [("nchw", (4, 3, 3, 5), 1), ("nhwc", (4, 3, 5, 3), -1),
                    ("2d", (6, 3), 1)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, axis", BOUNDARY_LAYOUTS,
                         ids=[n for n, _, _ in BOUNDARY_LAYOUTS])
def test_boundary_passes_no_gradient(name, shape, axis, dtype, training, cpu_path):
    x, dy, w, b, rm, rv = boundary_case(shape, axis, dtype)
    assert np.all(np.sum(x, axis=tuple(a for a in range(x.ndim) if a != axis % x.ndim)) == 0)
    y, dx, dw, db, _, _ = numbn_relu_bn(x, dy, w, b, rm, rv, training, axis)
    at_zero = x == 0
    assert np.all(y[at_zero] == 0)
    # The masked gradient: 0 at the boundary and where the ReLU's input is negative.
    wb = np.moveaxis(np.broadcast_to(w, np.moveaxis(x, axis, -1).shape), -1, axis)
    passed = x * wb > 0
    g = np.where(passed, dy, 0).astype(np.float64)
    reduce = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    assert_close(db, g.sum(axis=reduce), dtype)
    ref = numbn_relu_bn(x, dy, w, b, rm, rv, training, axis, backend="numpy")
    for got, expected in zip((y, dx, dw, db), ref[:4], strict=True):
        assert_close(got, expected, dtype)
    if not training:
        # Inference form: dx is exactly dy * w * invstd where the ReLU passed, else 0.
        assert np.all(dx[~passed] == 0)


@needs_torch
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, axis", BOUNDARY_LAYOUTS,
                         ids=[n for n, _, _ in BOUNDARY_LAYOUTS])
def test_boundary_matches_torch(name, shape, axis, dtype, training):
    args = boundary_case(shape, axis, dtype)
    expected = torch_relu_bn(*args, training, axis)
    z_torch = expected[-1]
    # Precondition: PyTorch's own ReLU input is exactly 0 there too, so its
    # gradient is threshold_backward's 0.
    assert np.all(z_torch[args[0] == 0] == 0)
    got = numbn_relu_bn(*args, training, axis)
    for g, e in zip(got, expected[:6], strict=True):
        assert_close(g, e, dtype)


def test_boundary_with_nonzero_mean_in_eval():
    # x equal to the running mean exactly: (x - m) * a + t is exactly t = 0.
    x = np.array([[2.5, -1.0], [3.0, -1.0], [2.0, 0.5]], np.float32)
    rm = np.array([2.5, -1.0], np.float32)
    rv = np.array([0.3, 2.0], np.float32)
    w = np.array([1.7, -0.3], np.float32)
    b = np.zeros(2, np.float32)
    dy = np.ones_like(x)
    for backend in ("cpu", "numpy"):
        y, dx, dw, db, _, _ = numbn_relu_bn(x, dy, w, b, rm, rv, False, 1, backend=backend)
        assert y[0, 0] == 0 and y[0, 1] == 0 and y[1, 1] == 0
        assert dx[0, 0] == 0 and dx[0, 1] == 0 and dx[1, 1] == 0
        np.testing.assert_array_equal(db, [1.0, 0.0])


TINY_LAYOUTS = [("nchw", (2, 5, 8, 16), 1), ("nhwc", (2, 8, 16, 5), -1), ("2d", (256, 5), 1)]


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, shape, axis", TINY_LAYOUTS, ids=[n for n, _, _ in TINY_LAYOUTS])
def test_float16_mask_is_that_of_the_stored_output(name, shape, axis, training, backend,
                                                   cpu_path):
    """float16 x: the backward passes the gradient exactly where the forward's
    float16 output is positive, as PyTorch's ReLU after a float16 BatchNorm.
    A ReLU input in (0, 2**-25] is stored as 0, and passed before."""
    x = np.zeros(shape, np.float16)  # every x is the mean: the ReLU's input is the bias
    c = shape[axis]
    b = np.array(TINY_BIASES, np.float32)
    w, rm, rv = np.ones(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)
    dy = np.random.default_rng(4).standard_normal(shape).astype(np.float16)
    y, dx, dw, db, _, _ = numbn_relu_bn(x, dy, w, b, rm, rv, training, axis, backend=backend)
    assert_mask_follows_output(y, dx, db, dy, axis, training)


@needs_torch
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16_tiny_relu_inputs_match_torch(training):
    """The same biases through PyTorch's float16 BatchNorm (float32
    parameters) and ReLU: the same outputs and bias gradient."""
    x = np.zeros((6, 5), np.float16)
    b = np.array(TINY_BIASES, np.float32)
    w, rm, rv = np.ones(5, np.float32), np.zeros(5, np.float32), np.ones(5, np.float32)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float16)
    expected = torch_relu_bn(x, dy, w, b, rm, rv, training, 1)
    got = numbn_relu_bn(x, dy, w, b, rm, rv, training, 1)
    np.testing.assert_array_equal(got[0], expected[0])  # y
    np.testing.assert_allclose(got[3], expected[3], rtol=1e-3)  # dbias


# -- the layer ---------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_with_relu_matches_torch_modules(dtype):
    x, dy, w, b, _, _ = case(4, (8, 5, 4, 3), 1, dtype)
    bn = numbn.BatchNorm(5, activation="relu", dtype=dtype)
    bn.weight[...], bn.bias[...] = w, b
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    tbn = torch.nn.BatchNorm2d(5, dtype=tdtype)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(w))
        tbn.bias.copy_(torch.from_numpy(b))
    model = torch.nn.Sequential(tbn, torch.nn.ReLU())
    for training, seed in ((True, 5), (True, 6), (False, 7)):
        bn.train(training)
        model.train(training)
        x = (np.random.default_rng(seed).standard_normal(x.shape) + 0.3).astype(dtype)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = model(xt)
        tbn.weight.grad = tbn.bias.grad = None
        yt.backward(torch.from_numpy(dy))
        y = bn(x)
        dx = bn.backward(dy)
        assert_close(y, yt.detach().numpy(), dtype)
        assert_close(dx, xt.grad.numpy(), dtype)
        assert_close(bn.grad_weight, tbn.weight.grad.numpy(), dtype)
        assert_close(bn.grad_bias, tbn.bias.grad.numpy(), dtype)
        assert_close(bn.running_mean, tbn.running_mean.numpy(), dtype)
        assert_close(bn.running_var, tbn.running_var.numpy(), dtype)
    assert bn.num_batches_tracked == int(tbn.num_batches_tracked)


@pytest.mark.parametrize("convention", sorted(numbn.CONVENTIONS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_with_relu_equals_plain_layer_then_relu(convention, training):
    # Every convention, its own default axis (channels last for keras and flax).
    fused = numbn.BatchNorm(5, convention=convention, activation="relu", dtype=np.float64)
    plain = numbn.BatchNorm(5, convention=convention, dtype=np.float64)
    shape = (4, 5, 3, 3) if fused.axis == 1 else (4, 3, 3, 5)
    x, dy, w, b, rm, rv = case(8, shape, fused.axis, np.float64)
    for layer in (fused, plain):
        layer.weight[...], layer.bias[...] = w, b
        layer.running_mean[...], layer.running_var[...] = rm, rv
        layer.train(training)
    y = fused(x)
    z = plain(x)
    np.testing.assert_array_equal(y, np.maximum(z, 0.0))
    assert_close(fused.backward(dy), plain.backward(np.where(z > 0, dy, 0.0)), np.float64)
    assert_close(fused.running_mean, plain.running_mean, np.float64)
    assert_close(fused.running_var, plain.running_var, np.float64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_fused_with_split_reductions(tiny_tasks, name, shape, axis, training):
    # Small inputs split over many tasks and blocks, as large ones are.
    args = case(9, shape, axis, np.float32)
    expected = numbn_relu_bn(*args, training, axis, backend="numpy")
    for g, e in zip(numbn_relu_bn(*args, training, axis), expected, strict=True):
        assert_close(g, e, np.float32)


@pytest.mark.parametrize("rows", [2, 3, 5, 66, 67])
@pytest.mark.parametrize("axis", [1, -1], ids=["2d", "nhwc"])
def test_fused_backward_any_row_count(rows, axis, cpu_path):
    # The channels-last ReLU sums go four rows at a time, then row by row
    # for a block's last rows: every remainder of rows mod 4.
    shape = (rows, 6) if axis == 1 else (rows, 1, 1, 6)
    args = case(rows, shape, axis, np.float32)
    expected = numbn_relu_bn(*args, True, axis, backend="numpy")
    for g, e in zip(numbn_relu_bn(*args, True, axis), expected, strict=True):
        assert_close(g, e, np.float32)
