"""``numbn bench``: timings of every available backend beside PyTorch.

Each case is timed interleaved (numbn, peer and copy in turn, in a new random
order each round) in one process and summarised by the median, so that slow
drifts of a noisy machine hit all of them alike and none always runs in the
cache state that another leaves. Effective bandwidth counts the compulsory
bytes: forward and eval read x and write y (2|x|), backward reads x and dy and
writes dx (3|x|); the copy bandwidth is that of a parallel copy of |x| bytes
(read and write) with the same number of threads.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import asdict, dataclass

import numba
import numpy as np
from numba import njit, prange

import numbn

#: The standard suite: (name, shape, channel axis), float32 unless ``--dtype``.
STANDARD = [
    ("NCHW", (32, 64, 56, 56), 1),
    ("NCHW", (16, 32, 112, 112), 1),
    ("NCHW", (64, 256, 14, 14), 1),
    ("NHWC", (32, 56, 56, 64), -1),
    ("NHWC", (8, 28, 28, 256), -1),
    ("2-D", (256, 1024), 1),
    ("2-D", (8192, 64), 1),
]

#: ``--quick``: the same layouts at a quarter of the batch.
QUICK = [(k, (max(2, s[0] // 4),) + s[1:], a) for k, s, a in STANDARD]

OPS = ("forward", "eval", "backward")

#: Memory orders of a 4-D NCHW array by name, each a function that returns
#: the array's values laid out so: C order, Fortran order, and PyTorch's
#: ``channels_last`` (NHWC memory behind NCHW axes). The mixed-order
#: benchmarks and tests draw their orders from here.
MEMORY_ORDERS = {
    "C": np.ascontiguousarray,
    "F": np.asfortranarray,
    "channels_last": lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
}

_BYTES_FACTOR = {"forward": 2, "eval": 2, "backward": 3}


@njit(parallel=True, cache=True)
def _parallel_copy(src, dst, nsplit):
    n = src.shape[0]
    for s in prange(nsplit):
        a = s * n // nsplit
        b = (s + 1) * n // nsplit
        d = dst[a:b]
        r = src[a:b]
        for i in range(b - a):
            d[i] = r[i]


@dataclass
class Row:
    layout: str
    shape: tuple
    dtype: str
    op: str
    backend: str
    ms: float
    gbps: float
    copy_fraction: float
    ratio_to_torch: float | None


def median_seconds(f, repeat: int = 7) -> float:
    """Median wall time of ``f()`` over ``repeat`` runs after one warm-up call."""
    return _median_interleaved([f], repeat, warm=True)[0]


def script_input(doc: str, argv, rounds: int, shape: str):
    """The ``--rounds`` and ``--shape`` (NCHW, comma-separated) options of the
    timing scripts in ``benchmarks/``, parsed from ``argv``, with ``doc``'s
    first paragraph as the description: ``(rounds, shape, x, rng)``, ``x`` a
    float32 standard-normal input of that shape drawn from ``rng`` (seed 0)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--shape", default=shape, help="NCHW, comma-separated")
    args = p.parse_args(argv)
    dims = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    return args.rounds, dims, rng.standard_normal(dims).astype(np.float32), rng


def _median_interleaved(funcs, repeat, warm=False, seed=0):
    """Median time of each of ``funcs``, run in turn ``repeat`` times, in a
    new random order each round: with a fixed order, what one call leaves in
    the cache (its output, the tail of its input) favours the call after it,
    by up to 10% on this suite's larger cases (measured)."""
    times = [[] for _ in funcs]
    for f in funcs if warm else ():
        f()
    order = np.random.default_rng(seed)
    for _ in range(repeat):
        for k in order.permutation(len(funcs)):
            t0 = time.perf_counter()
            funcs[k]()
            times[k].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def _numbn_calls(x, axis, backend, rng, module=numbn):
    """The timed calls of ``module`` (numbn, or another version of it:
    ``benchmarks/against_commit.py``) on ``x``, dy drawn from ``rng``."""
    c = x.shape[axis]
    # float32 parameters and statistics, float64 for float64 x: mixed
    # precision for float16, as PyTorch's float16 BatchNorm keeps them.
    pdt = np.float64 if x.dtype == np.float64 else np.float32
    w, b = np.ones(c, pdt), np.zeros(c, pdt)
    rm, rv = np.zeros(c, pdt), np.ones(c, pdt)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    _, mean, invstd = module.batch_norm_forward(x, w, b, axis=axis, backend=backend)
    return {
        "forward": lambda: module.batch_norm(x, rm, rv, w, b, True, axis=axis, backend=backend),
        "eval": lambda: module.batch_norm(x, rm, rv, w, b, False, axis=axis, backend=backend),
        "backward": lambda: module.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                       backend=backend),
    }


