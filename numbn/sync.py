"""Batch Normalization synchronised across processes: :class:`SyncBatchNorm`.

Data-parallel training splits a batch over the ranks of an MPI communicator;
``SyncBatchNorm`` normalises every rank's part with the statistics of the
whole batch, so the result is that of one :class:`~numbn.BatchNorm` run on the
concatenated batch. mpi4py is imported only when a layer is made without a
communicator, never by ``import numbn``.

Communication, per training step (and once, at a layer's first synchronised
training forward, a small ``allgather`` of its ``num_features``: ranks whose
layers differ in C would send rows of different lengths below, which MPI
either truncates, aborting the job, or reads misaligned; every rank raises
instead):

* forward: one ``Allgather`` of ``(status, count, machine, mean[C], var[C])``
  from every rank (2C + 3 float64 values each), then every rank merges the per-rank
  ``(count, mean, M2)`` with Chan's formula, pairwise in rank order. Chan's
  merge is not one of MPI's reduction operations; an ``Allreduce`` of sums
  and sums of squares would bring back the E[x^2] - E[x]^2 cancellation the
  kernels avoid (``tests/mpi/run_sync_checks.py::check_large_mean``), and a
  stable ``Allreduce`` needs two rounds (the global mean, then the squared
  deviations about it). The allgather also gives every rank the same numbers
  in the same order, so their merged statistics, outputs and running
  statistics are bitwise identical, and its status word lets the ranks agree
  on validity in the same collective. Its size grows with the number of
  ranks, P (2C + 3) values in all, which stays small beside the batch.
  ``machine`` (:func:`_machine`) tells each rank which ranks share its
  machine, and so its last-level cache: below.
  PyTorch's SyncBatchNorm gathers its statistics the same way.
* backward: one ``Allreduce`` (sum) of ``(sum dy, sum dy * (x - mean),
  failed)`` (2C + 1 values): plain sums of per-rank sums, taken around the
  global mean, so nothing cancels.

Errors never leave a rank waiting: a rank whose input is invalid still takes
part in the step's collective, with a failure status; then every rank learns
which ranks failed and why (one more, small collective, only on this error
path) and raises the same error. Checks that need the global batch (fewer than
two values per channel across all ranks, ranks disagreeing on the dtype) are
made by every rank on the gathered table, identically.

The statistics are float64 host vectors whatever the backend, so the
collectives work on small NumPy buffers and need no CUDA-aware MPI; the
normalisation itself goes through the backend's engine, as in ``BatchNorm``
(device arrays: ``tests/mpi/run_sync_checks.py::check_cuda``).

Cost: the collectives take microseconds, but a synchronised step cannot use the
CPU backend's cache-fused kernels (statistics and normalisation of a channel
while its slab is in cache; sums and dx likewise), because the global
statistics arrive between the two passes: x crosses memory once more in the
forward and in the backward. The two-pass reductions make up for much of it by
reading memory in order (``_cpu._stats_outer``, ``_cpu._sums_outer``).
``benchmarks/sync_cost.py`` reports the two costs apart. Ranks on one machine
share its last-level cache, so the CPU kernels choose their stores by what all
of them write (``_cpu._stream``): at 2 ranks of (16, 64, 56, 56) float32 on the
2-core machine this was tuned on, each rank's 12 MiB output is below the
streaming threshold, but the two together are not, and streaming them made the
synchronised step 0.87 of the time (measured, ``benchmarks/sync_cost.py``).
"""

from __future__ import annotations

import hashlib
import socket
from functools import cache

import numpy as np

from . import _checks, _reference
from ._dispatch import resolve
from ._layout import Plan
from .functional import (
    _check_forward,
    _engine,
    _kernel_backward,
    _stats_dtype,
    _train,
)
from .layers import BatchNorm

__all__ = ["SyncBatchNorm"]

_DTYPE_BY_SIZE = {2: "float16", 4: "float32", 8: "float64"}
_FAILED = -1.0
# Error classes a failing rank's error is re-raised as on every rank.
_KINDS = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError}


def _kind(exc: BaseException) -> str:
    for name, cls in _KINDS.items():
        if isinstance(exc, cls):
            return name
    return "RuntimeError"


