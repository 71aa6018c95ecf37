"""The canonical ``(outer, C, inner)`` view every kernel works on.

The statistics are taken over every axis but the channel axis, so the order of
the other axes does not matter. A :class:`Plan` sorts them by stride, merges
neighbours that are one strided run in memory, and puts the runs with larger
strides than the channel's before it ("outer") and the rest after it
("inner"). NCHW becomes ``(N, C, H*W)``, NHWC ``(N*H*W, C, 1)``, an
F-ordered NCHW array ``(W*H, C, N)``: views, never copies.

An array whose non-channel axes do not reduce to two strided runs (a crop in
two spatial axes of an NCHW tensor, for example) has no such view. It is then
copied once into a dense buffer in the plan's axis order (``Plan.dense``);
outputs are always allocated in that order, so they keep the input's memory
layout (channels-last in, channels-last out).
"""

from __future__ import annotations

import functools
import math
import mmap
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _config


def _runs(axes, shape, strides):
    """Group ``axes`` (sorted by decreasing |stride|) into mergeable runs."""
    runs: list[list[int]] = []
    for a in axes:
        if runs and strides[runs[-1][-1]] == strides[a] * shape[a]:
            runs[-1].append(a)
        else:
            runs.append([a])
    return runs


@dataclass(frozen=True)
class Plan:
    """How an array of ``shape`` maps to ``(outer, C, inner)``."""

    shape: tuple
    axis: int
    outer_axes: tuple
    inner_axes: tuple
    #: Axes of the array in the plan's order (size-1 axes first).
    order: tuple = field(init=False, repr=False, compare=False)
    #: ``(outer, C, inner)``.
    dims: tuple = field(init=False, repr=False, compare=False)
    #: The transpose from a buffer in ``order`` back to the array's axes,
    #: None when ``order`` is already the identity.
    back: tuple | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        used = set(self.outer_axes) | set(self.inner_axes) | {self.axis}
        rest = tuple(a for a in range(len(self.shape)) if a not in used)
        object.__setattr__(self, "order", rest + self.outer_axes + (self.axis,)
                           + self.inner_axes)
        object.__setattr__(self, "dims", (
            math.prod(self.shape[a] for a in self.outer_axes), self.shape[self.axis],
            math.prod(self.shape[a] for a in self.inner_axes)))
        identity = self.order == tuple(range(len(self.shape)))
        object.__setattr__(self, "back", None if identity
                           else tuple(int(i) for i in np.argsort(self.order)))

    @classmethod
    def of(cls, x, axis: int) -> Plan:
        """The plan of ``x`` (any array with ``shape`` and ``strides``), from a
        cache: a training loop asks for the same few layouts every step."""
        return _plan(tuple(x.shape), tuple(x.strides), axis)

    @classmethod
    def _make(cls, shape, strides, axis: int) -> Plan:
        ndim = len(shape)
        others = [a for a in range(ndim) if a != axis and shape[a] != 1]
        others.sort(key=lambda a: -abs(strides[a]))
        runs = _runs(others, shape, strides)
        # One channel has no stride that matters: everything goes inner, so C=1
        # is one long channel-major run, not a million rows of one value.
        channel_stride = abs(strides[axis]) if shape[axis] > 1 else np.inf
        if len(runs) > 2:
            # No two-run view exists: keep the memory order, outer then inner.
            outer = [a for a in others if abs(strides[a]) > channel_stride]
            inner = [a for a in others if abs(strides[a]) <= channel_stride]
            return cls(shape, axis, tuple(outer), tuple(inner))
        if len(runs) == 2:
            return cls(shape, axis, tuple(runs[0]), tuple(runs[1]))
        if len(runs) == 1 and abs(strides[runs[0][-1]]) > channel_stride:
            return cls(shape, axis, tuple(runs[0]), ())
        return cls(shape, axis, (), tuple(runs[0]) if runs else ())

    def view(self, a: np.ndarray) -> np.ndarray | None:
        """``a`` as ``(outer, C, inner)`` without a copy, or None if impossible."""
        outer, c, inner = self.dims
        if self.back is None and a.flags.c_contiguous:
            return a.reshape(outer, c, inner)  # the common case, and the fastest
        strides = []
        for group in (self.outer_axes, self.inner_axes):
            if any(a.strides[p] != a.strides[q] * a.shape[q] for p, q in zip(group, group[1:])):
                return None
            strides.append(a.strides[group[-1]] if group else a.itemsize)
        return as_strided(a, (outer, c, inner), (strides[0], a.strides[self.axis], strides[1]),
                          writeable=a.flags.writeable)

    def empty(self, dtype) -> tuple[np.ndarray, np.ndarray]:
        """A new array of ``shape`` laid out in the plan's order, and its view.

        A large one is touched once per page here, on one thread: fresh pages
        of a big allocation (glibc maps anything over 32 MiB anew each time)
        faulted in by several kernel threads at once contend in the kernel,
        18x slower on the machine this was measured on (eval at
        (16, 4096, 16, 16): 87 ms against 9 ms after this, PyTorch 19 ms).
        """
        buf = empty(self.dims, dtype)
        full = buf.reshape([self.shape[a] for a in self.order])
        return (full if self.back is None else full.transpose(self.back)), buf

    def dense(self, a: np.ndarray, dtype=None, copy=None) -> np.ndarray:
        """``(outer, C, inner)`` of ``a``: a view when one exists, else a copy,
        made by ``copy(dst, src)`` when given (``numbn._cpu.copy_into``)."""
        v = self.view(a)
        if v is not None and (dtype is None or v.dtype == dtype):
            return v
        full, v = self.empty(a.dtype if dtype is None else dtype)
        if copy is None:
            full[...] = a
        else:  # the buffer in the plan's axis order is C-contiguous
            copy(v.reshape([self.shape[i] for i in self.order]), a.transpose(self.order))
        return v


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, its pages touched first when it is large
    (:meth:`Plan.empty` says why)."""
    buf = np.empty(shape, dtype)
    if buf.nbytes >= _config.CPU_PREFAULT_BYTES:
        buf.reshape(-1).view(np.uint8)[::mmap.PAGESIZE] = 0
    return buf


def contiguous_view(a, axis: int) -> np.ndarray | None:
    """``Plan.of(a, axis).view(a)`` of a C-contiguous NumPy ``a`` with more
    than one channel, by one reshape (``(outer, C, inner)`` is then the axes
    before, at and after ``axis``); None for any other array.

    The common call's short cut past the plan cache: the host side of a call
    runs just after a kernel has streamed the caches out, where each Python
    call it makes costs a microsecond or more.
    """
    shape = a.shape
    c = shape[axis]
    if c < 2 or not a.flags.c_contiguous or a.size == 0:
        return None
    outer = math.prod(shape[:axis])
    return a.reshape(outer, c, a.size // (outer * c))


def dense_view(v) -> bool:
    """Whether the kernels read the ``(outer, C, inner)`` view ``v`` in dense
    runs: its inner stride is its item size or, with ``inner == 1`` (the
    rows of channels-last input), its channel stride is (or it has one
    channel). Otherwise they read it one element at a time: the launchers
    give the kernels dense copies (``numbn._cpu._unit_runs``) and the
    functional API copies such an input first (``functional._dense_runs``)."""
    if v.shape[2] > 1:
        return v.strides[2] == v.itemsize
    return v.shape[1] <= 1 or v.strides[1] == v.itemsize


@functools.lru_cache(maxsize=256)
def _plan(shape: tuple, strides: tuple, axis: int) -> Plan:
    return Plan._make(shape, strides, axis)
