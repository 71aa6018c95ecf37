"""numbn against PyTorch on the BatchNorm inputs of common networks.

Run ``python benchmarks/network_shapes.py [--rounds N] [--only TEXT]``.
Prints, per input, numbn's time over PyTorch's for the training forward,
eval and backward (float32, the CPU backend, the calls ``numbn bench``
times), as the lowest and highest of three medians of interleaved runs,
and marks ``<`` where the median of the three is slower than PyTorch,
``<<`` where all three are. The inputs: ResNet's stages at batch 1, 8 and
32, MobileNet v2's at 8 and 32, channels-last stages, 1-D and 3-D inputs, a
U-Net's first stages, dense layers' 2-D input, one to three channels. Where
the bench's seven inputs say how fast numbn is, this says where it is not:
``CPU_ROWS_BLOCK_MIN_ROWS`` and ``CPU_ROWS_TASKS_PER_THREAD`` came from its
2-D rows of 4096 columns, 1.3-2.1x PyTorch's time before them.
"""

from __future__ import annotations

import argparse

import numpy as np

from numbn._bench import OPS, _median_interleaved, _numbn_calls, _torch_calls, has_torch


def shapes():
    """``(name, shape, channel axis)`` of every input."""
    out = []
    for n in (1, 8, 32):
        for c, h in ((64, 112), (64, 56), (128, 28), (256, 14), (512, 7), (2048, 7)):
            out.append((f"resnet N={n}", (n, c, h, h), 1))
    for n in (8, 32):
        for c, h in ((32, 112), (96, 56), (144, 28), (384, 14), (960, 7), (1280, 7)):
            out.append((f"mobilenet N={n}", (n, c, h, h), 1))
    for n in (8, 32):
        for h, c in ((112, 64), (56, 128), (28, 256), (14, 512), (7, 1024)):
            out.append((f"NHWC N={n}", (n, h, h, c), -1))
    out += [("1-D", (32, 128, 1000), 1), ("1-D", (16, 64, 16000), 1), ("1-D", (64, 512, 50), 1),
            ("3-D", (4, 64, 16, 56, 56), 1), ("3-D", (8, 256, 8, 14, 14), 1),
            ("3-D last", (4, 16, 56, 56, 64), -1), ("U-Net", (2, 64, 256, 256), 1),
            ("U-Net", (1, 32, 512, 512), 1), ("dense", (16, 128), 1), ("dense", (128, 256), 1),
            ("dense", (32, 4096), 1), ("dense", (1024, 4096), 1), ("dense", (65536, 16), 1),
            ("C=1", (64, 1, 128, 128), 1), ("C=3", (16, 3, 224, 224), 1),
            ("C=3 rows", (4096, 3), 1)]
    return out


def ratios(x, axis, rounds, rng):
    """Per op, three medians of numbn's time over PyTorch's."""
    ours, peer = _numbn_calls(x, axis, "cpu", rng), _torch_calls(x, axis, rng)
    out = {}
    for op in OPS:
        out[op] = []
        for seed in range(3):
            t_ours, t_peer = _median_interleaved([ours[op], peer[op]], rounds, warm=True,
                                                 seed=seed)
            out[op].append(t_ours / t_peer)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=0,
                   help="rounds a median (default: 40 below 4 MB, else 15)")
    p.add_argument("--only", default="", help="only the inputs whose name contains this")
    args = p.parse_args(argv)
    if not has_torch():
        raise SystemExit("network_shapes.py compares with PyTorch: pip install -e '.[compare]'")
    rng = np.random.default_rng(0)
    print(f"{'input':<16} {'shape':<22} {'MiB':>6}  " + "  ".join(f"{op:<16}" for op in OPS))
    for name, shape, axis in shapes():
        if args.only not in name:
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        rounds = args.rounds or (40 if x.nbytes < 4e6 else 15)
        cells = []
        for rs in ratios(x, axis, rounds, rng).values():
            mark = "<<" if min(rs) > 1.0 else ("<" if np.median(rs) > 1.0 else "")
            cells.append(f"{min(rs):.2f}-{max(rs):.2f} {mark:<3}")
        print(f"{name:<16} {str(shape):<22} {x.nbytes / 2**20:6.2f}  " + "  ".join(
            f"{c:<16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
