"""asv benchmarks of the tools around BatchNorm: the fused ReLU and recalibration.

``FusedReLU`` times BatchNorm+ReLU in one pass (``activation="relu"``) beside
BatchNorm then a separate ReLU pass (``np.maximum``; the ReLU backward a
separate masking pass), and PyTorch's ``relu(batch_norm(...))`` as the peer,
on the standard CPU float32 shapes. ``Recalibrate`` tracks the throughput of
``numbn.recalibrate`` in batches per second. Every ``setup`` warms the JIT and
checks its result against the float64 reference before anything is timed.
"""

from __future__ import annotations

import time

import numpy as np

import numbn
from numbn import _reference

#: The standard CPU float32 shapes: (shape, channel axis).
SHAPES = {
    "nchw-32x64x56x56": ((32, 64, 56, 56), 1),
    "nhwc-32x56x56x64": ((32, 56, 56, 64), -1),
    "2d-8192x64": ((8192, 64), 1),
}
#: Largest relative difference from the reference a float32 result may show.
CHECK_TOL = 1e-4


def _check(actual, expected, what):
    expected = np.asarray(expected, np.float64)
    err = np.max(np.abs(np.asarray(actual, np.float64) - expected))
    if err > CHECK_TOL * max(1.0, float(np.max(np.abs(expected)))):
        raise AssertionError(f"{what} differs from the reference by {err:.3g}")


def _torch():
    try:
        import torch
    except ImportError as exc:  # asv marks the benchmark skipped
        raise NotImplementedError("PyTorch is not installed") from exc
    return torch


