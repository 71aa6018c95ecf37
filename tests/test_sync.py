"""SyncBatchNorm: one rank is BatchNorm; several ranks equal BatchNorm on the whole batch.

Three layers of tests:

* one process: with a communicator of one rank the layer is exactly ``BatchNorm``
  (``MPI.COMM_SELF`` when mpi4py is installed, and a stand-in communicator);
* several ranks as threads of this process (``ThreadComm``, below): the
  synchronisation protocol, its errors included, without mpi4py; the
  ``"numpy"`` backend keeps Numba's parallel kernels out of concurrent threads;
* real MPI (``@pytest.mark.mpi``): ``tests/mpi/run_sync_checks.py`` and
  ``examples/mpi_train.py`` launched with ``mpiexec -n 2`` and ``-n 3``, under a
  timeout so that a hang fails instead of hanging the suite; once more with
  device arrays (a real GPU, or Numba's CUDA simulator).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbn
from benchmarks.sync_cost import Mirror
from numbn.sync import chan_merge

ROOT = Path(__file__).resolve().parents[1]
TOL64 = 1e-9  # "equal to one BatchNorm on the concatenated batch", float64
MPI_TIMEOUT_S = 240  # generous: a cold Numba cache compiles the kernels in every rank


# -- a communicator of threads ------------------------------------------------------


class ThreadWorld:
    """``size`` ranks as threads; every collective is a barrier-separated exchange."""

    def __init__(self, size: int):
        self.size = size
        self.slots: list = [None] * size
        # A timeout turns a protocol bug (a rank left waiting) into an error.
        self.barrier = threading.Barrier(size, timeout=20)
        self.calls: list[str] = []

    def run(self, fn):
        """``fn(comm)`` on every rank; per-rank results or exceptions, in rank order."""
        results: list = [None] * self.size

        def target(rank):
            try:
                results[rank] = fn(ThreadComm(self, rank))
            except Exception as exc:  # noqa: BLE001 - handed back to the test
                results[rank] = exc

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a rank hung"
        return results


class ThreadComm:
    """The part of mpi4py's ``Comm`` that SyncBatchNorm uses, over a ThreadWorld."""

    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank = world, rank

    def Get_size(self):
        return self.world.size

    def Get_rank(self):
        return self.rank

    def _exchange(self, name, obj):
        w = self.world
        if self.rank == 0:
            w.calls.append(name)
        w.slots[self.rank] = obj
        w.barrier.wait()
        out = list(w.slots)
        w.barrier.wait()
        return out

    def Allgather(self, send, recv):
        recv[...] = np.stack(self._exchange("Allgather", np.array(send)))

    def Allreduce(self, send, recv):
        recv[...] = np.sum(self._exchange("Allreduce", np.array(send)), axis=0)

    def allgather(self, obj):
        return self._exchange("allgather", obj)


# -- one rank: exactly BatchNorm ----------------------------------------------------


def _comm_self():
    mpi = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed (numbn[mpi])")
    return mpi.COMM_SELF


COMMS = {"COMM_SELF": _comm_self, "one thread": lambda: ThreadComm(ThreadWorld(1), 0)}
SHAPES = {"torch": (6, 3, 4, 5), "keras": (6, 4, 5, 3), "paddle": (6, 3, 7), "flax": (6, 3)}


@pytest.mark.parametrize("comm", COMMS)
@pytest.mark.parametrize("convention", SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_one_rank_is_batchnorm(comm, convention, dtype):
    comm = COMMS[comm]()
    kw = dict(convention=convention, activation="relu" if dtype == np.float32 else None)
    ref, bn = numbn.BatchNorm(3, **kw), numbn.SyncBatchNorm(3, comm=comm, **kw)
    rng = np.random.default_rng(1)
    for _ in range(2):
        x = rng.standard_normal(SHAPES[convention]).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        np.testing.assert_array_equal(bn(x), ref(x))
        np.testing.assert_array_equal(bn.backward(dy), ref.backward(dy))
        for key, value in ref.state_dict().items():
            np.testing.assert_array_equal(bn.state_dict()[key], value)
        np.testing.assert_array_equal(bn.grad_weight, ref.grad_weight)
        np.testing.assert_array_equal(bn.grad_bias, ref.grad_bias)
    bn.eval()
    ref.eval()
    np.testing.assert_array_equal(bn(x), ref(x))


def test_one_rank_communicates_nothing_and_errors_like_batchnorm():
    world = ThreadWorld(1)
    bn = numbn.SyncBatchNorm(3, comm=ThreadComm(world, 0))
    bn.backward(np.ones_like(bn(np.ones((4, 3), np.float32))))
    assert world.calls == []
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        bn(np.ones((0, 3), np.float32))
    assert repr(bn).startswith("SyncBatchNorm(3, convention='torch'")


def test_default_comm_is_comm_world():
    mpi = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed (numbn[mpi])")
    assert numbn.SyncBatchNorm(2).comm is mpi.COMM_WORLD


def test_import_does_not_import_mpi4py():
    code = "import sys, numbn; assert 'mpi4py' not in sys.modules, 'mpi4py imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_mpi4py_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match="needs mpi4py"):
        numbn.SyncBatchNorm(3)
    numbn.SyncBatchNorm(3, comm=ThreadComm(ThreadWorld(1), 0))  # an explicit comm needs none


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match="mpi4py communicator"):
        numbn.SyncBatchNorm(3, comm=object())