def _world():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("SyncBatchNorm needs mpi4py for its default communicator "
                          "(pip install 'numbn[mpi]'), or pass comm= explicitly") from exc
    return MPI.COMM_WORLD


@cache
def _machine() -> float:
    """This process's machine as a float64: 48 bits of a hash of its host
    name, exact in a float64, the same for every rank on the machine."""
    digest = hashlib.blake2b(socket.gethostname().encode(), digest_size=6).digest()
    return float(int.from_bytes(digest, "little"))


def chan_merge(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray):
    """Merge per-rank ``(count, mean, M2)`` rows into one, pairwise in rank order.

    Parameters
    ----------
    counts : ndarray (P,)
        Values per channel on each rank (0 for an empty rank).
    means, m2s : ndarray (P, C)
        Per-rank mean and sum of squared deviations from it (0 where empty).

    Returns
    -------
    count : int
    mean, m2 : ndarray (C,), float64

    Examples
    --------
    >>> import numpy as np
    >>> from numbn.sync import chan_merge
    >>> chan_merge(np.array([2, 0, 1]), np.array([[1.0], [0.0], [4.0]]),
    ...            np.array([[2.0], [0.0], [0.0]]))
    (3, array([2.]), array([8.]))
    """
    n = np.asarray(counts, np.float64)[:, None]
    mean = np.asarray(means, np.float64)
    m2 = np.asarray(m2s, np.float64)
    # A pairwise tree, not a left fold: rounding grows with log(P), not P
    # (tests/test_sync.py::test_chan_merge_equals_the_whole).
    with np.errstate(invalid="ignore"):  # NaN and inf pass silently, as in the kernels
        while n.shape[0] > 1:
            n, mean, m2 = _merge_pairs(n, mean, m2)
    return int(n[0, 0]), mean[0], m2[0]


def _merge_pairs(n, mean, m2):
    """One level of :func:`chan_merge`'s tree: rows 0 and 1, 2 and 3, ... merged."""
    k = n.shape[0] // 2 * 2
    na, nb = n[0:k:2], n[1:k:2]
    total = na + nb
    frac = np.divide(nb, total, out=np.zeros_like(total), where=total > 0)
    ma, mb = mean[0:k:2], mean[1:k:2]
    delta = mb - ma
    merged = (ma + delta * frac, m2[0:k:2] + m2[1:k:2] + delta * delta * (na * frac))
    # A rank's channel holding an infinity has an infinite mean, and the
    # update above is then inf - inf; the weighted mean gives what one
    # plain sum over the whole batch gives (+-inf, NaN with both signs).
    odd = ~(np.isfinite(ma) & np.isfinite(mb))
    if odd.any():
        merged = (np.where(odd, (na * ma + nb * mb) / total, merged[0]), merged[1])
    return (np.concatenate([total, n[k:]]), np.concatenate([merged[0], mean[k:]]),
            np.concatenate([merged[1], m2[k:]]))


class _Synced(tuple):
    """``BatchNorm._saved`` of a synchronised forward, with the global ``count``.

    The mark travels with the saved state itself, so whatever restores
    ``_saved`` (``numbn.recalibrate`` after an error) restores it too.
    """

    def __new__(cls, saved, count: int, shared: int):
        self = super().__new__(cls, saved)
        self.count, self.shared = count, shared  # shared: as _gather_stats's
        return self


