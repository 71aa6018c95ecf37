"""Costs beside speed: import time, first call in a fresh process, memory."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import numbn

from ._common import SIZES, make_input

_FIRST_CALL = """
import time
t0 = time.perf_counter()
import numpy as np, numbn
x = np.ones((4, 3, 5, 5), np.float32)
y, m, s = numbn.batch_norm_forward(x)
numbn.batch_norm_backward(x, x, m, s, np.ones(3, np.float32))
print(time.perf_counter() - t0)
"""


class Startup:
    timeout = 600

    def setup(self):
        # Fill the on-disk kernel cache once, so the timing is the warm-cache case.
        subprocess.run([sys.executable, "-c", _FIRST_CALL], check=True, capture_output=True)

    def time_import(self):
        subprocess.run([sys.executable, "-c", "import numbn"], check=True)

    def track_first_call_warm_cache(self):
        """Seconds from interpreter start to a finished forward+backward."""
        out = subprocess.run([sys.executable, "-c", _FIRST_CALL], check=True,
                             capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])

    track_first_call_warm_cache.unit = "seconds"


class LayerMemory:
    """Peak memory of a layer's forward+backward: beyond x, y, dy and dx
    nothing the size of x should be allocated."""

    params = [["NCHW", "NHWC"], [k for k in ("medium", "large") if k in SIZES] or list(SIZES),
              ["float16", "float32"]]
    param_names = ["layout", "size", "dtype"]

    def setup(self, layout, size, dtype):
        self.x, self.axis = make_input(size, layout, dtype)
        self.dy = np.ones_like(self.x)
        self.bn = numbn.BatchNorm(self.x.shape[self.axis], axis=self.axis)
        self.bn(self.x[:2])

    def peakmem_layer_step(self, layout, size, dtype):
        self.bn(self.x)
        self.bn.backward(self.dy)

    def track_x_megabytes(self, layout, size, dtype):
        return self.x.nbytes / 2**20

    track_x_megabytes.unit = "MiB"


__all__ = ["Startup", "LayerMemory", "SIZES"]