# -- Chan's merge ---------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=7).filter(lambda s: sum(s) > 0),
       st.integers(0, 2**32 - 1))
def test_chan_merge_equals_the_whole(sizes, seed):
    x = 1e3 + np.random.default_rng(seed).standard_normal((sum(sizes), 4))
    parts = np.split(x, np.cumsum(sizes)[:-1])
    means = np.array([p.mean(0) if len(p) else np.zeros(4) for p in parts])
    m2s = np.array([((p - p.mean(0)) ** 2).sum(0) if len(p) else np.zeros(4) for p in parts])
    n, mean, m2 = chan_merge(np.array(sizes), means, m2s)
    assert n == len(x)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(m2, ((x - x.mean(0)) ** 2).sum(0), rtol=1e-9)


@pytest.mark.parametrize("sizes", [(3, 4), (0, 5, 2), (4, 0), (1, 1, 1, 1, 1)])
def test_chan_merge_keeps_an_infinite_mean(sizes):
    """A rank whose channel holds an infinity has an infinite mean; the merge
    gives the whole batch's mean (+inf, -inf, NaN with both signs or a NaN),
    not the NaN of inf - inf. Column 0 is finite, for comparison."""
    x = np.random.default_rng(0).standard_normal((sum(sizes), 6))
    last = sum(sizes) - 1
    x[0, 1] = np.inf
    x[last, 2] = np.inf
    x[0, 3] = np.inf
    x[last, 3] = -np.inf
    x[last, 4] = np.nan
    x[0, 5], x[last, 5] = -np.inf, -np.inf
    parts = np.split(x, np.cumsum(sizes)[:-1])
    with np.errstate(invalid="ignore"):
        means = np.array([p.mean(0) if len(p) else np.zeros(6) for p in parts])
        m2s = np.array([((p - p.mean(0)) ** 2).sum(0) if len(p) else np.zeros(6)
                        for p in parts])
        whole = x.mean(0)
    n, mean, m2 = chan_merge(np.array(sizes), means, m2s)
    np.testing.assert_array_equal(mean[1:], whole[1:])
    np.testing.assert_allclose(mean[0], whole[0], rtol=1e-13)
    assert np.isnan(m2[1:]).all()


# -- several ranks as threads ---------------------------------------------------------


def _slices(sizes):
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("convention", SHAPES)
@pytest.mark.parametrize("sizes", [(2, 4), (0, 5, 1)], ids=["uneven", "empty-rank"])
def test_threads_equal_batchnorm_on_the_whole_batch(convention, sizes):
    world = ThreadWorld(len(sizes))
    rng = np.random.default_rng(2)
    kw = dict(convention=convention, dtype=np.float64, backend="numpy")
    ref = numbn.BatchNorm(3, **kw)
    layers = [numbn.SyncBatchNorm(3, comm=ThreadComm(world, r), **kw)
              for r in range(world.size)]
    ref.weight[...] = rng.uniform(0.5, 2, 3)
    for bn in layers:
        bn.weight[...] = ref.weight
    for step in range(2):
        x = rng.standard_normal((sum(sizes),) + SHAPES[convention][1:]) * 3 + 2
        dy = rng.standard_normal(x.shape)
        y_ref, dx_ref = ref(x), ref.backward(dy)
        world.calls.clear()

        def run(comm, x=x, dy=dy):
            bn, part = layers[comm.rank], _slices(sizes)[comm.rank]
            return bn(x[part]), bn.backward(dy[part])

        results = world.run(run)
        # The first step also checks that the ranks' layers agree on C.
        assert world.calls == ["allgather"] * (step == 0) + ["Allgather", "Allreduce"]
        for (y, dx), part in zip(results, _slices(sizes), strict=True):
            np.testing.assert_allclose(y, y_ref[part], rtol=TOL64, atol=TOL64)
            np.testing.assert_allclose(dx, dx_ref[part], rtol=TOL64, atol=TOL64)
        for name in ("grad_weight", "grad_bias"):
            total = sum(getattr(bn, name) for bn in layers)
            np.testing.assert_allclose(total, getattr(ref, name), rtol=TOL64, atol=TOL64)
        for bn in layers:
            np.testing.assert_allclose(bn.running_var, ref.running_var, rtol=TOL64)
            np.testing.assert_allclose(bn.running_mean, ref.running_mean, atol=TOL64)
            assert bn.num_batches_tracked == ref.num_batches_tracked


