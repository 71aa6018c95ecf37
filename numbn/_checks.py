"""Input validation shared by the functions and the layers.

Every check runs before anything is written, so a bad call leaves the
caller's arrays and the running statistics as they were.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._dispatch import is_device_array

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: The dtypes the CPU kernels take the per-channel vectors in as they are (x may
#: be float16 too: the kernels take it as its bits, ``numbn._cpu._bits``).
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def dtype_of(a) -> np.dtype:
    try:
        return np.dtype(a.dtype)
    except TypeError:  # a framework dtype such as torch.float32
        return np.dtype(str(a.dtype).rsplit(".", 1)[-1])


def array(a, name: str):
    """``a`` if it is a NumPy or device array of a floating dtype."""
    if type(a) is np.ndarray and a.dtype in FLOAT_DTYPES:
        return a  # the common case, checked first: every call validates 3 to 7 arrays
    if isinstance(a, (np.ma.MaskedArray, np.matrix)):  # subclasses the kernels cannot honour
        raise TypeError(f"{name} is a {type(a).__module__}.{type(a).__name__}, which numbn "
                        f"does not take (it would ignore a mask; a matrix stays 2-D): pass "
                        f"a plain array, e.g. np.asarray({name}) or {name}.filled(value)")
    if not (isinstance(a, np.ndarray) or is_device_array(a)):
        raise TypeError(f"{name} must be a NumPy array or a CUDA device array, "
                        f"not {type(a).__name__}")
    dt = dtype_of(a)
    if dt not in FLOAT_DTYPES:
        if dt.kind == "f" and dt.newbyteorder("=") in FLOAT_DTYPES:
            raise TypeError(f"{name} is {dt.newbyteorder('=')} of the other byte order "
                            f"({dt.str}); numbn takes the machine's own, as PyTorch does: "
                            f"{name}.astype({name}.dtype.newbyteorder('='))")
        raise TypeError(f"{name} must be float16, float32 or float64, not {dt}")
    return a


def input_array(x, name: str = "x"):
    array(x, name)
    if len(x.shape) < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (N, C, ...), "
                         f"got shape {tuple(x.shape)}")
    return x


def channel_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an integer, not {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return int(axis) % ndim


def vector(v, c: int, name: str, *, writable: bool = False):
    """``v`` if None or a 1-D floating array of length ``c``."""
    if v is None:
        return None
    array(v, name)
    if tuple(v.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},) to match the {c} channels, "
                         f"got {tuple(v.shape)}")
    if writable and isinstance(v, np.ndarray) and not v.flags.writeable:
        raise ValueError(f"{name} is read-only but is updated in place")
    return v


def training_count(shape, axis: int) -> int:
    """Values per channel in a training batch; refuses fewer than two."""
    c = shape[axis]
    n = math.prod(shape) // c if c else 0
    if n == 0:
        raise ValueError(f"cannot train on an empty batch (input shape {tuple(shape)})")
    if n == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {tuple(shape)}")
    return n


def same_shape(a, x, name: str):
    array(a, name)
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, "
                         f"got {tuple(a.shape)}")
    return a


def output(out, x):
    """``out`` if it can receive ``y``: x's shape and dtype, writable, and
    either x itself or not overlapping it."""
    if out is None:
        return None
    same_shape(out, x, "out")
    if dtype_of(out) != dtype_of(x):
        raise TypeError(f"out must have x's dtype {dtype_of(x)}, got {dtype_of(out)}")
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        if any(st == 0 and n > 1 for st, n in zip(out.strides, out.shape)):
            raise ValueError("out repeats its elements (a zero stride, as from as_strided): "
                             "several results would land on each")
        same_view = (out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                     and out.strides == x.strides)
        if not same_view and np.may_share_memory(out, x):
            raise ValueError("out overlaps x without being x itself")
    return out


def _real(value, name: str) -> float:
    """``value`` as a float if it is a real number (a Python or NumPy scalar,
    or a 0-d array of one), else a TypeError that names it."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def eps(value) -> float:
    """``eps`` as a float: a real number, 0 or more. A negative eps (or NaN)
    is a ValueError, as PyTorch's ``batch_norm`` makes it; 0 is taken (a
    constant channel then divides by zero, :func:`numbn.batch_norm_forward`'s
    exact statistics), where PyTorch 2.13 refuses it in training."""
    if type(value) is float and value >= 0.0:  # the common case, first
        return value
    v = _real(value, "eps")
    if not v >= 0.0:
        raise ValueError(f"eps must be non-negative, got {v}")
    return v


def momentum(value) -> float:
    """``momentum`` as a float: a real number (the functions take no None;
    :class:`numbn.BatchNorm` does, in the torch convention)."""
    if type(value) is float:
        return value
    return _real(value, "momentum")


def activation(name):
    if name not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', not {name!r}")
    return name == "relu"


def kernel_ready(vectors, c: int | None = None) -> bool:
    """True when the per-channel ``vectors`` are NumPy arrays all of one
    dtype in ``KERNEL_DTYPES``, C-contiguous, aligned and writable
    (``flags.carray``: Numba compiles a variant per array type, and a
    read-only array is a type of its own), and of shape ``(c,)`` when ``c``
    is given: the CPU kernels take them as they are."""
    first = vectors[0]
    if not isinstance(first, np.ndarray):  # before the dtype test: dtype(None) is float64
        return False
    dt = first.dtype
    if dt not in KERNEL_DTYPES:
        return False
    for v in vectors:
        if (not isinstance(v, np.ndarray) or v.dtype != dt or not v.flags.carray
                or (c is not None and v.shape != (c,))):
            return False
    return True
