"""Where the CUDA backend's time goes: numbn's kernels alone, and simple
reference kernels, on one GPU (notes in ``benchmarks/gpu_results.md``).

Run on a machine with an NVIDIA GPU::

    python benchmarks/gpu_probe.py            # the table
    python benchmarks/gpu_probe.py --once     # one launch of each, for ncu
    python benchmarks/gpu_probe.py --profile  # where a call's host time goes

For NCHW (256, 64, 112, 112) and 2-D (65536, 1024), float32 and float16, it
times (CUDA events, median of ``--runs``):

* ``copy``: a device-to-device copy of x (the bandwidth floor, 2 S moved);
* ``eval call``: ``numbn.batch_norm(..., training=False)``, the whole call;
* ``eval kernel``: numbn's normalize kernel alone (coefficients already on
  the device), as ``numbn._cuda.normalize`` launches it;
* ``flat f32`` and ``flat f64``: a plain grid-stride kernel over the flat
  C-contiguous array, ``y = (x - m[c]) * a[c] + t[c]`` in float32 or float64,
  ``c`` from one integer division per element: what a simple kernel gets;
* ``stats call``: ``numbn._cuda.stats`` (the reduction, the per-channel
  merge and the copy of the (2, C) result to the host).

Every kernel's output is checked against the float64 formula first.

``--profile`` instead runs numbn's training forward, inference and backward
20 times each on the NCHW float32 case (PyTorch CUDA tensors when PyTorch is
there, else numba device arrays) under cProfile, and prints the functions
with the most cumulative time.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

CASES = {"NCHW 256x64x112x112": (256, 64, 112 * 112), "2-D 65536x1024": (65536, 1024, 1)}

#: ``numba.cuda``, bound in :func:`main`; a module global, as the kernels
#: need it under the CUDA simulator (which swaps the global while they run).
cuda = None


def _flat_kernels():
    @cuda.jit
    def flat32(x, coef, inner, nc, y):
        n = cuda.grid(1)
        step = cuda.gridsize(1)
        while n < x.size:
            c = (n // inner) % nc
            y[n] = (np.float32(x[n]) - coef[0, c]) * coef[1, c] + coef[2, c]
            n += step

    @cuda.jit
    def flat64(x, coef, inner, nc, y):
        n = cuda.grid(1)
        step = cuda.gridsize(1)
        while n < x.size:
            c = (n // inner) % nc
            y[n] = (float(x[n]) - float(coef[0, c])) * float(coef[1, c]) + float(coef[2, c])
            n += step

    return flat32, flat64


def _time_case(numbn, _cuda, _config, flat, median_ms, dims, dtype, rng):
    """``[(variant, ms, GB/s)]`` for one case, or a string saying what was wrong."""
    flat32, flat64 = flat
    outer, c, inner = dims
    host = rng.standard_normal((outer, c, inner), np.float32).astype(dtype)
    x3 = cuda.to_device(host)
    y3 = cuda.device_array_like(x3)
    m = rng.standard_normal(c) * 0.1
    a = rng.uniform(0.5, 1.5, c)
    t = rng.standard_normal(c) * 0.1
    want = (host.astype(np.float64) - m[:, None]) * a[:, None] + t[:, None]
    tol = 2e-6 if dtype == np.float32 else 2e-3
    coef64 = _cuda._coef(0, m, a, t)
    coef32 = cuda.to_device(np.stack([m, a, t]).astype(np.float32))
    kern = _cuda._kernels().normalize
    shape = (outer, c) + (() if inner == 1 else (inner,))
    xs = cuda.to_device(host.reshape(shape))
    rm = cuda.to_device(m.astype(np.float32))
    rv = cuda.to_device((1 / a**2 - 1e-5).astype(np.float32))
    w = cuda.to_device(np.ones(c, np.float32))
    b = cuda.to_device(t.astype(np.float32))
    tpb = int(_config.CUDA_THREADS_PER_BLOCK)
    blocks = min(-(-x3.size // tpb), 132 * 16)
    flat_x, flat_y = x3.reshape(x3.size), y3.reshape(y3.size)
    variants = {
        "copy": (lambda: y3.copy_to_device(x3), False),
        "eval call": (lambda: numbn.batch_norm(xs, rm, rv, w, b, False, eps=1e-5), False),
        "eval kernel": (lambda: _cuda._elementwise(kern, x3, x3, coef64, False, y3), True),
        "flat f32": (lambda: flat32[blocks, tpb](flat_x, coef32, inner, c, flat_y), True),
        "flat f64": (lambda: flat64[blocks, tpb](flat_x, coef64, inner, c, flat_y), True),
        "stats call": (lambda: _cuda.stats(x3), False),
    }
    rows = []
    for label, (fn, check) in variants.items():
        if check:
            y3.copy_to_device(np.full(host.shape, np.nan, dtype))
            fn()
            got = y3.copy_to_host().astype(np.float64)
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            if not err <= tol:
                return f"{label}: wrong result (relative error {err:.1e})"
        ms = median_ms(fn)
        moved = host.nbytes * (1 if label == "stats call" else 2)
        rows.append((label, ms, moved / ms / 1e6))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--once", action="store_true", help="one launch of each (for ncu)")
    parser.add_argument("--profile", action="store_true", help="cProfile of whole calls")
    args = parser.parse_args(argv)
    global cuda
    import numba
    from numba import cuda as module

    cuda = module
    if numba.config.ENABLE_CUDASIM or not cuda.is_available():
        print("gpu_probe: no GPU; nothing was timed.")
        return 0
    import numbn
    from numbn import _config, _cuda

    _cuda._cuda_module()
    if args.profile:
        return _profile(numbn)
    flat32, flat64 = _flat_kernels()
    runs = 1 if args.once else args.runs

    def median_ms(fn):
        for _ in range(1 if args.once else 3):
            fn()
        cuda.synchronize()
        times = []
        for _ in range(runs):
            start, end = cuda.event(), cuda.event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    rows = []
    rng = np.random.default_rng(0)
    for name, dims in CASES.items():
        for dtype in (np.float32, np.float16):
            found = _time_case(numbn, _cuda, _config, (flat32, flat64), median_ms, dims,
                               dtype, rng)
            if isinstance(found, str):
                print(f"{name} {found}")
                return 1
            rows += [(name, np.dtype(dtype).name) + r for r in found]
    print(f"device: {_cuda.describe()}; median of {runs} runs, CUDA events")
    print(f"{'case':<22} {'dtype':<8} {'variant':<12} {'ms':>8} {'GB/s':>7}")
    for name, dt, label, ms, gbs in rows:
        print(f"{name:<22} {dt:<8} {label:<12} {ms:>8.3f} {gbs:>7.0f}")
    return 0


def _profile(numbn) -> int:
    import cProfile
    import pstats

    outer, c, inner = CASES["NCHW 256x64x112x112"]
    shape = (outer, c, 112, 112)
    rng = np.random.default_rng(0)
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("PyTorch without CUDA")

        def put(a):
            return torch.as_tensor(a, device="cuda")
    except ImportError:
        def put(a):
            return cuda.to_device(a)
    x = put(rng.standard_normal(shape, np.float32))
    dy = put(rng.standard_normal(shape, np.float32))
    w, b = put(np.ones(c, np.float32)), put(np.zeros(c, np.float32))
    rm, rv = put(np.zeros(c, np.float32)), put(np.ones(c, np.float32))
    y, mean, invstd = numbn.batch_norm_forward(x, w, b)

    calls = {
        "train": lambda: numbn.batch_norm(x, rm, rv, w, b, True),
        "eval": lambda: numbn.batch_norm(x, rm, rv, w, b, False),
        "backward": lambda: numbn.batch_norm_backward(dy, x, mean, invstd, w),
    }
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            fn()
        cuda.synchronize()
        prof.disable()
        print(f"== {name}: 20 calls on {type(x).__module__} arrays of {shape}")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(22)
    return 0


if __name__ == "__main__":
    sys.exit(main())
