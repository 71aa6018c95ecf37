"""The ``"cuda"`` backend: Numba CUDA kernels and device-array handling.

:class:`Device` is the engine that ``numbn.functional`` drives (the interface
of ``functional._Host``): it adopts the caller's device array (numba device
arrays, CuPy arrays, PyTorch CUDA tensors, anything with
``__cuda_array_interface__`` or a CUDA DLPack capsule) as a numba device array
*without a copy*, takes its canonical ``(outer, C, inner)`` view, allocates
outputs of the caller's kind and hands them back. :func:`stats`,
:func:`normalize`, :func:`backward_sums` and :func:`backward_apply` are the
four primitives of ``numbn._cpu`` with the same semantics, as CUDA kernels.

Nothing here imports ``numba.cuda`` or touches a driver at import time: the
module is imported by ``numbn`` only when CUDA is asked about, and even then
``numba.cuda`` is imported by :func:`_cuda_module` on first use, and kernels
are built (and compiled, once per signature) on first launch.

Kernels
-------
Two regimes of the canonical view, as on the CPU:

* *channel-major* (``inner >= CUDA_CHANNEL_MAJOR_MIN_INNER``: NCHW and the
  like): a reduction runs on a grid ``(C, splits)``; each block reads rows
  ``o`` of its channel and a segment of their contiguous ``inner`` run, with
  consecutive threads on consecutive elements (coalesced). When the run is
  shorter than a block, one block iteration covers ``TPB // inner`` rows.
  Elementwise kernels grid-stride over the ``outer * C`` rows, with the row's
  channel tracked incrementally (no integer division per element).
* *row-major* (channels-last and 2-D: ``inner`` short, channels contiguous):
  2-D blocks, ``threadIdx.x`` along up to 32 contiguous channels (coalesced
  loads), ``threadIdx.y`` and ``blockIdx.y`` along rows.

In both, a thread loads four elements (along its run, or across four rows)
before it uses any, and the elementwise kernels store only after the four
loads: with one load in flight per thread the kernels were latency-bound
(on an H100, the eval kernel of NCHW (256, 64, 112, 112) float32 took 1.05
ms, now 0.69, a copy's time; ``benchmarks/gpu_results.md``).

A reduction makes per-block partials ``(count, mean, M2)`` (statistics) or
``(sum_g, sum_gx)`` (backward) in a ``(3, C, splits)`` buffer, merged per
channel by a second, tiny kernel: no two threads write one location and there
are no atomics, so results do not depend on scheduling.

Numerics (the contract of the ``numbn._cpu`` primitives, whose docstrings
give the semantics; both backends agree with the float64 reference to the
output dtype's rounding):

* Everything is float64 inside the kernels, for every input dtype: loads are
  converted to float64, sums are float64, and the affine maps are
  ``(x - m) * a + t`` in float64, then rounded once to the output dtype. A
  float32 mean cannot even represent the mean of the "mean 1e4, std 1e-2"
  input to better than 5 % of its standard deviation (ulp(1e4) is 1e-3 in
  float32); float64 can. On data-centre GPUs (A100, H100: float64 at half
  the float32 rate) the kernels should stay memory-bound; on consumer GPUs
  (1/64 rate) float64 may cost time, the price of exactness. (The CPU
  kernels, compute-bound on SIMD width, do their elementwise passes in
  float32 instead; a GPU has no such reason.)
* Within a thread, the variance is accumulated as *shifted* sums
  ``sum(x - k)`` and ``sum((x - k)**2)`` with ``k`` the first value the
  thread reads. Because ``k`` is one of the thread's own ``n`` values,
  ``n * M2 >= n * (k - mean)**2`` can exceed ``M2`` by at most a factor ``n``,
  so ``M2 = s2 - s1**2 / n`` loses at most ``log2(n)`` bits of float64 (n is a
  few hundred per thread): no E[x^2] - E[x]^2 cancellation, and no division
  per element as Welford's update needs (the float64 division is slow on
  GPUs). Threads, warps and blocks are then merged with Chan's formula.
  Pinned by the large-mean case of ``tests/test_cuda.py``. A channel
  holding an infinity makes them NaN (inf - inf); :func:`stats` then sums
  that channel plainly, so its mean is +inf or -inf as a plain sum gives.
* Block merges use warp shuffles on a GPU and a shared-memory tree under
  Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which has no
  shuffles; the choice is made when the kernels are built, at first use.

Launch sizes come from ``numbn._config`` (``CUDA_*``), read at every call, so
tests shrink them and tiny inputs still launch many blocks.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
import warnings

import numpy as np

from . import _config, _reference

#: ``numba.cuda``, bound by :func:`_cuda_module` on first use. The kernels
#: refer to it as a module global, which is what the CUDA simulator expects
#: (it swaps the module's ``cuda`` global for its fake one while a kernel runs).
cuda = None

_FULL_MASK = 0xFFFFFFFF
_COPY_NDIM = 8  # arrays with more dimensions take a host round trip in _copy


def _cuda_module():
    """``numba.cuda``, imported on first use (ImportError when it is missing)."""
    global cuda
    module = importlib.import_module("numba.cuda")
    cuda = module
    return module


def _simulator() -> bool:
    import numba

    return bool(numba.config.ENABLE_CUDASIM)


def unavailable_reason() -> str | None:
    """Why the ``"cuda"`` backend cannot run here, or None when it can.

    Imports ``numba.cuda`` and asks ``numba.cuda.is_available()`` (true under
    the CUDA simulator too); nothing is asked before this is called.

    Returns
    -------
    str or None
        None when the backend works, else a sentence saying why not.

    Examples
    --------
    >>> from numbn import _cuda
    >>> reason = _cuda.unavailable_reason()
    >>> reason is None or isinstance(reason, str)
    True
    """
    try:
        module = _cuda_module()
    except ImportError as exc:
        return (f"numba-cuda is not installed ({exc}); "
                "install it with pip install 'numbn[cuda]'")
    except Exception as exc:  # noqa: BLE001 - a numba-cuda that breaks on import, said why
        return f"numba.cuda could not be imported ({type(exc).__name__}: {exc})"
    try:
        ok = module.is_available()
    except Exception as exc:  # noqa: BLE001 - a broken driver is "unavailable", said why
        return f"the CUDA driver could not be initialised ({type(exc).__name__}: {exc})"
    if not ok:
        return "no CUDA GPU or driver was found (numba.cuda.is_available() is False)"
    return _compiler_problem()


def _compiler_problem() -> str | None:
    """Why numba-cuda's compiler cannot load, or None.

    numba-cuda loads its lowering registries at the first compilation, not
    at import, so a numba-cuda that does not work with the installed NumPy
    imports and finds the GPU, then fails at the first kernel launch:
    numba-cuda 0.30.4 (its last release) registers ``np.row_stack``, which
    NumPy 2.5 removed (NVIDIA/numba-cuda#907; seen on an H100 with NumPy
    2.5.2). Loading them here makes that a reason the backend is unavailable.
    The simulator compiles nothing, so it is not asked.
    """
    if _simulator():
        return None
    try:
        importlib.import_module("numba.cuda.cudaimpl")
    except ImportError:
        return None  # laid out otherwise in this numba-cuda; its first launch will tell
    except Exception as exc:  # noqa: BLE001 - said why, with the versions
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = f"numba-cuda {version('numba-cuda')}"
        except PackageNotFoundError:
            found = "numba.cuda"
        return (f"{found} cannot compile kernels with NumPy {np.__version__} "
                f"({type(exc).__name__}: {exc}); pip install 'numbn[cuda]' "
                "installs a NumPy it works with")
    return None


def describe() -> str:
    """One line about the CUDA device numbn would use, or why there is none.

    Returns
    -------
    str
        For example ``"NVIDIA H100 80GB HBM3, compute capability 9.0"``.

    Examples
    --------
    >>> from numbn import _cuda
    >>> isinstance(_cuda.describe(), str)
    True
    """
    reason = unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}"
    if _simulator():
        return "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): no GPU, kernels run in Python"
    try:
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        major, minor = dev.compute_capability
        return f"{name}, compute capability {major}.{minor}"
    except Exception as exc:  # noqa: BLE001 - describe, never raise
        return f"unavailable: the device could not be queried ({exc})"


# Array kinds ------------------------------------------------------------------


def _is_numba(a) -> bool:
    """numba device arrays (``DeviceNDArray``, and the simulator's ``FakeCUDAArray``)."""
    return bool(getattr(type(a), "__cuda_ndarray__", False))


def _kind(a) -> str:
    if isinstance(a, np.ndarray):
        return "numpy"
    if _is_numba(a):
        return "numba"
    root = type(a).__module__.split(".", 1)[0]
    if root in ("torch", "cupy"):
        return root
    return "other"


def _external(ptr: int):
    """A numba stream for a foreign stream handle (0: the legacy default stream)."""
    return cuda.external_stream(ptr) if ptr else 0


def _stream(a):
    return getattr(a, "stream", 0) or 0


def _strided(a, shape, strides):
    """A numba device array over ``a``'s memory with ``shape`` and byte ``strides``.

    Element ``(0, ..., 0)`` of the result is element ``(0, ..., 0)`` of ``a``.
    """
    shape, strides = tuple(int(s) for s in shape), tuple(int(s) for s in strides)
    if _simulator():
        from numpy.lib.stride_tricks import as_strided

        return type(a)(as_strided(a._ary, shape, strides), stream=a.stream)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, strides, a.dtype, stream=a.stream, gpu_data=a.gpu_data)


