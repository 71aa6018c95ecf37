"""The pure-NumPy float64 reference: the ``"numpy"`` backend and the oracle.

Written for clarity, not speed, and independent of the kernels' canonical
view: it moves the channel axis last and reduces over everything else. Every
result is float64.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def _quiet(fn):
    """Run ``fn`` without floating-point warnings: NaN and Inf are legal input
    and propagate to their channel's outputs (tests/test_bad_input.py)."""

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return fn(*args, **kwargs)

    return quiet


def _channels_last(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` as float64 with the channel axis moved last and the rest flattened."""
    moved = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    # The row count spelled out: reshape(-1, 0) is ambiguous when C is 0.
    return moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])


def _from_channels_last(flat: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    moved_shape = np.moveaxis(np.empty(like.shape, dtype=np.bool_), axis, -1).shape
    return np.moveaxis(flat.reshape(moved_shape), -1, axis)


def _vector(v, c: int, fill: float) -> np.ndarray:
    return np.full(c, fill) if v is None else np.asarray(v, dtype=np.float64)


@_quiet
def batch_stats(x: np.ndarray, axis: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean, biased variance and count, by the corrected
    two-pass formula: the deviations from the first mean also give that
    mean's own error, their mean (NumPy sums an axis that is not the last
    one element by element, so with a large mean against the spread the
    first mean alone was off by 5e-9 of the spread in float64, 50 times the
    CPU kernels' error). A channel whose first mean is not finite keeps it
    (an infinite value's channel has mean inf, as in the kernels)."""
    flat = _channels_last(x, axis)
    mean = flat.mean(axis=0)
    dev = flat - mean
    shift = dev.mean(axis=0)
    # Never below 0, which rounding could give a constant channel (NaN stays NaN).
    var = np.maximum((dev ** 2).mean(axis=0) - shift ** 2, 0.0)
    return np.where(np.isfinite(shift), mean + shift, mean), var, flat.shape[0]


@_quiet
def normalize(x, mean, var, weight=None, bias=None, eps=1e-5, axis=1, activation=None):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, float64."""
    flat = _channels_last(x, axis)
    c = flat.shape[1]
    y = (flat - mean) / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    y = y * _vector(weight, c, 1.0) + _vector(bias, c, 0.0)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return _from_channels_last(y, x, axis)


@_quiet
def forward_train(x, weight=None, bias=None, eps=1e-5, axis=1, activation=None):
    """Training forward: ``(y, mean, invstd, var_biased, count)``, all float64."""
    mean, var, count = batch_stats(x, axis)
    y = normalize(x, mean, var, weight, bias, eps, axis, activation)
    return y, mean, 1.0 / np.sqrt(var + eps), var, count


def relu_floor(dtype) -> float:
    """The largest ReLU input that ``dtype`` stores as 0: half its least
    subnormal, a tie that rounds to 0 (2**-25 for float16, 2**-150 for
    float32, 0 for float64). A fused ReLU's backward passes the gradient
    above it, where the forward's stored output is positive."""
    return float(np.finfo(dtype).smallest_subnormal) / 2


@_quiet
def backward(dy, x, mean, invstd, weight=None, training=True, axis=1,
             bias=None, activation=None):
    """Gradients of ``sum(dy * y)``: ``(dx, dweight, dbias)``, float64.

    ``training=True`` differentiates through the batch statistics;
    ``training=False`` treats ``mean`` and ``invstd`` as constants.
    """
    g = _channels_last(dy, axis)
    flat = _channels_last(x, axis)
    c = flat.shape[1]
    w = _vector(weight, c, 1.0)
    mean = np.asarray(mean, dtype=np.float64)
    invstd = np.asarray(invstd, dtype=np.float64)
    xhat = (flat - mean) * invstd
    if activation == "relu":
        # The mask of max(z, 0) at z == 0 takes the zero branch, as torch's relu
        # does; z as the forward stores it, in x's dtype: float16 rounds a z in
        # (0, 2**-25] to 0 (float32 one in (0, 2**-150]), and PyTorch's ReLU
        # after it passes nothing there.
        g = np.where(xhat * w + _vector(bias, c, 0.0) > relu_floor(x.dtype), g, 0.0)
    dbias = g.sum(axis=0)
    dweight = (g * xhat).sum(axis=0)
    if training:
        n = flat.shape[0]
        dx = w * invstd * (g - dbias / n - xhat * dweight / n)
    else:
        dx = g * w * invstd
    dx = _from_channels_last(dx, x, axis)
    if weight is None:
        return dx, None, None
    return dx, dweight, dbias


@_quiet
def update_running(running: np.ndarray, batch: np.ndarray, factor: float) -> np.ndarray:
    """``(1 - factor) * running + factor * batch`` in float64 (torch's form)."""
    return (1.0 - factor) * np.asarray(running, dtype=np.float64) + factor * batch
