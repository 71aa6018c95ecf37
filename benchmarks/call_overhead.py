"""Host cost per call: numbn's eval, training forward and backward on an input
too small for the kernel to matter, beside PyTorch's, with hot caches and
after a cache-flushing copy.

Run ``python benchmarks/call_overhead.py [--rounds N] [--shape 2,64,4,4]``. The
calls are those ``numbn bench`` times (forward is the training forward), and
``batch_norm_forward`` ("fwd+stats": the training forward that also returns
mean and invstd for the backward); "-wb": eval, ``batch_norm_forward`` and
the backward without weight and bias, as a layer with ``affine=False`` calls them;
"layer": a ``numbn.BatchNorm``'s eval forward, and its training step (forward,
then backward).

Why both: in a network, each BatchNorm call runs just after a layer that has
streamed megabytes through the caches, so the Python and dispatch code of the
call (validation, views, allocation, the Numba dispatcher) runs from memory,
not from L1/L2. That "cold" cost was several times the hot one here
(measured), and on large NCHW inputs it is what separates numbn's eval from
PyTorch's: the kernel itself runs at the speed of a plain copy. Every call
takes its turn in a new random order each round; the copy before a "cold"
call moves 2 x 16 MiB. Results are checked against the reference first.
"""

from __future__ import annotations

import time

import numba
import numpy as np

import numbn
from numbn import _bench, _reference
from numbn._bench import _parallel_copy

FLUSH_BYTES = 16 << 20


def main(argv=None):
    rounds, shape, x, rng = _bench.script_input(__doc__, argv, 300, "2,64,4,4")
    np.testing.assert_allclose(numbn.batch_norm_forward(x)[0], _reference.forward_train(x)[0],
                               rtol=1e-4, atol=1e-4)
    # The calls `numbn bench` times, on this small input.
    calls = {f"numbn {k}": f for k, f in _bench._numbn_calls(x, 1, "cpu", rng).items()}
    # The functional training forward, which also returns mean and invstd.
    w, b = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
    calls["numbn fwd+stats"] = lambda: numbn.batch_norm_forward(x, w, b)
    # Without weight and bias (affine=False): ones and zeros stand in for them.
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    _, mean, invstd = numbn.batch_norm_forward(x)
    dy = rng.standard_normal(shape).astype(np.float32)
    calls["numbn eval -wb"] = lambda: numbn.batch_norm(x, rm, rv)
    calls["numbn fwd+st -wb"] = lambda: numbn.batch_norm_forward(x)
    calls["numbn bwd -wb"] = lambda: numbn.batch_norm_backward(dy, x, mean, invstd)
    layer_eval, layer_train = numbn.BatchNorm(shape[1]).eval(), numbn.BatchNorm(shape[1])
    calls["layer eval"] = lambda: layer_eval(x)
    calls["layer step"] = lambda: (layer_train(x), layer_train.backward(dy))
    if _bench.has_torch():
        calls.update({f"torch {k}": f for k, f in _bench._torch_calls(x, 1, rng).items()})
    else:
        print("PyTorch is not installed: numbn only")
    big = np.ones(FLUSH_BYTES // 4, np.float32)
    dst = np.empty_like(big)
    for f in calls.values():
        f()
    names = list(calls)
    order = np.random.default_rng(1)
    print(f"numbn {numbn.__version__}, {numba.get_num_threads()} threads, input {shape} "
          f"float32, median us per call over {rounds} rounds")
    print(f"{'call':<16} {'hot':>8} {'cold':>8}")
    medians = {}
    for mode in ("hot", "cold"):
        times = {k: [] for k in names}
        for _ in range(rounds):
            for j in order.permutation(len(names)):
                if mode == "cold":
                    _parallel_copy(big, dst, numba.get_num_threads())
                t0 = time.perf_counter()
                calls[names[j]]()
                times[names[j]].append(time.perf_counter() - t0)
        medians[mode] = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
    for k in names:
        print(f"{k:<16} {medians['hot'][k]:8.1f} {medians['cold'][k]:8.1f}")


if __name__ == "__main__":
    main()
