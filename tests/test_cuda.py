"""The ``"cuda"`` backend against the float64 reference.

Run on a GPU, or without one on Numba's CUDA simulator (tiny shapes, launch
sizes shrunk so that several blocks, splits and grid-stride steps happen)::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda.py -q

The simulator must be switched on before numba is imported, so a plain
``pytest`` run (no GPU, no simulator) skips the backend tests with the reason;
the tests of the "unavailable" errors and the compile check of the GPU-only
code path (warp shuffles) run there.
"""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import LAYOUTS, TINY_BIASES, assert_mask_follows_output, close, make

import numbn
from numbn import _config, _cuda, _dispatch
from numbn import _reference as ref

REASON = _dispatch.cuda_unavailable_reason()
requires_cuda = pytest.mark.skipif(
    REASON is not None,
    reason=f"cuda backend unavailable: {REASON}. Without a GPU, run "
           "NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda.py")
pytestmark = pytest.mark.gpu


def _simulator() -> bool:
    import numba

    return bool(numba.config.ENABLE_CUDASIM)


@pytest.fixture(autouse=True)
def tiny_launches(monkeypatch):
    """Launch sizes shrunk so tiny inputs still run several blocks per channel,
    split inner runs, grid-stride and take both kernel regimes."""
    monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", 8 if _simulator() else 32)
    monkeypatch.setattr(_config, "CUDA_ELEMENTS_PER_BLOCK", 12)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS_PER_CHANNEL", 3)
    monkeypatch.setattr(_config, "CUDA_CHANNEL_MAJOR_MIN_INNER", 4)
    monkeypatch.setattr(_config, "CUDA_MAX_GRID_BLOCKS", 3)


