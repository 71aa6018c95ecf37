"""JIT cost per kernel family: cold compile, warm-cache first call, and
whether a new shape recompiles.

Run: ``python benchmarks/jit_cost.py``. Each measurement runs in a fresh
process; "cold" points NUMBA_CACHE_DIR at an empty folder, "warm" at a
filled one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

FAMILIES = {
    "forward-train NCHW": "numbn.batch_norm(np.ones((4, 8, 6, 6), np.float32), "
                          "np.zeros(8, np.float32), np.ones(8, np.float32), training=True)",
    "forward-train NHWC": "numbn.batch_norm(np.ones((4, 6, 6, 8), np.float32), None, None, "
                          "training=True, axis=-1)",
    "eval NCHW": "numbn.batch_norm(np.ones((4, 3, 6, 6), np.float32), np.zeros(3), "
                 "np.ones(3))",
    "backward NCHW": "numbn.batch_norm_backward(np.ones((4, 3, 6, 6), np.float32), "
                     "np.ones((4, 3, 6, 6), np.float32), np.zeros(3), np.ones(3), np.ones(3))",
}

_TEMPLATE = """
import time, json
t0 = time.perf_counter()
import numpy as np, numbn
t1 = time.perf_counter()
{call}
t2 = time.perf_counter()
{bigger}
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "first_call": t2 - t1, "new_shape": t3 - t2}}))
"""


def _run(call, cache_dir):
    bigger = call.replace("(4, ", "(9, ")
    code = _TEMPLATE.format(call=call, bigger=bigger)
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(f"{'family':<22} {'cold s':>8} {'warm s':>8} {'new shape s':>12} {'import s':>9}")
    for name, call in FAMILIES.items():
        with tempfile.TemporaryDirectory() as cache:
            cold = _run(call, cache)
            warm = _run(call, cache)
        print(f"{name:<22} {cold['first_call']:8.2f} {warm['first_call']:8.3f} "
              f"{warm['new_shape']:12.4f} {warm['import']:9.3f}")


if __name__ == "__main__":
    main()