def _c_strides(shape, itemsize: int) -> list[int]:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return strides[::-1]


def _from_dlpack(a):
    """A numba device array over a CUDA DLPack tensor (no copy)."""
    from cuda.core.utils import StridedMemoryView

    smv = StridedMemoryView.from_dlpack(a, stream_ptr=-1)
    itemsize = np.dtype(smv.dtype).itemsize
    strides = smv.strides
    desc = {"shape": tuple(smv.shape), "typestr": np.dtype(smv.dtype).str,
            "data": (int(smv.ptr), False), "version": 3,
            "strides": None if strides is None else tuple(s * itemsize for s in strides)}
    return cuda.from_cuda_array_interface(desc, owner=(a, smv), sync=False)


def _to_device(a: np.ndarray, stream=0):
    """Copy a NumPy array to the device, keeping its memory order (a
    channels-last array stays channels-last, so the kernels take the same
    path as for the original)."""
    order = sorted(range(a.ndim), key=lambda ax: -abs(a.strides[ax]))
    dense = np.ascontiguousarray(a.transpose(order))
    dev = cuda.to_device(dense, stream=stream)
    if order == list(range(a.ndim)):
        return dev
    strides = [0] * a.ndim
    for pos, ax in enumerate(order):
        strides[ax] = dense.strides[pos]
    return _strided(dev, a.shape, strides)