@pytest.fixture(autouse=True, scope="module")
def fast_simulator():
    """The simulator runs a block's threads as Python threads that poll each
    other at ``syncthreads``; a shorter switch interval makes that faster."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(before)


def _dev(a):
    from numba import cuda

    return cuda.to_device(a)


def _host(a):
    return a.copy_to_host()


def _to_device_layout(a):
    """``a`` on the device with ``a``'s strides: a transposed, sliced or
    cropped view stays such a view (of a device copy of its base)."""
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    if base is a or not base.flags.c_contiguous:
        return _cuda.Device.adopt(a)  # a copy in a's memory order
    start = (a.__array_interface__["data"][0] - base.__array_interface__["data"][0])
    flat = _dev(base.reshape(-1))[start // a.itemsize:]
    return _cuda._strided(flat, a.shape, a.strides)


# The table ---------------------------------------------------------------------

#: (shape, axis) for tiny_launches (8 threads a block in the simulator):
#: channel-major with inner runs longer than a block (split in segments),
#: shorter than a block (rows per iteration), row-major channels-last, 2-D,
#: short inner runs, a batch-axis channel, and inputs long enough for the
#: loops that load four values at a time.
SHAPES = [
    ((3, 3, 2, 11), 1),   # channel-major, inner 22 > 2 blocks of 8: elementwise segments
    ((5, 2, 4), 1),       # channel-major, inner 4: two rows per block iteration
    ((1, 2, 3, 8), 1),    # channel-major, one row: a reduction split in segments
    ((2, 3, 2, 3), -1),   # channels-last: row-major, inner 1
    ((7, 5), 1),          # 2-D: row-major
    ((5, 3, 2), 1),       # row-major with an inner run of 2
    ((3, 4, 5), 0),       # channel axis first
    ((2, 3, 70), 1),      # channel-major, long runs: four loads at a time, then the rest
    ((40, 3), 1),         # 2-D, many rows: four rows at a time, then the rest
]
DT = [np.float16, np.float32, np.float64]
LAYOUT_NAMES = ["contiguous", "transposed", "sliced", "cropped"]
CASES = [(d, s, a, lay) for d in DT for (s, a) in SHAPES for lay in LAYOUT_NAMES
         if lay != "cropped" or s == (3, 3, 2, 11)]


def _ids(case):
    d, s, a, lay = case
    return f"{np.dtype(d).name}-{'x'.join(map(str, s))}-axis{a}-{lay}"


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_table(case, rng):
    """Training forward, running statistics, eval forward and both backwards
    of device arrays (same layout as the NumPy case) against the reference."""
    dtype, shape, axis, layout = case
    c = shape[axis]
    x = LAYOUTS[layout](make(rng, shape, dtype))
    dy = LAYOUTS[layout](make(rng, shape, dtype, 0.0, 1.0))
    pdt = np.float32 if dtype == np.float16 else dtype
    w, b = make(rng, c, pdt, 1.0, 0.5), make(rng, c, pdt, 0.0, 0.5)
    relu = "relu" if dtype == np.float32 else None
    xd, dyd = _to_device_layout(x), _to_device_layout(dy)
    wd, bd = _dev(w), _dev(b)

    y, mean, invstd = numbn.batch_norm_forward(xd, wd, bd, axis=axis, activation=relu)
    y_ref, mean_ref, invstd_ref, var_ref, n = ref.forward_train(x, w, b, 1e-5, axis, relu)
    assert type(y) is type(xd) and y.dtype == x.dtype and tuple(y.shape) == x.shape
    close(_host(y), y_ref, dtype, err="y")
    close(_host(mean), mean_ref, dtype, scale=2.0, err="mean")
    close(_host(invstd), invstd_ref, dtype, err="invstd")
    np.testing.assert_array_equal(_host(xd), x)

    rm, rv = _dev(np.full(c, 0.3, np.float32)), _dev(np.full(c, 1.7, np.float32))
    numbn.batch_norm(xd, rm, rv, wd, bd, training=True, momentum=0.25, axis=axis)
    close(_host(rm), 0.75 * 0.3 + 0.25 * mean_ref, np.float32, err="running_mean")
    close(_host(rv), 0.75 * 1.7 + 0.25 * var_ref * n / (n - 1), np.float32, scale=4.0,
          err="running_var")

    y = numbn.batch_norm(xd, rm, rv, wd, bd, axis=axis, activation=relu)
    close(_host(y), ref.normalize(x, _host(rm), _host(rv), w, b, 1e-5, axis, relu), dtype,
          err="eval y")

    scale = np.sqrt(x.size // c)  # dweight, dbias: sums of N*H*W values
    for training in (True, False):
        dx, dw, db = numbn.batch_norm_backward(dyd, xd, mean, invstd, wd, bias=bd,
                                               training=training, axis=axis, activation=relu)
        dx_ref, dw_ref, db_ref = ref.backward(dy, x, _host(mean), _host(invstd), w, training,
                                              axis, b, relu)
        assert type(dx) is type(xd) and dx.dtype == x.dtype and dw.dtype == w.dtype
        close(_host(dx), dx_ref, dtype, scale=2.0, err=f"dx training={training}")
        close(_host(dw), dw_ref, dtype, scale=scale, err="dweight")
        close(_host(db), db_ref, dtype, scale=scale, err="dbias")


@requires_cuda
@pytest.mark.parametrize("shape,axis", [((4, 2, 16), 1), ((16, 3), 1)])
def test_large_mean_small_std(shape, axis, rng):
    """float32, mean 1e4, std 1e-2: no E[x^2] - E[x]^2 cancellation, and a mean
    kept beyond float32's resolution (1e-3 at 1e4)."""
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    y, mean, invstd = numbn.batch_norm_forward(_dev(x), axis=axis, eps=0.0)
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, eps=0.0, axis=axis)
    np.testing.assert_allclose(_host(invstd), invstd_ref, rtol=1e-4)
    np.testing.assert_allclose(_host(y), y_ref, atol=1e-3)


@requires_cuda
def test_nan_confined_to_channel(rng):
    x = make(rng, (4, 3, 6), np.float32)
    x[1, 1, 2] = np.nan
    y, mean, _ = numbn.batch_norm_forward(_dev(x))
    y = _host(y)
    assert np.isnan(y[:, 1]).all() and np.isfinite(np.delete(y, 1, axis=1)).all()
    assert np.isnan(_host(mean)[1])


