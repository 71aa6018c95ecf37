"""Inference folding: an eval-mode BatchNorm absorbed into the layer before it.

After training, ``bn(conv(x))`` in eval mode is an affine map per output
channel, ``s[o] * conv(x)[o] + (bias_bn[o] - s[o] * running_mean[o])`` with
``s = weight_bn / sqrt(running_var + eps)``; multiplying the convolution's (or
linear layer's) weight by ``s`` along its output-channel axis and adjusting its
bias removes the BatchNorm from the inference graph. The arithmetic is that of
``torch.nn.utils.fusion.fuse_conv_bn_weights`` and ``fuse_linear_bn_weights``,
done in float64 and cast back to the layer's dtypes
(``tests/test_folding.py``).
"""

from __future__ import annotations

import numpy as np

from . import _checks
from .layers import BatchNorm, _engine_host

__all__ = ["fold_conv", "fold_linear"]


def _bn_affine(bn: BatchNorm, c: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` in float64 of ``bn``'s inference form, checked against ``c``."""
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a numbn.BatchNorm, not {type(bn).__name__}")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics "
                         "(track_running_stats=False): its eval mode uses batch statistics, "
                         "which no fixed weight can reproduce")
    if bn.num_features != c:
        raise ValueError(f"the BatchNorm has {bn.num_features} channels but the layer "
                         f"before it has {c} output channels")
    mean = np.asarray(_engine_host(bn.running_mean), np.float64)
    var = np.asarray(_engine_host(bn.running_var), np.float64)
    # affine=False counts as weight 1 and bias 0, as torch.nn.utils.fusion does.
    w = np.ones(c) if bn.weight is None else np.asarray(_engine_host(bn.weight), np.float64)
    b = np.zeros(c) if bn.bias is None else np.asarray(_engine_host(bn.bias), np.float64)
    scale = w / np.sqrt(var + bn.eps)
    return scale, b - mean * scale


def _weight(weight, ranks: tuple[int, ...], what: str) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"weight must be float16, float32 or float64, not {weight.dtype}")
    if weight.ndim not in ranks:
        raise ValueError(f"a {what} weight has {' or '.join(map(str, ranks))} dimensions, "
                         f"got shape {weight.shape}")
    return weight


def _bias(bias, c: int, weight: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """``bias`` in float64 (zeros when None) and the dtype the folded bias gets."""
    if bias is None:
        return np.zeros(c), weight.dtype
    bias = np.asarray(bias)
    if bias.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"bias must be float16, float32 or float64, not {bias.dtype}")
    if bias.shape != (c,):
        raise ValueError(f"bias must have shape ({c},) to match the {c} output channels, "
                         f"got {bias.shape}")
    return bias.astype(np.float64), bias.dtype


def fold_conv(weight, bias, bn: BatchNorm, *, transpose: bool = False):
    """Fold an eval-mode BatchNorm into the convolution before it.

    Returns the weight and bias of one convolution that computes
    ``bn(conv(x))`` with ``bn`` in inference form (running statistics), as
    ``torch.nn.utils.fusion.fuse_conv_bn_weights`` does.

    Parameters
    ----------
    weight : ndarray
        The convolution's weight, 1-D, 2-D or 3-D: ``(out, in/groups, *kernel)``,
        or ``(in, out/groups, *kernel)`` for a transposed convolution.
    bias : ndarray of shape (out,) or None
        The convolution's bias; None counts as zeros.
    bn : BatchNorm
        The layer after the convolution, with ``num_features == out``. Its
        running statistics, ``eps``, and ``weight`` and ``bias`` (1 and 0 when
        ``affine=False``) are used whatever its convention, channel axis or
        mode. A fused ``activation="relu"`` is not linear and is not folded:
        apply it to the folded convolution's output.
    transpose : bool
        ``weight`` belongs to a transposed convolution. Its groups are
        ``out / weight.shape[1]``; the scale goes to output channel
        ``g * (out/groups) + j`` of input channel ``i`` in group ``g``, so
        grouped transposed convolutions fold correctly too.

    Returns
    -------
    weight : ndarray
        The folded weight, ``weight``'s shape and dtype.
    bias : ndarray of shape (out,)
        The folded bias, of ``bias``'s dtype (``weight``'s when ``bias`` is None).

    Raises
    ------
    TypeError
        ``bn`` is not a BatchNorm, or a non-floating weight or bias.
    ValueError
        ``bn`` has no running statistics (``track_running_stats=False``);
        ``weight`` does not have 3, 4 or 5 dimensions; the output channels do
        not match ``bn.num_features`` (or, with ``transpose=True``, do not
        divide into whole groups); ``bias`` has the wrong shape.

    Examples
    --------
    >>> import numpy as np, numbn
    >>> bn = numbn.BatchNorm(2, dtype=np.float64).eval()
    >>> bn.running_mean[:] = [1.0, -1.0]
    >>> bn.running_var[:] = [4.0, 0.25]
    >>> bn.eps = 0.0
    >>> w = np.ones((2, 3, 1, 1))             # a 1x1 Conv2d, 3 -> 2 channels
    >>> w2, b2 = numbn.fold_conv(w, None, bn)
    >>> w2[:, 0, 0, 0], b2
    (array([0.5, 2. ]), array([-0.5,  2. ]))
    """
    weight = _weight(weight, (3, 4, 5), "1-D, 2-D or 3-D convolution")
    w64 = weight.astype(np.float64)
    if not transpose:
        c = weight.shape[0]
        scale, shift = _bn_affine(bn, c)
        folded = w64 * scale.reshape((c,) + (1,) * (weight.ndim - 1))
    else:
        c_in, per_group = weight.shape[:2]
        c = bn.num_features if isinstance(bn, BatchNorm) else per_group
        if per_group == 0:
            raise ValueError(f"a transposed convolution weight of shape {weight.shape} has no "
                             f"output channels (its axis 1, out/groups, is 0)")
        if c % per_group or c_in % (c // per_group):
            raise ValueError(f"a transposed convolution weight of shape {weight.shape} "
                             f"cannot have {c} output channels: (in, out/groups, *kernel) "
                             f"needs out a multiple of {per_group} whose groups divide "
                             f"{c_in}")
        groups = c // per_group
        scale, shift = _bn_affine(bn, c)
        # Output channel g * per_group + j is column j of group g's input rows.
        grouped = w64.reshape((groups, c_in // groups) + weight.shape[1:])
        folded = (grouped * scale.reshape((groups, 1, per_group) + (1,) * (weight.ndim - 2))
                  ).reshape(weight.shape)
    b64, bias_dtype = _bias(bias, c, weight)
    return folded.astype(weight.dtype), (b64 * scale + shift).astype(bias_dtype)


def fold_linear(weight, bias, bn: BatchNorm):
    """Fold an eval-mode BatchNorm into the linear layer before it.

    Returns the weight and bias of one linear layer ``x @ weight.T + bias``
    that computes ``bn(linear(x))`` with ``bn`` in inference form, as
    ``torch.nn.utils.fusion.fuse_linear_bn_weights`` does.

    Parameters
    ----------
    weight : ndarray of shape (out, in)
        The linear layer's weight (PyTorch's layout; a Keras ``Dense`` kernel
        is its transpose).
    bias : ndarray of shape (out,) or None
        None counts as zeros.
    bn : BatchNorm
        The layer after, ``num_features == out``; as in :func:`fold_conv`.

    Returns
    -------
    weight : ndarray (out, in), of ``weight``'s dtype.
    bias : ndarray (out,), of ``bias``'s dtype (``weight``'s when None).

    Raises
    ------
    TypeError
        ``bn`` is not a BatchNorm, or a non-floating weight or bias.
    ValueError
        ``bn`` has no running statistics, ``weight`` is not 2-D, ``out`` does
        not match ``bn.num_features``, ``bias`` has the wrong shape.

    Examples
    --------
    >>> import numpy as np, numbn
    >>> bn = numbn.BatchNorm(2, affine=False, eps=0.0, dtype=np.float64).eval()
    >>> bn.running_mean[:] = [3.0, 0.0]
    >>> bn.running_var[:] = [9.0, 1.0]
    >>> w2, b2 = numbn.fold_linear(np.eye(2), np.array([3.0, 1.0]), bn)
    >>> w2, b2
    (array([[0.33333333, 0.        ],
           [0.        , 1.        ]]), array([0., 1.]))
    """
    weight = _weight(weight, (2,), "linear")
    c = weight.shape[0]
    scale, shift = _bn_affine(bn, c)
    b64, bias_dtype = _bias(bias, c, weight)
    folded = weight.astype(np.float64) * scale[:, None]
    return folded.astype(weight.dtype), (b64 * scale + shift).astype(bias_dtype)