def _to_host(d) -> np.ndarray:
    """A device array's values in a new NumPy array (waits for the copy)."""
    stream = _stream(d)
    host = d.copy_to_host(stream=stream)
    if stream:
        stream.synchronize()
    return host


def _view3(a, plan):
    """``a`` as ``(outer, C, inner)`` without a copy, or None (``Plan.view`` for
    device arrays)."""
    outer, c, inner = plan.dims
    strides = []
    for group in (plan.outer_axes, plan.inner_axes):
        pairs = zip(group[:-1], group[1:], strict=True)
        if any(a.strides[p] != a.strides[q] * a.shape[q] for p, q in pairs):
            return None
        strides.append(a.strides[group[-1]] if group else a.dtype.itemsize)
    return _strided(a, (outer, c, inner), (strides[0], a.strides[plan.axis], strides[1]))


def _alloc(plan, dtype, like=None):
    """``(full, view3)``: a new dense array in the plan's axis order, as the
    kind of ``like`` (torch and CuPy allocate with their own caching
    allocators), and its canonical view as a numba device array."""
    dtype = np.dtype(dtype)
    order = plan.order
    dense_shape = [plan.shape[a] for a in order]
    inverse = [int(i) for i in np.argsort(order)]
    kind = _kind(like)
    if kind == "torch":
        import torch

        buf = torch.empty(dense_shape, dtype=getattr(torch, dtype.name), device=like.device)
        full, dev = buf.permute(*inverse), Device.adopt(buf)
    elif kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            buf = cupy.empty(dense_shape, dtype=dtype)
        full, dev = buf.transpose(inverse), Device.adopt(buf)
    else:
        stream = _stream(like) if kind == "numba" else 0
        dev = cuda.device_array(dense_shape, dtype=dtype, stream=stream)
        strides = _c_strides(dense_shape, dtype.itemsize)
        full = _strided(dev, plan.shape, [strides[inverse[ax]] for ax in range(len(order))])
    dims = plan.dims
    return full, _strided(dev, dims, _c_strides(dims, dtype.itemsize))


class Device:
    """Array handling of the ``"cuda"`` backend (the interface of ``functional._Host``)."""

    @staticmethod
    def adopt(a):
        """``a`` as a numba device array: a view for device arrays, a copy for NumPy."""
        _cuda_module()
        kind = _kind(a)
        if kind == "numpy":
            return _to_device(a)
        if kind == "numba":
            return a
        if kind == "torch":
            import torch

            t = a.detach()
            if not t.is_cuda:
                raise TypeError(f"the cuda backend takes CUDA tensors, got one on {t.device}")
            dev = cuda.as_cuda_array(t, sync=False)
            return dev.bind(_external(torch.cuda.current_stream(t.device).cuda_stream))
        if hasattr(a, "__cuda_array_interface__"):
            # CuPy and others; a v3 interface carries the producer's stream,
            # which the array is bound to (kernels then run in order on it).
            return cuda.as_cuda_array(a, sync=False)
        if hasattr(a, "__dlpack__"):
            return _from_dlpack(a)
        raise TypeError(f"unsupported array type {type(a).__name__} for the cuda backend")

    @staticmethod
    def kernels():
        """This module: :func:`stats`, :func:`normalize`, :func:`backward_sums`,
        :func:`backward_apply`."""
        return sys.modules[__name__]

    @staticmethod
    def canonical(a, plan):
        """``(outer, C, inner)`` device view of ``a``, or a dense device copy
        when no view exists (as ``Plan.dense`` on the CPU)."""
        v = _view3(a, plan)
        if v is not None:
            return v
        full, v = _alloc(plan, a.dtype, a)
        _copy(a, Device.adopt(full))
        return v

    @staticmethod
    def output(plan, dtype, out=None, like=None):
        """``(full, view3)`` to write into; ``full`` is ``out`` when it has a view,
        else a new array of ``like``'s kind."""
        if out is not None and not isinstance(out, np.ndarray):
            v = _view3(Device.adopt(out), plan)
            if v is not None:
                return out, v
        return _alloc(plan, dtype, like)

    @staticmethod
    def finish(full, out, like):
        """The result as the caller's kind: into ``out`` when given, NumPy for
        NumPy input, else ``full`` (already the input's kind)."""
        if out is not None:
            if full is out:
                return out
            if isinstance(out, np.ndarray):
                out[...] = _to_host(Device.adopt(full))
            else:
                _copy(Device.adopt(full), Device.adopt(out))
            return out
        if isinstance(like, np.ndarray):
            return _to_host(full)
        if _is_numba(full) and _kind(like) == "torch":  # allocated without ``like``
            import torch

            return torch.as_tensor(full, device=like.device)
        if _is_numba(full) and _kind(like) == "cupy":
            import cupy

            return cupy.asarray(full)
        return full

    @staticmethod
    def host(v):
        """A per-channel vector as a NumPy float64 array (copied from the device)."""
        if v is None:
            return None
        if isinstance(v, np.ndarray):
            return np.asarray(v, dtype=np.float64)
        return _to_host(Device.adopt(v)).astype(np.float64)

    @staticmethod
    def like(values, dtype, ref):
        """NumPy ``values`` as ``dtype``, put beside ``ref`` (its kind and device)."""
        values = np.asarray(values).astype(dtype)
        if isinstance(ref, np.ndarray):
            return values
        return Device.to_device_like(values, ref)

    @staticmethod
    def to_device_like(value, ref):
        """A copy of NumPy ``value`` (dtype kept) on ``ref``'s device, of ``ref``'s kind."""
        value = np.array(value)
        kind = _kind(ref)
        if kind == "torch":
            import torch

            return torch.as_tensor(value, device=ref.device)
        if kind == "cupy":
            import cupy

            with cupy.cuda.Device(ref.device.id):
                return cupy.asarray(value)
        _cuda_module()
        return cuda.to_device(np.ascontiguousarray(value), stream=_stream(ref))

    @staticmethod
    def assign(r, new):
        """Write NumPy vector ``new`` into device vector ``r`` in place."""
        if isinstance(r, np.ndarray):
            r[...] = new
            return
        d = Device.adopt(r)
        values = np.ascontiguousarray(new, dtype=d.dtype)
        if d.is_c_contiguous():
            # One host-to-device copy into r: a running statistic updated by
            # a temporary device copy and the copy kernel cost an allocation
            # and a launch each, twice a training step.
            d.copy_to_device(values, stream=_stream(d))
            return
        _copy(cuda.to_device(values, stream=_stream(d)), d)


