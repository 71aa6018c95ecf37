"""fold_conv and fold_linear: against torch.nn.utils.fusion, and end to end.

End to end: a NumPy reference convolution (below, checked against PyTorch's
when it is installed) followed by numbn's eval-mode BatchNorm must equal the
folded convolution alone, for every convention and dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_TORCH, close, requires_torch
from numpy.lib.stride_tricks import sliding_window_view

import numbn

if HAS_TORCH:
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

needs_torch = requires_torch
CONVENTIONS = sorted(numbn.CONVENTIONS)
DTYPES = [np.float32, np.float64]

# (name, weight shape, groups, transpose); transposed weights are (in, out/groups, *k).
CONVS = [
    ("conv1d", (6, 4, 3), 1, False),
    ("conv2d", (6, 4, 3, 3), 1, False),
    ("conv3d", (4, 2, 2, 2, 2), 1, False),
    ("conv2d_grouped", (6, 2, 3, 2), 2, False),
    ("conv1d_depthwise", (4, 1, 3), 4, False),
    ("conv_transpose1d", (4, 6, 3), 1, True),
    ("conv_transpose2d", (4, 6, 2, 3), 1, True),
    ("conv_transpose2d_grouped", (4, 3, 3, 2), 2, True),
    ("conv_transpose1d_depthwise", (4, 1, 3), 4, True),
]
CONV_IDS = [c[0] for c in CONVS]


# -- a small reference convolution (stride 1, no padding), float64 -------------

def conv_ref(x, w, b, groups):
    """Cross-correlation of ``x (N, Cin, *S)`` with ``w (Cout, Cin/groups, *K)``."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = w.ndim - 2
    cig, cog = x.shape[1] // groups, w.shape[0] // groups
    windows = sliding_window_view(x, w.shape[2:], axis=tuple(range(2, 2 + nd)))
    sum_axes = [1] + list(range(2 + nd, 2 + 2 * nd)), [1] + list(range(2, 2 + nd))
    parts = [np.tensordot(windows[:, g * cig:(g + 1) * cig], w[g * cog:(g + 1) * cog], sum_axes)
             for g in range(groups)]
    y = np.moveaxis(np.concatenate(parts, axis=-1), -1, 1)
    return y + np.asarray(b, np.float64).reshape((1, -1) + (1,) * nd)


def conv_transpose_ref(x, w, b, groups):
    """Transposed convolution of ``x (N, Cin, *S)`` with ``w (Cin, Cout/groups, *K)``."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    spatial, kernel = x.shape[2:], w.shape[2:]
    cig, cog = x.shape[1] // groups, w.shape[1]
    out_spatial = tuple(s + k - 1 for s, k in zip(spatial, kernel, strict=True))
    y = np.zeros((x.shape[0], cog * groups) + out_spatial)
    for g in range(groups):
        xg, wg = x[:, g * cig:(g + 1) * cig], w[g * cig:(g + 1) * cig]
        for k in np.ndindex(*kernel):
            where = tuple(slice(i, i + s) for i, s in zip(k, spatial, strict=True))
            y[(slice(None), slice(g * cog, (g + 1) * cog)) + where] += np.einsum(
                "nc...,co->no...", xg, wg[(slice(None), slice(None)) + k])
    return y + np.asarray(b, np.float64).reshape((1, -1) + (1,) * len(kernel))


def run_conv(x, w, b, groups, transpose):
    return (conv_transpose_ref if transpose else conv_ref)(x, w, b, groups)


def out_channels(shape, groups, transpose):
    return shape[1] * groups if transpose else shape[0]


def in_channels(shape, groups, transpose):
    return shape[0] if transpose else shape[1] * groups


def make_bn(rng, c, convention="torch", dtype=np.float32, affine=True, **kw):
    """An eval-mode BatchNorm with random running statistics and parameters."""
    bn = numbn.BatchNorm(c, convention=convention, dtype=dtype, affine=affine, **kw).eval()
    bn.running_mean[...] = rng.normal(0.5, 1.0, c)
    bn.running_var[...] = rng.uniform(0.2, 3.0, c)
    if affine:
        bn.weight[...] = rng.normal(1.0, 0.5, c)
        bn.bias[...] = rng.normal(0.0, 0.5, c)
    return bn


def assert_close(actual, expected, dtype):
    """``close`` (conftest's per-dtype tolerance) on the scale of ``expected``."""
    close(actual, expected, dtype, scale=max(1.0, float(np.max(np.abs(expected)))))


# -- the reference convolutions are right ----------------------------------------

@needs_torch
@pytest.mark.parametrize("name, shape, groups, transpose", CONVS, ids=CONV_IDS)
def test_reference_conv_matches_torch(name, shape, groups, transpose):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape)
    b = rng.standard_normal(out_channels(shape, groups, transpose))
    x = rng.standard_normal((2, in_channels(shape, groups, transpose)) + (5,) * (len(shape) - 2))
    nd = len(shape) - 2
    fn = getattr(F, f"conv_transpose{nd}d" if transpose else f"conv{nd}d")
    expected = fn(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), groups=groups)
    close(run_conv(x, w, b, groups, transpose), expected.numpy(), np.float64)


