"""numbn's CUDA backend against PyTorch's CUDA BatchNorm, on one GPU.

Run on a machine with an NVIDIA GPU (one process, nothing else on the GPU)::

    python benchmarks/gpu_bench.py                      # every case, float32 and float16
    python benchmarks/gpu_bench.py --runs 100 --json gpu.json

For each case (NCHW (256, 64, 112, 112), NCHW (256, 256, 56, 56), NHWC
(256, 56, 56, 256), 2-D (65536, 1024)) and dtype (float32, float16) it times
three operations, numbn and PyTorch on the *same* CUDA tensors:

* ``train``: training forward with running statistics,
  ``numbn.batch_norm(..., training=True)`` against
  ``torch.nn.functional.batch_norm(..., training=True)``;
* ``eval``: inference forward with running statistics (``training=False``);
* ``backward``: ``numbn.batch_norm_backward`` against
  ``torch.ops.aten.native_batch_norm_backward`` (dx, dweight, dbias).

Each is run ``--warmup`` times (JIT compilation included there), then
``--runs`` times (at least 50), each run between two CUDA events on the current
stream; the median is reported. Before timing, numbn's result is checked
against PyTorch's. A device-to-device copy of the input is timed the same way,
and every operation's bandwidth is given as a fraction of that copy's.

Bandwidth counts the traffic both implementations need at least, in units of
the input's size S: ``train`` 3 S (x read for the statistics, read again and y
written), ``eval`` 2 S, ``backward`` 5 S (dy and x read for the sums, read again
and dx written); the copy moves 2 S. Parameters are float32 in every case
(mixed precision for float16 input, as autocast does).

Without a GPU (or under ``NUMBA_ENABLE_CUDASIM=1``) the script says so and
exits with status 0; without PyTorch it times numbn alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

#: name -> (shape, channel axis, memory layout); NHWC is an (N, C, H, W)
#: tensor in PyTorch's channels_last memory format, which is the NHWC array.
CASES = {
    "NCHW 256x64x112x112": ((256, 64, 112, 112), "nchw"),
    "NCHW 256x256x56x56": ((256, 256, 56, 56), "nchw"),
    "NHWC 256x56x56x256": ((256, 256, 56, 56), "nhwc"),
    "2-D 65536x1024": ((65536, 1024), "2d"),
}
DTYPES = ("float32", "float16")
OPS = ("train", "eval", "backward")
TRAFFIC = {"train": 3, "eval": 2, "backward": 5, "copy": 2}  # in units of the input's size
EPS, MOMENTUM = 1e-5, 0.1


def _gpu_problem() -> str | None:
    """Why this cannot run, or None."""
    import numba

    if numba.config.ENABLE_CUDASIM:
        return "NUMBA_ENABLE_CUDASIM=1 is set: simulator timings mean nothing"
    from numbn import _dispatch

    return _dispatch.cuda_unavailable_reason()


class _Timer:
    """Median milliseconds of a callable between CUDA events."""

    def __init__(self, torch, runs: int, warmup: int):
        self.torch, self.runs, self.warmup = torch, runs, warmup
        if torch is None:
            from numba import cuda

            self._event = cuda.event
            self._sync = cuda.synchronize
        else:
            self._event = lambda: torch.cuda.Event(enable_timing=True)
            self._sync = torch.cuda.synchronize

    def _record(self, event):
        if self.torch is None:
            event.record()
        else:
            event.record(self.torch.cuda.current_stream())

    @staticmethod
    def _elapsed(start, end) -> float:
        return start.elapsed_time(end)  # milliseconds, numba's and torch's events alike

    def median_ms(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        self._sync()
        times = []
        for _ in range(self.runs):
            start, end = self._event(), self._event()
            self._record(start)
            fn()
            self._record(end)
            end.synchronize()
            times.append(self._elapsed(start, end))
        return statistics.median(times)


def _inputs(torch, shape, layout, dtype, seed=0):
    """x, dy (the caller's kind: torch tensors, else numba device arrays),
    float32 parameters and running statistics."""
    c = shape[1]
    rng = np.random.default_rng(seed)
    if torch is not None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        tdt = getattr(torch, dtype)
        x = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(tdt)
        dy = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(tdt)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
            dy = dy.contiguous(memory_format=torch.channels_last)

        def vec(values):
            return torch.tensor(values, dtype=torch.float32, device="cuda")
    else:
        from numba import cuda

        host_shape = (shape[0],) + shape[2:] + (c,) if layout == "nhwc" else shape
        x = cuda.to_device(rng.standard_normal(host_shape, np.float32).astype(dtype))
        dy = cuda.to_device(rng.standard_normal(host_shape, np.float32).astype(dtype))

        def vec(values):
            return cuda.to_device(np.asarray(values, np.float32))
    w, b = vec(rng.uniform(0.5, 1.5, c)), vec(rng.uniform(-0.5, 0.5, c))
    return x, dy, w, b, vec


def _max_diff(torch, a, b) -> float:
    if torch is None:
        return float("nan")
    return float((a.float() - b.float()).abs().max())


def _case(torch, timer, name, shape, layout, dtype):
    import numbn

    x, dy, w, b, vec = _inputs(torch, shape, layout, dtype)
    c = shape[1]
    axis = -1 if (layout == "nhwc" and torch is None) else 1
    rm, rv = vec(np.zeros(c)), vec(np.ones(c))
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    rows = []

    def add(op, ms, torch_ms, diff):
        gbs = TRAFFIC[op] * nbytes / ms / 1e6
        rows.append({"case": name, "dtype": dtype, "op": op, "numbn_ms": ms, "GB/s": gbs,
                     "torch_ms": torch_ms, "max_diff": diff})

    # Device-to-device copy of x: the bandwidth to compare with.
    if torch is not None:
        scratch = torch.empty_like(x)
        copy_ms = timer.median_ms(lambda: scratch.copy_(x))
    else:
        from numba import cuda

        scratch = cuda.device_array_like(x)
        copy_ms = timer.median_ms(lambda: scratch.copy_to_device(x))
    add("copy", copy_ms, None, float("nan"))

    # Training forward (running statistics updated in place, as in a training step).
    y, mean, invstd = numbn.batch_norm_forward(x, w, b, eps=EPS, axis=axis)
    ms = timer.median_ms(lambda: numbn.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS,
                                                  axis=axis))
    torch_ms = diff = None
    if torch is not None:
        import torch.nn.functional as F

        rm_t, rv_t = vec(np.zeros(c)), vec(np.ones(c))
        y_t = F.batch_norm(x, rm_t, rv_t, w, b, True, MOMENTUM, EPS)
        diff = _max_diff(torch, y, y_t)
        torch_ms = timer.median_ms(lambda: F.batch_norm(x, rm_t, rv_t, w, b, True,
                                                        MOMENTUM, EPS))
    add("train", ms, torch_ms, diff)

    # Inference forward.
    ms = timer.median_ms(lambda: numbn.batch_norm(x, rm, rv, w, b, False, eps=EPS, axis=axis))
    if torch is not None:
        y = numbn.batch_norm(x, rm, rv, w, b, False, eps=EPS, axis=axis)
        diff = _max_diff(torch, y, F.batch_norm(x, rm, rv, w, b, False, eps=EPS))
        torch_ms = timer.median_ms(lambda: F.batch_norm(x, rm, rv, w, b, False, eps=EPS))
    add("eval", ms, torch_ms, diff)

    # Backward of the training forward.
    ms = timer.median_ms(lambda: numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis))
    if torch is not None:
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, w, b, None, None, True, MOMENTUM, EPS)
        mask = [True, True, True]

        def torch_backward():
            return torch.ops.aten.native_batch_norm_backward(
                dy, x, w, None, None, save_mean, save_invstd, True, EPS, mask)

        dx, _, _ = numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
        diff = _max_diff(torch, dx, torch_backward()[0])
        torch_ms = timer.median_ms(torch_backward)
    add("backward", ms, torch_ms, diff)
    return rows


def _print(rows) -> None:
    copy = {(r["case"], r["dtype"]): r["GB/s"] for r in rows if r["op"] == "copy"}
    head = (f"{'case':<22} {'dtype':<8} {'op':<9} {'numbn ms':>9} {'GB/s':>8} "
            f"{'of copy':>8} {'torch ms':>9} {'numbn/torch':>11} {'max|diff|':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        frac = r["GB/s"] / copy[(r["case"], r["dtype"])]
        torch_ms = "-" if r["torch_ms"] is None else f"{r['torch_ms']:.3f}"
        ratio = "-" if r["torch_ms"] is None else f"{r['numbn_ms'] / r['torch_ms']:.2f}"
        diff = "-" if r["max_diff"] is None or np.isnan(r["max_diff"]) else \
            f"{r['max_diff']:.1e}"
        print(f"{r['case']:<22} {r['dtype']:<8} {r['op']:<9} {r['numbn_ms']:>9.3f} "
              f"{r['GB/s']:>8.0f} {frac:>8.2f} {torch_ms:>9} {ratio:>11} {diff:>10}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per number (>= 50)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                        metavar="CASE", help=f"some of: {', '.join(CASES)}")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.runs < 50:
        parser.error("--runs must be at least 50")

    problem = _gpu_problem()
    if problem is not None:
        print(f"gpu_bench: no GPU to benchmark on ({problem}); nothing was timed.")
        return 0
    try:
        import torch

        if not torch.cuda.is_available():
            print("gpu_bench: PyTorch has no CUDA here; timing numbn alone.", file=sys.stderr)
            torch = None
    except ImportError:
        print("gpu_bench: PyTorch is not installed; timing numbn alone.", file=sys.stderr)
        torch = None

    from numbn import _cuda

    print(f"device: {_cuda.describe()}")
    if torch is not None:
        print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"median of {args.runs} runs after {args.warmup} warm-up runs, CUDA events\n")
    timer = _Timer(torch, args.runs, args.warmup)
    rows = []
    for name in args.cases:
        shape, layout = CASES[name]
        for dtype in args.dtypes:
            rows += _case(torch, timer, name, shape, layout, dtype)
            if torch is not None:
                torch.cuda.empty_cache()
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _cuda.describe(), "runs": args.runs, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
