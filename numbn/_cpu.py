"""Numba CPU kernels on the canonical ``(outer, C, inner)`` view.

Four primitives serve every operation and layout:

* :func:`stats`: per-channel mean and biased variance;
* :func:`normalize`: ``y = (x - m[c]) * a[c] + t[c]``, with an optional ReLU;
* :func:`backward_sums`: per-channel ``sum(g)`` and ``sum(g * (x - m))``,
  ``g`` being ``dy`` masked by the fused ReLU when there is one;
* :func:`backward_apply`: ``dx = g * a[c] + (x - m[c]) * b[c] + d[c]``.

Three one-call forms skip host work between them: :func:`infer` (eval, the
coefficients from the running statistics computed in the kernel),
:func:`train_fused` and :func:`backward_fused` (statistics or sums, then the
elementwise pass, in one kernel call, while the data may still be cached).

Each has two loop orders. *Channel-major* (a long contiguous inner run, as in
NCHW) splits every channel's reduction into tasks; *row-major* (channels-last
and 2-D, inner run 1) gives each task a block of rows over all channels, so
the innermost loop runs along contiguous channels. Contiguous channel-major
input with short runs (small H*W) takes the row-major kernels too, each row
``C * inner`` columns wide, the columns merged per channel afterwards
(:func:`_row_views`). Either way a task owns its partial results and the
partials are merged afterwards; no two threads write one location. Rows of
``_TILE // 2`` columns or fewer are taken several at a time as one flat run
(a tile) where the arrays are C-contiguous, so that a short row costs no
loop of its own (:func:`_rows_tiled_sums`, :func:`_affine_tiles`,
:func:`_apply_tiles`).

Variance: each task reduces blocks of ``_config.CPU_BLOCK`` elements and
merges blocks and tasks with Chan's formula. A block's sums are shifted by the
mean of the task's blocks before it (the first block's, by the mean of a few
values spread over it), so one pass gives the block's (mean, M2) by the
shifted-data formula; a block whose mean lies too far from that shift takes
two passes (its own mean, then deviations from it; the second pass hits the
cache). There is no E[x^2] - E[x]^2 cancellation (pinned by
``tests/test_numerics.py::test_large_mean_small_std``,
``test_statistics_of_moving_data`` and ``test_first_block_probe_far_from_the_mean``).

Arithmetic runs in the input's dtype (float32 for float16 and float32 input:
twice float64's SIMD width; this machine's kernels are compute-bound), with
float64 wherever precision is at stake: chunk sums go to float64 every
``_config.CPU_BLOCK`` elements, and per-channel coefficients are prepared in
float64 on the host, the mean's rounding to float32 folded into the shift
(``_in_dtype``). Numba has no float16 on the CPU, so float16 arrays reach the
kernels as their bits (uint16 views, ``_bits``): every element is widened to
float32 as it is loaded (``_ld``) and every result rounded to float16 as it is
stored (``_st``), both vectorised (``vcvtph2ps``, ``vcvtps2ph``), with no
float32 copy of anything the size of x. In the docstrings below, "x's dtype"
means this arithmetic dtype: float32 for float16 x.

Outputs of ``_config.CPU_STREAM_MIN_BYTES`` or more are written by the
elementwise passes with non-temporal stores, a whole cache line at a time
(:func:`_stream_line`, :func:`_stream_apply_line`; the rows kernels take a
task's rows as one run of memory, :func:`_stream_row_line`): an ordinary
store reads each line before writing it, a third of the pass's traffic. The
one-task-per-channel kernels, whose tasks write runs far apart, stream from
``_config.CPU_SLAB_STREAM_MIN_BYTES`` already (:func:`_stream_slabs`), the
rows kernels from ``_config.CPU_ROWS_STREAM_MIN_BYTES``.

``fastmath`` is limited to ``reassoc`` and ``contract``: reassociation lets
LLVM vectorise the reductions (a different summation order, as accurate), and
contraction forms fused multiply-adds. Neither changes NaN or Inf handling
(``tests/test_bad_input.py::test_nan_confined_to_channel``).
"""

from __future__ import annotations

import os
import types

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

from . import _checks, _config, _reference
from ._layout import contiguous_view, dense_view

_FASTMATH = {"reassoc", "contract"}
#: ``error_model="numpy"``: a float division by zero gives inf or NaN, as in
#: NumPy and PyTorch (eps=0 on a constant channel), where Numba's default
#: "python" model raises ZeroDivisionError (and tests every divisor).
_SERIAL = dict(cache=True, fastmath=_FASTMATH, error_model="numpy")
_FLAGS = dict(parallel=True, **_SERIAL)