# Kernels -------------------------------------------------------------------


def _tpb() -> int:
    tpb = int(_config.CUDA_THREADS_PER_BLOCK)
    if tpb < 1 or tpb & (tpb - 1) or tpb > 1024:
        raise ValueError(f"CUDA_THREADS_PER_BLOCK must be a power of two <= 1024, got {tpb}")
    if tpb < 32 and not _simulator():
        raise ValueError("CUDA_THREADS_PER_BLOCK must be at least 32 (a warp) on a GPU")
    return tpb


def _launch(kernel, grid, block, stream, *args, shared: int = 0):
    """Launch ``kernel`` with ``shared`` bytes of dynamic shared memory; a
    small grid (a small input, or the per-channel merge) is what it should be,
    so numba's low-occupancy warning, given below 128 blocks, is silenced."""
    blocks = int(np.prod(grid)) if isinstance(grid, tuple) else int(grid)
    if blocks >= 128:
        kernel[grid, block, stream, shared](*args)
        return
    with warnings.catch_warnings():
        for category in _performance_warnings():
            warnings.simplefilter("ignore", category)
        kernel[grid, block, stream, shared](*args)


@functools.cache
def _performance_warnings() -> tuple[type, ...]:
    """The classes of numba's performance warning: numba-cuda (0.2x on) warns
    with its own ``numba.cuda.core.errors.NumbaPerformanceWarning``, older
    ``numba.cuda`` with ``numba.core.errors``'s; a filter must name each."""
    found = []
    for name in ("numba.core.errors", "numba.cuda.core.errors"):
        try:
            category = importlib.import_module(name).NumbaPerformanceWarning
        except (ImportError, AttributeError):
            continue
        if category not in found:
            found.append(category)
    return tuple(found)


def _shared_bytes(tpb: int) -> int:
    """Dynamic shared memory of a reduction block: three float64 per thread.

    Dynamic rather than three static arrays: the CUDA simulator creates static
    shared arrays lazily, racing between its threads; its dynamic buffer is
    made once per launch.
    """
    return 3 * tpb * 8