@requires_cuda
@pytest.mark.parametrize("shape,axis", [((3, 3, 2, 11), 1), ((2, 3, 2, 3), -1), ((7, 3), 1)])
@pytest.mark.parametrize("values", [(np.inf,), (-np.inf, -np.inf), (np.inf, -np.inf)])
@pytest.mark.parametrize("where", ["first", "last"])
def test_infinity_gives_the_mean_of_the_cpu_backend(shape, axis, values, where, rng):
    """A channel holding +inf has mean +inf (its variance NaN), as on the
    "cpu" backend and in PyTorch; the shifted sums alone made it NaN. The
    running mean that a training step leaves follows it."""
    x = make(rng, shape, np.float32)
    channel = np.moveaxis(x, axis, 0)[1]
    at = 0 if where == "first" else channel.size - len(values)
    for k, v in enumerate(values):
        channel[np.unravel_index(at + k, channel.shape)] = v
    _, mean, invstd = numbn.batch_norm_forward(_dev(x), axis=axis)
    _, cpu_mean, cpu_invstd = numbn.batch_norm_forward(x, axis=axis, backend="cpu")
    np.testing.assert_array_equal(_host(mean)[1], cpu_mean[1])  # inf as inf, NaN as NaN
    assert np.isnan(_host(invstd)[1]) and np.isnan(cpu_invstd[1])
    close(_host(mean)[[0, 2]], cpu_mean[[0, 2]], np.float32)
    bn = numbn.BatchNorm(3, axis=axis)
    bn(_dev(x))
    np.testing.assert_array_equal(_host(bn.running_mean)[1], np.float32(0.1 * cpu_mean[1]))


@requires_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", [((2, 5, 8), 1), ((6, 5), 1)])
def test_float16_relu_mask_is_that_of_the_stored_output(shape, axis, training, rng):
    """float16 x under the fused ReLU: the backward passes the gradient
    exactly where the forward's float16 output is positive, as the "cpu"
    backend and PyTorch (a ReLU input in (0, 2**-25] is stored as 0)."""
    x = np.zeros(shape, np.float16)  # every x is the mean: the ReLU's input is the bias
    c = shape[axis]
    b = np.array(TINY_BIASES, np.float32)
    w, rm, rv = np.ones(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)
    dy = make(rng, shape, np.float16, 0.0, 1.0)
    kw = dict(axis=axis, activation="relu")
    if training:
        y, mean, invstd = numbn.batch_norm_forward(_dev(x), _dev(w), _dev(b), **kw)
    else:
        y = numbn.batch_norm(_dev(x), _dev(rm), _dev(rv), _dev(w), _dev(b), **kw)
        mean, invstd = _dev(rm), _dev((1 / np.sqrt(rv + 1e-5)).astype(np.float32))
    dx, dw, db = numbn.batch_norm_backward(_dev(dy), _dev(x), mean, invstd, _dev(w),
                                           bias=_dev(b), training=training, **kw)
    assert_mask_follows_output(_host(y), _host(dx), _host(db), dy, axis, training)


@requires_cuda
def test_numpy_input(rng):
    """NumPy in with backend="cuda": copied to the device and back; "auto"
    keeps NumPy on the CPU (under the simulator too)."""
    x = _transposed_nchw(make(rng, (3, 2, 5, 4), np.float32))
    y = numbn.batch_norm_forward(x, backend="cuda")[0]
    assert isinstance(y, np.ndarray)
    assert np.argsort(y.strides).tolist() == np.argsort(x.strides).tolist()
    close(y, ref.forward_train(x)[0], np.float32)
    assert _dispatch.resolve("auto", x) == "cpu"
    assert _dispatch.resolve("auto", _dev(np.ascontiguousarray(x))) == "cuda"
    out = np.zeros_like(x)
    assert numbn.batch_norm(x, training=True, backend="cuda", out=out) is out
    close(out, y, np.float32)


def _transposed_nchw(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "cropped"])
def test_out_on_device(layout, rng):
    x = LAYOUTS[layout](make(rng, (3, 3, 2, 5), np.float32))
    expected = ref.forward_train(x)[0]
    xd = _to_device_layout(x)
    assert numbn.batch_norm(xd, training=True, out=xd) is xd  # in place
    close(_host(xd), expected, np.float32)
    out = _to_device_layout(LAYOUTS[layout](np.zeros_like(x)))
    assert numbn.batch_norm(_to_device_layout(x), training=True, out=out) is out
    close(_host(out), expected, np.float32)