# -- against torch.nn.utils.fusion ---------------------------------------------

@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("name, shape, groups, transpose",
                         # torch's transposed fold reshapes the scale to (1, -1, 1, ...):
                         # right for groups=1 only (the grouped case is checked end to end).
                         [c for c in CONVS if not (c[3] and c[2] > 1)],
                         ids=[c[0] for c in CONVS if not (c[3] and c[2] > 1)])
def test_fold_conv_matches_torch(name, shape, groups, transpose, with_bias, affine, dtype):
    rng = np.random.default_rng(1)
    c = out_channels(shape, groups, transpose)
    bn = make_bn(rng, c, dtype=dtype, affine=affine, eps=1e-3)
    w = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(c).astype(dtype) if with_bias else None
    w2, b2 = numbn.fold_conv(w, b, bn, transpose=transpose)

    def t(a):
        return None if a is None else torch.from_numpy(np.array(a))

    tw, tb = fuse_conv_bn_weights(t(w), t(b), t(bn.running_mean), t(bn.running_var), bn.eps,
                                  t(bn.weight), t(bn.bias), transpose=transpose)
    assert w2.dtype == w.dtype and b2.dtype == w.dtype
    assert w2.shape == w.shape and b2.shape == (c,)
    assert_close(w2, tw.detach().numpy(), dtype)
    assert_close(b2, tb.detach().numpy(), dtype)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_linear_matches_torch(with_bias, affine, dtype):
    rng = np.random.default_rng(2)
    bn = make_bn(rng, 5, dtype=dtype, affine=affine)
    w = rng.standard_normal((5, 7)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype) if with_bias else None
    w2, b2 = numbn.fold_linear(w, b, bn)
    ones, zeros = np.ones(5, dtype), np.zeros(5, dtype)
    tw, tb = fuse_linear_bn_weights(
        torch.from_numpy(w), None if b is None else torch.from_numpy(b),
        torch.from_numpy(bn.running_mean), torch.from_numpy(bn.running_var), bn.eps,
        torch.from_numpy(ones if bn.weight is None else bn.weight),
        torch.from_numpy(zeros if bn.bias is None else bn.bias))
    assert w2.dtype == w.dtype and b2.dtype == w.dtype
    assert_close(w2, tw.detach().numpy(), dtype)
    assert_close(b2, tb.detach().numpy(), dtype)


