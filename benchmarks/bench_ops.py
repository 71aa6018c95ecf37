"""The full matrix: forward-train, eval, backward and a layer step, for every
backend x dtype x layout x size, with effective bandwidth beside the times."""

from __future__ import annotations

import os

import numba
import numpy as np

import numbn
from numbn._bench import MEMORY_ORDERS, _numbn_calls, _parallel_copy, median_seconds

from ._common import BACKENDS, DTYPES, LAYOUTS, SIZES, check_forward, make_input, require


class Ops:
    params = (list(BACKENDS), list(DTYPES), list(LAYOUTS), list(SIZES))
    param_names = ["backend", "dtype", "layout", "size"]
    timeout = 300

    def setup(self, backend, dtype, layout, size):
        require(backend)
        if backend == "numpy" and size == "large":
            raise NotImplementedError("the float64 reference is not timed at the large size")
        self.x, self.axis = make_input(size, layout, dtype)
        c = self.x.shape[self.axis]
        self.backend = backend
        self.w, self.b = np.ones(c, np.float32), np.zeros(c, np.float32)
        self.rm, self.rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        self.dy = make_input(size, layout, dtype, seed=1)[0]
        y, self.mean, self.invstd = numbn.batch_norm_forward(self.x, self.w, self.b,
                                                             axis=self.axis, backend=backend)
        check_forward(self.x, self.axis, y, dtype)  # also compiles the kernels
        self.bn = numbn.BatchNorm(c, axis=self.axis, backend=backend)
        self.time_eval(backend, dtype, layout, size)
        self.time_backward(backend, dtype, layout, size)
        self.time_layer_step(backend, dtype, layout, size)

    def time_forward_train(self, *params):
        numbn.batch_norm(self.x, self.rm, self.rv, self.w, self.b, True, axis=self.axis,
                         backend=self.backend)

    def time_eval(self, *params):
        numbn.batch_norm(self.x, self.rm, self.rv, self.w, self.b, False, axis=self.axis,
                         backend=self.backend)

    def time_backward(self, *params):
        numbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                  axis=self.axis, backend=self.backend)

    def time_layer_step(self, *params):
        self.bn(self.x)
        self.bn.backward(self.dy)


class Bandwidth:
    """Effective GB/s (compulsory bytes over time) and its fraction of a
    parallel copy of the same bytes, float32 on the CPU backend."""

    params = (["forward_train", "eval", "backward"], list(LAYOUTS),
              [k for k in ("medium", "large") if k in SIZES] or list(SIZES))
    param_names = ["op", "layout", "size"]
    unit = "GB/s"

    def setup(self, op, layout, size):
        self.x, axis = make_input(size, layout, "float32")
        c = self.x.shape[axis]
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        dy = make_input(size, layout, "float32", seed=1)[0]
        _, mean, invstd = numbn.batch_norm_forward(self.x, w, b, axis=axis)
        self.call, self.nbytes = {
            "forward_train": (lambda: numbn.batch_norm(self.x, rm, rv, w, b, True, axis=axis),
                              2 * self.x.nbytes),
            "eval": (lambda: numbn.batch_norm(self.x, rm, rv, w, b, False, axis=axis),
                     2 * self.x.nbytes),
            "backward": (lambda: numbn.batch_norm_backward(dy, self.x, mean, invstd, w,
                                                           axis=axis), 3 * self.x.nbytes),
        }[op]
        src = np.ascontiguousarray(self.x).reshape(-1)
        dst = np.empty_like(src)
        n = numba.get_num_threads()
        self.copy = lambda: _parallel_copy(src, dst, n)

    def track_gbps(self, *params):
        return self.nbytes / median_seconds(self.call) / 1e9

    def track_fraction_of_copy(self, *params):
        copy_gbps = 2 * self.x.nbytes / median_seconds(self.copy) / 1e9
        return self.track_gbps() / copy_gbps

    track_fraction_of_copy.unit = "fraction"


class CopyBandwidth:
    """The floor every kernel is measured against."""

    params = [list(SIZES)]
    param_names = ["size"]
    unit = "GB/s"

    def setup(self, size):
        self.src = np.ones(int(np.prod(SIZES[size])), np.float32)
        self.dst = np.empty_like(self.src)
        _parallel_copy(self.src, self.dst, numba.get_num_threads())

    def track_copy_gbps(self, size):
        n = numba.get_num_threads()
        return 2 * self.src.nbytes / median_seconds(
            lambda: _parallel_copy(self.src, self.dst, n)) / 1e9