# The layer ---------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_layer_on_device(convention, rng):
    """Parameters and running statistics move to the device on the first device
    forward and stay there; results match the same layer on the reference."""
    from numbn._cuda import _is_numba

    shape = (4, 3, 5) if convention == "torch" else (4, 5, 3)
    dev_bn = numbn.BatchNorm(3, convention=convention)
    cpu_bn = numbn.BatchNorm(3, convention=convention, backend="numpy")
    for step in range(2):
        x = make(rng, shape, np.float32)
        dy = make(rng, shape, np.float32, 0.0, 1.0)
        y = dev_bn(_dev(x))
        assert _is_numba(y) and _is_numba(dev_bn.running_mean) and _is_numba(dev_bn.weight)
        close(_host(y), cpu_bn(x), np.float32, err=f"y step {step}")
        dx = dev_bn.backward(_dev(dy))
        assert _is_numba(dx) and _is_numba(dev_bn.grad_weight)
        close(_host(dx), cpu_bn.backward(dy), np.float32, scale=2.0, err="dx")
        close(_host(dev_bn.grad_weight), cpu_bn.grad_weight, np.float32, scale=5.0)
        close(_host(dev_bn.grad_bias), cpu_bn.grad_bias, np.float32, scale=5.0)
    assert dev_bn.num_batches_tracked == 2
    for key in ("running_mean", "running_var"):
        close(_host(getattr(dev_bn, key)), getattr(cpu_bn, key), np.float32, err=key)
    dev_bn.eval()
    cpu_bn.eval()
    x = make(rng, shape, np.float32)
    close(_host(dev_bn(_dev(x))), cpu_bn(x), np.float32, err="eval")
    close(_host(dev_bn.backward(_dev(x))), cpu_bn.backward(x), np.float32, err="eval dx")


@requires_cuda
def test_state_dict_round_trip(rng, tmp_path):
    from numbn._cuda import _is_numba

    bn = numbn.BatchNorm(3)
    bn(_dev(make(rng, (4, 3, 2), np.float32)))
    state = bn.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    close(state["running_mean"], _host(bn.running_mean), np.float32)
    state = {k: v + 1 if k != "num_batches_tracked" else v for k, v in state.items()}
    held = bn.running_var, bn.weight
    bn.load_state_dict(state)
    assert _is_numba(bn.running_var) and _is_numba(bn.weight)  # stays on the device
    assert bn.running_var is held[0] and bn.weight is held[1]  # written in place, as copy_
    for key, value in state.items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)
    bn.save(tmp_path / "bn.npz")
    other = numbn.BatchNorm(3)
    other.load(tmp_path / "bn.npz")
    for key, value in state.items():
        np.testing.assert_array_equal(other.state_dict()[key], value)
    x = make(rng, (4, 3, 2), np.float32)
    close(_host(bn.eval()(_dev(x))), other.eval()(x), np.float32)  # on device / on host


# Bad input ---------------------------------------------------------------------


def _bad_calls(rng):
    """(name, call(to)) pairs; ``to`` puts an array where the call is made."""
    x = make(rng, (4, 3, 5), np.float32)
    w = np.ones(3, np.float32)
    return [
        ("int dtype", lambda to: numbn.batch_norm_forward(to(x.astype(np.int32)))),
        ("1-D", lambda to: numbn.batch_norm_forward(to(x[:, 0, 0].copy()))),
        ("axis", lambda to: numbn.batch_norm_forward(to(x), axis=3)),
        ("one value", lambda to: numbn.batch_norm_forward(to(x[:1, :, :1].copy()))),
        ("empty", lambda to: numbn.batch_norm_forward(to(x[:0].copy()))),
        ("weight", lambda to: numbn.batch_norm_forward(to(x), to(np.ones(4, np.float32)))),
        ("eval", lambda to: numbn.batch_norm(to(x))),
        ("dy", lambda to: numbn.batch_norm_backward(to(x[:2].copy()), to(x), to(w), to(w))),
        ("out dtype", lambda to: numbn.batch_norm(to(x), training=True,
                                                 out=to(x.astype(np.float64)))),
        ("activation", lambda to: numbn.batch_norm_forward(to(x), activation="gelu")),
    ]


@requires_cuda
def test_bad_input_same_errors(rng):
    """Device arrays get the errors (type and message) NumPy arrays get, and
    nothing is written."""
    for name, call in _bad_calls(rng):
        with pytest.raises((TypeError, ValueError)) as host_err:
            call(lambda a: a)
        with pytest.raises(type(host_err.value)) as dev_err:
            call(_dev)
        assert str(dev_err.value) == str(host_err.value), name