@pytest.mark.parametrize("sizes", [(2, 4), (0, 5, 1)], ids=["uneven", "empty-rank"])
def test_threads_running_mean_of_an_infinity_as_batchnorm(sizes):
    """A channel holding +inf on one rank, another -inf on one and +inf on
    another: the running means are those of BatchNorm on the whole batch
    (+inf, NaN), not NaN from the merge's inf - inf."""
    world = ThreadWorld(len(sizes))
    x = np.random.default_rng(3).standard_normal((sum(sizes), 3))
    x[1, 1] = np.inf
    x[0, 2], x[-1, 2] = -np.inf, np.inf
    ref = numbn.BatchNorm(3, backend="numpy")
    ref(x)
    layers = [numbn.SyncBatchNorm(3, comm=ThreadComm(world, r), backend="numpy")
              for r in range(world.size)]
    world.run(lambda comm: layers[comm.rank](x[_slices(sizes)[comm.rank]]))
    assert np.isposinf(ref.running_mean[1]) and np.isnan(ref.running_mean[2])
    for bn in layers:
        np.testing.assert_array_equal(bn.running_mean[1:], ref.running_mean[1:])
        np.testing.assert_allclose(bn.running_mean[0], ref.running_mean[0], rtol=TOL64)


def test_threads_eval_mode_communicates_nothing():
    world = ThreadWorld(2)
    layers = [numbn.SyncBatchNorm(3, comm=ThreadComm(world, r), backend="numpy").eval()
              for r in range(2)]
    world.run(lambda comm: layers[comm.rank].backward(layers[comm.rank](np.ones((2, 3)))))
    assert world.calls == []


@pytest.mark.parametrize("case, kind, match", [
    ("wrong C", ValueError, "failed on rank 1 of 2: expected 3 channels"),
    ("int dtype", TypeError, "failed on rank 1 of 2: x must be float16"),
    ("dtype mismatch", TypeError, "every rank must pass the same dtype"),
    ("one value in all", ValueError, "Expected more than 1 value per channel"),
])
def test_threads_bad_input_on_one_rank_raises_everywhere(case, kind, match):
    world = ThreadWorld(2)
    layers = [numbn.SyncBatchNorm(3, comm=ThreadComm(world, r), backend="numpy")
              for r in range(2)]
    good = np.ones((4, 3, 2), np.float32)
    bad = {"wrong C": np.ones((4, 2, 2), np.float32), "int dtype": np.ones((4, 3, 2), int),
           "dtype mismatch": np.ones((4, 3, 2)), "one value in all": np.ones((1, 3))}[case]
    if case == "one value in all":
        good = np.ones((0, 3))
    world.run(lambda comm: layers[comm.rank](np.full((4, 3, 2), comm.rank, np.float32)))
    means = [bn.running_mean.copy() for bn in layers]
    results = world.run(lambda comm: layers[comm.rank](bad if comm.rank == 1 else good))
    for exc in results:
        assert isinstance(exc, kind), exc
        assert match in str(exc)
    for bn, mean in zip(layers, means, strict=True):
        assert bn.num_batches_tracked == 1
        np.testing.assert_array_equal(bn.running_mean, mean)
        # The good forward before is not what backward() differentiates now.
        with pytest.raises(RuntimeError, match="last one raised"):
            bn.backward(np.ones((4, 3, 2), np.float32))


@pytest.mark.parametrize("features", [(3, 2), (2, 3), (3, 3, 4)])
def test_threads_layers_with_other_channel_counts_raise_everywhere(features):
    """Ranks whose layers differ in num_features, each given input that fits
    its own layer: every rank raises the same error, nothing hangs and
    nothing changes (under MPI one rank returned statistics read from
    misaligned rows while another raised a dtype error, then the job hung;
    the other way round MPI aborted it)."""
    world = ThreadWorld(len(features))
    layers = [numbn.SyncBatchNorm(c, comm=ThreadComm(world, r), backend="numpy")
              for r, c in enumerate(features)]
    results = world.run(lambda comm: layers[comm.rank](np.ones((4, features[comm.rank]))))
    held = ", ".join(f"rank {r} {c}" for r, c in enumerate(features))
    for exc in results:
        assert isinstance(exc, ValueError), exc
        assert f"must have the same num_features; got {held}" in str(exc)
    assert world.calls == ["allgather"]
    for bn in layers:
        assert bn.num_batches_tracked == 0 and bn._saved is None
        np.testing.assert_array_equal(bn.running_mean, 0)


