"""Backend choice: names, defaults, the environment variable, device arrays,
and that importing numbn touches no GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import numbn
from numbn import _dispatch


def test_available_backends():
    names = numbn.available_backends()
    assert names[0] == "cpu" and names[-1] == "numpy"
    assert set(names) <= {"cpu", "cuda", "numpy"}


def test_set_backend_and_context_manager(rng):
    assert numbn.get_backend() == "auto"
    with numbn.set_backend("numpy"):
        assert numbn.get_backend() == "numpy"
        with numbn.set_backend("cpu"):
            assert numbn.get_backend() == "cpu"
        assert numbn.get_backend() == "numpy"
    assert numbn.get_backend() == "auto"
    numbn.set_backend("numpy")
    try:
        assert numbn.get_backend() == "numpy"
    finally:
        numbn.set_backend("auto")


def test_set_backend_rejects_unknown():
    with pytest.raises(ValueError, match="unknown backend"):
        numbn.set_backend("gpu")


def test_backend_used_is_the_one_asked(monkeypatch, rng):
    calls = []
    from numbn import _reference

    real = _reference.forward_train
    monkeypatch.setattr(_reference, "forward_train", lambda *a: calls.append(1) or real(*a))
    x = rng.standard_normal((4, 3))
    numbn.batch_norm_forward(x, backend="cpu")
    assert calls == []
    with numbn.set_backend("numpy"):
        numbn.batch_norm_forward(x)
    assert calls == [1]


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=300)


def test_environment_variable():
    r = _run("import numbn; print(numbn.get_backend())", NUMBN_BACKEND="numpy")
    assert r.stdout.strip() == "numpy", r.stderr


def test_environment_variable_unknown_is_an_error():
    """A NUMBN_BACKEND that names no backend: every call that takes the
    default raises a ValueError that names the variable, before anything is
    written, while the import and `numbn info` (which says so) still work
    (the import raised, and with it every command) and set_backend mends it."""
    code = """if True:
        import numpy as np, numbn
        x = np.ones((4, 3), np.float32)
        out = np.zeros_like(x)
        for call in (numbn.get_backend, lambda: numbn.batch_norm(x, training=True, out=out),
                     lambda: numbn.BatchNorm(3)(x)):
            try:
                call()
            except ValueError as exc:
                print(exc)
        assert not out.any()
        print(numbn.batch_norm(x, training=True, backend="cpu").shape)
        numbn.set_backend("auto")
        print(numbn.get_backend(), numbn.batch_norm(x, training=True).shape)
    """
    r = _run(code, NUMBN_BACKEND="quantum")
    want = ("unknown backend 'quantum' in the environment variable NUMBN_BACKEND; "
            "choose one of auto, cpu, cuda, numpy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [want] * 3 + ["(4, 3)", "auto (4, 3)"]
    r = subprocess.run([sys.executable, "-m", "numbn", "info"], capture_output=True, text=True,
                       env=dict(os.environ, NUMBN_BACKEND="quantum"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"default backend: none: {want}" in r.stdout


def test_import_touches_no_gpu_and_compiles_nothing():
    r = _run("import sys, numbn; print(sorted(m for m in sys.modules "
             "if m.startswith(('numba.cuda', 'numbn._cuda', 'cupy', 'torch', 'mpi4py'))))")
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_cuda_unavailable_is_a_clear_error(monkeypatch, rng):
    monkeypatch.setattr(_dispatch, "cuda_unavailable_reason", lambda: "no CUDA GPU was found")
    assert "cuda" not in numbn.available_backends()
    with pytest.raises(numbn.BackendUnavailableError, match="no CUDA GPU was found"):
        numbn.batch_norm_forward(rng.standard_normal((4, 3)), backend="cuda")
    assert issubclass(numbn.BackendUnavailableError, RuntimeError)


class _FakeDeviceArray:
    """Carries the CUDA array interface, as CuPy and numba device arrays do."""

    shape = (4, 3)
    dtype = np.dtype(np.float32)
    __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False),
                                "version": 3}


class _FakeDLPack:
    shape = (4, 3)
    dtype = np.dtype(np.float32)

    def __init__(self, device_type):
        self._device = device_type

    def __dlpack_device__(self):
        return (self._device, 0)


def test_device_arrays_are_recognised(monkeypatch):
    assert _dispatch.is_device_array(_FakeDeviceArray())
    assert _dispatch.is_device_array(_FakeDLPack(2))
    assert not _dispatch.is_device_array(_FakeDLPack(1))  # kDLCPU
    assert not _dispatch.is_device_array(np.ones(3))
    monkeypatch.setattr(_dispatch, "cuda_unavailable_reason", lambda: None)
    assert _dispatch.resolve("auto", _FakeDeviceArray()) == "cuda"
    assert _dispatch.resolve("auto", np.ones((2, 2))) == "cpu"
    with pytest.raises(TypeError, match="device array"):
        _dispatch.resolve("cpu", _FakeDeviceArray())


class _FakeTensorRequiringGrad:
    """As a PyTorch CUDA tensor that requires grad: its array interface raises."""

    __module__ = "torch"
    shape = (4, 3)
    dtype = np.dtype(np.float32)
    is_cuda = True

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires "
                           "grad. If gradients aren't required, use var.detach()")


def test_tensor_requiring_grad_is_a_device_array():
    """Seen on an H100: the RuntimeError escaped from the type check, where
    numbn reads such a tensor (an nn.Parameter weight) detached."""
    assert _dispatch.is_device_array(_FakeTensorRequiringGrad())
    cpu_tensor = _FakeTensorRequiringGrad()
    cpu_tensor.is_cuda = False
    assert not _dispatch.is_device_array(cpu_tensor)


@pytest.mark.parametrize("make", [
    lambda: numbn.BatchNorm(3),
    lambda: numbn.BatchNorm(3).eval(),
    lambda: numbn.BatchNorm(3, track_running_stats=False),
    lambda: numbn.SyncBatchNorm(3),
])
def test_layer_on_a_device_array_without_cuda(make, monkeypatch):
    """A layer given a device array where CUDA cannot run raises the
    functions' BackendUnavailableError, and nothing moves or changes (the
    layer used to copy its parameters to the device first, and raised the
    driver's own error)."""
    monkeypatch.setattr(_dispatch, "cuda_unavailable_reason", lambda: "no CUDA GPU was found")
    bn = make()
    before = bn.state_dict()
    with pytest.raises(numbn.BackendUnavailableError, match="no CUDA GPU was found"):
        bn(_FakeDeviceArray())
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    assert all(isinstance(getattr(bn, k), (np.ndarray, type(None)))
               for k in ("weight", "bias", "running_mean", "running_var"))
    with pytest.raises(TypeError, match="device array"):
        numbn.BatchNorm(3, backend="cpu")(_FakeDeviceArray())


