"""What SyncBatchNorm costs over BatchNorm, per training step, across MPI ranks.

    NUMBA_NUM_THREADS=1 mpiexec -n 2 python benchmarks/sync_cost.py

(one Numba thread per rank when the ranks share the cores; give each rank its
share of threads on a bigger machine.) A plain script, not an asv benchmark:
asv runs one process, and this needs several.

Every rank holds its own (16, 64, 56, 56) float32 batch (``--shape``,
``--dtype``). One repeat times a forward plus backward of four layers on that
batch, each started after a barrier, in rotating order, so that drift of the
machine hits all alike:

* ``BatchNorm``, the baseline;
* ``BatchNorm`` held to the two-pass kernels (:func:`two_pass`): the CPU
  backend fuses statistics and normalisation per channel while a channel's
  slab is in cache, which a synchronised layer cannot do (the global
  statistics arrive between the passes);
* ``BatchNorm`` with streamed stores (:func:`streamed`): the ranks of one
  machine share its last-level cache, and SyncBatchNorm chooses its stores by
  what all of them write (non-temporal above ``_config.CPU_STREAM_MIN_BYTES``),
  which a BatchNorm, knowing nothing of the other ranks, cannot; this row
  shows what the same choice gives BatchNorm;
* ``SyncBatchNorm`` over a :class:`Mirror` communicator, which answers at
  once as if every rank held this rank's batch: the synchronised code path
  without communication or waiting;
* ``SyncBatchNorm`` over MPI.

A step of a data-parallel program lasts as long as its slowest rank, so each
repeat's time is the maximum over the ranks; the figures are medians over the
repeats (ratios: medians of the per-repeat ratios), with the minimum beside
them, what is left when the machine does not get in the way (on a shared
machine a rank descheduled while the other waits in a collective makes the
medians noisy). The time SyncBatchNorm spends inside its two collectives,
waiting for the slower rank included, and the latency of the collectives alone
(the forward's Allgather of 2C + 3 float64 values per rank, the backward's
Allreduce of 2C + 1) are reported too. Nothing is timed before every layer has
been compiled and the synchronised result checked (global mean 0 and variance
1 per channel).

It sits beside the asv suite, which imports every module here: importing it
starts nothing (mpi4py, hence MPI, is imported in ``main``) and it defines no
``time_*`` name for asv to pick up.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

import numbn
from numbn import _config


class Timed:
    """A communicator for SyncBatchNorm that adds up the seconds spent in its collectives."""

    def __init__(self, comm):
        self._comm = comm
        self.seconds = 0.0

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in ("Allgather", "Allreduce"):
            return attr

        def timed(*args):
            t0 = time.perf_counter()
            attr(*args)
            self.seconds += time.perf_counter() - t0

        return timed


class Mirror:
    """A communicator of ``size`` ranks that all hold this rank's batch: no waiting."""

    def __init__(self, size: int):
        self.size = size

    def Get_size(self):
        return self.size

    def Get_rank(self):
        return 0

    def Allgather(self, send, recv):
        recv[...] = send

    def Allreduce(self, send, recv):
        np.multiply(send, self.size, out=recv)

    def allgather(self, obj):
        return [obj] * self.size


class Configured:
    """A BatchNorm whose calls run with one setting of ``numbn._config`` changed."""

    def __init__(self, bn, name: str, value: int):
        self.bn, self.name, self.value = bn, name, value

    def _run(self, method, arg):
        saved = getattr(_config, self.name)
        setattr(_config, self.name, self.value)
        try:
            return method(arg)
        finally:
            setattr(_config, self.name, saved)

    def __call__(self, x):
        return self._run(self.bn, x)

    def backward(self, dy):
        return self._run(self.bn.backward, dy)


def two_pass(bn) -> Configured:
    """A BatchNorm held to the two-pass kernels, as synchronisation must be.

    The CPU backend fuses the statistics and the normalisation (and the
    backward's sums and dx) per channel while the channel's slab is in cache,
    when it fits (``numbn._config.CPU_FUSED_MAX_SLAB_BYTES``). SyncBatchNorm
    cannot: the global statistics arrive between the two passes, so x crosses
    memory once more in the forward and in the backward. This baseline
    separates that cost from the cost of the communication.
    """
    return Configured(bn, "CPU_FUSED_MAX_SLAB_BYTES", -1)


def streamed(bn) -> Configured:
    """A BatchNorm whose outputs are all stored non-temporally, as SyncBatchNorm's
    are when the machine's ranks together write ``_config.CPU_STREAM_MIN_BYTES``."""
    return Configured(bn, "CPU_STREAM_MIN_BYTES", 0)


