"""Whether the kernels' choice of non-temporal stores pays, input by input.

Run ``python benchmarks/store_choice.py [--rounds N] [SHAPE ...]``, a SHAPE
being ``N,C,H,W`` (channel axis 1), ``N,H,W,C:last`` (channels last) or
``N,C`` (2-D). For each input (float32) it times the training forward, the
eval and the backward twice, with the thresholds of ``numbn._config`` as
they are and with every output stored ordinarily (the three thresholds
``CPU_STREAM_MIN_BYTES``, ``CPU_SLAB_STREAM_MIN_BYTES`` and
``CPU_ROWS_STREAM_MIN_BYTES`` out of reach), all six calls taking their turn
in a new random order each round, and prints the median milliseconds and
the ratio, as chosen over ordinary. Both settings' results are compared
first. The defaults are the inputs that the thresholds' docstrings quote.
This machine's numbers move from one sitting to the next (its cache is
shared): run it more than once before changing a threshold.
"""

from __future__ import annotations

import argparse

import numba
import numpy as np

import numbn
from numbn import _config
from numbn._bench import _median_interleaved, _numbn_calls

DEFAULT = ["64,256,14,14", "128,128,14,14", "16,64,56,56", "32,256,14,14", "64,512,7,7",
           "16,56,56,64:last", "12288,256", "8192,256"]


def _ordinary(f):
    """``f`` run with every output stored ordinarily."""
    def run():
        kept = {name: getattr(_config, name) for name in _config.STORE_THRESHOLDS}
        for name in _config.STORE_THRESHOLDS:
            setattr(_config, name, 1 << 62)
        try:
            return f()
        finally:
            for name, value in kept.items():
                setattr(_config, name, value)
    return run


def _arrays(result):
    """A call's result as a tuple of arrays (``batch_norm`` returns one)."""
    return (result,) if isinstance(result, np.ndarray) else result


def _calls(spec: str):
    """The shape of ``spec`` and ``numbn bench``'s calls on a float32 input
    of it (``numbn._bench._numbn_calls``)."""
    dims, _, kind = spec.partition(":")
    shape = tuple(int(s) for s in dims.split(","))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    return shape, _numbn_calls(x, -1 if kind == "last" else 1, "cpu", rng)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("shapes", nargs="*", default=DEFAULT)
    args = p.parse_args(argv)
    print(f"numbn {numbn.__version__}, {numba.get_num_threads()} threads, float32, median ms "
          f"of {args.rounds} interleaved rounds; ratio: as chosen / all ordinary stores")
    print(f"{'input':<20} {'MiB':>6} " + " ".join(f"{op:>22}" for op in ("forward", "eval",
                                                                          "backward")))
    for spec in args.shapes:
        shape, calls = _calls(spec)
        funcs = []
        for op, f in calls.items():
            ordinary = _ordinary(f)
            for g, e in zip(_arrays(f()), _arrays(ordinary())):
                np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
            funcs += [(op, "chosen", f), (op, "ordinary", ordinary)]
        medians = _median_interleaved([f for _, _, f in funcs], args.rounds, seed=1)
        ms = {(op, how): t * 1e3 for (op, how, _), t in zip(funcs, medians)}
        cells = [f"{ms[(op, 'chosen')]:6.3f} / {ms[(op, 'ordinary')]:6.3f} "
                 f"{ms[(op, 'chosen')] / ms[(op, 'ordinary')]:5.2f}" for op in calls]
        print(f"{spec:<20} {np.prod(shape) * 4 / 2**20:6.1f} " + " ".join(f"{c:>22}"
                                                                        for c in cells))


if __name__ == "__main__":
    main()
