"""A data-parallel training step with SyncBatchNorm, checked against one process.

    mpiexec -n 2 python examples/mpi_train.py

A tiny NumPy network, linear (no bias: BatchNorm's shift takes its place) ->
SyncBatchNorm -> ReLU (fused into the layer) -> mean-square loss, takes a few
SGD steps on a global batch that is split unevenly over the ranks. Each rank
runs forward and backward on its own part; the batch statistics are shared by
SyncBatchNorm, and the gradients are summed with one Allreduce, as any
data-parallel trainer does. Every rank then checks that the losses, the
updated parameters and the running statistics equal those of one process
training on the whole batch with a plain BatchNorm; rank 0 prints them. The
exit status is non-zero if any rank disagrees.
"""

import sys

import numpy as np
from mpi4py import MPI

import numbn

N, D_IN, D_OUT, STEPS, LR = 10, 5, 4, 4, 0.5


def data():
    """The global batch and targets, the same on every rank."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D_IN))
    t = np.abs(rng.standard_normal((N, D_OUT)))
    return x, t


def train(bn, x, t, allreduce):
    """``STEPS`` SGD steps on ``(x, t)``; ``allreduce`` sums over the ranks."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((D_OUT, D_IN)) / np.sqrt(D_IN)
    n_global = allreduce(np.array([x.shape[0]], np.float64))[0]
    losses = []
    for _ in range(STEPS):
        a = bn(x @ w.T)                      # normalise over the global batch, then ReLU
        r = a - t
        loss = allreduce(np.array([(r * r).sum()]))[0] / (n_global * D_OUT)
        dh = bn.backward(2.0 * r / (n_global * D_OUT))   # dx of the global batch
        grads = [allreduce(g) for g in (dh.T @ x, bn.grad_weight, bn.grad_bias)]
        w -= LR * grads[0]
        bn.weight -= LR * grads[1]
        bn.bias -= LR * grads[2]
        losses.append(loss)
    return {"loss": np.array(losses), "linear.weight": w,
            **{f"bn.{k}": v for k, v in bn.state_dict().items()}}


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x, t = data()
    # Uneven parts: rank r holds a share proportional to r + 1.
    bounds = np.round(np.cumsum([0] + [r + 1 for r in range(size)]) * N
                      / (size * (size + 1) / 2)).astype(int)
    part = slice(bounds[rank], bounds[rank + 1])

    def allreduce(a):
        out = np.empty_like(a)
        comm.Allreduce(np.ascontiguousarray(a), out)
        return out

    sync = train(numbn.SyncBatchNorm(D_OUT, dtype=np.float64, activation="relu", comm=comm),
                 x[part], t[part], allreduce)
    whole = train(numbn.BatchNorm(D_OUT, dtype=np.float64, activation="relu"), x, t,
                  lambda a: a)
    diff = max(float(np.max(np.abs(sync[k] - whole[k]))) for k in whole)
    ok = comm.allreduce(diff <= 1e-9, op=MPI.LAND)
    if rank == 0:
        np.set_printoptions(precision=6, suppress=True)
        print(f"{size} ranks, batch parts {np.diff(bounds).tolist()} of {N}")
        for key, value in sync.items():
            print(f"{key:>24}: {value}")
        verdict = "matches" if ok else "DOES NOT match"
        print(f"{verdict} the single-process run (max abs difference {diff:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
