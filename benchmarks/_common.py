"""Inputs and checks shared by the asv benchmarks."""

from __future__ import annotations

import os

import numpy as np

import numbn
from numbn import _reference as ref

#: Sizes of the matrix: (N, C, H, W) before the layout is applied.
SIZES = {"small": (8, 16, 16, 16), "medium": (16, 64, 28, 28), "large": (32, 64, 56, 56)}
# ``NUMBN_ASV_SIZES=small`` (a comma list) narrows the size axis: CI's smoke run
# uses it to run every benchmark once in minutes; the default is all sizes.
if os.environ.get("NUMBN_ASV_SIZES"):
    SIZES = {k: v for k, v in SIZES.items()
             if k in os.environ["NUMBN_ASV_SIZES"].split(",")} or SIZES
LAYOUTS = ("NCHW", "NHWC", "2-D", "strided")
DTYPES = ("float16", "float32", "float64")
BACKENDS = ("cpu", "numpy", "cuda")


def require(backend: str) -> None:
    """asv marks a benchmark skipped when setup raises NotImplementedError."""
    if backend not in numbn.available_backends():
        raise NotImplementedError(f"backend {backend!r} is not available here")


def make_input(size: str, layout: str, dtype: str, seed: int = 0):
    """``(x, axis)`` for a layout: NCHW, NHWC (channels last), 2-D (N*H*W, C)
    or a strided view (every other image of a twice-as-long NCHW batch)."""
    n, c, h, w = SIZES[size]
    rng = np.random.default_rng(seed)
    if layout == "NCHW":
        return rng.standard_normal((n, c, h, w)).astype(dtype), 1
    if layout == "NHWC":
        return rng.standard_normal((n, h, w, c)).astype(dtype), -1
    if layout == "2-D":
        return rng.standard_normal((n * h * w, c)).astype(dtype), 1
    if layout == "strided":
        return rng.standard_normal((2 * n, c, h, w)).astype(dtype)[::2], 1
    raise ValueError(layout)


def check_forward(x, axis, y, dtype) -> None:
    """Refuse to time a backend whose result is wrong."""
    tol = {"float16": 3e-3, "float32": 5e-5, "float64": 1e-9}[dtype]
    expected = ref.forward_train(x, axis=axis)[0]
    err = float(np.max(np.abs(y.astype(np.float64) - expected)))
    if not err <= tol * 10:
        raise AssertionError(f"result differs from the reference by {err}")