def _torch_calls(x, axis, rng):
    import torch

    torch.set_num_threads(numba.get_num_threads())
    c = x.shape[axis]
    t = torch.from_numpy(np.moveaxis(x, axis, 1))  # channels-last memory stays so
    dy = torch.from_numpy(np.moveaxis(rng.standard_normal(x.shape).astype(x.dtype), axis, 1))
    pdt = torch.float64 if x.dtype == np.float64 else torch.float32
    w, b = torch.ones(c, dtype=pdt), torch.zeros(c, dtype=pdt)
    rm, rv = torch.zeros(c, dtype=pdt), torch.ones(c, dtype=pdt)
    _, sm, si = torch.ops.aten.native_batch_norm(t, w, b, rm.clone(), rv.clone(), True, 0.1,
                                                 1e-5)
    f = torch.nn.functional.batch_norm
    back = torch.ops.aten.native_batch_norm_backward
    return {
        "forward": lambda: f(t, rm, rv, w, b, True),
        "eval": lambda: f(t, rm, rv, w, b, False),
        "backward": lambda: back(dy, t, w, rm, rv, sm, si, True, 1e-5, [True, True, True]),
    }


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


class _Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str):
        self.done += 1
        if self.enabled:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{self.total} {label:<40}")
            sys.stderr.flush()
            if self.done == self.total:
                sys.stderr.write("\n")