class SyncBatchNorm(BatchNorm):
    """A :class:`~numbn.BatchNorm` whose training statistics cover every rank's batch.

    In training mode each rank's forward normalises its own batch with the
    mean and variance of the batch of every rank of ``comm`` together; ranks
    may hold different batch sizes, an empty batch included (that rank takes
    part in the collectives and gets an empty output). Outputs, running
    statistics (with the global count, so unbiased over the global batch for
    the torch convention) and ``dx`` equal those of one ``BatchNorm`` run on
    the concatenated batch; ``grad_weight`` and ``grad_bias`` are this rank's
    contribution (sum them over the ranks, as for any data-parallel gradient).
    Eval mode (and a frozen layer, see ``BatchNorm.freeze``) communicates
    nothing. With a communicator of one rank the layer is exactly ``BatchNorm``.

    Every rank must make the same calls in the same order (forward in the
    same mode, then backward), with the same ``num_features``, axis and
    dtype, as with any MPI collective. Invalid input on one rank makes every
    rank raise instead of waiting.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    comm : mpi4py communicator, optional
        The ranks to synchronise over; ``MPI.COMM_WORLD`` when omitted (mpi4py
        is imported then, and only then).
    **kwargs
        Every keyword of :class:`~numbn.BatchNorm` (``convention``,
        ``momentum``, ``eps``, ``axis``, ``affine``, ``track_running_stats``,
        ``dtype``, ``backend``, ``activation``), with the same meaning.

    Raises
    ------
    ImportError
        ``comm`` omitted and mpi4py not installed.
    TypeError
        ``comm`` is not an mpi4py communicator.
    ValueError
        As for :class:`~numbn.BatchNorm`.

    Examples
    --------
    Run under ``mpiexec -n 2 python script.py``; each rank passes its own
    part of the batch (here of different sizes):

    >>> import numpy as np, numbn
    >>> from mpi4py import MPI
    >>> comm = MPI.COMM_WORLD
    >>> bn = numbn.SyncBatchNorm(3, comm=comm)
    >>> x = np.random.default_rng(comm.rank).standard_normal((4 + comm.rank, 3, 8, 8))
    >>> y = bn(x.astype(np.float32))
    >>> dx = bn.backward(np.ones_like(y))
    >>> int(bn.num_batches_tracked)
    1
    """

    def __init__(self, num_features: int, *, comm=None, **kwargs):
        super().__init__(num_features, **kwargs)
        comm = _world() if comm is None else comm
        needed = ("Get_size", "Get_rank", "Allgather", "Allreduce", "allgather")
        if not all(hasattr(comm, name) for name in needed):
            raise TypeError(f"comm must be an mpi4py communicator, not {type(comm).__name__}")
        self.comm = comm

    # -- forward ------------------------------------------------------------

    def forward(self, x):
        """Normalise ``x``; in training mode with the statistics of every rank's batch.

        Parameters
        ----------
        x : array with ``num_features`` channels along ``self.axis``
            This rank's part of the batch; may have no values at all.

        Returns
        -------
        y : array of x's shape, dtype and kind.

        Raises
        ------
        TypeError, ValueError
            On every rank, when any rank's input is invalid (the message
            names the rank), when the ranks' dtypes differ, or when all the
            ranks together hold fewer than two values per channel. Nothing is
            changed then, but that :meth:`backward` needs a new forward (as
            :meth:`BatchNorm.forward`).
        """
        # Eval mode, a frozen layer (BatchNorm.freeze) and one rank: nothing to share.
        if not self.training or getattr(self, "_frozen", False) or self.comm.Get_size() == 1:
            return super().forward(x)
        self._saved = None  # as BatchNorm.forward: a forward that raises leaves nothing
        if self._agreed != self.num_features:
            self._agree_on_features()
        eng = None
        gathered = None  # what the collective gave, once it is behind us

        def combine(mean, var, count):
            nonlocal gathered
            gathered = ()  # joined, even if what follows raises
            gathered = self._gather_stats(eng.host(mean), eng.host(var), count,
                                          _checks.dtype_of(x).itemsize, x)
            return gathered

        try:
            _checks.input_array(x)
            if x.shape[_checks.channel_axis(self.axis, len(x.shape))] != self.num_features:
                raise ValueError(f"expected {self.num_features} channels on axis {self.axis}, "
                                 f"got input of shape {tuple(x.shape)}")
            axis, relu = _check_forward(x, self.weight, self.bias, self.axis, None,
                                        self.activation)
            self._check_running()
            eng = _engine(resolve(self.backend, x))
            self._place(x)  # device input: parameters and statistics to the device, as BatchNorm
            if _empty(x):  # take part in the collective; nothing to launch
                c = self.num_features
                mean, var, n, _ = combine(np.zeros(c), np.full(c, np.nan), 0)
                y = _empty_output(eng, x, axis)
            else:
                y, mean, var, n = _train(x, self.weight, self.bias, self.eps, axis,
                                         self.backend, None, relu, combine)
        except Exception as exc:
            if gathered is not None:  # the collective is behind us: the peers are not waiting
                raise
            self._gather_stats(None, None, 0, _FAILED, x, exc)  # raises on every rank
            raise  # not reached
        self._after_batch(x, mean, var, n, axis)  # with the global statistics and count
        self._saved = _Synced(self._saved, n, gathered[3])
        return y

    #: The ``num_features`` that every rank's layer was found to share
    #: (:meth:`_agree_on_features`); None until the first synchronised step.
    _agreed = None

    def _agree_on_features(self) -> None:
        """Check, on every rank alike, that all the ranks' layers have this
        layer's ``num_features``: the forward's collective sends ``2C + 3``
        values a rank, so with another C one rank read the others' rows
        misaligned (and uninitialised memory) while another failed or MPI
        aborted the job. One small pickled collective, at the first
        synchronised training forward (again if ``num_features`` changes)."""
        counts = self.comm.allgather(self.num_features)
        if any(c != counts[0] for c in counts):
            held = ", ".join(f"rank {r} {c}" for r, c in enumerate(counts))
            raise ValueError(f"SyncBatchNorm.forward: every rank's layer must have the same "
                             f"num_features; got {held}")
        self._agreed = self.num_features

    def _gather_stats(self, mean, var, count, status, x, exc=None):
        """The forward's one collective: ``(mean, var, count)`` of all ranks
        together, and ``shared``: the bytes that this machine's ranks write in
        the normalisation (``functional._train``)."""
        c = self.num_features
        row = np.zeros(2 * c + 3)
        row[0], row[1], row[2] = status, count, _machine()
        if count:
            row[3:3 + c], row[3 + c:] = mean, var
        table = np.empty((self.comm.Get_size(), 2 * c + 3))
        self.comm.Allgather(row, table)
        status, counts, machines = table[:, 0], table[:, 1], table[:, 2]
        if (status == _FAILED).any():
            self._raise_agreed("forward", exc)
        if (status != status[0]).any():
            held = ", ".join(f"rank {r} {_DTYPE_BY_SIZE.get(int(s), s)}"
                             for r, s in enumerate(status))
            raise TypeError(f"SyncBatchNorm.forward: every rank must pass the same dtype; "
                            f"got {held}")
        total = int(counts.sum())
        here = f"this rank's input size {tuple(x.shape)}"
        if total == 0:
            raise ValueError(f"cannot train on an empty batch: the {len(counts)} ranks "
                             f"together hold no values ({here})")
        if total == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got 1 "
                             f"value per channel over all {len(counts)} ranks ({here})")
        means = table[:, 3:3 + c]
        # An empty rank sends zeros; M2 = var * count recovers each rank's sum
        # of squared deviations, never a raw sum of squares
        # (tests/mpi/run_sync_checks.py::check_large_mean).
        m2s = table[:, 3 + c:] * counts[:, None]
        n, mean, m2 = chan_merge(counts, means, m2s)
        here_count = counts[machines == _machine()].sum()
        return mean, m2 / n, n, int(here_count) * c * int(status[0])

    # -- backward -----------------------------------------------------------

    def backward(self, dy):
        """Gradient with respect to the last forward's input (this rank's part).

        After a synchronised training forward, ``dx`` is that of the
        concatenated batch (one collective); ``grad_weight`` and ``grad_bias``
        are this rank's contribution. Otherwise this is ``BatchNorm.backward``.

        Parameters
        ----------
        dy : array of the last forward's input shape

        Returns
        -------
        dx : array of x's shape, dtype and kind.

        Raises
        ------
        RuntimeError
            When no forward came before.
        TypeError, ValueError
            On every rank, when any rank's ``dy`` is invalid (the message names
            the rank).
        """
        if not isinstance(self._saved, _Synced):
            return super().backward(dy)
        x, mean, invstd, _, axis = self._saved
        count = self._saved.count
        joined = False

        def combine(sum_g, sum_gx, _local_count):
            nonlocal joined
            joined = True
            glob_g, glob_gx = self._reduce_sums(eng.host(sum_g), eng.host(sum_gx))
            return glob_g, glob_gx, count, self._saved.shared

        try:
            _checks.same_shape(dy, x, "dy")
            name = resolve(self.backend, x)
            relu = _checks.activation(self.activation)
            dt = _stats_dtype(x)
            if _empty(x):  # take part in the collective; nothing to launch
                eng = _engine(name)
                dw = db = np.zeros(self.num_features)
                combine(dw, db, 0)
                dx = _empty_output(eng, x, axis)
            elif name == "numpy":
                eng = _engine("cpu")  # the host engine
                dx, dw, db = _numpy_backward(dy, x, mean.astype(dt), invstd.astype(dt),
                                             self.weight, self.bias, axis, relu, combine)
            else:
                eng = _engine(name)
                dx, dw, db = _kernel_backward(eng, dy, x, eng.like(mean, dt, x),
                                              eng.like(invstd, dt, x), self.weight, self.bias,
                                              True, axis, relu, combine)
        except Exception as exc:
            if joined:
                raise
            self._reduce_sums(None, None, exc)  # raises on every rank
            raise  # not reached
        if self.weight is None:
            dw = db = None
        else:
            wdt = _checks.dtype_of(self.weight)
            dw, db = eng.like(dw, wdt, self.weight), eng.like(db, wdt, self.weight)
        self.grad_weight, self.grad_bias = dw, db
        return dx

    def _reduce_sums(self, sum_g, sum_gx, exc=None):
        """The backward's one collective: per-channel sums over all ranks."""
        c = self.num_features
        buf = np.zeros(2 * c + 1)
        if exc is None:
            buf[:c], buf[c:2 * c] = sum_g, sum_gx
        else:
            buf[-1] = 1.0
        total = np.empty_like(buf)
        self.comm.Allreduce(buf, total)
        if total[-1] > 0:
            self._raise_agreed("backward", exc)
        return total[:c], total[c:2 * c]

    # -- errors -------------------------------------------------------------

    def _raise_agreed(self, phase, exc):
        """Raise, on every rank, the error of the first failing rank.

        Called by every rank once the step's collective has shown that some
        rank failed; one more (small, pickled) collective shares the messages.
        """
        info = None if exc is None else (_kind(exc), str(exc))
        infos = self.comm.allgather(info)
        failed = [r for r, i in enumerate(infos) if i is not None]
        first = failed[0]
        kind, message = infos[first]
        text = (f"SyncBatchNorm.{phase} failed on rank {first} of {self.comm.Get_size()}: "
                f"{message}")
        if len(failed) > 1:
            text += f" (ranks {', '.join(map(str, failed))} failed)"
        raise _KINDS[kind](text) from exc

    def __repr__(self) -> str:
        return "Sync" + super().__repr__()