@requires_cuda
def test_running_stats_untouched_by_a_bad_call(rng):
    x = _dev(make(rng, (1, 3), np.float32))
    rm, rv = _dev(np.zeros(3, np.float32)), _dev(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        numbn.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(_host(rm), 0)
    np.testing.assert_array_equal(_host(rv), 1)


@requires_cuda
@pytest.mark.parametrize("step", [1, 2])
def test_running_stats_updated_in_place(step, rng):
    """Contiguous running statistics take one host-to-device copy, strided
    ones (every other element of a buffer) the copy kernel: both as the
    "cpu" backend updates NumPy ones, and nothing else of the buffer moves."""
    x = make(rng, (6, 3, 5), np.float32)
    rm, rv = np.arange(3, dtype=np.float32), np.full(3, 2.0, np.float32)
    numbn.batch_norm(x, rm, rv, training=True, momentum=0.3, backend="cpu")
    buf_m = _dev(np.repeat(np.arange(3, dtype=np.float32), step))
    buf_v = _dev(np.full(3 * step, 2.0, np.float32))
    rm_d, rv_d = buf_m[::step], buf_v[::step]
    assert rm_d.is_c_contiguous() == (step == 1)
    numbn.batch_norm(_dev(x), rm_d, rv_d, training=True, momentum=0.3)
    close(_host(rm_d), rm, np.float32)
    close(_host(rv_d), rv, np.float32)
    if step == 2:
        np.testing.assert_array_equal(_host(buf_m)[1::2], np.arange(3))
        np.testing.assert_array_equal(_host(buf_v)[1::2], 2.0)


# Unavailable -------------------------------------------------------------------


def test_missing_numba_cuda_is_a_clear_error(monkeypatch, rng):
    monkeypatch.setitem(sys.modules, "numba.cuda", None)  # as if numba-cuda were missing
    reason = _dispatch.cuda_unavailable_reason()
    assert reason is not None and "numba-cuda is not installed" in reason
    assert "cuda" not in numbn.available_backends()
    with pytest.raises(numbn.BackendUnavailableError, match="numba-cuda is not installed"):
        numbn.batch_norm_forward(make(rng, (4, 3), np.float32), backend="cuda")
    assert "numba-cuda is not installed" in _cuda.describe()


def test_no_gpu_is_a_clear_error(monkeypatch, rng):
    cuda = pytest.importorskip("numba.cuda")
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    with pytest.raises(numbn.BackendUnavailableError, match="no CUDA GPU or driver"):
        numbn.batch_norm_forward(make(rng, (4, 3), np.float32), backend="cuda")


def test_numba_cuda_that_breaks_on_import_is_a_clear_error(monkeypatch):
    def broken():
        raise DeprecationWarning("numba-cuda's import under a newer NumPy, warnings as errors")

    monkeypatch.setattr(_cuda, "_cuda_module", broken)
    reason = _dispatch.cuda_unavailable_reason()
    assert reason is not None and "numba.cuda could not be imported" in reason
    assert "DeprecationWarning" in reason and "cuda" not in numbn.available_backends()


def test_numba_cuda_that_cannot_compile_is_a_clear_error(monkeypatch, rng):
    """numba-cuda 0.30.4 with NumPy 2.5 imports and sees the GPU, then fails
    at the first launch (seen on an H100): the backend must say it is
    unavailable, and why, before anything runs."""
    import importlib

    real_import = importlib.import_module

    def import_module(name, *args):
        if name == "numba.cuda.cudaimpl":
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")
        return real_import(name, *args)

    monkeypatch.setattr(_cuda, "_cuda_module", lambda: SimpleNamespace(is_available=lambda: True))
    monkeypatch.setattr(_cuda, "_simulator", lambda: False)
    monkeypatch.setattr(_cuda.importlib, "import_module", import_module)
    reason = _dispatch.cuda_unavailable_reason()
    assert reason is not None and "cannot compile kernels with NumPy" in reason
    assert "row_stack" in reason
    with pytest.raises(numbn.BackendUnavailableError, match="cannot compile kernels"):
        numbn.batch_norm_forward(make(rng, (4, 3), np.float32), backend="cuda")


@pytest.mark.skipif(_simulator(), reason="the simulator's launches give no occupancy warning")
def test_small_grids_do_not_warn():
    """numbn launches small grids for small inputs on purpose; numba's
    low-occupancy warning (given below 128 blocks) must not reach the caller,
    whichever class this numba-cuda gives it (on an H100, numba-cuda 0.30.4's
    own class got through a filter on numba.core.errors' and failed every
    test under pytest's warnings-as-errors)."""
    pytest.importorskip("numba.cuda")
    import numba.cuda.dispatcher as dispatcher

    # The class numba-cuda's launch warns with, and numba's own.
    from numba.core.errors import NumbaPerformanceWarning

    categories = tuple({dispatcher.errors.NumbaPerformanceWarning, NumbaPerformanceWarning})
    launched = []

    class Kernel:
        def __getitem__(self, config):
            def run(*args):
                for category in categories:
                    warnings.warn("Grid size 3 will likely result in GPU under-utilization",
                                  category, stacklevel=2)
                launched.append((config, args))

            return run

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cuda._launch(Kernel(), (3, 1), 32, 0, "x", shared=24)
    assert launched == [(((3, 1), 32, 0, 24), ("x",))]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _cuda._launch(Kernel(), (128, 1), 32, 0, "x")  # a full grid: not filtered
    assert {w.category for w in seen} == set(categories)


@requires_cuda
def test_describe():
    text = _cuda.describe()
    assert ("simulator" in text) if _simulator() else ("compute capability" in text)


# The GPU-only code path, compiled without a GPU ----------------------------------


@pytest.mark.skipif(_simulator(), reason="the simulator runs kernels as Python; this "
                    "compiles the GPU path (warp shuffles), which needs the real numba.cuda")
def test_gpu_kernels_compile(monkeypatch):
    """Type and lower every kernel of the GPU build (shuffle merges) to LLVM IR,
    which needs no GPU and no CUDA toolkit: catches typing errors in the code
    that the simulator never runs."""
    cuda = pytest.importorskip("numba.cuda")
    import numba.cuda.dispatcher as dispatcher
    from numba.core import types
    from numba.cuda.compiler import compile_cuda

    # Device functions are compiled for the current device: pretend to have one.
    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(8, 0)))
    k = _cuda._build.__wrapped__(256, True)  # a fresh build, not the cached one
    c2, p3 = types.Array(types.float64, 2, "C"), types.Array(types.float64, 3, "C")
    i64, flag, floor = types.int64, types.boolean, types.float64  # floor: _cuda._mask_floor

    def lower(kernel, sig):
        return compile_cuda(kernel.py_func, types.void, sig, cc=(8, 0)).library.get_llvm_str()

    for arr in (types.Array(types.float16, 3, "A"), types.Array(types.float32, 3, "C")):
        for (cm, rm, _), relu in ((k.stats, flag), (k.sums, floor)):
            ir = lower(cm, (arr, arr, c2, relu, i64, i64, i64, p3))
            assert "llvm.nvvm.shfl.sync" in ir
            lower(rm, (arr, arr, c2, relu, p3))
        for (cm, rm), relu in ((k.normalize, flag), (k.apply, floor)):
            lower(cm, (arr, arr, c2, relu, i64, arr))
            lower(rm, (arr, arr, c2, relu, arr))
    lower(k.stats[2], (p3, c2))
    lower(k.sums[2], (p3, c2))
    a8 = types.Array(types.float32, 8, "A")
    lower(k.copy, (a8, a8))
    assert cuda is not None