class FusedReLU:
    """Forward (training) and backward of BatchNorm+ReLU, fused vs unfused."""

    params = (list(SHAPES), ["fused", "unfused", "torch"])
    param_names = ["shape", "variant"]
    timeout = 300

    def setup(self, shape_name, variant):
        shape, axis = SHAPES[shape_name]
        rng = np.random.default_rng(0)
        c = shape[axis]
        self.axis = axis
        self.x = rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5
        self.dy = rng.standard_normal(shape, dtype=np.float32)
        self.w = rng.normal(1.0, 0.3, c).astype(np.float32)
        self.b = rng.normal(0.0, 0.3, c).astype(np.float32)
        self.mask, self.g = np.empty(shape, np.bool_), np.empty_like(self.dy)
        if variant == "torch":
            self._setup_torch()
            return
        # Check the variant's own code path against the reference on the first
        # two samples (same layout, same kernels), then warm it at full size.
        part = self.x[:2], self.dy[:2]
        y = np.empty_like(part[0])
        mean, invstd = self._forward(part[0], y, variant)
        dx = self._backward(part[1], part[0], y, mean, invstd, variant)
        ref_y, ref_mean, ref_invstd, _, _ = _reference.forward_train(
            part[0], self.w, self.b, axis=axis, activation="relu")
        ref_dx, _, _ = _reference.backward(part[1], part[0], ref_mean, ref_invstd, self.w,
                                           True, axis, self.b, "relu")
        _check(y, ref_y, "forward")
        _check(dx, ref_dx, "backward")
        self.y = np.empty_like(self.x)
        self.mean, self.invstd = self._forward(self.x, self.y, variant)
        self._backward(self.dy, self.x, self.y, self.mean, self.invstd, variant)
        full_mean = np.moveaxis(self.x, axis, -1).reshape(-1, c).mean(axis=0, dtype=np.float64)
        _check(self.mean, full_mean, "batch mean")

    def _forward(self, x, y, variant):
        relu = "relu" if variant == "fused" else None
        _, mean, invstd = numbn.batch_norm_forward(x, self.w, self.b, axis=self.axis, out=y,
                                                   activation=relu)
        if variant == "unfused":  # the ReLU as its own pass over memory
            np.maximum(y, 0, out=y)
        return mean, invstd

    def _backward(self, dy, x, y, mean, invstd, variant):
        if variant == "fused":
            return numbn.batch_norm_backward(dy, x, mean, invstd, self.w, bias=self.b,
                                             axis=self.axis, activation="relu")[0]
        # Unfused: the ReLU's backward masks dy with its saved output (its own pass,
        # into preallocated buffers), then BatchNorm's backward.
        mask, g = np.greater(y, 0), np.empty_like(dy)
        if dy.shape == self.dy.shape:
            mask, g = np.greater(y, 0, out=self.mask), self.g
        np.multiply(dy, mask, out=g)
        return numbn.batch_norm_backward(g, x, mean, invstd, self.w, axis=self.axis)[0]

    def _setup_torch(self):
        torch = _torch()
        F = torch.nn.functional
        xt, dyt = torch.from_numpy(self.x), torch.from_numpy(self.dy)
        if self.axis != 1:  # channels last in memory: PyTorch's channels_last format
            xt, dyt = xt.movedim(-1, 1), dyt.movedim(-1, 1)
        self.xt = xt.detach().requires_grad_(True)
        self.dyt = dyt
        self.wt = torch.from_numpy(self.w).requires_grad_(True)
        self.bt = torch.from_numpy(self.b).requires_grad_(True)
        self.yt = torch.relu(F.batch_norm(self.xt, None, None, self.wt, self.bt, training=True))
        torch.autograd.grad(self.yt, (self.xt, self.wt, self.bt), self.dyt, retain_graph=True)
        with torch.no_grad():
            got = torch.relu(F.batch_norm(self.xt[:2], None, None, self.wt, self.bt,
                                          training=True))
        ref = _reference.forward_train(self.x[:2], self.w, self.b, axis=self.axis,
                                       activation="relu")[0]
        _check(np.moveaxis(got.numpy(), 1, self.axis), ref, "torch forward")

    def time_forward_train(self, shape_name, variant):
        if variant == "torch":
            torch = _torch()
            with torch.no_grad():
                torch.relu_(torch.nn.functional.batch_norm(self.xt, None, None, self.wt,
                                                           self.bt, training=True))
        else:
            self._forward(self.x, self.y, variant)

    def time_backward(self, shape_name, variant):
        if variant == "torch":
            _torch().autograd.grad(self.yt, (self.xt, self.wt, self.bt), self.dyt,
                                   retain_graph=True)
        else:
            self._backward(self.dy, self.x, self.y, self.mean, self.invstd, variant)


class Recalibrate:
    """Throughput of ``numbn.recalibrate`` on (32, 64, 28, 28) float32 batches,
    beside plain training forwards of the same batches."""

    params = (["recalibrate", "train_forward"],)
    param_names = ["mode"]
    n_batches = 8

    def setup(self, mode):
        rng = np.random.default_rng(1)
        self.batches = [rng.normal(k * 0.5, 1.0 + 0.1 * k, (32, 64, 28, 28)).astype(np.float32)
                        for k in range(self.n_batches)]
        self.bn = numbn.BatchNorm(64)
        self._run(mode)  # warm the JIT
        if mode == "recalibrate":
            flat = np.concatenate([np.moveaxis(b, 1, -1).reshape(-1, 64) for b in self.batches])
            _check(self.bn.running_mean, flat.mean(axis=0, dtype=np.float64), "running_mean")
            _check(self.bn.running_var, flat.var(axis=0, dtype=np.float64, ddof=1),
                   "running_var")

    def _run(self, mode):
        if mode == "recalibrate":
            with numbn.recalibrate(self.bn):
                for batch in self.batches:
                    self.bn(batch)
        else:
            for batch in self.batches:
                self.bn(batch)

    def track_batches_per_second(self, mode):
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            self._run(mode)
            best = max(best, self.n_batches / (time.perf_counter() - t0))
        return best

    track_batches_per_second.unit = "batches/s"