def _empty(x) -> bool:
    # A rank with an empty batch skips the kernels: a zero-sized launch is an
    # error on a GPU (tests/mpi/run_sync_checks.py, split kind "empty").
    return int(np.prod(x.shape, dtype=np.int64)) == 0


def _empty_output(eng, x, axis):
    """An array of x's shape, dtype and kind, for an ``x`` with no values."""
    if isinstance(x, np.ndarray):
        return np.empty(x.shape, x.dtype)
    full, _ = eng.output(Plan.of(eng.adopt(x), axis), _checks.dtype_of(x), like=x)
    return eng.finish(full, None, x)


def _numpy_backward(dy, x, mean, invstd, weight, bias, axis, relu, combine):
    """The float64 reference backward with the sums taken over all ranks."""
    g = _reference._channels_last(dy, axis)
    flat = _reference._channels_last(x, axis)
    c = flat.shape[1]
    w = _reference._vector(weight, c, 1.0)
    mean = np.asarray(mean, np.float64)
    invstd = np.asarray(invstd, np.float64)
    xhat = (flat - mean) * invstd
    if relu:
        # Same mask as numbn._reference.backward.
        g = np.where(xhat * w + _reference._vector(bias, c, 0.0) > 0.0, g, 0.0)
    dbias = g.sum(axis=0)
    dweight = (g * xhat).sum(axis=0)
    glob_b, glob_w, n, _ = combine(dbias, dweight, flat.shape[0])
    dx = w * invstd * (g - glob_b / n - xhat * glob_w / n)
    return _reference._from_channels_last(dx, x, axis).astype(x.dtype), dweight, dbias
