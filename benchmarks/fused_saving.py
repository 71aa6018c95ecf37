"""What the fused ReLU saves: fused vs plain BatchNorm vs BatchNorm-then-ReLU.

Run ``python benchmarks/fused_saving.py [--runs N] [--seconds S] [--cold]``. For each of
the seven standard CPU float32 shapes it times, interleaved in one process
(the three variants take turns, so drift in clock speed or memory state hits
them alike), the training forward and the backward of

* ``plain``: ``batch_norm_forward`` / ``batch_norm_backward``, no activation;
* ``fused``: the same with ``activation="relu"`` (one pass);
* ``bn+relu``: plain, then ``np.maximum`` as its own pass (and, backward, the
  ReLU's mask applied to ``dy`` as its own pass, into preallocated buffers),

and prints the medians, the ratios to plain BatchNorm, the ratio of the
fastest runs, and the median over rounds of each round's own fused/plain
ratio (the last two less sensitive to other work on the machine: the calls
of a round run within milliseconds of each other). With ``--cold`` every
call starts with its inputs out of the caches (a 64 MiB buffer is rewritten
before it, outside the timing), as in a network whose BatchNorm input was
written long before its backward; without it the small shapes run from
cache, round after round. The target is fused forward-train and backward
within 10% of plain BatchNorm's time. Every result is checked against the
float64 reference on a slice before timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import numpy as np

import numbn
from numbn import _reference
from numbn._bench import STANDARD

SHAPES = STANDARD  # the seven float32 shapes of `numbn bench`
VARIANTS = ("plain", "fused", "bn+relu")


class Case:
    """Inputs and preallocated outputs of one shape; one method per variant and pass."""

    def __init__(self, shape, axis, rng):
        c = shape[axis]
        self.axis = axis
        self.x = rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5
        self.dy = rng.standard_normal(shape, dtype=np.float32)
        self.w = rng.normal(1.0, 0.3, c).astype(np.float32)
        self.b = rng.normal(0.0, 0.3, c).astype(np.float32)
        self.y = {v: np.empty_like(self.x) for v in VARIANTS}
        self.mask = np.empty(shape, np.bool_)
        self.g = np.empty_like(self.x)
        self.stats = {}

    def forward(self, variant):
        y = self.y[variant]
        _, mean, invstd = numbn.batch_norm_forward(
            self.x, self.w, self.b, axis=self.axis, out=y,
            activation="relu" if variant == "fused" else None)
        if variant == "bn+relu":
            np.maximum(y, 0, out=y)
        self.stats[variant] = mean, invstd
        return y

    def backward(self, variant):
        mean, invstd = self.stats[variant]
        if variant == "fused":
            return numbn.batch_norm_backward(self.dy, self.x, mean, invstd, self.w, bias=self.b,
                                             axis=self.axis, activation="relu")[0]
        dy = self.dy
        if variant == "bn+relu":
            np.greater(self.y[variant], 0, out=self.mask)
            np.multiply(self.dy, self.mask, out=self.g)
            dy = self.g
        return numbn.batch_norm_backward(dy, self.x, mean, invstd, self.w, axis=self.axis)[0]

    def check(self):
        """Each variant's forward and backward against the reference, on 2 samples."""
        part = Case.__new__(Case)
        part.__dict__.update(axis=self.axis, w=self.w, b=self.b, x=self.x[:2], dy=self.dy[:2],
                             mask=self.mask[:2], g=self.g[:2], stats={},
                             y={v: np.empty_like(self.x[:2]) for v in VARIANTS})
        for variant in VARIANTS:
            relu = None if variant == "plain" else "relu"
            y_ref, mean, invstd, _, _ = _reference.forward_train(part.x, self.w, self.b,
                                                                 axis=self.axis, activation=relu)
            dx_ref = _reference.backward(part.dy, part.x, mean, invstd, self.w, True, self.axis,
                                         self.b, relu)[0]
            for got, ref, what in ((part.forward(variant), y_ref, "forward"),
                                   (part.backward(variant), dx_ref, "backward")):
                err = np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref)))
                if err > 1e-4:
                    raise AssertionError(f"{variant} {what} is off the reference by {err:.2g}")


def measure(case, runs, seconds, cold=False):
    """Seconds per call, ``{(pass, variant): (median, min)}``, the median over
    rounds of each round's fused/plain ratio, ``{pass: ratio}`` (the two calls
    of a round run within milliseconds of each other, so a slow phase of the
    machine hits both), and the rounds run; the variants take turns inside
    every round, in a rotating order; ``cold``: the caches are flushed before
    each call."""
    times = {(p, v): [] for p in ("forward", "backward") for v in VARIANTS}
    flush = np.zeros(64 * 2**20 // 8) if cold else None
    for v in VARIANTS:  # warm the JIT and the buffers
        case.forward(v)
        case.backward(v)
    start = time.perf_counter()
    rounds = 0
    while rounds < runs or (time.perf_counter() - start < seconds and rounds < 20 * runs):
        order = VARIANTS[rounds % 3:] + VARIANTS[:rounds % 3]
        for p in ("forward", "backward"):
            for v in order:
                fn = case.forward if p == "forward" else case.backward
                if cold:
                    flush += 1.0
                t0 = time.perf_counter()
                fn(v)
                times[p, v].append(time.perf_counter() - t0)
        rounds += 1
    paired = {p: statistics.median(f / q for f, q in zip(times[p, "fused"], times[p, "plain"]))
              for p in ("forward", "backward")}
    return {k: (statistics.median(t), min(t)) for k, t in times.items()}, paired, rounds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="fewest rounds per shape")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="keep going (up to 20x runs) until this long per shape")
    parser.add_argument("--cold", action="store_true",
                        help="flush the caches before every timed call")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"numbn {numbn.__version__}, numba {numba.__version__}, "
          f"{numba.get_num_threads()} threads, float32, {'cold' if args.cold else 'hot'} "
          f"caches, medians (ms); "
          f"load average {os.getloadavg()[0]:.2f} at start (other work skews the timings)")
    header = (f"{'shape':<24}{'pass':<9}{'plain':>8}{'fused':>8}{'bn+relu':>9}"
              f"{'fused/plain':>13}{'bn+relu/plain':>15}{'(min) fused/plain':>19}"
              f"{'(paired)':>10}{'rounds':>8}")
    print(header)
    print("-" * len(header))
    worst = worst_min = worst_paired = 0.0
    for layout, shape, axis in SHAPES:
        case = Case(shape, axis, rng)
        case.check()
        med, paired, rounds = measure(case, args.runs, args.seconds, args.cold)
        for p in ("forward", "backward"):
            plain, fused, then = (med[p, v][0] * 1e3 for v in VARIANTS)
            fastest = med[p, "fused"][1] / med[p, "plain"][1]
            worst = max(worst, fused / plain)
            worst_min = max(worst_min, fastest)
            worst_paired = max(worst_paired, paired[p])
            name = f"{layout} {'x'.join(map(str, shape))}"
            print(f"{name:<24}{p:<9}{plain:8.2f}{fused:8.2f}{then:9.2f}"
                  f"{fused / plain:13.3f}{then / plain:15.3f}{fastest:19.3f}{paired[p]:10.3f}"
                  f"{rounds:8d}")
    print(f"worst fused/plain ratio: {worst:.3f} of medians, {worst_min:.3f} of minima, "
          f"{worst_paired:.3f} paired (target <= 1.10)")


if __name__ == "__main__":
    main()
