"""SyncBatchNorm's code path, commit by commit, without MPI: a training step
over a communicator that answers at once as if two ranks held this batch
(:class:`benchmarks.sync_cost.Mirror`). A synchronised step runs the two-pass
CPU kernels (the statistics, then the normalisation; the backward's sums, then
dx), so this tracks them too. What communication adds across real ranks is
``benchmarks/sync_cost.py``'s to report (asv runs one process)."""

from __future__ import annotations

import time

import numpy as np

import numbn

from ._common import SIZES, check_forward, make_input, require
from .sync_cost import Mirror


class SyncStep:
    params = (["NCHW", "NHWC"], list(SIZES))
    param_names = ["layout", "size"]
    timeout = 300

    def setup(self, layout, size):
        require("cpu")
        self.x, axis = make_input(size, layout, "float32")
        self.dy = make_input(size, layout, "float32", seed=1)[0]
        c = self.x.shape[axis]
        self.sync = numbn.SyncBatchNorm(c, comm=Mirror(2), axis=axis, backend="cpu")
        # Mirror's ranks all hold x: the global statistics are x's own.
        check_forward(self.x, axis, self.sync(self.x), "float32")  # also compiles
        self.sync.backward(self.dy)

    def time_step(self, *params):
        self.sync(self.x)
        self.sync.backward(self.dy)

    def track_step_over_batchnorm(self, layout, size):
        """The step's time over a BatchNorm step on the same batch (medians of
        interleaved runs): what the synchronised path costs in kernels alone."""
        bn = numbn.BatchNorm(self.x.shape[self.sync.axis], axis=self.sync.axis, backend="cpu")
        times = {"sync": [], "bn": []}
        for _ in range(15):
            for name, layer in (("sync", self.sync), ("bn", bn)):
                t0 = time.perf_counter()
                layer(self.x)
                layer.backward(self.dy)
                times[name].append(time.perf_counter() - t0)
        return float(np.median(times["sync"]) / np.median(times["bn"]))

    track_step_over_batchnorm.unit = "ratio"