class MixedOrderBackward:
    """The CPU backward, float32, with ``dy`` in another memory order than
    ``x``'s: ``dy`` is copied into x's order first (``numbn._cpu.copy_into``).
    The same orders (``x`` and ``dy`` alike) are the baseline."""

    params = (["C/C", "C/F", "F/C", "C/channels_last", "channels_last/C",
               "channels_last/channels_last"],
              [k for k in ("medium", "large") if k in SIZES] or list(SIZES))
    param_names = ["x_dy_orders", "size"]

    def setup(self, orders, size):
        x = make_input(size, "NCHW", "float32")[0]
        dy = make_input(size, "NCHW", "float32", seed=1)[0]
        x_order, dy_order = orders.split("/")
        self.x, self.dy = MEMORY_ORDERS[x_order](x), MEMORY_ORDERS[dy_order](dy)
        self.w = np.ones(x.shape[1], np.float32)
        _, self.mean, self.invstd = numbn.batch_norm_forward(self.x, self.w)
        got = self.time_backward(orders, size)
        want = numbn.batch_norm_backward(dy, x, self.mean, self.invstd, self.w,
                                         backend="numpy")
        np.testing.assert_allclose(got[0], want[0], rtol=1e-3, atol=1e-3)

    def time_backward(self, *params):
        return numbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w)


def _float32_calls(shape: str, axis: int = 1):
    """The forward-train, eval and backward calls of ``numbn bench``
    (``numbn._bench._numbn_calls``) on a float32 input of ``shape``
    (``"(N, C, H, W)"``), checked against the reference first; the smoke run
    (``NUMBN_ASV_SIZES``) takes a tenth of the batch."""
    dims = tuple(int(s) for s in shape.strip("()").split(","))
    if os.environ.get("NUMBN_ASV_SIZES"):
        dims = (max(2, dims[0] // 10),) + dims[1:]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(dims).astype(np.float32)
    check_forward(x, axis, numbn.batch_norm_forward(x, axis=axis)[0], "float32")
    calls = _numbn_calls(x, axis, "cpu", rng)
    return {"forward_train": calls["forward"], "eval": calls["eval"],
            "backward": calls["backward"]}


class _Shapes:
    """float32 calls of ``numbn bench`` on the CPU backend, per op and shape
    (``"(N, C, H, W)"``; with `` last``, channels-last: channel axis -1).
    Not collected itself (asv skips names that start with an underscore)."""

    param_names = ["op", "shape"]

    def setup(self, op, shape):
        self.call = _float32_calls(shape.removesuffix(" last"),
                                   -1 if shape.endswith(" last") else 1)[op]
        self.call()

    def time_op(self, op, shape):
        self.call()


class ShortRuns(_Shapes):
    """Channel-major input with small feature maps (ResNet's last stages),
    float32 on the CPU backend: the eval of 7x7 maps was 1.2-1.4x slower
    than PyTorch's until its kernels stopped slicing every run and left the
    rows view to the reductions (``_config.CPU_ROWS_ELEMENTWISE_MAX_INNER``).
    Their backward takes the fused kernel a group of adjacent channels a
    task (``_config.CPU_FUSED_GROUP_MAX_RUN_BYTES``,
    ``CPU_FUSED_GROUP_BYTES``), also for (128, 512, 7, 7), whose x and dy
    are beyond the cache: one channel a task, the two-pass kernels had
    served it faster."""

    params = (["forward_train", "eval", "backward"],
              ["(256, 256, 7, 7)", "(64, 512, 7, 7)", "(128, 512, 7, 7)", "(256, 64, 8, 8)",
               "(128, 256, 5, 5)"])


class CacheSizedOutputs(_Shapes):
    """Outputs of 4-16 MiB, float32 on the CPU backend, where the kernels'
    choice of non-temporal stores changed: the fused channel-major forward
    and backward stream from ``_config.CPU_SLAB_STREAM_MIN_BYTES`` when the
    runs are long enough, the rows kernels (channels last, 2-D) from
    ``_config.CPU_ROWS_STREAM_MIN_BYTES``; streamed, the forward of (128,
    128, 14, 14) took 0.71 of the time it took with ordinary stores."""

    params = (["forward_train", "eval", "backward"],
              ["(24, 256, 14, 14)", "(128, 128, 14, 14)", "(16, 64, 56, 56)",
               "(16, 56, 56, 64) last", "(12288, 256)"])


class WideRows(_Shapes):
    """2-D input with long rows and few of them (a wide dense layer's
    BatchNorm1d, and channel-major input with 4x4 maps as rows of 8192
    columns), float32 on the CPU backend. The rows kernels reduced such
    rows in blocks of 8 and four tasks a thread: the forward of (1024,
    4096) took PyTorch's time, that of (32, 4096) 1.8x it, its backward
    2.1x; blocks of at least 64 rows (``_config.CPU_ROWS_BLOCK_MIN_ROWS``)
    and one task a thread (``_config.CPU_ROWS_TASKS_PER_THREAD``) took
    them to 0.56-0.65 of their time, 0.47-0.56 and 0.60-0.65."""

    params = (["forward_train", "eval", "backward"],
              ["(32, 4096)", "(1024, 4096)", "(128, 8192)", "(128, 512, 4, 4)"])
