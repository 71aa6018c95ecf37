"""The backward when ``x`` and ``dy`` lie in different memory orders.

Run ``python benchmarks/mixed_orders.py [--rounds N] [--shape 32,64,56,56]``.
For an NCHW float32 shape it times ``batch_norm_backward`` with ``x`` and
``dy`` each C-ordered, F-ordered or channels-last in memory (PyTorch's
``channels_last``: NHWC memory behind NCHW axes), every pair taking its turn
in each round, and prints the median milliseconds and the ratio to the
all-C-ordered call, beside the time of NumPy's copy of ``dy`` into the
other order (what numbn did before ``numbn._cpu.copy_into``). A ``dy`` in
another order than x's is copied into x's first; the kernels then run as
for matching orders. Every result is checked against the matching-order
call first.
"""

from __future__ import annotations

import numba
import numpy as np

import numbn
from numbn import _bench

ORDERS = _bench.MEMORY_ORDERS
LAST = "channels_last"
PAIRS = [("C", "C"), ("F", "F"), (LAST, LAST), ("F", "C"), ("C", "F"), (LAST, "C"), ("C", LAST)]


def main(argv=None):
    rounds, shape, x, rng = _bench.script_input(__doc__, argv, 25, "32,64,56,56")
    dy = rng.standard_normal(shape).astype(np.float32)
    w = np.ones(shape[1], np.float32)
    _, mean, invstd = numbn.batch_norm_forward(x, w)
    calls, copies = {}, {}
    for xo, do in PAIRS:
        xs, dys = ORDERS[xo](x), ORDERS[do](dy)
        got = numbn.batch_norm_backward(dys, xs, mean, invstd, w)
        want = numbn.batch_norm_backward(ORDERS[xo](dy), xs, mean, invstd, w)
        for g, e in zip(got, want):
            np.testing.assert_array_equal(g, e)
        calls[(xo, do)] = lambda xs=xs, dys=dys: numbn.batch_norm_backward(dys, xs, mean,
                                                                           invstd, w)
        if xo != do:
            into = ORDERS[xo](np.empty(shape, np.float32))
            copies[(xo, do)] = lambda into=into, dys=dys: np.copyto(into, dys)
    every = [*calls.items(), *((("copy",) + k, f) for k, f in copies.items())]
    medians = _bench._median_interleaved([f for _, f in every], rounds, seed=1)
    ms = {key: t * 1e3 for (key, _), t in zip(every, medians)}
    print(f"numbn {numbn.__version__}, {numba.get_num_threads()} threads, backward of "
          f"{shape} float32, median ms of {rounds} interleaved rounds")
    print(f"{'x':<13} {'dy':<13} {'ms':>8} {'vs C,C':>8} {'NumPy copy of dy':>17}")
    for xo, do in PAIRS:
        copy = f"{ms[('copy', xo, do)]:17.2f}" if xo != do else f"{'':>17}"
        print(f"{xo:<13} {do:<13} {ms[(xo, do)]:8.2f} {ms[(xo, do)] / ms[('C', 'C')]:7.2f}x"
              f" {copy}")


if __name__ == "__main__":
    main()