def warm_up(backends, say=print, dtype="float32") -> float:
    """Compile (or load from the cache) every kernel the suite uses; seconds."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for backend in backends:
        for _, shape, axis in STANDARD:
            small = tuple(2 if k == 0 else (n if k == axis % len(shape) else 3)
                          for k, n in enumerate(shape))
            x = rng.standard_normal(small).astype(dtype)
            for call in _numbn_calls(x, axis, backend, rng).values():
                call()
    x = _copyable(np.ones(8, dtype))
    _parallel_copy(x, x.copy(), 2)
    return time.perf_counter() - t0


def _copyable(flat):
    """``flat`` as :func:`_parallel_copy` takes it: float16 as its bits (Numba
    has no float16 on the CPU), the same bytes."""
    return flat.view(np.uint16) if flat.dtype == np.float16 else flat


def run(backends=None, quick=False, repeat=None, peers=True, progress=True, say=print,
        cases=None, dtype="float32"):
    """Time the suite in ``dtype`` (float32 by default); returns a list of
    :class:`Row`."""
    dtype = np.dtype(dtype).name
    backends = [b for b in (backends or numbn.available_backends())]
    cases = cases or (QUICK if quick else STANDARD)
    if repeat is None:
        repeat = 5 if quick else 25
    elif repeat < 1:
        raise ValueError(f"repeat must be 1 or more, not {repeat}")
    use_torch = peers and has_torch()
    say(f"numbn bench: backends {', '.join(backends)}"
        + (", beside PyTorch" if use_torch else " (PyTorch not installed: no peer column)")
        + f"; {dtype}; {numba.get_num_threads()} threads; median of {repeat} interleaved runs")
    say("compiling kernels on first use (cached on disk afterwards)...")
    say(f"  ready in {warm_up(backends, dtype=dtype):.1f} s")
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    bar = _Progress(len(cases), progress)
    for layout, shape, axis in cases:
        x = rng.standard_normal(shape).astype(dtype)
        calls = {b: _numbn_calls(x, axis, b, rng) for b in backends}
        peer = _torch_calls(x, axis, rng) if use_torch else None
        flat = _copyable(x.reshape(-1))
        dst = np.empty_like(flat)
        nthreads = numba.get_num_threads()
        def copy(flat=flat, dst=dst, nthreads=nthreads):
            _parallel_copy(flat, dst, nthreads)

        # The numpy reference is timed on its own, with fewer rounds: its
        # float64 temporaries would flush the cache between the other calls.
        fast = [b for b in backends if b != "numpy"]
        for op in OPS:
            funcs = [calls[b][op] for b in fast] + ([peer[op]] if peer else []) + [copy]
            for f in funcs:
                f()
            times = _median_interleaved(funcs, repeat)
            copy_gbps = 2 * x.nbytes / times[-1] / 1e9
            torch_t = times[len(fast)] if peer else None
            seconds = dict(zip(fast, times))
            if "numpy" in backends:
                seconds["numpy"] = _median_interleaved([calls["numpy"][op]], max(3, repeat // 5),
                                                       warm=True)[0]
            nbytes = _BYTES_FACTOR[op] * x.nbytes
            for b in backends:
                t = seconds[b]
                rows.append(Row(layout, shape, dtype, op, b, t * 1e3, nbytes / t / 1e9,
                                nbytes / t / 1e9 / copy_gbps,
                                t / torch_t if torch_t else None))
            if peer:
                rows.append(Row(layout, shape, dtype, op, "torch", torch_t * 1e3,
                                nbytes / torch_t / 1e9, nbytes / torch_t / 1e9 / copy_gbps,
                                1.0))
        bar.step(f"{layout} {shape}")
    return rows


def table(rows) -> str:
    head = (f"{'layout':<5} {'shape':<20} {'op':<9} {'backend':<7} {'ms':>9} {'GB/s':>7} "
            f"{'of copy':>8} {'vs torch':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r.ratio_to_torch:.2f}x" if r.ratio_to_torch is not None else "-"
        lines.append(f"{r.layout:<5} {str(r.shape):<20} {r.op:<9} {r.backend:<7} "
                     f"{r.ms:9.3f} {r.gbps:7.1f} {r.copy_fraction:7.0%} {ratio:>9}")
    summary = geomeans(rows)
    if summary:
        lines.append("")
        for backend, ops in summary.items():
            lines.append(f"geometric mean time ratio to torch, {backend}: " + ", ".join(
                f"{op} {v:.2f}" for op, v in ops.items()))
    return "\n".join(lines)


def geomeans(rows) -> dict:
    out: dict = {}
    for r in rows:
        if r.ratio_to_torch is not None and r.backend != "torch":
            out.setdefault(r.backend, {}).setdefault(r.op, []).append(r.ratio_to_torch)
    return {b: {op: float(np.exp(np.mean(np.log(v)))) for op, v in ops.items()}
            for b, ops in out.items()}


def to_json(rows) -> dict:
    return {"numbn": numbn.__version__, "threads": numba.get_num_threads(),
            "rows": [asdict(r) for r in rows], "geomean_ratio_to_torch": geomeans(rows)}


def plot(rows, path) -> None:
    """Effective GB/s per case and backend against the copy bandwidth."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("numbn bench --plot needs matplotlib: pip install 'numbn[bench]'"
                         ) from exc
    cases = list(dict.fromkeys((r.layout, r.shape) for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    fig, axes = plt.subplots(1, len(OPS), figsize=(6 * len(OPS), 4.5), sharey=True)
    for ax, op in zip(np.atleast_1d(axes), OPS):
        width = 0.8 / len(backends)
        for k, b in enumerate(backends):
            vals = [next((r.gbps for r in rows if (r.layout, r.shape) == cs and r.op == op
                          and r.backend == b), 0.0) for cs in cases]
            ax.bar(np.arange(len(cases)) + k * width, vals, width, label=b)
        copy = [next(r.gbps / r.copy_fraction for r in rows if (r.layout, r.shape) == cs
                     and r.op == op) for cs in cases]
        ax.plot(np.arange(len(cases)) + 0.4 - width / 2, copy, "k_", markersize=20,
                label="copy bandwidth")
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{lay}\n{'x'.join(map(str, s))}" for lay, s in cases],
                           fontsize=7, rotation=30)
        ax.set_title(op)
        ax.set_ylabel("effective GB/s")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