@functools.cache
def _build(tpb: int, shuffle: bool):
    """The kernels for ``tpb`` threads per block, merging across a warp with
    shuffles (``shuffle``, a GPU) or through shared memory (the simulator).

    Built on first use and cached; numba compiles each once per signature.
    Returns a namespace of dispatchers.
    """
    _cuda_module()
    from types import SimpleNamespace

    from numba import float64

    nan = math.nan
    nwarps = max(tpb // 32, 1)
    device = cuda.jit(device=True)

    # -- per-element steps and merges ----------------------------------------

    @device
    def chan(na, ma, qa, nb, mb, qb):
        # Merge two (count, mean, M2) summaries (Chan, Golub and LeVeque).
        if nb == 0.0:
            return na, ma, qa
        if na == 0.0:
            return nb, mb, qb
        n = na + nb
        delta = mb - ma
        frac = nb / n
        return n, ma + delta * frac, qa + qb + delta * delta * na * frac

    @device
    def add(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @device
    def stats_step(n, k, s1, s2, xv, gv, m, a, t, relu):
        # Shifted sums, shift k = the thread's first value (see the module docstring).
        if n == 0.0:
            k = xv
        d = xv - k
        return n + 1.0, k, s1 + d, s2 + d * d

    @device
    def stats_close(n, k, s1, s2):
        if n == 0.0:
            return 0.0, 0.0, 0.0
        mean_shift = s1 / n
        m2 = s2 - s1 * mean_shift
        if m2 < 0.0:  # rounding; NaN passes (the comparison is false)
            m2 = 0.0
        return n, k + mean_shift, m2

    @device
    def stats_final(n, mean, m2):
        if n > 0.0:
            return mean, m2 / n
        return mean, nan

    @device
    def masked(gv, xv, m, a, t, floor):
        # dy where the fused ReLU passed its input, else 0 (0 at the boundary,
        # as torch's threshold_backward and numbn._cpu._gate); floor < 0: no
        # ReLU, else the largest input stored as 0 (_mask_floor).
        if floor >= 0.0 and not ((xv - m) * a + t > floor):
            return 0.0
        return gv

    @device
    def sums_step(sg, sgx, u, v, xv, gv, m, a, t, relu):
        g = masked(gv, xv, m, a, t, relu)
        return sg + g, sgx + g * (xv - m), u, v

    @device
    def sums_close(sg, sgx, u, v):
        return sg, sgx, 0.0

    @device
    def sums_final(sg, sgx, u):
        return sg, sgx

    @device
    def bn_relu(xv, gv, m, a, t, b, d, relu):
        v = (xv - m) * a + t
        if relu and v < 0.0:  # NaN passes
            v = 0.0
        return v

    @device
    def bn_apply(xv, gv, m, a, t, b, d, relu):
        return masked(gv, xv, m, a, t, relu) * a + (xv - m) * b + d

    # -- block merges -----------------------------------------------------------

    def block_shared(merge):
        # The tree of rows_shared over a single column: nx = 1, ny = tpb.
        rows = rows_shared(merge)

        @device
        def reduce(b0, b1, b2, tid):
            return rows(b0, b1, b2, 0, tid, 1, tpb)

        return reduce

    def block_shuffle(merge):
        @device
        def warp(b0, b1, b2):
            off = 16
            while off > 0:
                c0 = cuda.shfl_down_sync(_FULL_MASK, b0, off)
                c1 = cuda.shfl_down_sync(_FULL_MASK, b1, off)
                c2 = cuda.shfl_down_sync(_FULL_MASK, b2, off)
                b0, b1, b2 = merge(b0, b1, b2, c0, c1, c2)
                off //= 2
            return b0, b1, b2

        @device
        def reduce(b0, b1, b2, tid):
            # Shuffles within each warp, then the warps' totals through shared
            # memory and one more warp; thread 0 ends with the total.
            sh = cuda.shared.array(0, float64)  # 3 * 32 used (_shared_bytes)
            lane = tid % 32
            wid = tid // 32
            b0, b1, b2 = warp(b0, b1, b2)
            if lane == 0:
                sh[wid] = b0
                sh[32 + wid] = b1
                sh[64 + wid] = b2
            cuda.syncthreads()
            if wid == 0:
                if lane < nwarps:
                    b0, b1, b2 = float(sh[lane]), float(sh[32 + lane]), float(sh[64 + lane])
                else:
                    b0, b1, b2 = 0.0, 0.0, 0.0
                b0, b1, b2 = warp(b0, b1, b2)
            return b0, b1, b2

        return reduce

    def rows_shared(merge):
        @device
        def reduce(b0, b1, b2, tx, ty, nx, ny):
            # Tree over threadIdx.y (threads of one channel); row ty == 0 ends
            # with the totals of its channel.
            sh = cuda.shared.array(0, float64)  # 3 * tpb float64 (_shared_bytes)
            p = ty * nx + tx
            sh[p] = b0
            sh[tpb + p] = b1
            sh[2 * tpb + p] = b2
            cuda.syncthreads()
            stride = ny // 2
            while stride > 0:
                if ty < stride:
                    q = p + stride * nx
                    r0, r1, r2 = merge(float(sh[p]), float(sh[tpb + p]), float(sh[2 * tpb + p]),
                                       float(sh[q]), float(sh[tpb + q]), float(sh[2 * tpb + q]))
                    sh[p] = r0
                    sh[tpb + p] = r1
                    sh[2 * tpb + p] = r2
                cuda.syncthreads()
                stride //= 2
            return float(sh[p]), float(sh[tpb + p]), float(sh[2 * tpb + p])

        return reduce

    @device
    def along_run(a, o, c, i, d):
        # Four elements d apart along a run, all loads issued before any use.
        return (float(a[o, c, i]), float(a[o, c, i + d]), float(a[o, c, i + 2 * d]),
                float(a[o, c, i + 3 * d]))

    @device
    def across_rows(a, o, c, i, d):
        # The same element of four rows d apart.
        return (float(a[o, c, i]), float(a[o + d, c, i]), float(a[o + 2 * d, c, i]),
                float(a[o + 3 * d, c, i]))

    @device
    def row_span(tid, inner):
        """Where thread ``tid`` works in a channel-major block: its row within
        the block's rows (``sub``), first element and stride along a row. Rows
        at least a block long take every thread; shorter ones pack
        ``tpb // inner`` rows into one block."""
        if inner >= tpb:
            return 0, tid, tpb
        sub = tid // inner
        return sub, tid - sub * inner, inner

    # -- kernel templates -------------------------------------------------------

    def reduction(step, close, merge, final, grad):
        """Channel-major and row-major reductions, and the partial merge.

        ``grad``: the reduction reads ``dy`` and the coefficients (backward
        sums); otherwise only ``x`` (statistics).
        """
        block_reduce = block_shuffle(merge) if shuffle else block_shared(merge)
        rows_reduce = rows_shared(merge)

        @cuda.jit
        def channel_major(x, dy, coef, relu, so, si, rpi, part):
            outer, C, inner = x.shape
            c = cuda.blockIdx.x
            s = cuda.blockIdx.y
            s_rows = s // si
            s_seg = s - s_rows * si
            tid = cuda.threadIdx.x
            sub, i0, istep = row_span(tid, inner)
            lo = s_seg * inner // si
            hi = (s_seg + 1) * inner // si
            m, a, t = 0.0, 0.0, 0.0
            if grad:
                m, a, t = float(coef[0, c]), float(coef[1, c]), float(coef[2, c])
            a0, a1, a2, a3 = 0.0, 0.0, 0.0, 0.0
            if sub < rpi:
                o = s_rows * rpi + sub
                while o < outer:
                    i = lo + i0
                    while i + 3 * istep < hi:  # four loads in flight, not one
                        x0, x1, x2, x3 = along_run(x, o, c, i, istep)
                        g0, g1, g2, g3 = 0.0, 0.0, 0.0, 0.0
                        if grad:
                            g0, g1, g2, g3 = along_run(dy, o, c, i, istep)
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, x0, g0, m, a, t, relu)
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, x1, g1, m, a, t, relu)
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, x2, g2, m, a, t, relu)
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, x3, g3, m, a, t, relu)
                        i += 4 * istep
                    while i < hi:
                        xv = float(x[o, c, i])
                        gv = float(dy[o, c, i]) if grad else 0.0
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, xv, gv, m, a, t, relu)
                        i += istep
                    o += so * rpi
            b0, b1, b2 = close(a0, a1, a2, a3)
            b0, b1, b2 = block_reduce(b0, b1, b2, tid)
            if tid == 0:
                part[0, c, s] = b0
                part[1, c, s] = b1
                part[2, c, s] = b2

        @cuda.jit
        def row_major(x, dy, coef, relu, part):
            outer, C, inner = x.shape
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            nx = cuda.blockDim.x
            ny = cuda.blockDim.y
            c = cuda.blockIdx.x * nx + tx
            s = cuda.blockIdx.y
            a0, a1, a2, a3 = 0.0, 0.0, 0.0, 0.0
            if c < C:
                m, a, t = 0.0, 0.0, 0.0
                if grad:
                    m, a, t = float(coef[0, c]), float(coef[1, c]), float(coef[2, c])
                o = s * ny + ty
                d = cuda.gridDim.y * ny
                while o + 3 * d < outer:  # four loads in flight, not one
                    for i in range(inner):
                        x0, x1, x2, x3 = across_rows(x, o, c, i, d)
                        g0, g1, g2, g3 = 0.0, 0.0, 0.0, 0.0
                        if grad:
                            g0, g1, g2, g3 = across_rows(dy, o, c, i, d)
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, x0, g0, m, a, t, relu)
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, x1, g1, m, a, t, relu)
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, x2, g2, m, a, t, relu)
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, x3, g3, m, a, t, relu)
                    o += 4 * d
                while o < outer:
                    for i in range(inner):
                        xv = float(x[o, c, i])
                        gv = float(dy[o, c, i]) if grad else 0.0
                        a0, a1, a2, a3 = step(a0, a1, a2, a3, xv, gv, m, a, t, relu)
                    o += d
            b0, b1, b2 = close(a0, a1, a2, a3)
            b0, b1, b2 = rows_reduce(b0, b1, b2, tx, ty, nx, ny)
            if ty == 0 and c < C:
                part[0, c, s] = b0
                part[1, c, s] = b1
                part[2, c, s] = b2

        @cuda.jit
        def merge_partials(part, out):
            c = cuda.grid(1)
            if c < part.shape[1]:
                b0, b1, b2 = float(part[0, c, 0]), float(part[1, c, 0]), float(part[2, c, 0])
                for s in range(1, part.shape[2]):
                    b0, b1, b2 = merge(b0, b1, b2, float(part[0, c, s]), float(part[1, c, s]),
                                       float(part[2, c, s]))
                r0, r1 = final(b0, b1, b2)
                out[0, c] = r0
                out[1, c] = r1

        return channel_major, row_major, merge_partials

    def elementwise(op, grad):
        """Channel-major and row-major ``out = op(x, dy, coefficients)``."""

        @cuda.jit
        def channel_major(x, dy, coef, relu, rpi, out):
            outer, C, inner = x.shape
            tid = cuda.threadIdx.x
            sub, i0, istep = row_span(tid, inner)
            si = cuda.gridDim.y
            seg = cuda.blockIdx.y
            lo = seg * inner // si
            hi = (seg + 1) * inner // si
            if sub < rpi:
                r = cuda.blockIdx.x * rpi + sub
                step = cuda.gridDim.x * rpi
                o = r // C
                c = r - o * C
                do = step // C
                dc = step - do * C
                while o < outer:
                    m, a, t = float(coef[0, c]), float(coef[1, c]), float(coef[2, c])
                    b, d = float(coef[3, c]), float(coef[4, c])
                    i = lo + i0
                    while i + 3 * istep < hi:  # four loads in flight, then the stores
                        x0, x1, x2, x3 = along_run(x, o, c, i, istep)
                        g0, g1, g2, g3 = 0.0, 0.0, 0.0, 0.0
                        if grad:
                            g0, g1, g2, g3 = along_run(dy, o, c, i, istep)
                        out[o, c, i] = op(x0, g0, m, a, t, b, d, relu)
                        out[o, c, i + istep] = op(x1, g1, m, a, t, b, d, relu)
                        out[o, c, i + 2 * istep] = op(x2, g2, m, a, t, b, d, relu)
                        out[o, c, i + 3 * istep] = op(x3, g3, m, a, t, b, d, relu)
                        i += 4 * istep
                    while i < hi:
                        xv = float(x[o, c, i])
                        gv = float(dy[o, c, i]) if grad else 0.0
                        out[o, c, i] = op(xv, gv, m, a, t, b, d, relu)
                        i += istep
                    # Next row: r += step, with (o, c) = divmod(r, C) kept incrementally.
                    o += do
                    c += dc
                    if c >= C:
                        c -= C
                        o += 1

        @cuda.jit
        def row_major(x, dy, coef, relu, out):
            outer, C, inner = x.shape
            c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            if c < C:
                m, a, t = float(coef[0, c]), float(coef[1, c]), float(coef[2, c])
                b, d = float(coef[3, c]), float(coef[4, c])
                o = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
                e = cuda.gridDim.y * cuda.blockDim.y
                while o + 3 * e < outer:  # four loads in flight, then the stores
                    for i in range(inner):
                        x0, x1, x2, x3 = across_rows(x, o, c, i, e)
                        g0, g1, g2, g3 = 0.0, 0.0, 0.0, 0.0
                        if grad:
                            g0, g1, g2, g3 = across_rows(dy, o, c, i, e)
                        out[o, c, i] = op(x0, g0, m, a, t, b, d, relu)
                        out[o + e, c, i] = op(x1, g1, m, a, t, b, d, relu)
                        out[o + 2 * e, c, i] = op(x2, g2, m, a, t, b, d, relu)
                        out[o + 3 * e, c, i] = op(x3, g3, m, a, t, b, d, relu)
                    o += 4 * e
                while o < outer:
                    for i in range(inner):
                        xv = float(x[o, c, i])
                        gv = float(dy[o, c, i]) if grad else 0.0
                        out[o, c, i] = op(xv, gv, m, a, t, b, d, relu)
                    o += e

        return channel_major, row_major

    @cuda.jit
    def copy(src, dst):
        # Strided copy of 8-D arrays (fewer dimensions are padded with size-1
        # axes); only for layouts without a canonical view, so simple.
        n = dst.size
        f = cuda.grid(1)
        while f < n:
            r = f
            i7 = r % dst.shape[7]
            r //= dst.shape[7]
            i6 = r % dst.shape[6]
            r //= dst.shape[6]
            i5 = r % dst.shape[5]
            r //= dst.shape[5]
            i4 = r % dst.shape[4]
            r //= dst.shape[4]
            i3 = r % dst.shape[3]
            r //= dst.shape[3]
            i2 = r % dst.shape[2]
            r //= dst.shape[2]
            i1 = r % dst.shape[1]
            i0 = r // dst.shape[1]
            dst[i0, i1, i2, i3, i4, i5, i6, i7] = src[i0, i1, i2, i3, i4, i5, i6, i7]
            f += cuda.gridsize(1)

    stats_cm, stats_rm, stats_merge = reduction(stats_step, stats_close, chan, stats_final,
                                                False)
    sums_cm, sums_rm, sums_merge = reduction(sums_step, sums_close, add, sums_final, True)
    norm_cm, norm_rm = elementwise(bn_relu, False)
    apply_cm, apply_rm = elementwise(bn_apply, True)
    return SimpleNamespace(stats=(stats_cm, stats_rm, stats_merge),
                           sums=(sums_cm, sums_rm, sums_merge),
                           normalize=(norm_cm, norm_rm), apply=(apply_cm, apply_rm),
                           copy=copy)


