"""Checks of ``numbn.SyncBatchNorm`` across processes; run under ``mpiexec -n P`` (P >= 2).

    mpiexec -n 3 python tests/mpi/run_sync_checks.py

Every rank builds the same global batches (same seeds), keeps its own slice
along the batch axis (uneven sizes, an empty rank, a rank with one value per
channel), and compares what ``SyncBatchNorm`` gives it with one ``BatchNorm``
run on the concatenated batch: outputs, running statistics, ``dx``, and the
sum over ranks of ``grad_weight`` / ``grad_bias``. Bad input on one rank must
make every rank raise.

Mismatches are recorded, not raised, so that every rank keeps making the same
collective calls; at the end the ranks agree on the number of failures and the
script exits 1 if there was any. An unexpected exception aborts the whole job
(``MPI.COMM_WORLD.Abort``), so a broken rank never leaves the others waiting.
``tests/test_sync.py`` launches this script with a timeout.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
from mpi4py import MPI

import numbn
from numbn._dispatch import is_device_array

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
C = 3
# "Equal to one BatchNorm on the concatenated batch": to 1e-9 in float64, a few
# float32 ulps (both round float64 statistics to the output dtype).
TOL = {np.float64: 1e-9, np.float32: 2e-5, np.float16: 2e-3}
FAILURES: list[str] = []
SKIPPED: list[str] = []


class Counting:
    """A communicator that counts the collectives made through it."""

    def __init__(self, comm):
        self._comm = comm
        self.calls: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name.startswith("Get_") or not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def fail(what: str) -> None:
    FAILURES.append(f"rank {RANK}: {what}")


def close(got, want, tol, what: str) -> None:
    if got is None or want is None:
        if got is not want:
            fail(f"{what}: got {got!r}, want {want!r}")
        return
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        fail(f"{what}: shape {got.shape} != {want.shape}")
    elif not np.allclose(got, want, rtol=tol, atol=tol, equal_nan=True):
        err = np.max(np.abs(got - want)) if got.size else 0.0
        fail(f"{what}: max abs error {err:.3g} > {tol:g}")


def equal(got, want, what: str) -> None:
    if got != want:
        fail(f"{what}: got {got!r}, want {want!r}")


def split(n: int, kind: str) -> list[int]:
    """Per-rank batch sizes summing to ``n``: uneven, with an empty rank or a single value."""
    if kind == "even":
        sizes = [n // SIZE + (r < n % SIZE) for r in range(SIZE)]
    elif kind == "uneven":
        weights = np.arange(1, SIZE + 1, dtype=float)
        sizes = list(np.floor(n * weights / weights.sum()).astype(int))
        sizes[-1] += n - sum(sizes)
    elif kind == "empty":  # rank 0 holds nothing
        sizes = [0] + split(n, "uneven")[1:]
        sizes[-1] += n - sum(sizes)
    elif kind == "single":  # rank 1 holds one sample
        rest = split(n - 1, "even")
        sizes = [rest[0], 1] + rest[2:]
        sizes[0] += rest[1]
    else:
        raise ValueError(kind)
    assert sum(sizes) == n and min(sizes) >= 0, sizes
    return [int(s) for s in sizes]


def mine(a, sizes):
    lo = sum(sizes[:RANK])
    return a[lo:lo + sizes[RANK]]


LAYOUTS = {  # convention -> per-sample shape (channel axis as the convention's default)
    "torch": (C, 5, 4),
    "keras": (4, 5, C),
    "paddle": (C, 7),
    "flax": (C,),
}


def check_matches(convention, dtype, kind, *, n=11, steps=3, seed=0, **kw):
    """SyncBatchNorm on this rank's slice == BatchNorm on the global batch, for ``steps``."""
    what = f"{convention} {np.dtype(dtype).name} {kind} {kw}"
    pdtype = np.float64 if dtype == np.float64 else np.float32
    tol = TOL[dtype]
    comm = Counting(WORLD)
    ref = numbn.BatchNorm(C, convention=convention, dtype=pdtype, **kw)
    bn = numbn.SyncBatchNorm(C, convention=convention, dtype=pdtype, comm=comm, **kw)
    rng = np.random.default_rng(seed)
    if ref.affine:
        ref.weight[...] = bn.weight[...] = rng.uniform(0.5, 2.0, C)
        ref.bias[...] = bn.bias[...] = rng.uniform(-1.0, 1.0, C)
    for step in range(steps):
        sizes = split(n + step, kind)
        shape = (n + step,) + LAYOUTS[convention]
        xg = (rng.standard_normal(shape) * 2.0 + 3.0).astype(dtype)
        dyg = rng.standard_normal(shape).astype(dtype)
        y_ref, dx_ref = ref(xg), None
        dx_ref = ref.backward(dyg)
        y = bn(mine(xg, sizes))
        calls_fwd = comm.take()
        dx = bn.backward(mine(dyg, sizes))
        calls_bwd = comm.take()
        at = f"{what} step {step}"
        # The first step also checks that the ranks' layers agree on C.
        equal(calls_fwd, ["allgather"] * (step == 0) + ["Allgather"], f"{at}: forward collectives")
        equal(calls_bwd, ["Allreduce"], f"{at}: backward collectives")
        equal(y.dtype, np.dtype(dtype), f"{at}: y dtype")
        equal(dx.dtype, np.dtype(dtype), f"{at}: dx dtype")
        close(y, mine(y_ref, sizes), tol, f"{at}: y")
        close(dx, mine(dx_ref, sizes), tol, f"{at}: dx")
        for name in ("grad_weight", "grad_bias"):
            mine_g = getattr(bn, name)
            total = None if mine_g is None else WORLD.allreduce(np.asarray(mine_g, np.float64))
            close(total, getattr(ref, name), tol * 10, f"{at}: sum over ranks of {name}")
        if ref.track_running_stats:
            close(bn.running_mean, ref.running_mean, tol, f"{at}: running_mean")
            close(bn.running_var, ref.running_var, tol, f"{at}: running_var")
            equal(bn.num_batches_tracked, ref.num_batches_tracked, f"{at}: num_batches_tracked")
            # Every rank holds bitwise the same running statistics.
            rm = WORLD.allgather(np.asarray(bn.running_var).tobytes())
            equal(len(set(rm)), 1, f"{at}: running_var identical on every rank")
    # Eval mode communicates nothing (track_running_stats=False: local batch
    # statistics, as PyTorch's SyncBatchNorm does in eval mode).
    bn.eval()
    ref.eval()
    xg = rng.standard_normal((n,) + LAYOUTS[convention]).astype(dtype)
    x = mine(xg, split(n, "even"))
    y = bn(x)
    bn.backward(np.ones_like(y))
    equal(comm.take(), [], f"{what}: eval-mode collectives")
    if ref.track_running_stats:
        close(y, ref(x), tol, f"{what}: eval-mode y")