class _Kernel:
    """A ``parallel=True`` kernel and its serial twin, compiled from the same
    source (``prange`` runs as ``range`` there) so that small inputs do not
    pay for starting threads. The twin has a qualified name of its own, so the
    two never share an entry of Numba's on-disk cache."""

    def __init__(self, fn):
        self.parallel = njit(**_FLAGS)(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        twin.__module__ = fn.__module__
        twin.__doc__ = fn.__doc__
        self.serial = njit(**_SERIAL)(twin)

    def on(self, n_elements: int):
        """The variant for an input of ``n_elements``: the serial twin for
        small inputs, and for every input in a process forked from one whose
        OpenMP pool had started (:func:`_after_fork`)."""
        if n_elements >= _config.CPU_PARALLEL_MIN and not _forked_from_openmp:
            return self.parallel
        return self.serial


#: True in a process forked after the parent started Numba's ``omp`` threading
#: layer: GNU OpenMP cannot run in such a child, and Numba ends the child
#: (SIGTERM) at its first parallel region, so a ``multiprocessing`` pool
#: (Linux's default start method is fork) whose workers call numbn waited
#: forever for them. Those children run the serial kernels instead.
_forked_from_openmp = False


#: The launch plans of :func:`infer_ready`, :func:`train_ready` and
#: :func:`backward_ready`, by the layout of their arrays and the calling
#: thread's thread count, and of their ``*_dense`` forms, by shape and axis
#: (:func:`_plan`).
_plans: dict = {}
_PLANS_MAX = 256


def _after_fork() -> None:
    global _forked_from_openmp
    _plans.clear()  # they hold the parent's choice of kernel variant (_Kernel.on)
    try:
        _forked_from_openmp = numba.threading_layer() == "omp"
    except ValueError:  # no pool in the parent: the child starts its own
        pass


os.register_at_fork(after_in_child=_after_fork)

# Loops below index slice views from 0 (``for i in range(n): xr[i]``): a loop
# whose start is computed keeps Numba's negative-index wraparound check alive
# and stops LLVM from vectorising it (4-6x slower, measured).


def _is_half(ty) -> bool:
    """Numba type of a float16 element: the kernels see float16 arrays as uint16."""
    return isinstance(ty, numba.types.Integer) and ty.bitwidth == 16


@intrinsic
def _ld(typingctx, v):
    """An element of x, dy or y in the arithmetic dtype: float32 and float64
    as they are; float16 (its bits, a uint16: Numba has no float16 on the
    CPU) widened to float32, exactly. LLVM vectorises the widening
    (``vcvtph2ps``)."""
    if _is_half(v):
        def widen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return numba.types.float32(v), widen
    if isinstance(v, numba.types.Float):
        return v(v), lambda context, builder, signature, args: args[0]
    return None


@intrinsic
def _dense(typingctx, r):
    """The 1-D run ``r`` of a channel-major kernel typed C-contiguous: the
    same data, length and owner, its stride taken as its item size, which
    the launchers make it (:func:`_unit_runs`). A run of a C-contiguous
    array is returned as it is. A run of a sliced or F-ordered input is
    typed ``"A"``, and LLVM does not vectorise a loop over it (its stride
    is unknown): that loop added one element at a time into one
    accumulator, 3-4x slower than over the same data contiguous, and in
    float32 about ten times less accurate (the sums of a chunk of up to
    ``_config.CPU_BLOCK`` values in one accumulator; measured)."""
    if not isinstance(r, numba.types.Array) or r.ndim != 1:
        return None
    ret = r.copy(layout="C")

    def codegen(context, builder, signature, args):
        if r.layout == "C":
            context.nrt.incref(builder, ret, args[0])
            return args[0]
        src = context.make_array(r)(context, builder, args[0])
        dst = context.make_array(ret)(context, builder)
        size = context.get_constant(numba.types.intp,
                                    context.get_abi_sizeof(context.get_data_type(r.dtype)))
        populate_array(dst, data=src.data, shape=src.shape,
                       strides=cgutils.pack_array(builder, [size]), itemsize=src.itemsize,
                       meminfo=src.meminfo, parent=src.parent)
        out = dst._getvalue()
        context.nrt.incref(builder, ret, out)
        return out
    return ret(r), codegen


_HALF_RELU_FLOOR = _reference.relu_floor(np.float16)  # 2**-25


@intrinsic
def _relu_floor(typingctx, arr):
    """The largest ReLU input that x's dtype stores as 0, in the arithmetic
    dtype: 2**-25 for float16 (the tie between 0 and the least subnormal,
    2**-24, rounds to 0), else 0 (float32 and float64 x are stored as
    computed). The backward's mask (:func:`_gate`) passes above it, so it
    passes exactly where the forward's stored output is positive."""
    half = _is_half(arr.dtype)
    ty = numba.types.float32 if half else arr.dtype

    def codegen(context, builder, signature, args):
        return context.get_constant(ty, _HALF_RELU_FLOOR if half else 0.0)
    return ty(arr), codegen


@intrinsic
def _st(typingctx, arr, v):
    """``v`` as an element of ``arr``: rounded to nearest, ties to even, as
    NumPy's ``astype``; for a float16 ``arr`` (seen as uint16), the float16
    bits (``vcvtps2ph``)."""
    dtype = arr.dtype
    if _is_half(dtype):
        def narrow(context, builder, signature, args):
            half = builder.fptrunc(args[1], ir.HalfType())
            return builder.bitcast(half, ir.IntType(16))
        return dtype(arr, v), narrow

    def cast(context, builder, signature, args):
        return context.cast(builder, args[1], signature.args[1], dtype)
    return dtype(arr, v), cast


@intrinsic
def _fma(typingctx, x, y, z):
    """``x * y + z`` rounded once (``llvm.fma``), in the type of ``x``.

    The backward's ``dx = g * a + (x - m) * b + d`` is written with it,
    ``_fma(g, a, _fma(x - m, b, d))`` (:func:`_dx`), in every loop and in the streamed
    lines (:func:`_apply_line`), so that every path rounds it alike. Left to
    LLVM, the contraction of the two products into multiply-adds differed
    between a plain loop and the streamed lines, and so dx of the same call
    differed in its last bit with the alignment of the array that numbn
    allocates for it (measured: 4244 elements of (32, 64, 56, 56) float32)."""
    if not all(isinstance(v, numba.types.Float) for v in (x, y, z)):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.return_type
        vals = [context.cast(builder, v, t, ty) for v, t in zip(args, signature.args)]
        return builder.call(_fma_function(builder.module, context.get_value_type(ty)), vals)
    return x(x, y, z), codegen


def _fma_function(module, ty):
    """The declaration of ``llvm.fma`` for ``ty``, a float or double or a
    vector of them."""
    element, suffix = ty, ""
    if isinstance(ty, ir.VectorType):
        element, suffix = ty.element, f"v{ty.count}"
    suffix += "f64" if isinstance(element, ir.DoubleType) else "f32"
    return cgutils.get_or_insert_function(module, ir.FunctionType(ty, [ty] * 3),
                                          "llvm.fma." + suffix)


@njit(inline="always")
def _dx(g, xv, m, a, b, d):
    """The backward's ``dx = g * a + (x - m) * b + d`` as every loop computes
    it, ``fma(g, a, fma(x - m, b, d))`` (:func:`_fma`; the streamed lines'
    vector form is :func:`_apply_line`'s)."""
    return _fma(g, a, _fma(xv - m, b, d))


@njit(inline="always")
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub and LeVeque)."""
    n = n_a + n_b
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    delta = mean_b - mean_a
    frac = n_b / n
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@njit(inline="always")
def _shifted_chunk(xr, sh, zero):
    """``sum(x - sh)`` and ``sum((x - sh)**2)`` of the 1-D chunk ``xr``,
    summed in its dtype, returned in float64."""
    d1 = zero
    d2 = zero
    for i in range(xr.shape[0]):
        d = _ld(xr[i]) - sh
        d1 += d
        d2 += d * d
    return np.float64(d1), np.float64(d2)


@njit(inline="always")
def _too_far(d1, d2, nb):
    """Whether sums shifted by ``sh`` (``d1 = sum(x - sh)``, ``d2 =
    sum((x - sh)**2)`` over ``nb`` values, float64) lose more than one bit to
    cancellation in ``M2 = d2 - d1**2 / nb``: ``d1**2 / nb`` over half of
    ``d2``, i.e. the shift is further from the mean than the spread. NaN
    compares false: a NaN channel stays NaN, nothing is redone."""
    return d1 * d1 > 0.5 * nb * d2


@njit(inline="always")
def _own_mean_sums(xr, zero, cell, k):
    """Two passes over the 1-D chunk ``xr``: ``cell[k]`` becomes its mean
    (rounded to ``cell``'s dtype), then :func:`_shifted_chunk` from it."""
    acc = zero
    for i in range(xr.shape[0]):
        acc += _ld(xr[i])
    cell[k] = np.float64(acc) / xr.shape[0]
    return _shifted_chunk(xr, cell[k], zero)


#: Values (rows, for channels-last input), spread evenly over the first block
#: of a reduction, whose mean shifts that block's sums (later blocks: the mean
#: so far for channels-last input; for channel-major input the same shift
#: while it stays near, :func:`_span_moments`).
_PROBE = 8
#: Channel-major statistics prefetch the run ``_AHEAD_BYTES // run bytes``
#: runs ahead when a channel's runs are at most ``_SHORT_RUN_BYTES`` long:
#: such runs are a page's part or less, where the hardware prefetcher
#: stops, and the runs of one channel lie C runs apart. Training forward of
#: (64, 256, 14, 14) float32 (784-byte runs) 0.86-0.90 of the time without,
#: (32, 128, 28, 28) 0.92; 7x7 runs and long runs unchanged (measured). The
#: backward's sums, which read dy and x, gained nothing from it (measured).
_AHEAD_BYTES = 6144
_SHORT_RUN_BYTES = 4096


@njit(inline="always")
def _fold(n, sh, d1, d2):
    """(count, mean, M2) in float64 from ``n`` values' sums shifted by
    ``sh``: ``d1 = sum(x - sh)``, ``d2 = sum((x - sh)**2)``."""
    dev = d1 / n
    return n, np.float64(sh) + dev, d2 - d1 * dev


@njit(inline="always")
def _probe_shift(xr, zero):
    """A shift near the mean of the 1-D chunk ``xr``: the mean (float64) of
    ``_PROBE`` of its values spread over it, summed in x's dtype."""
    k = min(_PROBE, xr.shape[0])
    acc = zero
    for j in range(k):
        acc += _ld(xr[j * xr.shape[0] // k])
    return np.float64(acc) / k


@njit(inline="always")
def _fold_merge(n, mean, m2, ns, sh, d1s, d2s):
    """``(n, mean, M2)`` merged (Chan) with the ``ns`` values summed under
    the shift ``sh`` (:func:`_fold`)."""
    nf, mf, m2f = _fold(ns, sh, d1s, d2s)
    return _chan_merge(n, mean, m2, nf, mf, m2f)


@njit(inline="always")
def _span_moments(x, c, f0, f1, block, zero, cell):
    """(count, mean, M2), float64, of channel ``c``'s elements ``f0:f1`` of
    ``x`` (``(outer, C, inner)``; element ``f`` is ``x[f // inner, c, f % inner]``).

    Chunks of at most ``block`` values within a run are summed in x's
    arithmetic dtype (float32 for float32 input: twice the SIMD width of
    float64), shifted by one value near the mean (shifted-data formula: no
    cancellation), and added up in float64. The shift is the mean of
    ``_PROBE`` values spread over the first chunk, kept while each chunk's
    mean stays near it; a chunk too far from it (:func:`_too_far`) is summed
    again from its own mean (rounded into ``cell[0]``), which becomes the
    shift from there on, the sums so far folded aside and merged at the end
    (Chan). Every chunk summed under a shift passes :func:`_too_far`, so, by
    the Cauchy-Schwarz inequality, so do their totals. Keeping the shift
    leaves the chunks independent of each other: shifting each by the mean
    so far made every chunk wait for the previous one's merge, and the
    statistics of (64, 256, 14, 14) float32 (196-value runs, x in cache)
    took 1.5x as long on two threads, 1.1x on one (measured; 1.03-1.10x at
    (32, 64, 56, 56), whose runs are 16 times as long).
    """
    inner = x.shape[2]
    n, mean, m2 = 0.0, 0.0, 0.0  # folded aside when the shift moved
    ns, d1s, d2s = 0.0, 0.0, 0.0  # summed under the current shift
    sh = zero
    first = True
    run_bytes = inner * x.itemsize
    ahead = _AHEAD_BYTES // run_bytes if run_bytes <= _SHORT_RUN_BYTES else 0
    if f0 % inner == 0 and f1 % inner == 0 and inner <= block:
        # Whole runs, each one chunk: no chunk loop (as _run_sums).
        for o in range(f0 // inner, f1 // inner):
            if ahead and o + ahead < x.shape[0]:
                _prefetch_run(x[o + ahead, c])
            first, sh, n, mean, m2, ns, d1s, d2s = _span_step(
                _dense(x[o, c]), zero, cell, first, sh, n, mean, m2, ns, d1s, d2s)
    else:
        for o in range(f0 // inner, (f1 + inner - 1) // inner):
            i0 = max(f0 - o * inner, 0)
            i1 = min(f1 - o * inner, inner)
            if ahead and o + ahead < x.shape[0]:
                _prefetch_run(x[o + ahead, c])
            for b0 in range(i0, i1, block):
                first, sh, n, mean, m2, ns, d1s, d2s = _span_step(
                    _dense(x[o, c, b0:min(b0 + block, i1)]), zero, cell, first, sh, n, mean,
                    m2, ns, d1s, d2s)
    if ns > 0.0:
        n, mean, m2 = _fold_merge(n, mean, m2, ns, sh, d1s, d2s)
    return n, mean, m2


@njit(inline="always")
def _span_step(xr, zero, cell, first, sh, n, mean, m2, ns, d1s, d2s):
    """One chunk ``xr`` of :func:`_span_moments`'s loop: its state
    ``first, sh, n, mean, m2, ns, d1s, d2s`` updated."""
    nb = np.float64(xr.shape[0])
    if first:  # the shift: the mean of a few of the first chunk's values
        cell[0] = _probe_shift(xr, zero)
        sh = cell[0]
        first = False
    d1, d2 = _shifted_chunk(xr, sh, zero)
    if _too_far(d1, d2, nb):
        if ns > 0.0:
            n, mean, m2 = _fold_merge(n, mean, m2, ns, sh, d1s, d2s)
            ns, d1s, d2s = 0.0, 0.0, 0.0
        d1, d2 = _own_mean_sums(xr, zero, cell, 0)
        sh = cell[0]
    return first, sh, n, mean, m2, ns + nb, d1s + d1, d2s + d2


@_Kernel
def _stats_channel_major(x, nsplit, block, zero, cells, pn, pmean, pm2):
    outer, C, inner = x.shape
    total = outer * inner
    for task in prange(C * nsplit):
        c = task // nsplit
        s = task - c * nsplit
        f0 = s * total // nsplit
        f1 = (s + 1) * total // nsplit
        n, mean, m2 = _span_moments(x, c, f0, f1, block, zero, cells[task:task + 1])
        if c == 0:  # every channel's split s holds the same count
            pn[s] = n
        pmean[s, c] = mean
        pm2[s, c] = m2


@njit(inline="always")
def _moments_step(xr, zero, acc, c, cell):
    """Add the 1-D chunk ``xr`` of channel ``c`` to its running moments
    ``acc[:, c]`` (float64: ``n, mean, M2`` folded aside, then ``n, sum(x -
    sh), sum((x - sh)**2)`` under the shift ``sh = cell[c]``), as one step of
    :func:`_span_moments`'s loop: the first chunk sets the shift from a probe
    of ``_PROBE`` values; a chunk too far from the shift (:func:`_too_far`)
    folds the sums aside and starts again from its own mean."""
    nb = np.float64(xr.shape[0])
    if acc[0, c] == 0.0 and acc[3, c] == 0.0:  # the first chunk
        cell[c] = _probe_shift(xr, zero)
    d1, d2 = _shifted_chunk(xr, cell[c], zero)
    if _too_far(d1, d2, nb):
        if acc[3, c] > 0.0:
            acc[0, c], acc[1, c], acc[2, c] = _fold_merge(acc[0, c], acc[1, c], acc[2, c],
                                                          acc[3, c], cell[c], acc[4, c],
                                                          acc[5, c])
            acc[3, c], acc[4, c], acc[5, c] = 0.0, 0.0, 0.0
        d1, d2 = _own_mean_sums(xr, zero, cell, c)
    acc[3, c] += nb
    acc[4, c] += d1
    acc[5, c] += d2


@njit(inline="always")
def _prefetch_ahead(a, o, c, b0, b1, ahead):
    """Prefetch the ``b1 - b0`` elements ``ahead`` past ``a[o, c, b0]`` in
    memory order (``a`` C-contiguous), those that exist."""
    outer, C, inner = a.shape
    p0 = (o * C + c) * inner + b0 + ahead
    for i in range(p0, min(p0 + b1 - b0, a.size), max(1, 64 // a.itemsize)):
        _prefetch(a, i)


@_Kernel
def _stats_outer(x, nsplit, block, zero, cells, pn, pmean, pm2, ahead):
    """Channel-major statistics with tasks over the outer axis: task ``s``
    reads its rows of every channel in memory order, keeping each channel's
    moments (:func:`_moments_step`), so the hardware prefetcher sees one
    stream, not one per run (each channel's runs lie C runs apart): (16,
    64, 56, 56) float32 from memory in 0.7 of the time of
    :func:`_stats_channel_major` on one thread (measured). Partials per task
    as that kernel's."""
    outer, C, inner = x.shape
    for s in prange(nsplit):
        o0 = s * outer // nsplit
        o1 = (s + 1) * outer // nsplit
        acc = np.zeros((6, C))
        cell = cells[s]
        for o in range(o0, o1):
            for c in range(C):
                for b0 in range(0, inner, block):
                    b1 = min(b0 + block, inner)
                    if ahead:
                        _prefetch_ahead(x, o, c, b0, b1, ahead)
                    _moments_step(_dense(x[o, c, b0:b1]), zero, acc, c, cell)
        for c in range(C):
            n, pmean[s, c], pm2[s, c] = _fold_merge(acc[0, c], acc[1, c], acc[2, c], acc[3, c],
                                                    cell[c], acc[4, c], acc[5, c])
        pn[s] = (o1 - o0) * inner


@njit(inline="always")
def _rows_block_sum(x, r0, r1, zero, bs, ahead):
    """``bs[c] = sum(x[r0:r1, c])`` in x's dtype, four rows per update (a row
    of 64 channels is only four AVX-512 vectors: a per-row loop and its
    accumulator traffic were 2x slower, measured)."""
    r4 = r0 + (r1 - r0) // 4 * 4
    for c in range(x.shape[1]):
        bs[c] = zero
    for o in range(r0, r4, 4):
        _prefetch_rows(x, o + ahead, 4 if ahead else 0)
        x0, x1, x2, x3 = _dense(x[o]), _dense(x[o + 1]), _dense(x[o + 2]), _dense(x[o + 3])
        for c in range(x.shape[1]):
            bs[c] += (_ld(x0[c]) + _ld(x1[c])) + (_ld(x2[c]) + _ld(x3[c]))
    for o in range(r4, r1):
        xr = _dense(x[o])
        for c in range(x.shape[1]):
            bs[c] += _ld(xr[c])


@njit(inline="always")
def _rows_probe(x, r0, r1, zero, sh):
    """``sh[c]``: the mean of ``_PROBE`` rows spread evenly over ``r0:r1``."""
    k = min(_PROBE, r1 - r0)
    for c in range(x.shape[1]):
        sh[c] = zero
    for j in range(k):
        xr = _dense(x[r0 + j * (r1 - r0) // k])
        for c in range(x.shape[1]):
            sh[c] += _ld(xr[c])
    for c in range(x.shape[1]):
        sh[c] = sh[c] / k


@njit(inline="always")
def _rows_shifted_sums(x, r0, r1, sh, zero, d1, d2, ahead):
    """``d1[c] = sum(x - sh[c])`` and ``d2[c] = sum((x - sh[c])**2)`` over rows
    ``r0:r1``, in x's dtype, four rows per update."""
    r4 = r0 + (r1 - r0) // 4 * 4
    for c in range(x.shape[1]):
        d1[c] = zero
        d2[c] = zero
    for o in range(r0, r4, 4):
        _prefetch_rows(x, o + ahead, 4 if ahead else 0)
        x0, x1, x2, x3 = _dense(x[o]), _dense(x[o + 1]), _dense(x[o + 2]), _dense(x[o + 3])
        for c in range(x.shape[1]):
            s = sh[c]
            e0, e1 = _ld(x0[c]) - s, _ld(x1[c]) - s
            e2, e3 = _ld(x2[c]) - s, _ld(x3[c]) - s
            d1[c] += (e0 + e1) + (e2 + e3)
            d2[c] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
    for o in range(r4, r1):
        xr = _dense(x[o])
        for c in range(x.shape[1]):
            d = _ld(xr[c]) - sh[c]
            d1[c] += d
            d2[c] += d * d


@njit(inline="always")
def _shift_too_far(d1, d2, nb):
    """How many channels of the per-channel sums ``d1``, ``d2`` are :func:`_too_far`."""
    bad = 0
    for c in range(d1.shape[0]):
        bad += _too_far(np.float64(d1[c]), np.float64(d2[c]), nb)
    return bad


@njit(inline="always")
def _rows_moments(x, o0, o1, block_rows, zero, pmean, pm2, ahead):
    """Per-channel (mean, M2) of rows ``o0:o1`` of 2-D ``x`` (rows, C) into
    ``pmean`` and ``pm2`` (length C); returns the row count.

    Blocks of ``block_rows`` rows are reduced in x's dtype and merged with
    Chan's formula in float64. A block's sums are shifted by the mean of
    the blocks before it (rounded to x's dtype), the first block's by the
    mean of ``_PROBE`` of its rows (:func:`_rows_probe`), so one pass over
    the block gives its (mean, M2) by the shifted-data formula. The channels
    whose block mean is too far from that shift (:func:`_too_far`) are
    reduced again two-pass, their own mean first (from the cache): each on
    its own when they are few, else the whole block. One pass was 0.64 of
    the two-pass time on a 25 MB NHWC input (measured), at the same accuracy
    (tests/test_numerics.py); the probe took the forward of (8192, 64) from
    two passes over its first blocks to one, 5-12% faster (measured).
    """
    C = x.shape[1]
    # Accumulators allocated here, not passed in: LLVM then knows they alias
    # no input row (with a caller's scratch the statistics of a 25 MB NHWC
    # input were ~25% slower, measured).
    acc = np.full((4, C), zero)  # in the arithmetic dtype (float32 for float16 x)
    bs = acc[0]
    sh = acc[1]
    d1 = acc[2]
    d2 = acc[3]
    n = 0.0
    for c in range(C):
        pmean[c] = 0.0
        pm2[c] = 0.0
    for r0 in range(o0, o1, block_rows):
        r1 = min(r0 + block_rows, o1)
        nb = np.float64(r1 - r0)
        if n == 0:  # the first block's shift: the mean of a few of its rows
            _rows_probe(x, r0, r1, zero, sh)
        _rows_shifted_sums(x, r0, r1, sh, zero, d1, d2, ahead)
        bad = _shift_too_far(d1, d2, nb)
        if bad > C // 8:  # many channels: the whole block again, vectorised
            _rows_block_sum(x, r0, r1, zero, bs, ahead)
            for c in range(C):
                sh[c] = np.float64(bs[c]) / nb
            _rows_shifted_sums(x, r0, r1, sh, zero, d1, d2, ahead)
        elif bad > 0:  # a few: those channels again, each on its own
            for c in range(C):
                if _too_far(np.float64(d1[c]), np.float64(d2[c]), nb):
                    d1[c], d2[c] = _own_mean_sums(x[r0:r1, c], zero, sh, c)
        for c in range(C):
            _, pmean[c], pm2[c] = _fold_merge(n, pmean[c], pm2[c], nb, sh[c],
                                              np.float64(d1[c]), np.float64(d2[c]))
            sh[c] = pmean[c]  # the next block's shift: the mean so far
        n += nb
    return n


@_Kernel
def _stats_rows(x, nsplit, block_rows, zero, pn, pmean, pm2, ahead):
    """Channels-last statistics of 2-D ``x`` (rows, C), per-task row blocks.

    The partials are ``(nsplit, C)``: each task owns a row, so no two threads
    write one cache line (the ``(C, nsplit)`` layout made this 2.5x slower
    than serial at (256, 1024), measured).
    """
    R = x.shape[0]
    for s in prange(nsplit):
        pn[s] = _rows_moments(x, s * R // nsplit, (s + 1) * R // nsplit, block_rows, zero,
                              pmean[s], pm2[s], ahead)


@njit(inline="always")
def _merge_partials(pn, pmean, pm2, mean, var):
    """Merge the ``(nsplit, C)`` partials (counts ``pn[s]``) into per-channel
    ``mean`` and biased ``var``; the channel loop is innermost, so it runs
    as SIMD (a channel-by-channel chain of divisions was 37 us at C=1024)."""
    nsplit, C = pmean.shape
    n = 0.0
    for c in range(C):
        mean[c] = 0.0
        var[c] = 0.0  # M2 until the end
    for s in range(nsplit):
        nb = pn[s]
        if nb == 0.0:
            continue
        total = n + nb
        frac = nb / total
        for c in range(C):
            delta = pmean[s, c] - mean[c]
            mean[c] += delta * frac
            var[c] += pm2[s, c] + delta * delta * n * frac
        n = total
    for c in range(C):
        var[c] = var[c] / n if n > 0 else np.nan


@njit(inline="always")
def _plain_mean(x, c):
    """The mean of channel ``c`` of ``x`` (``(outer, C, inner)``), summed in
    float64 in memory order, unshifted.

    For a channel whose shifted moments gave a NaN mean: one holding an
    infinity (the shift, or a partial's mean, is then infinite, and ``inf -
    inf`` is NaN). Summed plainly, as PyTorch's CPU kernel sums it, a
    channel with +inf in it (and no -inf or NaN) has mean +inf, as there;
    its variance is NaN in both."""
    acc = 0.0
    for o in range(x.shape[0]):
        for i in range(x.shape[2]):
            acc += np.float64(_ld(x[o, c, i]))
    return acc / (x.shape[0] * x.shape[2])


@njit(inline="always")
def _plain_nan_means(x, mean):
    """:func:`_plain_mean` for every channel of ``x`` (``(outer, C, inner)``)
    whose ``mean`` is NaN."""
    for c in range(mean.shape[0]):
        if mean[c] != mean[c]:
            mean[c] = _plain_mean(x, c)


@njit(inline="always")
def _plain_nan_means_rows(x, g, mean):
    """:func:`_plain_nan_means` for a rows view ``x`` (``(outer, C * g)``,
    :func:`_row_views`): channel ``c`` is columns ``c * g`` to ``c * g + g``."""
    for c in range(mean.shape[0]):
        if mean[c] != mean[c]:
            acc = 0.0
            for o in range(x.shape[0]):
                for k in range(c * g, c * g + g):
                    acc += np.float64(_ld(x[o, k]))
            mean[c] = acc / (x.shape[0] * g)


@njit(inline="always")
def _merge_channels(pn, pmean, pm2, g, mean, var):
    """:func:`_merge_partials` of columns, then, when each channel has ``g``
    columns (a rows view, :func:`_row_views`), :func:`_merge_groups`."""
    if g == 1:
        _merge_partials(pn, pmean, pm2, mean, var)
    else:
        cmean, cvar = np.empty(pmean.shape[1]), np.empty(pmean.shape[1])
        _merge_partials(pn, pmean, pm2, cmean, cvar)
        _merge_groups(cmean, cvar, g, mean, var)


@njit(cache=True, error_model="numpy")
def _merge(x, pn, pmean, pm2, mean, var):
    """Merge the partials of :func:`stats` (and each channel's columns, when
    they are several per channel in a rows view of ``x``, :func:`_merge_groups`)
    into ``mean`` and ``var``, then redo the NaN means
    (:func:`_plain_nan_means`) from ``x``, the ``(outer, C, inner)`` view."""
    _merge_channels(pn, pmean, pm2, pmean.shape[1] // mean.shape[0], mean, var)
    _plain_nan_means(x, mean)


@njit(inline="always")
def _relu_bn(xv, m, a, t, zero):
    """``max((x - m) * a + t, 0)`` in x's dtype; NaN passes through."""
    v = (xv - m) * a + t
    return zero if v < zero else v


#: How far ahead (bytes) a streamed run prefetches what it reads
#: (:func:`_affine_run`, :func:`_apply_run`). With only the hardware
#: prefetcher, the two-pass backward apply of (16, 64, 56, 56) float32 took
#: 1.7x its ordinary-store time on one thread and 1.2x on two; prefetched,
#: 0.68x and 0.92x (measured). The same distance as the rows kernels'
#: (``_config.CPU_ROWS_STREAM_AHEAD_BYTES``).
_STREAM_AHEAD_BYTES = 8192


@njit(inline="always")
def _affine_run(xr, yr, m, a, t, relu, zero, stream):
    """``yr = (xr - m) * a + t`` along one run, then ReLU if ``relu``; with
    ``stream``, the run's whole 64-byte lines of ``yr`` stored non-temporally
    (:func:`_stream_line`; the partial lines at its ends as usual), after
    which the caller's task ends with :func:`_store_fence` (a fence per run
    made the eval of (64, 256, 14, 14) six times slower; measured), and x
    prefetched ``_STREAM_AHEAD_BYTES`` ahead. The prefetch may point past the
    run's end: in a contiguous x that is the next run, read next; past the
    array, a hint that cannot fault.

    Two loops, not one clamp at -inf when there is no ReLU: the compare and
    select doubled the work per element, and cache-resident inputs are
    compute-bound (eval at 64x256x14x14: 0.78 of the clamped time, measured).
    """
    if stream:
        head, body, line = _lines(yr)
        _affine_span(xr[:head], yr[:head], m, a, t, relu, zero)
        ahead = _STREAM_AHEAD_BYTES // xr.itemsize
        for i in range(head, body, line):
            _prefetch(xr, i + ahead)
            _stream_line(xr, yr, i, m, a, t, relu)
        _affine_span(xr[body:], yr[body:], m, a, t, relu, zero)
    else:
        _affine_span(xr, yr, m, a, t, relu, zero)


@njit(inline="always")
def _lines(yr):
    """``(head, body, line)``: the whole 64-byte cache lines of the 1-D
    contiguous ``yr`` are its elements ``head:body``, ``line`` to a line."""
    return _line_split(yr.ctypes.data, yr.shape[0], yr.itemsize)


@njit(inline="always")
def _line_split(address, n, size):
    """:func:`_lines` of ``n`` contiguous elements of ``size`` bytes at ``address``."""
    line = 64 // size
    head = min((64 - address % 64) % 64 // size, n)
    return head, head + (n - head) // line * line, line


@njit(inline="always")
def _affine_span(xr, yr, m, a, t, relu, zero):
    """:func:`_affine_run` without streaming."""
    if relu:
        for i in range(xr.shape[0]):
            yr[i] = _st(yr, _relu_bn(_ld(xr[i]), m, a, t, zero))
    else:
        for i in range(xr.shape[0]):
            yr[i] = _st(yr, (_ld(xr[i]) - m) * a + t)


@njit(inline="always")
def _gate(g, xv, m, a, t, relu, zero, lo):
    """``dy``, or ``zero`` where the fused ReLU did not pass its input: 0 at
    the boundary ``(x - m) * a + t == 0`` (and for NaN), as torch's
    ``threshold_backward``. The test is the forward's own expression, against
    ``lo`` (:func:`_relu_floor`), so the mask matches the forward's stored
    output (float16 stores an input in (0, 2**-25] as 0); ``relu`` is
    loop-invariant and LLVM unswitches it.

    Callers under the ReLU (but the rows sums, :func:`_rows_sums` and
    :func:`_rows_sums4`) also add ``dy`` to a sum that they store and
    never read (a *sink*): a load whose only use
    is this select compiles to a masked load (AVX-512), which waits for its
    mask, i.e. for x's load and the arithmetic above. Streaming from memory,
    that made the gated sums 1.3-1.8x the plain time (serial, 25M float32),
    1.04x with the sink; the whole ReLU backward of (8192, 64) from memory
    went from 1.94x plain to 1.25x (measured)."""
    keep = (not relu) | ((xv - m) * a + t > lo)  # a select, not a branch: vectorises
    return g if keep else zero


@njit(inline="always")
def _gate_sunk(u, sd, xv, m, a, t, relu, zero, lo):
    """:func:`_gate` of ``u``, and the sink ``sd`` with ``u`` added under the ReLU."""
    if relu:
        sd += u
    return _gate(u, xv, m, a, t, relu, zero, lo), sd


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the cache to fetch the line holding ``arr[idx]`` (1-D ``arr``):
    ``llvm.prefetch``, read, into L1. A hint, never a fault; no effect on results."""
    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        i = context.cast(builder, args[1], idxty, numba.types.intp)
        if aryty.ndim == 1:
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [i])
        else:  # element i in memory order of a C-contiguous array
            ptr = builder.gep(ary.data, [i])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return numba.types.void(arr, idx), codegen


_STORED = {4: ir.FloatType(), 8: ir.DoubleType(), 2: ir.HalfType()}


class _Halves:
    """LLVM IR for the two 32-byte halves of a 64-byte cache line of
    contiguous arrays (1-D, or C-contiguous rows views indexed in memory
    order) whose elements have ``size`` bytes (float16 as its bits),
    computed on in vectors of the scalar type ``arith``."""

    def __init__(self, builder, size, arith):
        self.builder, self.size, self.lanes = builder, size, 32 // size
        self.stored = ir.VectorType(_STORED[size], self.lanes)
        self.bits = ir.VectorType(ir.IntType(8 * size), self.lanes)
        self.arith = ir.VectorType(arith, self.lanes)
        self.zero = ir.Constant(self.arith, None)
        self.nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])

    def splat(self, v):
        out = ir.Constant(ir.VectorType(v.type, self.lanes), ir.Undefined)
        for k in range(self.lanes):
            out = self.builder.insert_element(out, v, ir.Constant(ir.IntType(32), k))
        return out

    def flag(self, v):
        """A runtime boolean as a vector of ``i1``."""
        return self.splat(self.builder.icmp_unsigned("!=", v, ir.Constant(v.type, 0)))

    def at(self, start, half):
        return self.builder.add(start, ir.Constant(start.type, half * self.lanes))

    def load(self, data, at):
        """A half's elements from ``data[at:]``, widened to ``arith`` (float16)."""
        b = self.builder
        v = b.bitcast(b.load(b.bitcast(b.gep(data, [at]), self.bits.as_pointer()),
                             align=self.size), self.stored)
        return b.fpext(v, self.arith) if self.size == 2 else v

    def stream(self, v, data, at):
        """Store ``v`` at ``data[at:]`` (32-byte aligned), rounded to the
        element type (float16), non-temporally."""
        b = self.builder
        if self.size == 2:
            v = b.fptrunc(v, self.stored)
        store = b.store(b.bitcast(v, self.bits), b.bitcast(b.gep(data, [at]),
                                                           self.bits.as_pointer()), align=32)
        store.set_metadata("nontemporal", self.nontemporal)

    def coefficients(self, values, types, at):
        """The intrinsic's scalar arguments as vectors: a number splatted, a
        1-D array of the arithmetic dtype (per-column coefficients of a
        rows view) loaded at ``at``, as the line's elements; flags as they are."""
        b = self.builder
        out = []
        for v, ty in zip(values, types):
            if isinstance(ty, numba.types.Array):
                out.append(b.load(b.bitcast(b.gep(v.data, [at]), self.arith.as_pointer()),
                                  align=8 if isinstance(self.arith.element, ir.DoubleType)
                                  else 4))
            elif isinstance(ty, numba.types.Float):
                out.append(self.splat(v))
            else:
                out.append(v)
        return out

    def relu_floor(self):
        """:func:`_relu_floor` of the stored type, as a vector."""
        return ir.Constant(self.arith, [_HALF_RELU_FLOOR if self.size == 2 else 0.0] * self.lanes)

    def where(self, keep, v):
        """``v`` where ``keep``, else 0."""
        return self.builder.select(keep, v, self.zero)

    def fma(self):
        """``llvm.fma`` of ``arith`` vectors (:func:`_fma`'s, lane by lane)."""
        return _fma_function(self.builder.module, self.arith)

    def affine(self, x, m, a, t):
        b = self.builder
        return b.fadd(b.fmul(b.fsub(x, m), a), t)


def _line_typing(n_arrays, compute, args, indexed=False):
    """The typing of an intrinsic ``f(*arrays, i, *scalars)`` (Numba types
    ``args``) that writes the 64-byte line at ``arrays[-1][i]`` (aligned)
    non-temporally, from ``compute(h, loaded, scalars)``, ``h`` a
    :class:`_Halves`, ``loaded`` the other arrays' values at the same
    elements, ``scalars`` as vectors (:meth:`_Halves.coefficients`: a
    number for every element, or, ``indexed``, per-column coefficients of a
    rows view loaded from index ``j``, the argument after ``i``). A normal
    store first reads the line into the cache, a third of an elementwise
    pass's traffic; LLVM makes no aligned non-temporal vector store of a
    plain loop's (its alignment is unknown there), so the line is written
    as two explicit 32-byte vectors.
    The arithmetic is in the coefficients' type (float32 for float16), and
    Numba's fastmath pass flags it as the rest of the kernel."""
    size = args[0].dtype.bitwidth // 8
    first = n_arrays + 1 + indexed
    kinds = args[first:]
    arith = kinds[0].dtype if isinstance(kinds[0], numba.types.Array) else kinds[0]

    def codegen(context, builder, signature, values):
        arrays = [context.make_array(ty)(context, builder, v)
                  for ty, v in zip(signature.args[:n_arrays], values[:n_arrays])]
        start, coef_start = (context.cast(builder, values[k], signature.args[k],
                                          numba.types.intp)
                             for k in (n_arrays, first - 1))
        scalars = [context.make_array(ty)(context, builder, v)
                   if isinstance(ty, numba.types.Array) else v
                   for ty, v in zip(kinds, values[first:])]
        h = _Halves(builder, size, context.get_value_type(arith))
        for half in range(2):
            at = h.at(start, half)
            loaded = [h.load(arr.data, at) for arr in arrays[:-1]]
            coefs = h.coefficients(scalars, kinds, h.at(coef_start, half))
            h.stream(compute(h, loaded, coefs), arrays[-1].data, at)
        return context.get_dummy_value()
    return numba.types.void(*args), codegen


def _affine_line(h, loaded, scalars):
    """:func:`_affine_run`'s arithmetic: ``(x - m) * a + t``, then ReLU."""
    b = h.builder
    (x,) = loaded
    m, a, t, relu = scalars
    v = h.affine(x, m, a, t)
    return h.where(b.not_(b.and_(h.flag(relu), b.fcmp_ordered("<", v, h.zero))), v)  # _relu_bn


def _apply_line(h, loaded, scalars):
    """:func:`_apply_run`'s arithmetic: ``g * a + (x - m) * b + d``, ``g``
    being ``dy`` gated by the fused ReLU."""
    b = h.builder
    dy, x = loaded
    m, a, t, bc, dc = scalars[:3] + scalars[4:]
    above = b.fcmp_ordered(">", h.affine(x, m, a, t), h.relu_floor())  # _relu_floor
    g = h.where(b.or_(b.not_(h.flag(scalars[3])), above), dy)  # _gate
    fma = h.fma()
    return b.call(fma, [g, a, b.call(fma, [b.fsub(x, m), bc, dc])])  # as _fma's


@intrinsic
def _stream_line(typingctx, xr, yr, i, m, a, t, relu):
    """:func:`_affine_run` for the line at ``yr[i]`` (:func:`_line_typing`)."""
    return _line_typing(2, _affine_line, (xr, yr, i, m, a, t, relu))


@intrinsic
def _stream_apply_line(typingctx, gr, xr, dr, i, m, a, t, relu, b, d):
    """:func:`_apply_run` for the line at ``dr[i]`` (:func:`_line_typing`)."""
    return _line_typing(3, _apply_line, (gr, xr, dr, i, m, a, t, relu, b, d))


@intrinsic
def _stream_row_line(typingctx, x, y, i, j, m, a, t, relu):
    """:func:`_stream_line` for C-contiguous rows views ``x`` and ``y`` taken
    as one run of memory (element ``i`` in memory order), ``m, a, t`` the
    tiled per-column coefficients from column ``j`` (:func:`_tiled`)."""
    return _line_typing(2, _affine_line, (x, y, i, j, m, a, t, relu), indexed=True)


@intrinsic
def _stream_row_apply_line(typingctx, gr, xr, dr, i, j, m, a, t, relu, b, d):
    """:func:`_stream_apply_line` as :func:`_stream_row_line`."""
    return _line_typing(3, _apply_line, (gr, xr, dr, i, j, m, a, t, relu, b, d), indexed=True)


@intrinsic
def _store_fence(typingctx):
    """A sequentially consistent fence (``mfence`` on x86): the non-temporal
    stores before it are ordered before every store after it, so they are
    visible by the time the parallel region's end is (an ordinary fence on
    x86 orders nothing, non-temporal stores being weakly ordered)."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return numba.types.void(), codegen


@njit(inline="always")
def _prefetch_run(r):
    """Prefetch every cache line of the 1-D run ``r``."""
    for i in range(0, r.shape[0], max(1, 64 // r.itemsize)):
        _prefetch(r, i)


@njit(inline="always")
def _prefetch_rows(x, r, n):
    """Prefetch rows ``r:r + n`` of 2-D ``x`` (those that exist).

    The rows kernels prefetch ``_ahead`` rows ahead of their loads: a row of
    a channels-last input is short (256 bytes at C=64), and with only the
    hardware prefetcher the 25 MB NHWC statistics pass ran at a third of the
    read bandwidth (a four-row sum loop: 0.91 ms hot, 0.47 ms prefetched
    8 KiB ahead, a plain read 0.31 ms; measured)."""
    for k in range(r, min(r + n, x.shape[0])):
        _prefetch_run(x[k])


@njit(inline="always")
def _chunk_sums(gr, xr, m, a, t, relu, zero):
    """``sum(g)`` and ``sum(g * (x - m))`` of one chunk, summed in x's dtype
    and returned in float64 (``g`` is ``dy`` gated by the fused ReLU), and,
    under the ReLU, ``sum(dy)`` (else 0) for the caller's sink (:func:`_gate`)."""
    lo = _relu_floor(xr)
    sg = zero
    sgx = zero
    sd = zero
    for i in range(xr.shape[0]):
        g, sd = _gate_sunk(_ld(gr[i]), sd, _ld(xr[i]), m, a, t, relu, zero, lo)
        sg += g
        sgx += g * (_ld(xr[i]) - m)
    return np.float64(sg), np.float64(sgx), np.float64(sd)


@njit(inline="always")
def _apply_run(gr, xr, dr, m, a, t, relu, b, d, zero, stream):
    """``dr = g * a + (xr - m) * b + d`` along one run, with ``stream`` as
    :func:`_affine_run`'s (x and dy prefetched); returns, under the ReLU,
    ``sum(dy)`` (else 0; over the parts not streamed) for the caller's sink
    (:func:`_gate`)."""
    if not stream:
        return _apply_span(gr, xr, dr, m, a, t, relu, b, d, zero)
    head, body, line = _lines(dr)
    sd = _apply_span(gr[:head], xr[:head], dr[:head], m, a, t, relu, b, d, zero)
    ahead = _STREAM_AHEAD_BYTES // xr.itemsize
    for i in range(head, body, line):
        _prefetch(xr, i + ahead)
        _prefetch(gr, i + ahead)
        _stream_apply_line(gr, xr, dr, i, m, a, t, relu, b, d)
    return sd + _apply_span(gr[body:], xr[body:], dr[body:], m, a, t, relu, b, d, zero)


@njit(inline="always")
def _apply_span(gr, xr, dr, m, a, t, relu, b, d, zero):
    """:func:`_apply_run` without streaming."""
    lo = _relu_floor(xr)
    sd = zero
    for i in range(xr.shape[0]):
        g, sd = _gate_sunk(_ld(gr[i]), sd, _ld(xr[i]), m, a, t, relu, zero, lo)
        dr[i] = _st(dr, _dx(g, _ld(xr[i]), m, a, b, d))
    return np.float64(sd)


@njit(inline="always")
def _task_span(task, isplit, C, inner):
    """``(o, c, i0, i1)`` of elementwise task ``task`` of a channel-major
    kernel: part ``task % isplit`` (elements ``i0:i1``) of row ``(o, c)``'s
    inner run, rows in memory order. One integer division when runs are not
    split (four otherwise: a short run's whole work, measured)."""
    if isplit == 1:
        o = task // C
        return o, task - o * C, 0, inner
    row = task // isplit
    s = task - row * isplit
    o = row // C
    return o, row - o * C, s * inner // isplit, (s + 1) * inner // isplit


@njit(inline="always")
def _task_run(a, o, c, i0, i1, isplit):
    """``a[o, c, i0:i1]`` of an elementwise task (:func:`_task_span`) as a
    dense run (:func:`_dense`): the whole run ``a[o, c]``, without a slice,
    when runs are not split. A slice's bounds handling cost more than the
    work of a short run: the eval kernel of (64, 512, 7, 7) float32 took
    1.8x as long with it, (256, 64, 8, 8) 1.8x (measured)."""
    if isplit == 1:
        return _dense(a[o, c])
    return _dense(a[o, c, i0:i1])


@njit(inline="always")
def _affine_task(x, task, isplit, coef, relu, zero, y, stream):
    """Elementwise task ``task`` of the channel-major forward (:func:`_task_span`)."""
    o, c, i0, i1 = _task_span(task, isplit, x.shape[1], x.shape[2])
    _affine_run(_task_run(x, o, c, i0, i1, isplit), _task_run(y, o, c, i0, i1, isplit),
                coef[0, c], coef[1, c], coef[2, c], relu, zero, stream)


@njit(inline="always")
def _scale_coefficients(zero, m, a, t, g):
    """``(3, C * g)`` coefficients m, a, t in the kernels' arithmetic dtype,
    that of ``zero`` (:func:`_coefficients_in_dtype`), from float64-convertible
    vectors of length C, each over its channel's ``g`` columns (:func:`_spread`)."""
    coef = np.full((3, m.shape[0]), zero)
    for c in range(m.shape[0]):
        _coefficients_in_dtype(coef, c, np.float64(m[c]), np.float64(a[c]), np.float64(t[c]))
    return _spread(coef, g)


@njit(inline="always")
def _eval_coefficients(zero, mean, var, w, b, eps, g):
    """As :func:`_scale_coefficients` with ``a = w / sqrt(var + eps)`` in float64."""
    coef = np.full((3, mean.shape[0]), zero)
    for c in range(mean.shape[0]):
        a = np.float64(w[c]) / np.sqrt(np.float64(var[c]) + eps)
        _coefficients_in_dtype(coef, c, np.float64(mean[c]), a, np.float64(b[c]))
    return _spread(coef, g)


@njit(inline="always")
def _spread(coef, g):
    """Per-channel columns of ``coef`` each repeated over the channel's ``g``
    adjacent columns of a rows view (:func:`_row_views`): a new array, or
    ``coef`` itself for ``g == 1``. A loop of its own, so that the channel
    loops that fill ``coef`` stay SIMD: writing each channel's ``g`` columns
    there made them scalar, which added about 3 us to every call at C=1024
    (eval of (256, 1024): 23 us against 20; measured). Channel by channel,
    not column by column with ``k // g``: an integer division per column
    took 14 of the 16 us of the backward kernel at (2, 64, 4, 4) (measured)."""
    if g == 1:
        return coef
    out = np.empty((coef.shape[0], coef.shape[1] * g), coef.dtype)
    for r in range(coef.shape[0]):
        for c in range(coef.shape[1]):
            v = coef[r, c]
            for j in range(g):
                out[r, c * g + j] = v
    return out


@njit(inline="always")
def _merge_groups(cmean, cvar, g, mean, var):
    """Per-channel ``mean`` and biased ``var`` from those of its ``g``
    columns (equal counts; :func:`_row_views`): the mean of the column
    means, and the mean of the column variances plus the variance of the
    column means (Chan's merge for equal counts)."""
    for c in range(mean.shape[0]):
        m = 0.0
        for k in range(c * g, c * g + g):
            m += cmean[k]
        m /= g
        v = 0.0
        for k in range(c * g, c * g + g):
            d = cmean[k] - m
            v += cvar[k] + d * d
        mean[c] = m
        var[c] = v / g


@njit(inline="always")
def _affine_tasks(x, coef, relu, zero, y, isplit, parts, stream):
    """The channel-major elementwise forward: its tasks (:func:`_task_span`)
    in ``parts`` contiguous parts (one a thread, as a static schedule splits
    them), so that a part's non-temporal stores take one fence. The ordinary
    stores take a loop of their own, without the streaming code beside them
    in the loop body: eval of (64, 256, 14, 14) float32 0.89-0.98 of the time
    of the one loop with ``stream`` tested per task (measured)."""
    tasks = x.shape[0] * x.shape[1] * isplit
    parts = min(tasks, parts)
    for p in prange(parts):
        t0, t1 = p * tasks // parts, (p + 1) * tasks // parts
        if stream:
            for task in range(t0, t1):
                _affine_task(x, task, isplit, coef, relu, zero, y, True)
            _store_fence()
        else:  # a loop of its own, free of the streaming code
            for task in range(t0, t1):
                _affine_task(x, task, isplit, coef, relu, zero, y, False)


@_Kernel
def _affine_channel_major(x, m, a, t, relu, zero, y, isplit, parts, stream):
    _affine_tasks(x, _scale_coefficients(zero, m, a, t, 1), relu, zero, y, isplit, parts,
                  stream)


@_Kernel
def _infer_channel_major(x, mean, var, w, b, eps, relu, zero, y, isplit, parts, stream):
    """Inference forward: the coefficients from the running statistics here,
    not on the host (a few microseconds of NumPy calls per call, which is
    most of the Python cost of a small eval)."""
    _affine_tasks(x, _eval_coefficients(zero, mean, var, w, b, eps, 1), relu, zero, y, isplit,
                  parts, stream)


@njit(inline="always")
def _affine_row_range(x, o0, o1, m, a, t, relu, zero, y, ahead):
    """Rows ``o0:o1`` of ``y = (x - m) * a + t`` (then ReLU), ``m, a, t``
    per column: two loops, as :func:`_affine_run`."""
    for o in range(o0, o1):
        _prefetch_rows(x, o + ahead, 1 if ahead else 0)
        xr = _dense(x[o])
        yr = _dense(y[o])
        if relu:
            for c in range(x.shape[1]):
                yr[c] = _st(yr, _relu_bn(_ld(xr[c]), m[c], a[c], t[c], zero))
        else:
            for c in range(x.shape[1]):
                yr[c] = _st(yr, (_ld(xr[c]) - m[c]) * a[c] + t[c])


@njit(inline="always")
def _affine_elements(x, y, f0, f1, m, a, t, relu, zero):
    """Elements ``f0:f1`` (in memory order) of the C-contiguous rows view
    ``x`` into ``y``, as :func:`_affine_row_range`: the partial cache lines
    at the ends of :func:`_affine_rows_streamed`'s span."""
    K = x.shape[1]
    for f in range(f0, f1):
        o = f // K
        c = f - o * K
        xv = _ld(x[o, c])
        y[o, c] = _st(y, _relu_bn(xv, m[c], a[c], t[c], zero) if relu
                      else (xv - m[c]) * a[c] + t[c])


@njit(inline="always")
def _affine_rows_streamed(x, o0, o1, m, a, t, relu, zero, y, ahead):
    """Rows ``o0:o1`` of the C-contiguous rows view ``x`` into ``y`` as one
    run of memory, its whole 64-byte lines of ``y`` stored non-temporally
    (:func:`_stream_row_line`) whatever the row length, the coefficients
    ``m, a, t`` tiled past the row's end (:func:`_tiled`) for lines that
    cross into the next row; x prefetched ``ahead`` rows ahead
    (:func:`_ahead`; without it the streamed apply of (32, 56, 56, 64) took
    1.3x the time of the ordinary stores, with it 0.8x; measured). The
    caller's task then ends with :func:`_store_fence`."""
    K = x.shape[1]
    f0, f1 = o0 * K, o1 * K
    ahead *= K
    head, body, line = _line_split(y.ctypes.data + f0 * y.itemsize, f1 - f0, y.itemsize)
    _affine_elements(x, y, f0, f0 + head, m, a, t, relu, zero)
    col = head % K
    for i in range(f0 + head, f0 + body, line):
        if ahead:
            _prefetch(x, min(i + ahead, f1 - 1))
        _stream_row_line(x, y, i, col, m, a, t, relu)
        col += line
        while col >= K:
            col -= K
    _affine_elements(x, y, f0 + body, f1, m, a, t, relu, zero)


#: Elements (a whole number of rows) that the rows kernels take as one flat
#: run when a row is at most half as long (:func:`_rows_tiled_sums`,
#: :func:`_apply_tiles`, :func:`_affine_tiles`).
_TILE = 256

#: Columns from which the rows kernels' plain backward sums take four rows at
#: a time (:func:`_rows_sums4`), as the ReLU's do. The backward of 2-D
#: float32, two threads, interleaved against row by row: in cache (512, 4096)
#: 0.80, (128, 8192) 0.81, (1024, 2048) 0.83, (1024, 1024) 0.97, (256, 1024)
#: 0.96; from memory (8192, 1024) 0.89, (4096, 2048) 0.92; float64 (512,
#: 1024) 0.89; float16 (1024, 1024) 0.91. Shorter rows did no better: float32
#: (2048, 512) 1.06, (6272, 256) 1.0-1.14 (prefetched as the ReLU's, or
#: not), from memory (25088, 256) 1.07-1.2; float64 (2048, 256) 1.07
#: (measured).
_FOUR_ROWS_MIN_COLUMNS = 1024


def _flat(a):
    """The 2-D ``a`` as one flat run when it is C-contiguous, else an empty
    array (in a kernel: Numba reshapes only contiguous arrays)."""


@overload(_flat)
def _flat_typed(a):
    if a.layout == "C":
        return lambda a: a.reshape(-1)
    return lambda a: np.empty(0, a.dtype)


@njit(inline="always")
def _tiled(coef, line):
    """The per-column coefficient rows ``coef`` (``(r, K)``) extended by
    ``line`` columns that start again from column 0, so that a line's
    coefficients are adjacent even where it crosses a row's end."""
    K = coef.shape[1]
    out = np.empty((coef.shape[0], K + line), coef.dtype)
    for r in range(coef.shape[0]):
        for j in range(K + line):
            out[r, j] = coef[r, j % K]
    return out


@njit(inline="always")
def _affine_tiles(x, y, xf, yf, o0, o1, tc, relu, zero, ahead):
    """Rows of ``o0:o1`` of :func:`_affine_row_range` in flat tiles of whole
    rows (:func:`_apply_tiles`); returns the first row not done."""
    C = x.shape[1]
    W = tc.shape[1]
    k = W // C
    m, a, t = tc[0], tc[1], tc[2]
    o = o0
    while o + k <= o1:
        _prefetch_rows(x, o + ahead, k if ahead else 0)
        xr = xf[o * C:o * C + W]
        yr = yf[o * C:o * C + W]
        if relu:  # two loops, as _affine_run
            for j in range(W):
                yr[j] = _st(yr, _relu_bn(_ld(xr[j]), m[j], a[j], t[j], zero))
        else:
            for j in range(W):
                yr[j] = _st(yr, (_ld(xr[j]) - m[j]) * a[j] + t[j])
        o += k
    return o


@njit(inline="always")
def _affine_row_tasks(x, coef, relu, zero, y, nsplit, ahead, stream):
    """The rows elementwise forward: ``nsplit`` tasks of adjacent rows;
    with ``stream``, each task's rows as one run of memory
    (:func:`_affine_rows_streamed`), ending with a fence; else rows of at
    most ``_TILE // 2`` columns in flat tiles (:func:`_affine_tiles`)."""
    R = x.shape[0]
    C = x.shape[1]
    tiled = _tiled(coef, 64 // y.itemsize) if stream else coef
    xf, yf = _flat(x), _flat(y)
    k = _TILE // C if not stream and min(xf.size, yf.size) > 0 else 0
    tc = _tiled(coef, (k - 1) * C) if k > 1 else coef
    for s in prange(nsplit):
        o0, o1 = s * R // nsplit, (s + 1) * R // nsplit
        if stream:
            _affine_rows_streamed(x, o0, o1, tiled[0], tiled[1], tiled[2], relu, zero, y, ahead)
            _store_fence()
        else:
            if k > 1:
                o0 = _affine_tiles(x, y, xf, yf, o0, o1, tc, relu, zero, ahead)
            _affine_row_range(x, o0, o1, coef[0], coef[1], coef[2], relu, zero, y, ahead)


@_Kernel
def _affine_rows(x, m, a, t, relu, zero, y, nsplit, ahead, g, stream):
    _affine_row_tasks(x, _scale_coefficients(zero, m, a, t, g), relu, zero, y, nsplit, ahead,
                      stream)


@_Kernel
def _infer_rows(x, mean, var, w, b, eps, relu, zero, y, nsplit, ahead, g, stream):
    """Inference forward of a rows view (:func:`_row_views`; see
    :func:`_infer_channel_major`)."""
    _affine_row_tasks(x, _eval_coefficients(zero, mean, var, w, b, eps, g), relu, zero, y,
                      nsplit, ahead, stream)


@_Kernel
def _sums_channel_major(dy, x, m, a, t, relu, nsplit, block, zero, psum, pdot, sink):
    outer, C, inner = x.shape
    total = outer * inner
    for task in prange(C * nsplit):
        c = task // nsplit
        s = task - c * nsplit
        f0 = s * total // nsplit
        f1 = (s + 1) * total // nsplit
        mc, ac, tc = m[c], a[c], t[c]
        acc_g = 0.0
        acc_gx = 0.0
        acc_d = 0.0
        for o in range(f0 // inner, (f1 + inner - 1) // inner):
            i0 = max(f0 - o * inner, 0)
            i1 = min(f1 - o * inner, inner)
            for b0 in range(i0, i1, block):
                b1 = min(b0 + block, i1)
                sg, sgx, sd = _chunk_sums(_dense(dy[o, c, b0:b1]), _dense(x[o, c, b0:b1]), mc,
                                          ac, tc, relu, zero)
                acc_g += sg
                acc_gx += sgx
                acc_d += sd
        psum[c, s] = acc_g
        pdot[c, s] = acc_gx
        sink[task] = acc_d  # the sink: see _gate


@_Kernel
def _sums_outer(dy, x, m, a, t, relu, nsplit, block, zero, psum, pdot, sink, ahead):
    """:func:`_sums_channel_major` with tasks over the outer axis, each
    reading its rows of every channel in memory order (as
    :func:`_stats_outer`); ``ahead``: elements to prefetch ahead (0: none;
    x and dy C-contiguous)."""
    outer, C, inner = x.shape
    for s in prange(nsplit):
        o0 = s * outer // nsplit
        o1 = (s + 1) * outer // nsplit
        acc = np.zeros((2, C))
        acc_d = 0.0
        for o in range(o0, o1):
            for c in range(C):
                mc, ac, tc = m[c], a[c], t[c]
                for b0 in range(0, inner, block):
                    b1 = min(b0 + block, inner)
                    if ahead:
                        _prefetch_ahead(x, o, c, b0, b1, ahead)
                        _prefetch_ahead(dy, o, c, b0, b1, ahead)
                    sg, sgx, sd = _chunk_sums(_dense(dy[o, c, b0:b1]), _dense(x[o, c, b0:b1]),
                                              mc, ac, tc, relu, zero)
                    acc[0, c] += sg
                    acc[1, c] += sgx
                    acc_d += sd
        for c in range(C):
            psum[c, s] = acc[0, c]
            pdot[c, s] = acc[1, c]
        sink[s] = acc_d  # the sink: see _gate


@njit(inline="always")
def _rows_sums4(dy, x, r0, r4, m, a, t, relu, zero, sg, sgx):
    """Add ``g`` (``dy``, ReLU-gated when ``relu``) and ``g * (x - m)`` of
    rows ``r0:r4`` (four rows at a time) to ``sg`` and ``sgx``: one load and
    store of the accumulators and one load of the coefficients per four rows.
    Under the ReLU, in cache, this took 0.65-0.8 of the row-by-row time
    (measured). The plain sums take it for long rows only
    (``_FOUR_ROWS_MIN_COLUMNS``).

    Four short rows (4 KiB or less together) are prefetched about
    ``_STREAM_AHEAD_BYTES`` ahead, line by line in memory order: read four
    rows at a time, they were 1.2-3x slower from memory than row by row,
    the hardware prefetcher alone not keeping up. Whole ReLU backward over
    plain, float32, two threads, interleaved (cold: inputs out of cache):
    (25088, 64) cold 1.40-1.45 -> 1.00-1.02, hot 0.99-1.10 -> 1.05-1.12;
    (8192, 64) cold 1.21-1.23 -> 1.03-1.04, hot 1.00-1.02 -> 1.09-1.11;
    (6272, 256) cold 1.21-1.28 -> 1.03-1.05, hot 1.12-1.14 -> 1.08-1.09.
    So it serves input of every size (it used to serve only input that fits
    in the cache, the rest summed row by row): (100352, 64) cold 1.02-1.15
    -> 1.06-1.07, hot 1.09-1.14 -> 0.96; (50176, 128) cold 1.10-1.22 ->
    1.12-1.14, hot 1.15-1.29 -> 1.11; (8192, 1024) and (4096, 2048)
    1.00-1.08 -> 0.94-1.01, with or without the prefetch.

    Unlike the other gated loops, this one adds ``dy`` to no sink
    (:func:`_gate`): with the rows prefetched, the sink's three adds and its
    accumulator's load and store per four rows cost more than the wait it
    saves. Whole ReLU backward over plain, interleaved against the sunk
    form: in cache (8192, 64) 1.02-1.13 -> 0.96-1.06, (6272, 256)
    1.09-1.12 -> 1.01-1.06, (256, 1024) 1.07-1.12 -> 1.03-1.10; from
    memory (8192, 64) 1.01-1.09 -> 0.96-1.02, (6272, 256) 1.04-1.09 ->
    1.08-1.11 (the one loss), (100352, 64) 1.03-1.10 -> 1.02-1.13."""
    lo = _relu_floor(x)
    step = 4 * x.shape[1] * x.itemsize
    ahead = _STREAM_AHEAD_BYTES // step * 4 if step <= _SHORT_RUN_BYTES else 0
    for o in range(r0, r4, 4):
        if ahead and o + ahead + 4 <= x.shape[0]:
            for j in range(o + ahead, o + ahead + 4):
                for k in range(0, x.shape[1], 64 // x.itemsize):
                    _prefetch(x[j], k)
                    _prefetch(dy[j], k)
        x0, x1, x2, x3 = _dense(x[o]), _dense(x[o + 1]), _dense(x[o + 2]), _dense(x[o + 3])
        g0, g1, g2, g3 = _dense(dy[o]), _dense(dy[o + 1]), _dense(dy[o + 2]), _dense(dy[o + 3])
        for c in range(x.shape[1]):
            mc, ac, tc = m[c], a[c], t[c]
            v0, v1, v2, v3 = _ld(x0[c]), _ld(x1[c]), _ld(x2[c]), _ld(x3[c])
            e0, e1, e2, e3 = v0 - mc, v1 - mc, v2 - mc, v3 - mc
            u0, u1, u2, u3 = _ld(g0[c]), _ld(g1[c]), _ld(g2[c]), _ld(g3[c])
            h0 = _gate(u0, v0, mc, ac, tc, relu, zero, lo)
            h1 = _gate(u1, v1, mc, ac, tc, relu, zero, lo)
            h2 = _gate(u2, v2, mc, ac, tc, relu, zero, lo)
            h3 = _gate(u3, v3, mc, ac, tc, relu, zero, lo)
            sg[c] += (h0 + h1) + (h2 + h3)
            sgx[c] += (h0 * e0 + h1 * e1) + (h2 * e2 + h3 * e3)


@njit(inline="always")
def _rows_tiled_sums(dy, x, xf, gf, r0, r1, m, zero, tile, sg, sgx, ahead):
    """Add ``sum(dy)`` and ``sum(dy * (x - m))`` of the first rows of
    ``r0:r1`` (as many as fill whole tiles) to ``sg`` and ``sgx``; returns
    the first row not summed. ``xf`` and ``gf`` are x and dy as flat runs
    (:func:`_flat`); ``tile`` holds three rows of ``k * C`` elements (``k``
    rows to a tile): two accumulators and ``m`` repeated ``k`` times.

    Rows of a channels-last input are short (64 float32 channels are four
    AVX-512 vectors): summed row by row, each accumulator update waits on
    the previous row's store to the same address, and each row pays a loop's
    setup. A tile of ``_TILE`` elements updates ``k`` rows' worth of
    accumulators, once per ``k`` rows."""
    C = x.shape[1]
    W = tile.shape[1]
    k = W // C
    tg = tile[0]
    tgx = tile[1]
    mt = tile[2]
    for j in range(W):
        tg[j] = zero
        tgx[j] = zero
    o = r0
    while o + k <= r1:
        _prefetch_rows(x, o + ahead, k if ahead else 0)
        _prefetch_rows(dy, o + ahead, k if ahead else 0)
        xr = xf[o * C:o * C + W]
        gr = gf[o * C:o * C + W]
        for j in range(W):
            g = _ld(gr[j])
            tg[j] += g
            tgx[j] += g * (_ld(xr[j]) - mt[j])
        o += k
    for r in range(k):
        for c in range(C):
            sg[c] += tg[r * C + c]
            sgx[c] += tgx[r * C + c]
    return o


@njit(inline="always")
def _rows_sums(dy, x, o0, o1, m, a, t, relu, block_rows, zero, psum, pdot, ahead):
    """``sum(g)`` and ``sum(g * (x - m))`` per channel over rows ``o0:o1``
    into ``psum`` and ``pdot`` (length C): blocks of ``block_rows`` rows
    summed in x's dtype, then float64. Under the ReLU, and for rows of at
    least ``_FOUR_ROWS_MIN_COLUMNS``, four rows at a time (:func:`_rows_sums4`;
    a block's last rows one by one, without the sink of :func:`_gate`: at most
    three rows a block). The plain sums of shorter rows: C-contiguous rows of
    at most ``_TILE // 2`` columns take whole tiles of rows as flat runs
    (:func:`_rows_tiled_sums`), the rest row by row; they prefetch x and dy
    ``ahead`` rows ahead. The backward with tiles, float32, two threads,
    interleaved with PyTorch and a copy as ``numbn bench`` times it: (8192,
    64) 0.82-0.88 of the row-by-row time, (16384, 16) 0.65-0.76, (131072, 2)
    0.61-0.66, (12544, 128) 0.90; tiles of 128 or 512 elements did no better
    (measured). (For such short rows a four-row form without tiles was 1.25x
    slower from memory.)"""
    C = x.shape[1]
    lo = _relu_floor(x)
    acc = np.full((2, C), zero)  # not the caller's: see _rows_moments
    sg = acc[0]
    sgx = acc[1]
    xf = _flat(x)
    gf = _flat(dy)
    k = _TILE // C if xf.shape[0] > 0 and gf.shape[0] > 0 else 0
    tile = np.empty((3, k * C if k > 1 else 0), acc.dtype)
    for r in range(tile.shape[1] // C):
        for c in range(C):
            tile[2, r * C + c] = m[c]
    for c in range(C):
        psum[c] = 0.0
        pdot[c] = 0.0
    for r0 in range(o0, o1, block_rows):
        r1 = min(r0 + block_rows, o1)
        for c in range(C):
            sg[c] = zero
            sgx[c] = zero
        start = r0
        if relu or C >= _FOUR_ROWS_MIN_COLUMNS:
            start = r0 + (r1 - r0) // 4 * 4
            _rows_sums4(dy, x, r0, start, m, a, t, relu, zero, sg, sgx)
        elif k > 1:
            start = _rows_tiled_sums(dy, x, xf, gf, r0, r1, m, zero, tile, sg, sgx, ahead)
        for o in range(start, r1):
            xr = _dense(x[o])
            gr = _dense(dy[o])
            # Two loops, not one with a runtime gate: in one loop the plain
            # sums were 2.5x slower from memory (measured).
            if relu:
                for c in range(C):
                    xv = _ld(xr[c])
                    g = _gate(_ld(gr[c]), xv, m[c], a[c], t[c], True, zero, lo)
                    sg[c] += g
                    sgx[c] += g * (xv - m[c])
            else:
                _prefetch_rows(x, o + ahead, 1 if ahead else 0)
                _prefetch_rows(dy, o + ahead, 1 if ahead else 0)
                for c in range(C):
                    g = _ld(gr[c])
                    sg[c] += g
                    sgx[c] += g * (_ld(xr[c]) - m[c])
        for c in range(C):
            psum[c] += np.float64(sg[c])
            pdot[c] += np.float64(sgx[c])


@_Kernel
def _sums_rows(dy, x, m, a, t, relu, nsplit, block_rows, zero, psum, pdot, ahead):
    R = x.shape[0]
    for s in prange(nsplit):
        _rows_sums(dy, x, s * R // nsplit, (s + 1) * R // nsplit, m, a, t, relu, block_rows,
                   zero, psum[s], pdot[s], ahead)


@_Kernel
def _apply_channel_major(dy, x, m, a, t, relu, b, d, dx, isplit, parts, stream, sink):
    """The channel-major backward apply, its tasks in parts as :func:`_affine_tasks`."""
    outer, C, inner = x.shape
    tasks = outer * C * isplit
    parts = min(tasks, parts)
    for p in prange(parts):
        for task in range(p * tasks // parts, (p + 1) * tasks // parts):
            o, c, i0, i1 = _task_span(task, isplit, C, inner)
            mc, ac, tc, bc, dc = m[c], a[c], t[c], b[c], d[c]
            sink[task] = _apply_run(_task_run(dy, o, c, i0, i1, isplit),
                                    _task_run(x, o, c, i0, i1, isplit),
                                    _task_run(dx, o, c, i0, i1, isplit), mc, ac, tc, relu, bc,
                                    dc, mc - mc, stream)  # the sink: see _gate
        if stream:
            _store_fence()


@njit(inline="always")
def _apply_row_range(dy, x, o0, o1, m, a, t, relu, b, d, dx, ahead, zero):
    """Rows ``o0:o1`` of ``dx = g * a + (x - m) * b + d`` (row by row: four
    rows per load of the coefficients was 10-25% slower here, measured); the
    plain form prefetches x and dy ``ahead`` rows ahead (:func:`_ahead`).
    Returns, under the ReLU, the sum of ``dy`` (else 0) for the caller's
    sink (:func:`_gate`)."""
    lo = _relu_floor(x)
    sd = zero
    for o in range(o0, o1):
        xr = _dense(x[o])
        gr = _dense(dy[o])
        dr = _dense(dx[o])
        if relu:  # two loops, as in _rows_sums
            for c in range(x.shape[1]):
                # Written out, not through _gate_sunk (where, before _fma,
                # LLVM contracted dx's arithmetic differently).
                u = _ld(gr[c])
                sd += u
                g = _gate(u, _ld(xr[c]), m[c], a[c], t[c], True, zero, lo)
                dr[c] = _st(dr, _dx(g, _ld(xr[c]), m[c], a[c], b[c], d[c]))
        else:
            _prefetch_rows(x, o + ahead, 1 if ahead else 0)
            _prefetch_rows(dy, o + ahead, 1 if ahead else 0)
            for c in range(x.shape[1]):
                dr[c] = _st(dr, _dx(_ld(gr[c]), _ld(xr[c]), m[c], a[c], b[c], d[c]))
    return np.float64(sd)


@njit(inline="always")
def _apply_elements(dy, x, dx, f0, f1, m, a, t, relu, b, d, zero):
    """Elements ``f0:f1`` (in memory order) of the C-contiguous rows views,
    as :func:`_apply_row_range` (:func:`_affine_elements`)."""
    lo = _relu_floor(x)
    K = x.shape[1]
    for f in range(f0, f1):
        o = f // K
        c = f - o * K
        xv = _ld(x[o, c])
        g = _gate(_ld(dy[o, c]), xv, m[c], a[c], t[c], relu, zero, lo)
        dx[o, c] = _st(dx, _dx(g, xv, m[c], a[c], b[c], d[c]))


@njit(inline="always")
def _apply_rows_streamed(dy, x, o0, o1, m, a, t, relu, b, d, dx, zero, ahead):
    """Rows ``o0:o1`` of the backward apply as :func:`_affine_rows_streamed`
    (:func:`_stream_row_apply_line`), x and dy prefetched."""
    K = x.shape[1]
    f0, f1 = o0 * K, o1 * K
    ahead *= K
    head, body, line = _line_split(dx.ctypes.data + f0 * dx.itemsize, f1 - f0, dx.itemsize)
    _apply_elements(dy, x, dx, f0, f0 + head, m, a, t, relu, b, d, zero)
    col = head % K
    for i in range(f0 + head, f0 + body, line):
        if ahead:
            _prefetch(x, min(i + ahead, f1 - 1))
            _prefetch(dy, min(i + ahead, f1 - 1))
        _stream_row_apply_line(dy, x, dx, i, col, m, a, t, relu, b, d)
        col += line
        while col >= K:
            col -= K
    _apply_elements(dy, x, dx, f0 + body, f1, m, a, t, relu, b, d, zero)


@njit(inline="always")
def _apply_tiles(dy, x, dx, xf, gf, df, o0, o1, tc, ahead):
    """Rows of ``o0:o1`` of the plain apply (as :func:`_apply_row_range`) in
    flat tiles of whole rows (:func:`_rows_tiled_sums`), ``tc`` the
    coefficients repeated over a tile's rows; returns the first row not done."""
    C = x.shape[1]
    W = tc.shape[1]
    k = W // C
    m, a, b, d = tc[0], tc[1], tc[3], tc[4]
    o = o0
    while o + k <= o1:
        _prefetch_rows(x, o + ahead, k if ahead else 0)
        _prefetch_rows(dy, o + ahead, k if ahead else 0)
        xr = xf[o * C:o * C + W]
        gr = gf[o * C:o * C + W]
        dr = df[o * C:o * C + W]
        for j in range(W):
            dr[j] = _st(dr, _dx(_ld(gr[j]), _ld(xr[j]), m[j], a[j], b[j], d[j]))
        o += k
    return o


@njit(inline="always")
def _part(p, parts, nsplit):
    """Tasks ``s0:s1`` of ``nsplit`` that part ``p`` of ``parts`` takes: the
    share that Numba's static schedule gives thread ``p`` of a
    ``prange(nsplit)`` on ``parts`` threads, ``nsplit // parts`` tasks and
    one more for each of the first ``nsplit % parts`` threads (checked
    against ``numba.get_thread_id()`` for 1-4 threads and 1-39 tasks). A
    schedule that split otherwise would cost locality, not correctness."""
    q, r = divmod(nsplit, parts)
    return p * q + min(p, r), (p + 1) * q + min(p + 1, r)


@njit(inline="always")
def _apply_row_tasks(dy, x, coef, relu, dx, nsplit, ahead, zero, stream, sink, parts):
    """The rows backward apply, ``coef`` its rows m, a, t, b, d per column:
    ``nsplit`` tasks of adjacent rows, each adding its sum of ``dy`` to
    ``sink`` (:func:`_gate`); with ``stream``, each task's rows as one run
    of memory instead (:func:`_apply_rows_streamed`, no sink), ending with a
    fence.

    The tasks run in ``parts`` (the threads) of adjacent tasks, as a static
    schedule splits the sums' ``prange`` over them, each part's tasks last
    to first: the last rows that a thread summed are the likeliest still in
    its caches (:func:`_part`). Backward, float32, two threads, interleaved
    with a PyTorch call and a copy, against first-to-last order: (8192, 64)
    0.94, channels-last (32, 14, 14, 512) 0.96-0.98, the bench's other rows
    inputs 0.99-1.02 (noise)."""
    R = x.shape[0]
    C = x.shape[1]
    tiled = _tiled(coef, 64 // dx.itemsize) if stream else coef
    xf, gf, df = _flat(x), _flat(dy), _flat(dx)
    k = _TILE // C if not stream and not relu and min(xf.size, gf.size, df.size) > 0 else 0
    tc = _tiled(coef, (k - 1) * C) if k > 1 else coef
    parts = max(1, min(parts, nsplit))
    for p in prange(parts):
        s0, s1 = _part(p, parts, nsplit)
        for s in range(s1 - 1, s0 - 1, -1):
            o0, o1 = s * R // nsplit, (s + 1) * R // nsplit
            if stream:
                _apply_rows_streamed(dy, x, o0, o1, tiled[0], tiled[1], tiled[2], relu,
                                     tiled[3], tiled[4], dx, zero, ahead)
            else:
                if k > 1:
                    o0 = _apply_tiles(dy, x, dx, xf, gf, df, o0, o1, tc, ahead)
                sink[s] += _apply_row_range(dy, x, o0, o1, coef[0], coef[1], coef[2], relu,
                                            coef[3], coef[4], dx, ahead, zero)
        if stream:
            _store_fence()


@_Kernel
def _apply_rows(dy, x, coef, relu, dx, nsplit, ahead, zero, stream, sink, parts):
    _apply_row_tasks(dy, x, coef, relu, dx, nsplit, ahead, zero, stream, sink, parts)


@njit(inline="always")
def _cast(cell, k, value):
    """``value`` rounded to the dtype of ``cell`` (x's dtype)."""
    cell[k] = value
    return cell[k]


@_Kernel
def _train_fused(x, w, b, eps, relu, block, zero, y, mean_out, var_out, stream):
    """Training forward with one task per channel, for channels whose slab
    fits in a core's cache: statistics, then normalisation while the slab is
    still cached, so x crosses memory once (2|x| of traffic, not 3|x|)."""
    outer, C, inner = x.shape
    cells = np.full((C, 4), zero)  # scratch, made here (_backward_fused)
    for c in prange(C):
        cell = cells[c]
        n, mean, m2 = _span_moments(x, c, 0, outer * inner, block, zero, cell[0:1])
        var = m2 / n
        if mean != mean:
            mean = _plain_mean(x, c)
        mean_out[c] = mean
        var_out[c] = var
        a = w[c] / np.sqrt(var + eps)
        mr = _cast(cell, 1, mean)
        ar = _cast(cell, 2, a)
        tr = _cast(cell, 3, b[c] - (mean - np.float64(mr)) * a)  # as _in_dtype
        if stream:
            for o in range(outer):
                _affine_run(x[o, c], y[o, c], mr, ar, tr, relu, zero, True)
            _store_fence()
        else:  # as in _backward_fused
            for o in range(outer):
                _affine_span(x[o, c], y[o, c], mr, ar, tr, relu, zero)


@njit(inline="always")
def _backward_vectors(mean, inv, w, b, c):
    """Channel ``c``'s float64 ``m, inv, a = w * inv, t`` of a backward."""
    invc = np.float64(inv[c])
    return np.float64(mean[c]), invc, np.float64(w[c]) * invc, np.float64(b[c])


@njit(inline="always")
def _run_sums(dy, x, o, c, block, m, a, t, relu, zero):
    """:func:`_chunk_sums` of run ``(o, c)`` of ``dy`` and ``x`` (``(outer, C,
    inner)``) added up in float64, in chunks of at most ``block`` values. A
    run that fits in one chunk is taken whole, without the chunk loop: with
    it, the fused backward of (64, 256, 14, 14) float32 (196-value runs) took
    1.10-1.15x as long (measured, one channel a task)."""
    inner = x.shape[2]
    if inner <= block:
        return _chunk_sums(dy[o, c], x[o, c], m, a, t, relu, zero)
    acc_g, acc_gx, acc_d = 0.0, 0.0, 0.0
    for b0 in range(0, inner, block):
        b1 = min(b0 + block, inner)
        sg, sgx, sd = _chunk_sums(dy[o, c, b0:b1], x[o, c, b0:b1], m, a, t, relu, zero)
        acc_g += sg
        acc_gx += sgx
        acc_d += sd
    return acc_g, acc_gx, acc_d


@_Kernel
def _backward_fused(dy, x, mean, inv, w, b, relu, training, group, block, zero, dx, db_out,
                    dw_out, stream):
    """Backward with one task per ``group`` adjacent channels whose slabs
    together fit in a core's cache: the sums, then dx while x and dy are
    still cached (3|x| of traffic). Both passes walk the group in memory
    order (``for o: for c in group``), so a group of short runs is read as
    ``outer`` stretches of ``group`` runs each. Writes ``dbias = sum(g)``
    and ``dweight = sum(g * x_hat)``."""
    outer, C, inner = x.shape
    # Scratch made here, not by the caller: each array the host side makes
    # and passes costs a call microseconds with its caches cold (_plan).
    cells = np.full((C, 5), zero)
    sums = np.empty((C, 3))
    sink = np.empty(C)
    n = np.float64(outer * inner)
    for k in prange((C + group - 1) // group):
        c0 = k * group
        c1 = min(c0 + group, C)
        for c in range(c0, c1):
            cell = cells[c]
            mc, invc, ac, tc = _backward_vectors(mean, inv, w, b, c)
            mr = _cast(cell, 0, mc)
            _cast(cell, 1, ac)
            _cast(cell, 2, tc - (mc - np.float64(mr)) * ac)
            sums[c, 0] = 0.0
            sums[c, 1] = 0.0
            sums[c, 2] = 0.0
        for o in range(outer):
            for c in range(c0, c1):
                cell = cells[c]
                sg, sgx, sd = _run_sums(dy, x, o, c, block, cell[0], cell[1], cell[2], relu,
                                        zero)
                sums[c, 0] += sg
                sums[c, 1] += sgx
                sums[c, 2] += sd
        acc_d = 0.0
        for c in range(c0, c1):
            cell = cells[c]
            mc, invc, ac, tc = _backward_vectors(mean, inv, w, b, c)
            shift = mc - np.float64(cell[0])
            acc_g = sums[c, 0]
            acc_gx = sums[c, 1] - shift * acc_g
            acc_d += sums[c, 2]
            db_out[c] = acc_g
            dw_out[c] = acc_gx * invc
            bc, dc = 0.0, 0.0
            if training:
                bc = -ac * invc * invc * acc_gx / n
                dc = -ac * acc_g / n
            _cast(cell, 3, bc)
            _cast(cell, 4, dc - shift * bc)
        if stream:
            for o in range(outer):
                for c in range(c0, c1):
                    cell = cells[c]
                    acc_d += _apply_run(dy[o, c], x[o, c], dx[o, c], cell[0], cell[1], cell[2],
                                        relu, cell[3], cell[4], zero, True)
            _store_fence()
        else:  # the plain loop on its own: inside the streaming one it ran 1.12x slower
            for o in range(outer):
                for c in range(c0, c1):
                    cell = cells[c]
                    acc_d += _apply_span(dy[o, c], x[o, c], dx[o, c], cell[0], cell[1], cell[2],
                                         relu, cell[3], cell[4], zero)
        sink[k] = acc_d  # the sink: see _gate


@njit(inline="always")
def _coefficients_in_dtype(coef, c, m, a, t):
    """Column ``c`` of ``coef`` (rows m, a, t in x's dtype) from float64
    ``m, a, t`` as :func:`_in_dtype` rounds them: ``t`` absorbs the rounding
    of ``m``. Returns that rounding, ``m - m_rounded``."""
    coef[0, c] = m
    coef[1, c] = a
    shift = m - np.float64(coef[0, c])
    coef[2, c] = t - shift * a
    return shift


@_Kernel
def _train_rows(x, w, b, eps, relu, nsplit, block_rows, zero, y, mean, var, ahead, g, stream):
    """Training forward of a rows view (:func:`_row_views`) in one call:
    per-task statistics of each column, their merge (and each channel's
    ``g`` columns'), the coefficients, then normalisation of the same row
    blocks by the same tasks (each thread finds its rows still in its cache
    when they fit; and one kernel call instead of three)."""
    R = x.shape[0]
    pn = np.empty(nsplit)  # scratch, made here (_backward_fused)
    pmean = np.empty((nsplit, x.shape[1]))
    pm2 = np.empty((nsplit, x.shape[1]))
    for s in prange(nsplit):
        pn[s] = _rows_moments(x, s * R // nsplit, (s + 1) * R // nsplit, block_rows, zero,
                              pmean[s], pm2[s], ahead)
    _merge_channels(pn, pmean, pm2, g, mean, var)
    _plain_nan_means_rows(x, g, mean)
    _affine_row_tasks(x, _eval_coefficients(zero, mean, var, w, b, eps, g), relu, zero, y,
                      nsplit, ahead, stream)


@_Kernel
def _backward_rows(dy, x, mean, inv, w, b, relu, training, nsplit, block_rows, zero, ahead,
                   dx, db, dw, g, stream, parts):
    """Backward of a rows view (:func:`_row_views`) in one call: per-task
    sums of each column, their merge (and each channel's ``g`` columns'),
    the coefficients, then dx over the same row blocks by the same tasks.
    Writes ``db = sum(g)`` and ``dw = sum(g * x_hat)``."""
    R = x.shape[0]
    C = db.shape[0]
    coef = np.full((5, C), zero)  # scratch, made here (_backward_fused)
    psum = np.empty((nsplit, x.shape[1]))
    pdot = np.empty((nsplit, x.shape[1]))
    sink = np.zeros(nsplit)
    for c in range(C):
        mc, invc, ac, tc = _backward_vectors(mean, inv, w, b, c)
        _coefficients_in_dtype(coef, c, mc, ac, tc)
    cols = _spread(coef[:3], g)  # rows 3 and 4 are filled below, then spread
    for s in prange(nsplit):
        _rows_sums(dy, x, s * R // nsplit, (s + 1) * R // nsplit, cols[0], cols[1], cols[2],
                   relu, block_rows, zero, psum[s], pdot[s], ahead)
    for s in range(1, nsplit):  # columns innermost: SIMD
        for k in range(x.shape[1]):
            psum[0, k] += psum[s, k]
            pdot[0, k] += pdot[s, k]  # sum(g * (x - m_rounded)) of column k
    if g > 1:  # each channel's g columns into column c (c <= c * g: in place)
        for c in range(C):
            sg = 0.0
            sgx = 0.0
            for k in range(c * g, c * g + g):
                sg += psum[0, k]
                sgx += pdot[0, k]
            psum[0, c] = sg
            pdot[0, c] = sgx
    n = np.float64(R * g)
    for c in range(C):
        mc, invc, ac, tc = _backward_vectors(mean, inv, w, b, c)
        shift = mc - np.float64(coef[0, c])
        sum_gx = pdot[0, c] - shift * psum[0, c]
        db[c] = psum[0, c]
        dw[c] = sum_gx * invc
        bc, dc = 0.0, 0.0
        if training:
            bc = -ac * invc * invc * sum_gx / n
            dc = -ac * psum[0, c] / n
        coef[3, c] = bc
        coef[4, c] = dc - shift * bc
    cols = _spread(coef, g)
    _apply_row_tasks(dy, x, cols, relu, dx, nsplit, ahead, zero, stream, sink, parts)


@njit(cache=True, error_model="numpy")  # no fastmath: as functional._forward's NumPy
def mean_invstd(mean, var, eps, mean_out, invstd_out):
    """``mean`` and ``1 / sqrt(var + eps)`` (float64) into the vectors
    ``mean_out`` and ``invstd_out`` of the statistics' dtype, rounded once,
    as the general path's NumPy gives them (``batch_norm_forward``), in one
    compiled call, without floating-point warnings (a constant channel with
    ``eps=0`` gives inf). Its five NumPy operations and their error-state
    guard took about 7 us of a 50 us forward at (256, 1024) (measured)."""
    for c in range(mean.shape[0]):
        mean_out[c] = mean[c]
        invstd_out[c] = 1.0 / np.sqrt(var[c] + eps)


@njit(cache=True, error_model="numpy")  # no fastmath: as _reference.update_running
def _update_running(running_mean, running_var, mean, var, var_scale, factor):
    for c in range(running_mean.shape[0]):
        running_mean[c] = (1.0 - factor) * np.float64(running_mean[c]) + factor * mean[c]
        batch_var = var[c] * var_scale
        running_var[c] = (1.0 - factor) * np.float64(running_var[c]) + factor * batch_var


def update_running(running_mean, running_var, mean, var, var_scale, factor: float) -> None:
    """``r = (1 - factor) * r + factor * batch`` in place for both running
    statistics, the batch variance being ``var * var_scale`` (NumPy arrays
    of any float dtype; float16 through float64 copies), computed in float64
    as :func:`numbn._reference.update_running`."""
    if running_mean.dtype == np.float16 or running_var.dtype == np.float16:
        held = running_mean.astype(np.float64), running_var.astype(np.float64)
        _update_running(*held, mean, var, var_scale, factor)
        running_mean[...], running_var[...] = held
    else:
        _update_running(running_mean, running_var, mean, var, var_scale, factor)


# Host-side drivers ---------------------------------------------------------


def _row_views(x3, *more, max_inner=None):
    """The 2-D ``(outer, C * inner)`` views of ``x3`` and of ``more`` (arrays
    of its shape) for the rows kernels, or None for the channel-major ones.

    Channels-last input (``inner == 1``) takes the rows kernels when its
    rows are dense (channel stride its item size), as they type every row
    (:func:`_dense`); ``numbn.functional`` copies an input whose rows are
    not (a step in its channel axis) first.
    Channel-major input with short runs takes them too (``inner`` at most
    ``_config.CPU_ROWS_MAX_INNER`` and ``C * inner**2`` at most
    ``_config.CPU_ROWS_MAX_WORK``; ``inner`` below ``max_inner`` when it is
    given) when every array is C-contiguous, so the
    views are views, not copies: each channel is then ``inner`` adjacent
    columns of a row, reduced column by column and merged per channel,
    where the channel-major kernels would pay a reduction's fixed cost on
    every run of ``inner`` elements.
    """
    outer, C, inner = x3.shape
    arrays = (x3, *more)
    if inner == 1:
        # A loop, not all() over a generator: this runs on every call, and
        # small calls are mostly such host work (benchmarks/call_overhead.py).
        for a in arrays:
            if not dense_view(a):
                return None  # rows that are not dense (_dense): the channel-major kernels
        return [a[:, :, 0] for a in arrays]
    short = inner <= _config.CPU_ROWS_MAX_INNER and C * inner * inner <= _config.CPU_ROWS_MAX_WORK
    if max_inner is not None:
        short = short and inner < max_inner
    if not short:
        return None
    for a in arrays:
        if not a.flags.c_contiguous:
            return None
    return [a.reshape(outer, C * inner) for a in arrays]


def _by_channel(v, g):
    """Per-column sums of a rows view (:func:`_row_views`) summed over each
    channel's ``g`` columns."""
    return v if g == 1 else v.reshape(-1, g).sum(axis=1)


def _repeat(vs, g):
    """Per-channel vectors repeated over each channel's ``g`` columns."""
    return vs if g == 1 else [np.repeat(v, g) for v in vs]


def _threads() -> int:
    """``numba.get_num_threads()``, the calling thread's setting, without the
    two lock acquisitions that the public function makes on every call (once
    Numba's pool is up, the threading layer's own getter answers; a Numba
    without that private name gets the public function)."""
    global _threads
    numba.get_num_threads()  # starts the pool; _get_num_threads exists after it
    _threads = getattr(numba.np.ufunc.parallel, "_get_num_threads", numba.get_num_threads)
    return _threads()


def _tasks(total_elements: int, cap: int, per_thread: int | None = None) -> int:
    """How many tasks to split ``total_elements`` of work into (1..cap):
    ``per_thread`` a thread (``_config.CPU_TASKS_PER_THREAD`` when None)."""
    if per_thread is None:
        per_thread = _config.CPU_TASKS_PER_THREAD
    n = min(_threads() * per_thread, total_elements // _config.CPU_MIN_TASK, cap)
    return int(n) if n > 1 else 1


def _row_tasks(x3) -> int:
    """How many tasks the rows kernels split the rows of ``x3``'s rows view
    (:func:`_row_views`) into: ``_config.CPU_ROWS_TASKS_PER_THREAD`` a thread."""
    return _tasks(x3.size, x3.shape[0], _config.CPU_ROWS_TASKS_PER_THREAD)


def _per_channel(x3) -> int:
    """Tasks per channel of a channel-major reduction: enough for every thread
    even when C is 1..3 (the partials are merged afterwards)."""
    outer, C, inner = x3.shape
    tasks = _tasks(x3.size, x3.size)
    return int(min(max(1, -(-tasks // max(C, 1))), max(outer * inner, 1)))


def _bits(a):
    """``a`` as the kernels take it: float16 as its bits, a uint16 view (Numba
    has no float16 on the CPU; the kernels widen each element as they load it,
    :func:`_ld`, and narrow each result as they store it, :func:`_st`), so
    float16 costs no float32 copy of x, dy or the output; float32 and
    float64 as they are."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


_ZEROS = {2: np.float32(0), 4: np.float32(0), 8: np.float64(0)}


def _zero(x3):
    """0 in the kernels' arithmetic dtype for ``x3`` (float32 for float16 and
    float32, float64 for float64), from a table by item size: constructing it
    took 4 us per call with cold caches."""
    return _ZEROS[x3.itemsize]


def _arith(x3) -> np.dtype:
    """The kernels' arithmetic dtype for ``x3`` (:func:`_zero`'s)."""
    return _ZEROS[x3.itemsize].dtype


def _in_dtype(dtype, m, a, t, *more):
    """The per-channel coefficients in the kernels' arithmetic dtype.

    The kernels compute ``(x - m) * a + t`` in ``dtype`` (:func:`_arith`:
    float32 for float16 and float32 input, twice float64's SIMD width). ``m``
    is rounded to that dtype, and ``t`` (and the backward's ``d``) absorb the
    rounding, ``t - (m - m_rounded) * a``:
    ``x - m_rounded`` is exact for x near the mean (Sterbenz), so a mean of 1e4
    with a standard deviation of 1e-2 still normalises to float32 accuracy
    (tests/test_numerics.py), and ``x == m`` still gives exactly ``t`` at the
    fused ReLU's boundary (tests/test_activation.py).
    """
    mr = m.astype(dtype)
    shift = m - mr.astype(np.float64)
    out = [mr, a.astype(dtype), (t - shift * a).astype(dtype)]
    if more:
        b, d = more
        out += [b.astype(dtype), (d - shift * b).astype(dtype)]
    return out


def _ahead(x2) -> int:
    """Rows the rows kernels prefetch ahead of their loads of the rows view
    ``x2``: about ``_config.CPU_ROWS_STREAM_AHEAD_BYTES``, or 0 (no
    prefetching) for cache-resident input (x and dy together within
    ``_config.CPU_CACHE_BYTES``), where the prefetch instructions only cost (the
    statistics of (8192, 64) took 1.35x as long with them; measured)."""
    if 2 * x2.nbytes <= _config.CPU_CACHE_BYTES:
        return 0
    return max(1, _config.CPU_ROWS_STREAM_AHEAD_BYTES // max(1, x2.shape[1] * x2.itemsize))


def _stream(y, *read, shared=0, least=None) -> bool:
    """Whether the kernels store ``y`` non-temporally (:func:`_stream_line`):
    when it, or ``shared`` (the bytes that the processes sharing this
    machine's last-level cache write in the same pass: SyncBatchNorm's ranks
    on one machine), has at least ``_config.CPU_STREAM_MIN_BYTES``, and, for a
    channel-major view, its inner runs and those of the arrays ``read``
    beside it are contiguous (the line intrinsics load and store whole
    vectors), or, for a rows view (:func:`_row_views`), all are C-contiguous
    (the rows kernels then stream them as one run, :func:`_stream_row_line`);
    and ``y`` is aligned to its item size (NumPy's ``flags.aligned``: an
    array at an odd byte offset into a buffer is not, and crashed), and the
    arrays ``read`` have its item size (float32 dy with float16 x crashed).
    ``least``: the size to stream from, if not ``_config.CPU_STREAM_MIN_BYTES``;
    a rows view streams from ``_config.CPU_ROWS_STREAM_MIN_BYTES`` when that
    is less."""
    least = _config.CPU_STREAM_MIN_BYTES if least is None else least
    if y.ndim == 2:
        least = min(least, _config.CPU_ROWS_STREAM_MIN_BYTES)
    if max(y.nbytes, shared) < least:
        return False
    if not y.flags.aligned:  # no whole element starts a line: the aligned stores would fault
        return False
    if any(a.itemsize != y.itemsize for a in read):  # the line intrinsics take one size
        return False
    if y.ndim == 2:
        return all(a.flags.c_contiguous for a in (y, *read))
    return all(a.strides[2] == a.itemsize for a in (y, *read))


def _stream_slabs(y3, *read) -> bool:
    """:func:`_stream` for the one-task-per-channel kernels (:func:`_train_fused`,
    :func:`_backward_fused`): from ``_config.CPU_SLAB_STREAM_MIN_BYTES`` when
    ``y3``'s runs have ``_config.CPU_SLAB_STREAM_MIN_RUN_BYTES`` or more."""
    least = _config.CPU_STREAM_MIN_BYTES
    if y3.shape[2] * y3.itemsize >= _config.CPU_SLAB_STREAM_MIN_RUN_BYTES:
        least = min(least, _config.CPU_SLAB_STREAM_MIN_BYTES)
    return _stream(y3, *read, least=least)


def _block_rows(x2) -> int:
    """Rows of a block of the rows view ``x2`` (``_config.CPU_ROWS_BLOCK``,
    ``_config.CPU_ROWS_BLOCK_MIN_ROWS``, ``_config.CPU_ROWS_BLOCK_MAX_ROWS``)."""
    rows = _config.CPU_ROWS_BLOCK // max(x2.shape[1], 1)
    return min(max(_config.CPU_ROWS_BLOCK_MIN_ROWS, rows), _config.CPU_ROWS_BLOCK_MAX_ROWS)


def _by_outer(x3) -> bool:
    """Whether the channel-major reductions split the outer axis among the
    tasks (:func:`_stats_outer`): when it has
    ``_config.CPU_OUTER_ROWS_PER_THREAD`` rows per thread."""
    return x3.shape[0] >= _threads() * _config.CPU_OUTER_ROWS_PER_THREAD


def _ahead_elements(*arrays) -> int:
    """Elements that :func:`_stats_outer` and :func:`_sums_outer` prefetch
    ahead of their loads: ``_AHEAD_BYTES`` when the runs are short
    (``_SHORT_RUN_BYTES``, as :func:`_span_moments`) and the arrays
    C-contiguous (the prefetch addresses are memory order), else 0. Long
    runs went no faster with it (measured)."""
    x3 = arrays[0]
    if x3.shape[2] * x3.itemsize > _SHORT_RUN_BYTES:
        return 0
    if not all(a.flags.c_contiguous for a in arrays):
        return 0
    return _AHEAD_BYTES // x3.itemsize


def _unit(a) -> bool:
    """Whether the runs of ``a`` (``(outer, C, inner)``) are dense: inner
    stride its item size, or runs of one element. The channel-major kernels
    type every run so (:func:`_dense`); the launchers give them a dense copy
    of an input whose runs are not (:func:`_unit_runs`), and a dense buffer
    for such an output, copied into it after: a view with a step or a
    reversal in its innermost axis, whose loops ran one element at a time
    anyway."""
    return a.shape[2] <= 1 or dense_view(a)


def _unit_runs(a):
    """``a``, or a C-contiguous copy of it when its runs are not dense (:func:`_unit`)."""
    return a if _unit(a) else np.ascontiguousarray(a)


def _unit_out(a):
    """``a``, or a new C-contiguous array of its shape when its runs are not
    dense (:func:`_unit`), for the caller to copy into ``a``."""
    return a if _unit(a) else np.empty(a.shape, a.dtype)


def stats(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (float64) of ``x3``."""
    x3 = _bits(x3)
    outer, C, inner = x3.shape
    if x3.size == 0:  # an empty batch (a SyncBatchNorm rank's): count 0
        return np.zeros(C), np.full(C, np.nan)
    views = _row_views(x3)
    if views is None:
        x3 = _unit_runs(x3)
    if views is None and _by_outer(x3):
        nsplit = _tasks(x3.size, outer)
        pn, pmean, pm2 = np.empty(nsplit), np.empty((nsplit, C)), np.empty((nsplit, C))
        _stats_outer.on(x3.size)(x3, nsplit, _config.CPU_BLOCK, _zero(x3),
                                 np.empty((nsplit, C), _arith(x3)), pn, pmean, pm2,
                                 _ahead_elements(x3))
    elif views is None:
        nsplit = _per_channel(x3)
        pn, pmean, pm2 = np.empty(nsplit), np.empty((nsplit, C)), np.empty((nsplit, C))
        cells = np.empty(C * nsplit, _arith(x3))
        _stats_channel_major.on(x3.size)(x3, nsplit, _config.CPU_BLOCK, _zero(x3), cells,
                                         pn, pmean, pm2)
    else:
        x2, = views
        nsplit = _row_tasks(x3)
        pn, pmean, pm2 = (np.empty(nsplit), np.empty((nsplit, x2.shape[1])),
                          np.empty((nsplit, x2.shape[1])))
        _stats_rows.on(x3.size)(x2, nsplit, _block_rows(x2), _zero(x3), pn, pmean, pm2,
                                _ahead(x2))
    mean, var = np.empty(C), np.empty(C)
    _merge(x3, pn, pmean, pm2, mean, var)
    return mean, var


def _isplit(x3) -> int:
    outer, C, inner = x3.shape
    return max(1, _tasks(x3.size, inner) // max(outer * C, 1))


def _elementwise(channel_major, rows, x3, y3, *args, shared=0) -> None:
    """Run the forward's elementwise kernel pair on ``x3`` into ``y3``:
    :func:`_launch_elementwise`, float16 as its bits (:func:`_bits`)."""
    if x3.size == 0:
        return
    _launch_elementwise(channel_major, rows, _bits(x3), _bits(y3), *args, shared=shared)


def _launch_elementwise(channel_major, rows, x3, y3, *args, shared=0) -> None:
    """``kernel(x, *args, zero, y, split, ...)`` on a non-empty ``x3``
    (float32, float64 or float16's bits, :func:`_bits`) into ``y3`` of its
    dtype: the channel-major kernel with the parts and whether to stream
    (:func:`_stream`) after ``split``, or, where :func:`_row_views` serves,
    the rows kernel with ``ahead`` (:func:`_ahead`), the columns per channel
    and whether to stream."""
    views = _row_views(x3, y3, max_inner=_config.CPU_ROWS_ELEMENTWISE_MAX_INNER)
    if views is None:
        x3, out = _unit_runs(x3), _unit_out(y3)
        channel_major.on(x3.size)(x3, *args, _zero(x3), out, _isplit(x3), _threads(),
                                  _stream(out, x3, shared=shared))
        if out is not y3:
            y3[...] = out
    else:
        x2, y2 = views
        rows.on(x3.size)(x2, *args, _zero(x3), y2, _row_tasks(x3), _ahead(x2),
                         x3.shape[2], _stream(y2, x2, shared=shared))


def normalize(x3, m, a, t, relu, y3, shared=0) -> None:
    """``y3 = (x3 - m[c]) * a[c] + t[c]``, then ReLU if ``relu`` (vectors
    float64); ``shared`` as :func:`_stream`'s."""
    _elementwise(_affine_channel_major, _affine_rows, x3, y3, m, a, t, relu, shared=shared)


def infer(x3, mean, var, w, b, eps, relu, y3) -> None:
    """Inference forward ``y3 = (x3 - mean) / sqrt(var + eps) * w + b`` (then
    ReLU): :func:`normalize` with its coefficients computed in the kernel.
    Vectors of any float dtype, taken as they are (:func:`_kernel_vectors`);
    ``w`` and ``b`` may be None (ones, zeros)."""
    mean, var, w, b = _kernel_vectors(mean, var, *_affine(w, b, x3.shape[1], mean))
    _elementwise(_infer_channel_major, _infer_rows, x3, y3, mean, var, w, b, float(eps), relu)


def infer_ready(x3, mean, var, w, b, eps, relu, y3) -> None:
    """:func:`infer` for a caller that has checked what :func:`infer` would
    convert: ``x3`` of a float dtype and not empty, ``y3`` of its dtype, and
    the four vectors as :func:`_kernel_vectors` takes them unchanged. Its
    launch is planned once per layout (:func:`_plan`)."""
    key = ("infer", x3.shape, x3.strides, x3.dtype, y3.strides, y3.dtype, y3.flags.aligned,
           _threads())
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(key, _infer_plan(_bits(x3), _bits(y3)))
    _infer_launch(plan, x3, mean, var, w, b, eps, relu, y3)


def infer_dense(x, axis, mean, var, w, b, eps, relu, y, aligned=True) -> None:
    """:func:`infer_ready` of a C-contiguous ``x`` whose channel axis is
    ``axis`` into ``y``, C-contiguous of its shape and dtype (``aligned``:
    ``y.flags.aligned``), as ``numbn.functional``'s direct path has checked
    them (:func:`~numbn._layout.contiguous_view` serves ``x``). Planned by
    shape and axis, which fix a C-contiguous array's strides: no ``(outer, C,
    inner)`` view made and no strides read, each up to a microsecond of a
    call that runs with cold caches (``numbn.functional._direct_channels``
    has the figures)."""
    key = ("infer dense", x.shape, axis, x.dtype, aligned, _threads())
    plan = _plans.get(key)
    if plan is None:
        x3 = contiguous_view(x, axis)
        plan = _plan(key, _infer_plan(_bits(x3), _bits(y.reshape(x3.shape))))
    _infer_launch(plan, x, mean, var, w, b, eps, relu, y)


def _infer_launch(plan, x, mean, var, w, b, eps, relu, y) -> None:
    """:func:`infer_ready`'s launch by ``plan`` (:func:`_infer_plan`) of
    ``x`` and ``y``, arrays that reshape to its view shape."""
    kernel, shape, half, zero, split, ahead, inner, stream = plan
    if half:
        x, y = _bits(x), _bits(y)
    x, y = x.reshape(shape), y.reshape(shape)
    if kernel is None:  # an input that the plans do not serve: converted per call
        _launch_elementwise(_infer_channel_major, _infer_rows, x, y, mean, var, w, b,
                            float(eps), relu)
    elif len(shape) == 3:
        kernel(x, mean, var, w, b, float(eps), relu, zero, y, split, _threads(), stream)
    else:
        kernel(x, mean, var, w, b, float(eps), relu, zero, y, split, ahead, inner, stream)


def _infer_plan(x3, y3) -> tuple:
    """:func:`infer_ready`'s plan for ``x3`` and ``y3`` (float16 as its bits):
    what :func:`_launch_elementwise` would choose, or no kernel when the
    channel-major kernel would need a dense copy of either. The second item
    is the shape the kernel takes its arrays in: the rows views' 2-D one
    (:func:`_rows_shape`) or ``(outer, C, inner)``."""
    half = x3.dtype == np.uint16
    views = _row_views(x3, y3, max_inner=_config.CPU_ROWS_ELEMENTWISE_MAX_INNER)
    if views is not None:
        x2, y2 = views
        return (_infer_rows.on(x3.size), _rows_shape(x3), half, _zero(x3), _row_tasks(x3),
                _ahead(x2), x3.shape[2], _stream(y2, x2))
    if not (_unit(x3) and _unit(y3)):
        return (None, x3.shape, half) + (None,) * 5
    return (_infer_channel_major.on(x3.size), x3.shape, half, _zero(x3), _isplit(x3), 0, 0,
            _stream(y3, x3))


def _affine(w, b, C: int, like):
    """``w`` and ``b``, ones and zeros of ``like``'s dtype where None."""
    dtype = like.dtype if isinstance(like, np.ndarray) else np.float64
    return (np.ones(C, dtype) if w is None else w, np.zeros(C, dtype) if b is None else b)


def _kernel_vectors(*vs):
    """Per-channel vectors for a kernel that reads them as float64: as they
    are when they are NumPy arrays of one dtype, float32 or float64,
    contiguous and writable (Numba compiles a variant per array type, and a
    read-only array is a type of its own), else all copied to float64. No
    per-call conversion in the common case, and at most two compiled variants
    per kernel and input dtype."""
    if _checks.kernel_ready(vs):
        return vs
    return [np.ascontiguousarray(v, np.float64) for v in vs]


def backward_sums(dy3, x3, m, a, t, relu) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``sum(g)`` and ``sum(g * (x - m))`` (float64), where ``g`` is
    ``dy`` masked by the fused ReLU when ``relu`` (its input ``(x - m) * a + t``)."""
    dy3, x3 = _bits(dy3), _bits(x3)
    outer, C, inner = x3.shape
    if x3.size == 0:
        return np.zeros(C), np.zeros(C)
    # The kernels subtract m rounded to x's dtype (so float32 input keeps
    # float32 SIMD); sum(g * (x - m)) is corrected for that rounding below.
    # The ReLU gate uses the forward's own coefficients, so the masks agree.
    mx, a, t = _in_dtype(_arith(x3), m, a, t)
    views = _row_views(x3, dy3)
    if views is None:
        dy3, x3 = _unit_runs(dy3), _unit_runs(x3)
    if views is None and _by_outer(x3):
        nsplit = _tasks(x3.size, outer)
        psum, pdot = np.empty((C, nsplit)), np.empty((C, nsplit))
        _sums_outer.on(x3.size)(dy3, x3, mx, a, t, relu, nsplit, _config.CPU_BLOCK, _zero(x3),
                                psum, pdot, np.empty(nsplit), _ahead_elements(x3, dy3))
        sum_g, sum_gx = psum.sum(axis=1), pdot.sum(axis=1)
    elif views is None:
        nsplit = _per_channel(x3)
        psum, pdot = np.empty((C, nsplit)), np.empty((C, nsplit))
        _sums_channel_major.on(x3.size)(dy3, x3, mx, a, t, relu, nsplit, _config.CPU_BLOCK,
                                        _zero(x3), psum, pdot, np.empty(C * nsplit))
        sum_g, sum_gx = psum.sum(axis=1), pdot.sum(axis=1)
    else:
        x2, dy2 = views
        nsplit = _row_tasks(x3)
        psum, pdot = np.empty((nsplit, x2.shape[1])), np.empty((nsplit, x2.shape[1]))
        _sums_rows.on(x3.size)(dy2, x2, *_repeat((mx, a, t), inner), relu, nsplit,
                               _block_rows(x2), _zero(x3), psum, pdot, _ahead(x2))
        sum_g = _by_channel(psum.sum(axis=0), inner)
        sum_gx = _by_channel(pdot.sum(axis=0), inner)
    return sum_g, sum_gx - (m - mx.astype(np.float64)) * sum_g


def backward_apply(dy3, x3, m, a, t, relu, b, d, dx3, shared=0) -> None:
    """``dx3 = g * a[c] + (x3 - m[c]) * b[c] + d[c]`` with ``g`` as in
    :func:`backward_sums`; ``shared`` as :func:`_stream`'s."""
    if x3.size == 0:
        return
    dy3, x3, dx3 = _bits(dy3), _bits(x3), _bits(dx3)
    m, a, t, b, d = _in_dtype(_arith(x3), m, a, t, b, d)
    views = _row_views(x3, dy3, dx3)
    if views is None:
        isplit = _isplit(x3)
        dy3, x3, out = _unit_runs(dy3), _unit_runs(x3), _unit_out(dx3)
        _apply_channel_major.on(x3.size)(dy3, x3, m, a, t, relu, b, d, out, isplit, _threads(),
                                         _stream(out, x3, dy3, shared=shared),
                                         np.empty(x3.shape[0] * x3.shape[1] * isplit))
        if out is not dx3:
            dx3[...] = out
    else:
        x2, dy2, dx2 = views
        coef = np.stack(_repeat((m, a, t, b, d), x3.shape[2]))
        nsplit = _row_tasks(x3)
        _apply_rows.on(x3.size)(dy2, x2, coef, relu, dx2, nsplit, _ahead(x2), _zero(x3),
                                _stream(dx2, x2, dy2, shared=shared), np.zeros(nsplit), _threads())


def _fusable(x3) -> bool:
    """One task per channel (or, in the backward, per group of channels,
    :func:`_channel_group`) pays when the channel's slab fits in a core's
    cache and there are channels enough for every thread."""
    outer, C, inner = x3.shape
    slab = outer * inner * x3.itemsize
    return (inner > 1 and outer > 0 and C >= 2 * _threads()
            and slab <= _config.CPU_FUSED_MAX_SLAB_BYTES and x3.flags.c_contiguous)


def _channel_group(x3) -> int:
    """Adjacent channels a task of the fused backward takes together
    (``_config.CPU_FUSED_GROUP_BYTES``): ``ceil(C / (threads * k))`` for the
    least k that keeps their slabs of x and dy within
    ``_config.CPU_FUSED_GROUP_BYTES``, k groups a thread or a few fewer; 1
    for runs of ``_config.CPU_FUSED_GROUP_MAX_RUN_BYTES`` or more."""
    outer, C, inner = x3.shape
    if inner * x3.itemsize >= _config.CPU_FUSED_GROUP_MAX_RUN_BYTES:
        return 1
    most = _config.CPU_FUSED_GROUP_BYTES // max(2 * outer * inner * x3.itemsize, 1)
    if most <= 1:
        return 1
    threads = _threads()
    k = -(-C // (threads * most))
    return max(1, -(-C // (threads * k)))


def train_fused(x3, w, b, eps, relu, y3):
    """Training forward in one kernel call: ``(mean, var)``, or None when this
    input is better served by :func:`stats` then :func:`normalize`. ``w`` and
    ``b``: None or vectors of any float dtype (:func:`_kernel_vectors`).

    Channels-last input takes the rows kernel (statistics and normalisation
    of each task's rows by the same task); channel-major input whose channel
    slabs fit in a core's cache takes one task per channel. float16 is
    viewed as its bits by :func:`train_ready`."""
    if y3.dtype != x3.dtype or x3.size == 0:
        return None
    w, b = _kernel_vectors(*_affine(w, b, x3.shape[1], w if w is not None else b))
    return train_ready(x3, w, b, eps, relu, y3)


def train_ready(x3, w, b, eps, relu, y3):
    """:func:`train_fused` for a caller that has checked what it would
    convert: ``x3`` of a float dtype (float16 as it is or as its bits,
    :func:`_bits`) and not empty, ``y3`` of its dtype, ``w`` and ``b`` as
    :func:`_kernel_vectors` takes them unchanged. Its launch is planned once
    per layout (:func:`_plan`)."""
    key = ("train", x3.shape, x3.strides, x3.dtype, y3.strides, y3.dtype, y3.flags.aligned,
           _threads())
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(key, _train_plan(_bits(x3), _bits(y3)))
    return _train_launch(plan, x3, w, b, eps, relu, y3)


def train_dense(x, axis, w, b, eps, relu, y, aligned=True):
    """:func:`train_ready` of a C-contiguous ``x`` and ``y`` as
    :func:`infer_dense` takes them, planned by shape and axis."""
    key = ("train dense", x.shape, axis, x.dtype, aligned, _threads())
    plan = _plans.get(key)
    if plan is None:
        x3 = contiguous_view(x, axis)
        plan = _plan(key, _train_plan(_bits(x3), _bits(y.reshape(x3.shape))))
    return _train_launch(plan, x, w, b, eps, relu, y)


def _train_launch(plan, x, w, b, eps, relu, y):
    """:func:`train_ready`'s launch by ``plan`` (:func:`_train_plan`):
    ``(mean, var)``, or None where the plan has no kernel."""
    kernel, shape, C, half, zero, split, block, ahead, inner, stream = plan
    if kernel is None:
        return None
    if half:
        x, y = _bits(x), _bits(y)
    mean, var = np.empty(C), np.empty(C)
    x, y = x.reshape(shape), y.reshape(shape)
    if len(shape) == 3:
        kernel(x, w, b, float(eps), relu, block, zero, y, mean, var, stream)
    else:
        kernel(x, w, b, float(eps), relu, split, block, zero, y, mean, var, ahead, inner, stream)
    return mean, var


def _train_plan(x3, y3) -> tuple:
    """:func:`train_ready`'s plan (float16 as its bits): no kernel for an
    input better served by :func:`stats` then :func:`normalize`. The kernel's
    view shape (as :func:`_infer_plan`'s) and C follow the kernel."""
    half = x3.dtype == np.uint16
    C = x3.shape[1]
    views = _row_views(x3, y3)
    if views is not None:
        x2, y2 = views
        return (_train_rows.on(x3.size), _rows_shape(x3), C, half, _zero(x3), _row_tasks(x3),
                _block_rows(x2), _ahead(x2), x3.shape[2], _stream(y2, x2))
    if not _fusable(x3):
        return (None,) * 10
    return (_train_fused.on(x3.size), x3.shape, C, half, _zero(x3), 0, _config.CPU_BLOCK, 0,
            0, _stream_slabs(y3, x3))


def backward_fused(dy3, x3, mean, inv, w, b, relu, training, dx3):
    """Backward in one kernel call: ``(dweight, dbias)`` (float64) with
    ``dx3`` written, or None when this input is better served by the
    two-pass kernels. ``mean`` and ``inv`` are the forward's mean and invstd
    (or the running ones, ``training=False``); ``w`` and ``b`` None or
    vectors, all of any float dtype (:func:`_kernel_vectors`): the
    coefficients are computed in the kernel. Channels-last input takes the
    rows kernel, channel-major input with cache-sized channel slabs one task
    per channel (as :func:`train_fused`) or, with short runs, per group of
    adjacent channels (:func:`_channel_group`). float16 is viewed as its
    bits by :func:`backward_ready`."""
    if dx3.dtype != x3.dtype or x3.size == 0:
        return None
    mean, inv, w, b = _kernel_vectors(mean, inv, *_affine(w, b, x3.shape[1], mean))
    return backward_ready(dy3, x3, mean, inv, w, b, relu, training, dx3)


def backward_ready(dy3, x3, mean, inv, w, b, relu, training, dx3, grads=np.float64):
    """:func:`backward_fused` for a caller that has checked what it would
    convert: ``x3`` of a float dtype (float16 as it is or as its bits,
    :func:`_bits`) and not empty, ``dx3`` of its dtype, ``dy3`` of its
    dtype too or, with float16 ``x3``, float32, the four
    vectors as :func:`_kernel_vectors` takes them unchanged; ``(dweight,
    dbias)`` of dtype ``grads`` (float32 or float64: the kernels compute
    them in float64 and round them once as they store them). Its launch is
    planned once per layout (:func:`_plan`)."""
    key = ("backward", x3.shape, x3.strides, x3.dtype, dy3.strides, dy3.dtype, dx3.strides,
           dx3.dtype, dx3.flags.aligned, _threads())
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(key, _backward_plan(_bits(dy3), _bits(x3), _bits(dx3)))
    return _backward_launch(plan, dy3, x3, mean, inv, w, b, relu, training, dx3, grads)


def backward_dense(dy, x, axis, mean, inv, w, b, relu, training, dx, grads=np.float64):
    """:func:`backward_ready` of C-contiguous ``dy``, ``x`` and ``dx`` of one
    shape (``dx`` aligned, of x's dtype) as :func:`infer_dense` takes them,
    planned by shape and axis."""
    key = ("backward dense", x.shape, axis, x.dtype, dy.dtype, _threads())
    plan = _plans.get(key)
    if plan is None:
        x3 = contiguous_view(x, axis)
        plan = _plan(key, _backward_plan(_bits(dy.reshape(x3.shape)), _bits(x3),
                                         _bits(dx.reshape(x3.shape))))
    return _backward_launch(plan, dy, x, mean, inv, w, b, relu, training, dx, grads)


def _backward_launch(plan, dy, x, mean, inv, w, b, relu, training, dx, grads):
    """:func:`backward_ready`'s launch by ``plan`` (:func:`_backward_plan`):
    ``(dweight, dbias)``, or None where the plan has no kernel."""
    kernel, shape, C, half, zero, split, block, ahead, inner, stream = plan
    if kernel is None:
        return None
    if half:  # dy may be float32 there (backward_fused's callers' mixed precision)
        dy, x, dx = _bits(dy), _bits(x), _bits(dx)
    dw, db = np.empty(C, grads), np.empty(C, grads)
    dy, x, dx = dy.reshape(shape), x.reshape(shape), dx.reshape(shape)
    if len(shape) == 3:
        kernel(dy, x, mean, inv, w, b, relu, training, split, block, zero, dx, db, dw, stream)
    else:
        kernel(dy, x, mean, inv, w, b, relu, training, split, block, zero, ahead, dx, db, dw,
               inner, stream, _threads())
    return dw, db


def _backward_plan(dy3, x3, dx3) -> tuple:
    """:func:`backward_ready`'s plan (float16 as its bits): no kernel for an
    input better served by the two-pass kernels."""
    half = x3.dtype == np.uint16
    C = x3.shape[1]
    views = _row_views(x3, dy3, dx3)
    if views is not None:
        x2, dy2, dx2 = views
        return (_backward_rows.on(x3.size), _rows_shape(x3), C, half, _zero(x3),
                _row_tasks(x3), _block_rows(x2), _ahead(x2), x3.shape[2],
                _stream(dx2, x2, dy2))
    if not _fusable(x3) or not dy3.flags.c_contiguous:
        return (None,) * 10
    return (_backward_fused.on(x3.size), x3.shape, C, half, _zero(x3), _channel_group(x3),
            _config.CPU_BLOCK, 0, 0, _stream_slabs(dx3, x3, dy3))


def _plan(key, plan: tuple) -> tuple:
    """Keep ``plan`` for ``key`` and return it.

    A launcher's choices (kernel and variant, row views, tasks, blocks,
    prefetch distance, stores) depend only on its arrays' shapes, strides,
    dtypes and alignment, on the thread count and on ``numbn._config``; made
    once per layout, they cost a call one dictionary lookup instead of a
    dozen Python-level calls, which run with the caches cold after a kernel
    (each one to three microseconds; measured in ``numbn bench``'s
    interleaving, where the direct path's host side took 20-60 us of a
    call). The plans are dropped whenever a setting of ``numbn._config`` is
    assigned and in a forked child (:func:`_after_fork`)."""
    if len(_plans) >= _PLANS_MAX:
        _plans.clear()
    _plans[key] = plan
    return plan


_config.ON_CHANGE.append(_plans.clear)


def _rows_shape(x3) -> tuple:
    """The shape of :func:`_row_views`'s views of ``x3``. The launchers make
    them by ``reshape`` to it, a view wherever :func:`_row_views` serves: of
    C-contiguous arrays, or, for channels-last input (``inner == 1``, rows
    that need only be dense), by dropping the unit axis, which NumPy never
    copies (the same strides as ``a[:, :, 0]``)."""
    outer, C, inner = x3.shape
    return outer, C * inner


#: Elements along each side of the square tiles of :func:`copy_into`.
_COPY_TILE = 8

#: The unsigned integer dtype of each item size: :func:`copy_into` moves bits.
_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@_Kernel
def _tile_copy(src, dst):
    """``dst[...] = src`` of two 5-D arrays of one shape, ``src`` read in
    ``_COPY_TILE`` x ``_COPY_TILE`` tiles of its last two axes (its fastest
    axis the fourth, ``dst``'s the fifth), so each cache line of either is
    used whole while it is cached. The inner loop runs along ``src``'s runs.
    Float32 (32, 64, 56, 56), two threads, ms, C-order from channels-last,
    channels-last from C-order, C-order from F-order, F-order from C-order:
    tiles of 8 (this) 4.3, 5.1, 7.1, 6.9; of 32 2.6, 9.6, 10.8, 11.3; of 16
    along ``dst``'s runs 6.2, 5.5, 6.1, 4.4; NumPy's assignment 8.1, 5.5,
    74, 22; a plain copy 1.3-1.6 (measured)."""
    A, B, D, K, L = src.shape
    T = _COPY_TILE
    nk = (K + T - 1) // T
    for task in prange(A * B * D * nk):
        kb = task % nk
        r = task // nk
        d = r % D
        r //= D
        b = r % B
        a = r // B
        k0 = kb * T
        sv = src[a, b, d, k0:min(k0 + T, K)]
        dv = dst[a, b, d, k0:min(k0 + T, K)]
        for l0 in range(0, L, T):
            st = sv[:, l0:min(l0 + T, L)]
            dt = dv[:, l0:min(l0 + T, L)]
            for j in range(st.shape[1]):  # along src's runs (measured: see above)
                for i in range(st.shape[0]):
                    dt[i, j] = st[i, j]


def copy_into(dst, src) -> None:
    """``dst[...] = src`` for NumPy arrays of one shape and dtype, ``dst``
    C-contiguous. A ``src`` whose fastest axis is not ``dst``'s (an
    F-ordered or channels-last ``dy`` beside a C-ordered ``x``, or the other
    way round) is copied in tiles by :func:`_tile_copy`: NumPy's assignment
    reads it one element per cache line: (32, 64, 56, 56) float32 into
    C-order from F-order took 74 ms that way, 7.1 ms tiled, 1.3 ms for a
    plain copy (measured). Anything else is NumPy's assignment."""
    shape, strides = _merged(src.shape, src.strides)
    if (dst.dtype != src.dtype or src.itemsize not in _BITS or not dst.flags.c_contiguous
            or len(shape) < 2 or len(shape) > 5 or src.size < _config.CPU_TILED_COPY_MIN):
        dst[...] = src
        return
    k = min(range(len(shape)), key=lambda i: abs(strides[i]))
    if k == len(shape) - 1:
        dst[...] = src
        return
    order = [i for i in range(len(shape) - 1) if i != k] + [k, len(shape) - 1]
    pad = 5 - len(shape)
    dst_strides = np.cumprod((1,) + shape[:0:-1])[::-1] * src.itemsize
    bits = _BITS[src.itemsize]
    s = np.lib.stride_tricks.as_strided(
        src.view(bits), (1,) * pad + tuple(shape[i] for i in order),
        (0,) * pad + tuple(strides[i] for i in order))
    d = np.lib.stride_tricks.as_strided(
        dst.view(bits), s.shape, (0,) * pad + tuple(int(dst_strides[i]) for i in order))
    _tile_copy.on(src.size)(s, d)


def _merged(shape, strides):
    """``shape`` and ``strides`` without size-1 axes, neighbours that are one
    strided run merged (as a C-contiguous array's would be)."""
    out_shape, out_strides = [], []
    for n, st in zip(shape, strides):
        if n == 1:
            continue
        if out_shape and out_strides[-1] == st * n:
            out_shape[-1] *= n
            out_strides[-1] = st
        else:
            out_shape.append(n)
            out_strides.append(st)
    return tuple(out_shape), tuple(out_strides)