def _kernels():
    _cuda_module()
    return _build(_tpb(), not _simulator())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _channel_major(x3) -> bool:
    return x3.shape[2] >= _config.CUDA_CHANNEL_MAJOR_MIN_INNER


def _rows_block(c: int, tpb: int) -> tuple[int, int]:
    """Row-major block shape: up to a warp of contiguous channels across x,
    rows across y (a power of two each, so the row tree halves evenly)."""
    tx = 1
    while tx < min(c, 32, tpb):
        tx *= 2
    return tx, tpb // tx


def _rows_per_iter(inner: int, tpb: int) -> int:
    return tpb // inner if inner < tpb else 1


def _reduce(kern, x3, dy3, coef, relu):
    """Run a reduction family; the (2, C) result on the host, float64."""
    channel_major, row_major, merge = kern
    outer, C, inner = x3.shape
    tpb = _tpb()
    stream = _stream(x3)
    epb = max(int(_config.CUDA_ELEMENTS_PER_BLOCK), 1)
    cap = max(int(_config.CUDA_MAX_BLOCKS_PER_CHANNEL), 1)
    if _channel_major(x3):
        rpi = _rows_per_iter(inner, tpb)
        want = min(max(_cdiv(outer * inner, epb), 1), cap)
        so = min(want, _cdiv(outer, rpi))
        si = min(_cdiv(want, so), max(inner // tpb, 1))
        part = cuda.device_array((3, C, so * si), np.float64, stream=stream)
        _launch(channel_major, (C, so * si), tpb, stream, x3, dy3, coef, relu, so, si, rpi, part,
                shared=_shared_bytes(tpb))
    else:
        tx, ty = _rows_block(C, tpb)
        want = min(max(_cdiv(outer * inner * tx, epb), 1), cap)
        ns = min(want, _cdiv(outer, ty), 65535)
        part = cuda.device_array((3, C, ns), np.float64, stream=stream)
        _launch(row_major, (_cdiv(C, tx), ns), (tx, ty), stream, x3, dy3, coef, relu, part,
                shared=_shared_bytes(tpb))
    out = cuda.device_array((2, C), np.float64, stream=stream)
    _launch(merge, _cdiv(C, tpb), tpb, stream, part, out)
    host = _to_host(out)
    return host[0].copy(), host[1].copy()


def _elementwise(kern, x3, dy3, coef, relu, out3):
    channel_major, row_major = kern
    outer, C, inner = x3.shape
    tpb = _tpb()
    stream = _stream(x3)
    epb = max(int(_config.CUDA_ELEMENTS_PER_BLOCK), 1)
    want = max(_cdiv(outer * C * inner, epb), 1)
    if _channel_major(x3):
        rpi = _rows_per_iter(inner, tpb)
        row_blocks = _cdiv(outer * C, rpi)
        si = 1 if inner < tpb else min(max(_cdiv(want, row_blocks), 1), inner // tpb, 65535)
        nbx = min(max(_cdiv(want, si), 1), row_blocks, int(_config.CUDA_MAX_GRID_BLOCKS))
        _launch(channel_major, (nbx, si), tpb, stream, x3, dy3, coef, relu, rpi, out3)
    else:
        tx, ty = _rows_block(C, tpb)
        cb = _cdiv(C, tx)
        nby = min(max(_cdiv(want, cb), 1), _cdiv(outer, ty), 65535)
        _launch(row_major, (cb, nby), (tx, ty), stream, x3, dy3, coef, relu, out3)


def _coef(stream, *vectors):
    """Per-channel float64 vectors as one (5, C) device array (one transfer)."""
    c = len(vectors[0])
    rows = [np.asarray(v, dtype=np.float64) for v in vectors]
    rows += [np.zeros(c)] * (5 - len(rows))
    return cuda.to_device(np.ascontiguousarray(np.stack(rows)), stream=stream)


def stats(x3) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (NumPy float64) of device ``x3``."""
    _cuda_module()
    outer, C, inner = x3.shape
    if outer * inner == 0 or C == 0:
        return np.zeros(C), np.full(C, np.nan)
    coef = _coef(_stream(x3), np.zeros(1))
    mean, var = _reduce(_kernels().stats, x3, x3, coef, False)
    lost = np.isnan(mean)
    if lost.any():
        # An infinity in a channel makes the shifted sums NaN (inf - inf),
        # where the mean of a plain sum is +inf or -inf (NaN with both signs
        # or a NaN), as PyTorch's and the "cpu" backend's. The sums kernels
        # with dy = x and m = 0 give that plain float64 sum.
        total, _ = _reduce(_kernels().sums, x3, x3, _coef(_stream(x3), np.zeros(C)),
                           _mask_floor(False, x3.dtype))
        mean[lost] = total[lost] / (outer * inner)
    return mean, var


def normalize(x3, m, a, t, relu, y3, shared=0) -> None:
    """``y3 = (x3 - m[c]) * a[c] + t[c]``, then ReLU if ``relu`` (vectors
    float64). ``shared`` is the CPU kernels' hint for their stores, unused here."""
    _cuda_module()
    if x3.size == 0:
        return
    coef = _coef(_stream(x3), m, a, t)
    _elementwise(_kernels().normalize, x3, x3, coef, bool(relu), y3)


def backward_sums(dy3, x3, m, a, t, relu) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``sum(g)`` and ``sum(g * (x - m))`` (NumPy float64), ``g``
    being ``dy`` masked by the fused ReLU when ``relu``."""
    _cuda_module()
    outer, C, inner = x3.shape
    if x3.size == 0:
        return np.zeros(C), np.zeros(C)
    coef = _coef(_stream(x3), m, a, t)
    return _reduce(_kernels().sums, x3, dy3, coef, _mask_floor(relu, x3.dtype))


def backward_apply(dy3, x3, m, a, t, relu, b, d, dx3, shared=0) -> None:
    """``dx3 = g * a[c] + (x3 - m[c]) * b[c] + d[c]`` with ``g`` as in
    :func:`backward_sums` (``shared``: as :func:`normalize`'s)."""
    _cuda_module()
    if x3.size == 0:
        return
    coef = _coef(_stream(x3), m, a, t, b, d)
    _elementwise(_kernels().apply, x3, dy3, coef, _mask_floor(relu, x3.dtype), dx3)


def _mask_floor(relu, dtype) -> float:
    """The backward kernels' ReLU argument: -1 without the ReLU, else the
    largest float64 input that ``dtype`` stores as 0
    (:func:`numbn._reference.relu_floor`, the reference's mask), so the mask
    passes exactly where the forward's stored output is positive, as
    PyTorch's ReLU after a BatchNorm in that dtype."""
    return _reference.relu_floor(dtype) if relu else -1.0


def _copy(src, dst) -> None:
    """``dst[...] = src`` for device arrays of one shape, any strides."""
    _cuda_module()
    if dst.size == 0:
        return
    nd = len(dst.shape)
    if nd > _COPY_NDIM:
        dst_host = _to_host(src)
        tmp = cuda.to_device(np.ascontiguousarray(dst_host), stream=_stream(dst))
        if not (dst.is_c_contiguous() and tuple(dst.strides) == tuple(tmp.strides)):
            raise NotImplementedError(f"strided copies of {nd}-D device arrays")
        dst.copy_to_device(tmp, stream=_stream(dst))
        return
    pad = _COPY_NDIM - nd
    shape = (1,) * pad + tuple(dst.shape)
    s8 = _strided(src, shape, (src.dtype.itemsize,) * pad + tuple(src.strides))
    d8 = _strided(dst, shape, (dst.dtype.itemsize,) * pad + tuple(dst.strides))
    tpb = _tpb()
    blocks = min(_cdiv(dst.size, tpb), int(_config.CUDA_MAX_GRID_BLOCKS))
    _launch(_kernels().copy, blocks, tpb, _stream(dst), s8, d8)