def check_large_mean():
    """Mean 1e4, std 1e-2 in float32: no cancellation in the merged statistics."""
    rng = np.random.default_rng(7)
    xg = (1e4 + 1e-2 * rng.standard_normal((12, C, 6, 6))).astype(np.float32)
    sizes = split(12, "uneven")
    bn = numbn.SyncBatchNorm(C, comm=WORLD)
    y = bn(mine(xg, sizes))
    mean, var, _ = numbn._reference.batch_stats(xg, 1)
    want = (xg.astype(np.float64) - mean[None, :, None, None]) / np.sqrt(
        var[None, :, None, None] + 1e-5)
    close(y, mine(want, sizes), 1e-3, "large mean: y")
    close(bn.running_var, 0.9 + 0.1 * var * 432 / 431, 1e-6, "large mean: running_var")


def expect_error(what, exc_type, match, fn):
    try:
        fn()
    except exc_type as exc:
        if match not in str(exc):
            fail(f"{what}: message {str(exc)!r} lacks {match!r}")
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - recorded as a failure
        fail(f"{what}: raised {type(exc).__name__}: {exc}")
    else:
        fail(f"{what}: no error raised")
    return None


def check_bad_input():
    """Invalid input on one rank: every rank raises; the layer is unchanged and usable."""
    bn = numbn.SyncBatchNorm(C, comm=WORLD)
    rng = np.random.default_rng(3)
    good = rng.standard_normal((2 + RANK, C, 4)).astype(np.float32)
    last = SIZE - 1

    def bad(x_on_bad_rank, bad_rank=last):
        return lambda: bn(x_on_bad_rank if RANK == bad_rank else good)

    state = {k: np.copy(v) for k, v in bn.state_dict().items()}
    wrong_c = np.zeros((4, C + 1, 4), np.float32)
    expect_error("wrong C", ValueError, f"rank {last} of {SIZE}", bad(wrong_c))
    expect_error("wrong C message", ValueError, "channels", bad(wrong_c))
    expect_error("int dtype", TypeError, "rank 0", bad(good.astype(np.int32), 0))
    expect_error("not an array", TypeError, f"rank {last}", bad(good.tolist()))
    expect_error("1-D input", ValueError, "at least 2 dimensions", bad(np.zeros(4, np.float32)))
    expect_error("dtype mismatch", TypeError, "same dtype", bad(good.astype(np.float64)))
    expect_error("two bad ranks", ValueError, "failed",
                 lambda: bn(wrong_c if RANK in (0, last) else good))
    # One value per channel in all (rank 0 has one sample of one value; the rest none).
    one = np.zeros((1 if RANK == 0 else 0, C), np.float32)
    expect_error("one value in all", ValueError, "Expected more than 1 value per channel",
                 lambda: numbn.SyncBatchNorm(C, axis=1, comm=WORLD)(one))
    none = np.zeros((0, C, 4), np.float32)
    expect_error("empty everywhere", ValueError, "empty batch", lambda: bn(none))
    for k, v in bn.state_dict().items():
        close(v, state[k], 0.0, f"state {k} after failed forwards")
    # The collectives are still in step: a good forward, then a bad backward.
    y = bn(good)
    dy_bad = np.ones((9, C, 4), np.float32) if RANK == last else np.ones_like(y)
    expect_error("bad dy", ValueError, f"rank {last}", lambda: bn.backward(dy_bad))
    dx = bn.backward(np.ones_like(y))
    close(dx, np.zeros_like(dx), 1e-5, "dx of dy = 1 after a failed backward")
    equal(bn.num_batches_tracked, 1, "num_batches_tracked after the good forward")


