"""How numbn's time grows with N, C and spatial size, for NCHW and NHWC.

Run: ``python benchmarks/scaling.py [--quick]``. Prints, per sweep, the time
of forward-train, eval and backward (float32, CPU backend) and the effective
GB/s, so cliffs (C = 1, tiny N*H*W, very large C) stand out. Medians of
interleaved runs in one process.
"""

from __future__ import annotations

import argparse

import numpy as np

from numbn._bench import _numbn_calls, median_seconds


def measure(shape, axis, repeat):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    calls = _numbn_calls(x, axis, "cpu", rng)  # numbn bench's calls
    t_fwd, t_eval, t_bwd = (median_seconds(calls[op], repeat)
                            for op in ("forward", "eval", "backward"))
    return t_fwd, t_eval, t_bwd, x.nbytes


def sweep(name, shapes, axis, repeat):
    print(f"\n{name}")
    print(f"{'shape':<22} {'fwd ms':>9} {'eval ms':>9} {'bwd ms':>9} "
          f"{'fwd GB/s':>9} {'eval GB/s':>9} {'bwd GB/s':>9}")
    for shape in shapes:
        f, e, b, nbytes = measure(shape, axis, repeat)
        print(f"{str(shape):<22} {f * 1e3:9.3f} {e * 1e3:9.3f} {b * 1e3:9.3f} "
              f"{2 * nbytes / f / 1e9:9.1f} {2 * nbytes / e / 1e9:9.1f} "
              f"{3 * nbytes / b / 1e9:9.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    repeat = 5 if args.quick else 15
    ns = [1, 4, 16, 64, 256, 1024]
    cs = [1, 2, 3, 16, 64, 256, 1024, 4096]
    hw = [1, 4, 8, 16, 32, 64]
    sweep("N (NCHW, C=64, 16x16)", [(n, 64, 16, 16) for n in ns], 1, repeat)
    sweep("N (NHWC, C=64, 16x16)", [(n, 16, 16, 64) for n in ns], -1, repeat)
    sweep("C (NCHW, N=16, 16x16)", [(16, c, 16, 16) for c in cs], 1, repeat)
    sweep("C (NHWC, N=16, 16x16)", [(16, 16, 16, c) for c in cs], -1, repeat)
    sweep("spatial (NCHW, N=16, C=64)", [(16, 64, s, s) for s in hw], 1, repeat)
    sweep("spatial (NHWC, N=16, C=64)", [(16, s, s, 64) for s in hw], -1, repeat)
    sweep("C=1, large N*H*W (NCHW)", [(n, 1, 64, 64) for n in (1, 16, 256)], 1, repeat)
    # Short runs at a fixed 4M elements: the channel-major kernels' fixed cost
    # per run of H*W, and where the rows kernels take over (_cpu._row_views).
    for c in (64, 512):
        sweep(f"H*W at 4M elements (NCHW, C={c})",
              [(max(2, (1 << 22) // (c * s * s)), c, s, s) for s in (1, 2, 3, 4, 5, 7, 8, 14)],
              1, repeat)


if __name__ == "__main__":
    main()