# Other array libraries on a real GPU -----------------------------------------------


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


@requires_cuda
@pytest.mark.skipif(_torch_cuda() is None, reason="needs PyTorch with a CUDA GPU")
def test_torch_cuda_tensors(rng):
    torch = _torch_cuda()
    import torch.nn.functional as F

    # x and w require grad (w is a Parameter): numbn reads them detached.
    x = torch.tensor(make(rng, (4, 3, 5, 6), np.float32), device="cuda", requires_grad=True)
    w = torch.nn.Parameter(torch.rand(3, device="cuda") + 0.5)
    b = torch.rand(3, device="cuda")
    rm, rv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    y = numbn.batch_norm(x, rm, rv, w, b, training=True)
    rm_t, rv_t = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True)
    assert isinstance(y, torch.Tensor) and y.device == x.device
    close(y.cpu().numpy(), y_t.detach().cpu().numpy(), np.float32)
    close(rm.cpu().numpy(), rm_t.cpu().numpy(), np.float32)
    close(rv.cpu().numpy(), rv_t.cpu().numpy(), np.float32)


@requires_cuda
def test_cupy_arrays(rng):
    cupy = pytest.importorskip("cupy", reason="needs CuPy with a CUDA GPU")
    x = make(rng, (4, 3, 5), np.float32)
    y, mean, _ = numbn.batch_norm_forward(cupy.asarray(x))
    assert isinstance(y, cupy.ndarray) and isinstance(mean, cupy.ndarray)
    close(cupy.asnumpy(y), ref.forward_train(x)[0], np.float32)