def check_single_value_ranks():
    """Ranks with one value per channel, or none, are fine when the total is >= 2."""
    xg = np.arange(SIZE * C, dtype=np.float64).reshape(SIZE, C) ** 1.5
    sizes = [1] * SIZE
    ref = numbn.BatchNorm(C, convention="flax", dtype=np.float64)
    bn = numbn.SyncBatchNorm(C, convention="flax", dtype=np.float64, comm=WORLD)
    close(bn(mine(xg, sizes)), mine(ref(xg), sizes), 1e-9, "one sample per rank: y")
    dyg = np.cos(xg)
    close(bn.backward(mine(dyg, sizes)), mine(ref.backward(dyg), sizes), 1e-9,
          "one sample per rank: dx")


def check_frozen():
    if not hasattr(numbn.BatchNorm, "freeze"):
        SKIPPED.append("check_frozen (no BatchNorm.freeze)")
        return
    comm = Counting(WORLD)
    bn = numbn.SyncBatchNorm(C, comm=comm).freeze()
    y = bn(np.ones((RANK + 2, C), np.float32))
    bn.backward(np.ones_like(y))
    equal(comm.take(), [], "frozen layer collectives")


def check_recalibrate():
    """numbn.recalibrate on SyncBatchNorm layers: the population of every rank's batches."""
    if not hasattr(numbn, "recalibrate"):
        SKIPPED.append("check_recalibrate (no numbn.recalibrate)")
        return
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((n, C, 3)) * (1 + n) + n for n in (5, 8, 4)]
    ref = numbn.BatchNorm(C, dtype=np.float64)
    bn = numbn.SyncBatchNorm(C, dtype=np.float64, comm=WORLD)
    for layer, parts in ((ref, batches), (bn, [mine(b, split(len(b), "empty")) for b in batches])):
        with numbn.recalibrate(layer):
            for part in parts:
                layer(part)
    close(bn.running_mean, ref.running_mean, 1e-9, "recalibrate: running_mean")
    close(bn.running_var, ref.running_var, 1e-9, "recalibrate: running_var")
    equal(bn.num_batches_tracked, ref.num_batches_tracked, "recalibrate: num_batches_tracked")


