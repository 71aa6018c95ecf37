"""The ``numbn`` command line: ``numbn info``, ``numbn bench``, ``numbn check``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

import numpy as np


def _info(args) -> int:
    import numba

    import numbn
    from numbn import _cpu, _dispatch

    print(f"numbn   {numbn.__version__}")
    print(f"numba   {numba.__version__}")
    print(f"numpy   {np.__version__}")
    print(f"python  {platform.python_version()} ({platform.machine()})")
    print("backends:")
    for name in _dispatch.BACKENDS:
        reason = _dispatch.cuda_unavailable_reason() if name == "cuda" else None
        print(f"  {name:<6} {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        default = _dispatch.get_backend()
    except ValueError as exc:  # a typo in NUMBN_BACKEND: every call would raise it
        default = f"none: {exc}"
    print(f"default backend: {default}")
    _cpu.stats(np.zeros((2, 1, 1), np.float32))  # the threading layer exists after a launch
    print(f"threads {numba.get_num_threads()} (threading layer: {numba.threading_layer()})")
    try:
        from numbn import _cuda

        gpu = _cuda.describe()
    except ImportError as exc:
        gpu = f"none (numba-cuda not importable: {exc})"
    print(f"GPU     {gpu}")
    return 0


def _bench(args) -> int:
    from numbn import _bench

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # Said before the benchmark runs, not after it.
        print("numbn bench --plot needs matplotlib: pip install 'numbn[bench]'",
              file=sys.stderr)
        return 2
    rows = _bench.run(backends=args.backend, quick=args.quick, repeat=args.repeat,
                      peers=not args.no_torch, progress=not args.no_progress,
                      dtype=args.dtype)
    print(_bench.table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_bench.to_json(rows), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        _bench.plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _check(args) -> int:
    from numbn import _check

    rng = np.random.default_rng(args.seed)
    results = []

    def report(found):
        # Each case as it ends, so that a slow first run (compilation) shows progress.
        for name, ok, detail in found:
            results.append(ok)
            if args.verbose or not ok:
                print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)

    from numbn import available_backends, set_backend

    backends = args.backend or available_backends()
    for backend in backends:
        print(f"numbn check: {backend} (a first run compiles its kernels, which can take "
              "minutes)", file=sys.stderr, flush=True)
        report(_check.run_cases([backend], rng))
    try:
        from numbn._tool_checks import tool_checks
    except ImportError:
        pass
    else:
        # On the first backend asked for, not the process default
        # (NUMBN_BACKEND), which --backend would not otherwise reach.
        with set_backend(backends[0]):
            report((f"tools ({backends[0]}) {name}", ok, detail)
                   for name, ok, detail in tool_checks(rng))
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="numbn", description="Batch Normalization for "
                                     "NumPy: Numba CPU and CUDA kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends, threads, GPU")
    b = sub.add_parser("bench", help="time every backend beside PyTorch")
    b.add_argument("--quick", action="store_true", help="smaller batches, fewer runs")
    b.add_argument("--repeat", type=_positive, help="runs per measurement (median)")
    b.add_argument("--backend", action="append", choices=["cpu", "cuda", "numpy"],
                   help="only this backend (repeatable); default: all available")
    b.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"],
                   help="the inputs' dtype (default float32; float16 with float32 "
                        "parameters, as PyTorch's)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="draw GB/s against copy bandwidth")
    c = sub.add_parser("check", help="every backend against the reference")
    c.add_argument("--backend", action="append", choices=["cpu", "cuda", "numpy"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    if "cuda" in (getattr(args, "backend", None) or ()):  # cpu and numpy always run
        from numbn import _dispatch

        reason = _dispatch.cuda_unavailable_reason()
        if reason is not None:  # one line, not a failure per case or a traceback
            print(f"numbn {args.command}: backend 'cuda' is unavailable here: {reason}",
                  file=sys.stderr)
            return 2
    try:
        return {"info": _info, "bench": _bench, "check": _check}[args.command](args)
    except BrokenPipeError:  # the reader went away (numbn info | head): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