@pytest.mark.parametrize("backend", ["auto", "cpu", "numpy"])
def test_device_out_or_dy_beside_numpy_x(backend, rng):
    """NumPy x with out= or dy in CUDA memory: a TypeError that names which,
    nothing written (Numba's own "can't unbox array" named neither)."""
    x = rng.standard_normal((4, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for call in (lambda: numbn.batch_norm(x, rm, rv, training=True, out=_FakeDeviceArray(),
                                          backend=backend),
                 lambda: numbn.batch_norm(x, rm, rv, out=_FakeDeviceArray(), backend=backend),
                 lambda: numbn.batch_norm_forward(x, out=_FakeDeviceArray(), backend=backend)):
        with pytest.raises(TypeError, match=r"out is a CUDA device array \(_FakeDeviceArray\) "
                                            "but x is a NumPy array"):
            call()
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    _, mean, invstd = numbn.batch_norm_forward(x)
    with pytest.raises(TypeError, match="dy is a CUDA device array"):
        numbn.batch_norm_backward(_FakeDeviceArray(), x, mean, invstd, backend=backend)
    bn = numbn.BatchNorm(3, backend=backend)
    bn(x)
    with pytest.raises(TypeError, match="dy is a CUDA device array"):
        bn.backward(_FakeDeviceArray())
    assert bn.grad_weight is None


def test_device_array_under_a_host_default_names_the_default(monkeypatch):
    """A device array under backend="auto" with the default set to a host
    backend: the message says the default chose it (it advised "use
    backend='cuda' or 'auto'", which the call had done)."""
    monkeypatch.setattr(_dispatch, "cuda_unavailable_reason", lambda: None)
    with numbn.set_backend("numpy"), pytest.raises(
            TypeError, match="the default backend 'numpy' \\(set_backend or NUMBN_BACKEND\\)"):
        _dispatch.resolve("auto", _FakeDeviceArray())


def test_unsupported_array_type():
    with pytest.raises(TypeError, match="NumPy array"):
        numbn.batch_norm_forward([[1.0, 2.0], [3.0, 4.0]])