@needs_torch
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_transposed_fold_matches_torch_modules(groups):
    # PyTorch end to end: ConvTranspose2d(groups) then eval BatchNorm2d equals
    # the folded ConvTranspose2d alone.
    rng = np.random.default_rng(3)
    c_in, c_out = 4, 8
    w = rng.standard_normal((c_in, c_out // groups, 3, 2))
    b = rng.standard_normal(c_out)
    bn = make_bn(rng, c_out, dtype=np.float64)
    x = torch.from_numpy(rng.standard_normal((2, c_in, 4, 5)))
    y = F.conv_transpose2d(x, torch.from_numpy(w), torch.from_numpy(b), groups=groups)
    expected = F.batch_norm(y, torch.from_numpy(bn.running_mean),
                            torch.from_numpy(bn.running_var), torch.from_numpy(bn.weight),
                            torch.from_numpy(bn.bias), training=False, eps=bn.eps)
    w2, b2 = numbn.fold_conv(w, b, bn, transpose=True)
    got = F.conv_transpose2d(x, torch.from_numpy(w2), torch.from_numpy(b2), groups=groups)
    close(got.numpy(), expected.numpy(), np.float64)


# -- end to end with numbn's BatchNorm -----------------------------------------

def bn_after(bn, y):
    """``bn`` applied to ``y (N, C, ...)`` whatever its channel axis; back as (N, C, ...)."""
    axis = bn.axis % y.ndim
    return np.moveaxis(bn(np.ascontiguousarray(np.moveaxis(y, 1, axis))), axis, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("name, shape, groups, transpose", CONVS, ids=CONV_IDS)
def test_fold_conv_end_to_end(name, shape, groups, transpose, convention, dtype):
    rng = np.random.default_rng(4)
    c = out_channels(shape, groups, transpose)
    bn = make_bn(rng, c, convention=convention, dtype=dtype)
    w = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    x = rng.standard_normal((3, in_channels(shape, groups, transpose))
                            + (6,) * (len(shape) - 2)).astype(dtype)
    expected = bn_after(bn, run_conv(x, w, b, groups, transpose).astype(dtype))
    w2, b2 = numbn.fold_conv(w, b, bn, transpose=transpose)
    assert w2.dtype == dtype and b2.dtype == dtype
    assert_close(run_conv(x, w2, b2, groups, transpose), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("affine", [True, False])
def test_fold_linear_end_to_end(convention, dtype, affine):
    rng = np.random.default_rng(5)
    bn = make_bn(rng, 6, convention=convention, dtype=dtype, affine=affine)
    w = rng.standard_normal((6, 9)).astype(dtype)
    x = rng.standard_normal((10, 9))
    expected = bn((x @ w.T).astype(dtype))
    w2, b2 = numbn.fold_linear(w, None, bn)
    assert_close(x @ w2.T + b2, expected, dtype)


def test_fold_uses_the_layers_eps_and_ignores_its_mode():
    rng = np.random.default_rng(6)
    w, b = rng.standard_normal((3, 2, 1, 1)), rng.standard_normal(3)
    small = make_bn(rng, 3, dtype=np.float64, eps=1e-5)
    large = make_bn(np.random.default_rng(7), 3, dtype=np.float64, eps=10.0)
    large.running_mean[...], large.running_var[...] = small.running_mean, small.running_var
    large.weight[...], large.bias[...] = small.weight, small.bias
    assert not np.allclose(numbn.fold_conv(w, b, small)[0], numbn.fold_conv(w, b, large)[0])
    # The fold is the inference form, whatever mode the layer is in.
    w_eval, b_eval = numbn.fold_conv(w, b, small)
    w_train, b_train = numbn.fold_conv(w, b, small.train())
    np.testing.assert_array_equal(w_eval, w_train)
    np.testing.assert_array_equal(b_eval, b_train)


def test_fold_keeps_dtypes_and_inputs():
    rng = np.random.default_rng(8)
    bn = make_bn(rng, 4, dtype=np.float64)
    w = rng.standard_normal((4, 3, 3)).astype(np.float16)
    b = rng.standard_normal(4).astype(np.float32)
    w_copy, b_copy, rm = w.copy(), b.copy(), bn.running_mean.copy()
    w2, b2 = numbn.fold_conv(w, b, bn)
    assert w2.dtype == np.float16 and b2.dtype == np.float32
    np.testing.assert_array_equal(w, w_copy)
    np.testing.assert_array_equal(b, b_copy)
    np.testing.assert_array_equal(bn.running_mean, rm)
    _, b_none = numbn.fold_conv(w, None, bn)
    assert b_none.dtype == np.float16


def test_relu_layer_folds_its_affine_part():
    # A fused activation is not folded: relu(folded conv) is the layer's output.
    rng = np.random.default_rng(9)
    bn = make_bn(rng, 4, dtype=np.float64, activation="relu")
    w, b = rng.standard_normal((4, 3, 3)), rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 7))
    w2, b2 = numbn.fold_conv(w, b, bn)
    close(np.maximum(conv_ref(x, w2, b2, 1), 0.0), bn(conv_ref(x, w, b, 1)), np.float64)


# -- errors -------------------------------------------------------------------------

def test_no_running_statistics_is_an_error():
    bn = numbn.BatchNorm(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        numbn.fold_conv(np.ones((4, 2, 3)), None, bn)
    with pytest.raises(ValueError, match="running statistics"):
        numbn.fold_linear(np.ones((4, 2)), None, bn)


@pytest.mark.parametrize("shape, transpose", [
    ((5, 2, 3), False),          # 5 output channels, the layer has 4
    ((4, 3, 3), True),           # out/groups = 3 does not divide 4
    ((3, 2, 3), True),           # 2 groups of 2 outputs, but 3 inputs do not split in 2
    ((4, 8, 3, 3), True),        # out/groups = 8 > 4
    ((4, 0, 3), True),           # no output channels (was a ZeroDivisionError)
    ((0, 2, 3), False),          # no output channels
])
def test_channel_mismatch_is_an_error(shape, transpose):
    with pytest.raises(ValueError, match="channels"):
        numbn.fold_conv(np.ones(shape), None, numbn.BatchNorm(4), transpose=transpose)


def test_linear_channel_mismatch_is_an_error():
    with pytest.raises(ValueError, match="channels"):
        numbn.fold_linear(np.ones((3, 4)), None, numbn.BatchNorm(4))


@pytest.mark.parametrize("shape", [(4,), (4, 2), (4, 1, 1, 1, 1, 1)])
def test_conv_weight_of_wrong_rank_is_an_error(shape):
    with pytest.raises(ValueError, match="dimensions"):
        numbn.fold_conv(np.ones(shape), None, numbn.BatchNorm(4))


@pytest.mark.parametrize("shape", [(4,), (4, 2, 3)])
def test_linear_weight_of_wrong_rank_is_an_error(shape):
    with pytest.raises(ValueError, match="dimensions"):
        numbn.fold_linear(np.ones(shape), None, numbn.BatchNorm(4))


def test_bias_of_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match="bias"):
        numbn.fold_conv(np.ones((4, 2, 3)), np.ones(3), numbn.BatchNorm(4))
    with pytest.raises(ValueError, match="bias"):
        numbn.fold_linear(np.ones((4, 2)), np.ones((4, 1)), numbn.BatchNorm(4))


def test_bad_types_are_errors():
    with pytest.raises(TypeError, match="BatchNorm"):
        numbn.fold_conv(np.ones((4, 2, 3)), None, object())
    with pytest.raises(TypeError, match="BatchNorm"):
        numbn.fold_conv(np.ones((4, 2, 3)), None, object(), transpose=True)
    with pytest.raises(TypeError, match="weight"):
        numbn.fold_conv(np.ones((4, 2, 3), dtype=np.int64), None, numbn.BatchNorm(4))
    with pytest.raises(TypeError, match="bias"):
        numbn.fold_linear(np.ones((4, 2)), np.ones(4, dtype=np.int32), numbn.BatchNorm(4))


# -- the self-checks behind ``numbn check`` ------------------------------------------

def test_tool_checks_pass():
    from numbn._tool_checks import tool_checks

    results = tool_checks(np.random.default_rng(0))
    assert len(results) == 4
    for name, passed, detail in results:
        assert passed, f"{name}: {detail}"


def test_tool_checks_report_failures(monkeypatch):
    from numbn import _tool_checks

    def broken(weight, bias, bn, *, transpose=False):
        raise RuntimeError("broken fold")

    monkeypatch.setattr(_tool_checks, "fold_conv", broken)
    results = dict((name, (passed, detail)) for name, passed, detail in
                   _tool_checks.tool_checks(0))
    assert results["fold_conv vs conv + eval BatchNorm"] == (False, "RuntimeError: broken fold")
    assert sum(passed for passed, _ in results.values()) == 3
