"""SyncBatchNorm's code path, commit by commit, without MPI: a training step
over a communicator that answers at once as if two ranks held this batch
(:class:`benchmarks.sync_cost.Mirror`). A synchronised step runs the two-pass
CPU kernels (the statistics, then the normalisation; the backward's sums, then
dx), so this tracks them too. What communication adds across real ranks is
``benchmarks/sync_cost.py``'s to report (asv runs one process)."""

from __future__ import annotations

import numbn
from numbn._bench import _median_interleaved

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

        def step(layer):
            return lambda: (layer(self.x), layer.backward(self.dy))

        sync, plain = _median_interleaved([step(self.sync), step(bn)], 15, warm=True)
        return float(sync / plain)

    track_step_over_batchnorm.unit = "ratio"