def check_other_features():
    """Layers that differ in num_features across the ranks, each given input
    that fits it: every rank raises the same ValueError and the job goes on
    (MPI aborted it, or one rank read misaligned rows while another raised,
    and the job hung)."""
    bn = numbn.SyncBatchNorm(C + RANK, comm=WORLD)
    try:
        bn(np.ones((4, C + RANK), np.float32))
    except ValueError as exc:
        held = ", ".join(f"rank {r} {C + r}" for r in range(SIZE))
        equal(f"the same num_features; got {held}" in str(exc), True,
              f"other num_features: the message ({exc})")
    else:
        fail("other num_features: no error")
    equal(bn.num_batches_tracked, 0, "other num_features: nothing counted")


def check_cuda():
    """Device arrays (numba's; the simulator under NUMBA_ENABLE_CUDASIM=1): same results."""
    if "cuda" not in numbn.available_backends():
        SKIPPED.append("check_cuda (no cuda backend here; NUMBA_ENABLE_CUDASIM=1 gives one)")
        return
    from numba import cuda

    for dtype, relu in ((np.float64, None), (np.float32, "relu")):
        what = f"cuda {np.dtype(dtype).name} {relu}"
        kw = dict(dtype=np.float64 if dtype == np.float64 else np.float32, activation=relu)
        ref = numbn.BatchNorm(C, **kw)
        bn = numbn.SyncBatchNorm(C, comm=WORLD, backend="cuda", **kw)
        rng = np.random.default_rng(5)
        for step in range(2):
            sizes = split(7 + step, "empty")
            xg = rng.standard_normal((7 + step, C, 5)).astype(dtype)
            dyg = rng.standard_normal(xg.shape).astype(dtype)
            y_ref, dx_ref = ref(xg), None
            dx_ref = ref.backward(dyg)
            y = bn(cuda.to_device(np.ascontiguousarray(mine(xg, sizes))))
            dx = bn.backward(cuda.to_device(np.ascontiguousarray(mine(dyg, sizes))))
            equal(is_device_array(y) and is_device_array(dx), True, f"{what}: device arrays out")
            # As BatchNorm: parameters, statistics and gradients on the device
            # (they stayed NumPy arrays with more than one rank).
            held = (bn.weight, bn.running_mean, bn.running_var, bn.grad_weight, bn.grad_bias)
            equal(all(map(is_device_array, held)), True, f"{what}: layer arrays on the device")
            close(y.copy_to_host(), mine(y_ref, sizes), TOL[dtype], f"{what} step {step}: y")
            close(dx.copy_to_host(), mine(dx_ref, sizes), TOL[dtype], f"{what} step {step}: dx")
            close(bn.running_var.copy_to_host(), ref.running_var, TOL[dtype],
                  f"{what} step {step}: running_var")


CHECKS = [
    *(lambda c=c, d=d, k=k: check_matches(c, d, k)
      for c in LAYOUTS for d in (np.float64, np.float32) for k in ("uneven", "empty")),
    lambda: check_matches("torch", np.float64, "single", momentum=None),
    lambda: check_matches("keras", np.float64, "empty", activation="relu"),
    lambda: check_matches("torch", np.float32, "uneven", activation="relu", backend="numpy"),
    lambda: check_matches("paddle", np.float64, "empty", backend="numpy", steps=2),
    lambda: check_matches("torch", np.float64, "uneven", affine=False, steps=2),
    lambda: check_matches("flax", np.float64, "empty", track_running_stats=False, steps=2),
    lambda: check_matches("torch", np.float16, "uneven", steps=2),
    check_large_mean,
    check_single_value_ranks,
    check_bad_input,
    check_frozen,
    check_recalibrate,
    check_other_features,
    check_cuda,
]


def main() -> int:
    if SIZE < 2:
        print("run under mpiexec -n 2 (or more)", file=sys.stderr)
        return 2
    for check in CHECKS:
        try:
            check()
        except Exception:  # noqa: BLE001 - a rank out of step must not hang the others
            traceback.print_exc()
            sys.stderr.flush()
            WORLD.Abort(3)
    for line in FAILURES:
        print(line, file=sys.stderr)
    total = WORLD.allreduce(len(FAILURES))
    if RANK == 0:
        skipped = f", skipped: {'; '.join(SKIPPED)}" if SKIPPED else ""
        print(f"{len(CHECKS)} checks on {SIZE} ranks: {total} failure(s){skipped}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