def step(comm, bn, x, dy) -> float:
    """Seconds of one forward and backward on this rank, started after a barrier."""
    comm.Barrier()
    t0 = time.perf_counter()
    bn(x)
    bn.backward(dy)
    return time.perf_counter() - t0


def check(comm, sbn, x, dy) -> None:
    """The synchronised output has mean 0 and variance 1 per channel over all ranks."""
    y = sbn(x).astype(np.float64)
    sbn.backward(dy)
    axes = tuple(a for a in range(y.ndim) if a != 1)
    n = comm.allreduce(y.size // y.shape[1])
    mean = comm.allreduce(y.sum(axis=axes)) / n
    var = comm.allreduce(((y - mean[None, :, None, None]) ** 2).sum(axis=axes)) / n
    assert np.allclose(mean, 0.0, atol=1e-4) and np.allclose(var, 1.0, atol=1e-3), (mean, var)


def latency(comm, op_max, c: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one Allgather (2C + 3 values) and one Allreduce (2C + 1)."""
    row, table = np.zeros(2 * c + 3), np.empty((comm.Get_size(), 2 * c + 3))
    sums, total = np.zeros(2 * c + 1), np.empty(2 * c + 1)
    times = {"Allgather": [], "Allreduce": []}
    for _ in range(repeats):
        for name, call in (("Allgather", lambda: comm.Allgather(row, table)),
                           ("Allreduce", lambda: comm.Allreduce(sums, total))):
            comm.Barrier()
            t0 = time.perf_counter()
            call()
            times[name].append(comm.allreduce(time.perf_counter() - t0, op=op_max))
    return float(np.median(times["Allgather"])), float(np.median(times["Allreduce"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="16,64,56,56", help="per-rank batch, NCHW")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    shape = tuple(int(s) for s in args.shape.split(","))
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(rank)
    x = (rng.standard_normal(shape) + rank).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)
    timed = Timed(comm)
    rows = {  # name -> layer
        "BatchNorm": numbn.BatchNorm(shape[1]),
        "BatchNorm, two-pass kernels": two_pass(numbn.BatchNorm(shape[1])),
        "BatchNorm, streamed stores": streamed(numbn.BatchNorm(shape[1])),
        "SyncBatchNorm, mirror comm": numbn.SyncBatchNorm(shape[1], comm=Mirror(size)),
        "SyncBatchNorm": numbn.SyncBatchNorm(shape[1], comm=timed),
    }
    for layer in rows.values():  # compile, and warm the caches
        for _ in range(2):
            step(comm, layer, x, dy)
    check(comm, rows["SyncBatchNorm"], x, dy)

    times = {name: [] for name in rows}
    inside = []
    names = list(rows)
    for i in range(args.repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order if i % 2 == 0 else order[::-1]:
            timed.seconds = 0.0
            times[name].append(comm.allreduce(step(comm, rows[name], x, dy), op=MPI.MAX))
            if name == "SyncBatchNorm":
                inside.append(comm.allreduce(timed.seconds, op=MPI.MAX))
    gather_s, reduce_s = latency(comm, MPI.MAX, shape[1], 10 * args.repeats)
    if rank != 0:
        return
    t = {name: np.array(v) for name, v in times.items()}
    base, two = t["BatchNorm"], t["BatchNorm, two-pass kernels"]
    print(f"{size} ranks x {shape} {args.dtype} per rank, forward + backward, "
          f"{numba.get_num_threads()} Numba thread(s) per rank; {args.repeats} interleaved "
          f"repeats, each the slowest rank's time")
    print(f"  {'':30} {'median':>9} {'min':>9} {'vs BatchNorm':>13} {'vs two-pass':>12}")
    for name, v in t.items():
        print(f"  {name:30} {np.median(v) * 1e3:6.2f} ms {v.min() * 1e3:6.2f} ms "
              f"{100 * (np.median(v / base) - 1):+11.1f} % "
              f"{100 * (np.median(v / two) - 1):+10.1f} %")
    print("  (the percentages are medians of the per-repeat ratios)")
    print(f"  SyncBatchNorm inside its 2 collectives, waiting for the slower rank included: "
          f"{np.median(inside) * 1e3:.2f} ms median")
    print(f"  Allgather of {2 * shape[1] + 3} float64 per rank (forward): "
          f"{gather_s * 1e6:.1f} us median")
    print(f"  Allreduce of {2 * shape[1] + 1} float64 (backward):        "
          f"{reduce_s * 1e6:.1f} us median")


if __name__ == "__main__":
    main()