def test_threads_bad_dy_on_one_rank_raises_everywhere():
    world = ThreadWorld(2)
    layers = [numbn.SyncBatchNorm(3, comm=ThreadComm(world, r), backend="numpy")
              for r in range(2)]

    def step(comm):
        bn = layers[comm.rank]
        y = bn(np.arange(12.0).reshape(4, 3) + comm.rank)
        try:
            bn.backward(y[:1] if comm.rank == 0 else y)
        except ValueError as exc:
            return str(exc), bn.backward(y)  # still in step with the other rank
        return None, None

    for message, dx in world.run(step):
        assert message.startswith("SyncBatchNorm.backward failed on rank 0 of 2: dy must have")
        assert dx.shape == (4, 3)


# -- the stores follow what the ranks of one machine write ------------------------------


class Elsewhere(Mirror):
    """:class:`benchmarks.sync_cost.Mirror` with the other ranks each on a
    machine of its own."""

    def Allgather(self, send, recv):
        super().Allgather(send, recv)
        recv[1:, 2] += np.arange(1, self.size)  # the machine column (numbn.sync._gather_stats)


@pytest.mark.parametrize("axis", [1, -1], ids=["runs", "channels-last"])
@pytest.mark.parametrize("elsewhere", [False, True], ids=["one machine", "two machines"])
def test_stores_follow_the_machine_s_ranks(monkeypatch, axis, elsewhere):
    """Two ranks on one machine write twice this rank's output between them:
    the CPU kernels judge their non-temporal stores by that (numbn._cpu._stream),
    and the results stay BatchNorm's."""
    from numbn import _config, _cpu

    x = np.random.default_rng(3).standard_normal((4, 8, 6, 64)).astype(np.float32)
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    monkeypatch.setattr(_config, "CPU_STREAM_MIN_BYTES", x.nbytes * 3 // 2)
    judged = []
    stream = _cpu._stream

    def spy(y, *read, shared=0, **least):
        judged.append(shared)
        return stream(y, *read, shared=shared, **least)

    monkeypatch.setattr(_cpu, "_stream", spy)
    comm = Elsewhere(2) if elsewhere else Mirror(2)
    bn = numbn.SyncBatchNorm(x.shape[axis], comm=comm, axis=axis,
                             backend="cpu")
    ref = numbn.BatchNorm(x.shape[axis], axis=axis, backend="cpu")
    y, dx = bn(x), bn.backward(dy)
    assert judged == [x.nbytes if elsewhere else 2 * x.nbytes] * 2  # normalise, then dx
    assert (judged[0] >= _config.CPU_STREAM_MIN_BYTES) is not elsewhere  # streamed on one
    np.testing.assert_allclose(y, ref(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref.backward(dy), rtol=1e-4, atol=1e-5)


# -- real MPI ---------------------------------------------------------------------------


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _launch(n: int, script: Path, **extra_env: str) -> str:
    """Run ``script`` on ``n`` ranks; fail on a non-zero exit or a hang."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (numbn[mpi])")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the Python interpreter or on PATH")
    # Not the variables of an MPI job this test may itself run in; one Numba
    # thread per rank, as the ranks share the cores.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL"))}
    env["NUMBA_NUM_THREADS"] = "1"
    env.update(extra_env)
    cmd = [mpiexec, "-n", str(n), sys.executable, "-W", "error", str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=MPI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {MPI_TIMEOUT_S} s (a hang?):\n{out}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{out}"
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_sync_checks(n):
    out = _launch(n, ROOT / "tests" / "mpi" / "run_sync_checks.py")
    assert f"on {n} ranks: 0 failure(s)" in out


@pytest.mark.mpi
@pytest.mark.gpu
def test_mpi_sync_checks_device_arrays():
    """The same checks, ``check_cuda`` included: on the GPU, or Numba's CUDA simulator."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (numbn[cuda])")
    real_gpu = "cuda" in numbn.available_backends()
    out = _launch(2, ROOT / "tests" / "mpi" / "run_sync_checks.py",
                  **({} if real_gpu else {"NUMBA_ENABLE_CUDASIM": "1"}))
    assert "on 2 ranks: 0 failure(s)" in out
    assert "check_cuda" not in out, out


@pytest.mark.mpi
def test_mpi_train_example():
    out = _launch(2, ROOT / "examples" / "mpi_train.py")
    assert "matches the single-process run" in out
