"""The public, stateless BatchNorm functions.

Each function validates everything first, then runs one of three backends:
``"numpy"`` (the float64 reference), ``"cpu"`` (Numba kernels) or ``"cuda"``
(Numba CUDA kernels). On ``"cpu"`` the common calls take one kernel call
each (inference, fused training forward, fused backward) that computes its
per-channel coefficients itself from the caller's vectors: the host side is
validation, a view and an allocation, and it does no floating-point
arithmetic to guard. The plainest of those calls (C-contiguous NumPy
float16/32/64 input, vectors as the kernels take them) skip even the
general checks by the direct path (:func:`_direct_channels`): a call usually
runs with cold caches, where every Python-level call counts. The two-pass
forms (CUDA, SyncBatchNorm, inputs the fused kernels do not serve) share the
coefficient arithmetic here, in float64 under ``np.errstate``.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _checks, _dispatch, _reference
from ._dispatch import is_device_array, resolve
from ._layout import Plan, contiguous_view, dense_view, empty
from ._reference import _quiet


class _Host:
    """Array handling of the ``"cpu"`` backend: NumPy arrays, Numba kernels.

    A kernel backend is this interface: ``adopt`` turns a caller's array into
    the backend's own kind, ``canonical`` gives its ``(outer, C, inner)``
    view, ``output`` allocates (or reuses ``out``), ``finish`` hands the
    result back as the caller's kind, ``host`` brings a per-channel vector to
    NumPy float64, ``like`` puts one back beside ``ref``; ``kernels()`` is the
    module with ``stats``, ``normalize``, ``backward_sums``, ``backward_apply``.
    ``numbn._cuda.Device`` implements the same for CUDA device arrays.
    """

    @staticmethod
    def adopt(a):
        return a

    @staticmethod
    def kernels():
        return _cpu_kernels()

    @staticmethod
    def canonical(a, plan: Plan):
        return plan.dense(a, copy=_cpu_kernels().copy_into)

    @staticmethod
    def output(plan: Plan, dtype, out=None, like=None):
        """``(full, view3)`` to write into; ``full`` is ``out`` when it has a view.

        ``like`` (the input) lets a device engine allocate the caller's kind.
        """
        if out is not None:
            v = plan.view(out)
            if v is not None:
                return out, v
        return plan.empty(dtype)

    @staticmethod
    def finish(full, out, like):
        if out is not None and full is not out:  # out in another order than x's
            _cpu_kernels().copy_into(out, full)
            return out
        return full

    @staticmethod
    def host(v):
        return None if v is None else np.asarray(v, dtype=np.float64)

    @staticmethod
    def like(values: np.ndarray, dtype, ref):
        return values.astype(dtype)


@functools.cache
def _cpu_kernels():
    """``numbn._cpu``, imported on first use (it imports Numba); cached, as a
    ``from . import`` in every call costs a Python-level import lookup."""
    from . import _cpu

    return _cpu


def _engine(name: str):
    if name == "cuda":
        from . import _cuda

        return _cuda.Device
    return _Host


def _views(eng, x, axis: int, out=None):
    """``(x3, full, y3, plan)``: the ``(outer, C, inner)`` view of ``x``, the
    output ``full`` (``out`` when it has a view) and its view ``y3``, and the
    plan, None when the short cut served.

    The short cut: a C-contiguous NumPy ``x`` (and ``out``) is one reshape
    (:func:`numbn._layout.contiguous_view`) and its output ``np.empty``, past
    the engine and the plan cache: about 15 us less per call when it runs
    after a cache-flushing layer, as in a training loop (eval of (2, 64, 4, 4):
    119 us against 133; ``benchmarks/call_overhead.py`` measures it).
    """
    if eng is _Host and (out is None or (isinstance(out, np.ndarray)
                                         and out.flags.c_contiguous)):
        x3 = contiguous_view(x, axis)
        if x3 is not None:
            full = empty(x.shape, x.dtype) if out is None else out
            return x3, full, full.reshape(x3.shape), None
    xa = eng.adopt(x)
    plan = Plan.of(xa, axis)
    if eng is _Host:
        xa, plan = _dense_runs(xa, plan, axis)
    full, y3 = eng.output(plan, _checks.dtype_of(x), out, like=x)
    return eng.canonical(xa, plan), full, y3, plan


def _dense_runs(x, plan, axis):
    """``(x, plan)`` as they are when ``x``'s ``(outer, C, inner)`` view is
    dense (:func:`numbn._layout.dense_view`), else a dense copy of ``x`` in its own
    memory order (``order="K"``) and the copy's plan: a view whose innermost
    axis (or channel axis, for channels-last input) has a step or runs
    backwards, or channels-last input sliced along the batch (its view is
    ``(N, C, H*W)`` with channels adjacent, which no rows view covers). The
    kernels read such a view one element at a time: the training forward of
    channels-last (32, 56, 56, 64) float32 sliced ``[::2]`` took 6.4 ms
    against 1.0 ms for the same values contiguous (measured); the copy is one
    pass at memory speed. Outputs follow the copy's order, which is x's;
    ``dy`` gets the same treatment in the backward."""
    v = plan.view(x)
    if v is None or dense_view(v):
        return x, plan
    x = np.copy(x, order="K")
    return x, Plan.of(x, axis)


_F16, _F32, _F64 = _checks.FLOAT_DTYPES


def _direct_channels(x, axis, backend) -> int:
    """C when the call may take the direct path, else 0 (and the general path
    validates and runs the call): a C-contiguous, non-empty NumPy ``x`` of
    float16, float32 or float64 with two or more channels, an integer
    ``axis`` in range, and the ``"cpu"`` backend.

    The direct path (eval, training forward, backward) checks exactly what
    the general path's checks and conversions would find nothing to do about
    and calls the kernel launcher, which plans by ``x``'s shape and ``axis``
    (``numbn._cpu.infer_dense``): no ``(outer, C, inner)`` view is made. A
    call runs just after a kernel (the caller's or its own last one) has
    streamed the caches out, where each Python-level call or attribute
    costs up to a microsecond or so (``benchmarks/call_overhead.py``). The
    host side of NHWC (8, 28, 28, 256) float32 in ``numbn bench``'s
    interleaving (every planned kernel replaced by one that does nothing),
    before and after this path took its present form (no view, the common
    checks inline, one call per check where it made two): eval 18.5 to 13.4
    us, training forward 27.3 to 19.4, backward 24.9 to 16.0; at 2-D (256,
    1024), 8.6 to 6.6, 11.4 to 9.3, 10.1 to 8.3.
    """
    if type(x) is not np.ndarray or type(axis) is not int:
        return 0
    dt = x.dtype  # NumPy's own float dtypes are singletons: `is` first, the cheap test
    if dt is not _F32 and dt is not _F64 and dt is not _F16 and dt not in _checks.FLOAT_DTYPES:
        return 0
    if backend != "cpu" and (backend != "auto" or _dispatch._default not in ("auto", "cpu")):
        return 0
    shape = x.shape
    nd = len(shape)
    if nd < 2 or not -nd <= axis < nd:
        return 0
    c = shape[axis]
    if c < 2 or x.size == 0 or not x.flags.c_contiguous:
        return 0
    return c


def _direct_activation(activation):
    """True for an ``activation`` other than None that is valid ("relu");
    None for anything else (the general path raises for it). The callers
    take ``activation=None`` (False) inline, a call the fewer."""
    if type(activation) is str and activation == "relu":
        return True
    return None


def _ones(v, c):
    return np.ones(c) if v is None else v


def _zeros(v, c):
    return np.zeros(c) if v is None else v


def _stats_dtype(x) -> np.dtype:
    return np.dtype(np.float64) if _checks.dtype_of(x) == np.float64 else np.dtype(np.float32)


def _train(x, weight, bias, eps, axis, backend, out, relu, combine=None):
    """Training forward of a validated call: ``(y, mean, var_biased, count)``.

    ``combine(mean, var, count) -> (mean, var, count, shared)``, when given,
    turns this batch's statistics into the ones to normalise with
    (SyncBatchNorm merges every rank's there); ``count`` may be 0 for an empty
    local batch, with ``mean`` 0 and ``var`` NaN. ``shared`` is the bytes
    that the processes sharing this machine's last-level cache write in the
    normalisation, for the CPU kernels' choice of stores (``_cpu._stream``).
    """
    name = resolve(backend, x)
    _host_arrays(name, out=out)
    if name == "numpy":
        return _train_reference(x, weight, bias, eps, axis, out, relu, combine)
    eng = _engine(name)
    kern = eng.kernels()
    x3, full, y3, _ = _views(eng, x, axis, out)
    count = x3.shape[0] * x3.shape[2]
    if name == "cpu" and combine is None:
        # One kernel call from the caller's vectors as they are: no host
        # arithmetic, so no floating-point state to guard.
        stats = kern.train_fused(x3, weight, bias, eps, relu, y3)
        if stats is not None:
            return eng.finish(full, out, x), stats[0], stats[1], count
    mean, var, count = _train_two_pass(eng, kern, x3, weight, bias, eps, relu, y3, count,
                                       combine)
    return eng.finish(full, out, x), mean, var, count


def _host_arrays(name: str, **arrays) -> None:
    """On a host backend (NumPy ``x``), a TypeError that names an ``out`` or
    ``dy`` in CUDA memory, before anything is written: Numba's own error
    ("can't unbox array from PyObject") named neither. The other way round,
    device ``x`` with NumPy ``out`` or ``dy``, the device engine copies."""
    if name in ("cpu", "numpy"):
        for key, a in arrays.items():
            if a is not None and is_device_array(a):
                raise TypeError(f"{key} is a CUDA device array ({type(a).__name__}) but x is "
                                f"a NumPy array: pass both in host memory, or both on the "
                                f"device")


@_quiet
def _train_two_pass(eng, kern, x3, weight, bias, eps, relu, y3, count, combine):
    """The statistics, ``combine``, then the normalisation: two kernel calls."""
    c = x3.shape[1]
    mean, var = kern.stats(x3)
    shared = 0
    if combine is not None:
        mean, var, count, shared = combine(mean, var, count)
    w, b = _ones(eng.host(weight), c), _zeros(eng.host(bias), c)
    kern.normalize(x3, mean, w / np.sqrt(var + eps), b, relu, y3, shared)
    return mean, var, count


@_quiet
def _train_reference(x, weight, bias, eps, axis, out, relu, combine):
    """:func:`_train` on the ``"numpy"`` backend."""
    activation = "relu" if relu else None
    if combine is None:
        y, mean, _, var, count = _reference.forward_train(x, weight, bias, eps, axis,
                                                          activation)
        return _fill(y, x, out), mean, var, count
    c = x.shape[axis]
    mean, var, count = _reference.batch_stats(x, axis) if x.size else (
        np.zeros(c), np.full(c, np.nan), 0)
    mean, var, count, _ = combine(mean, var, count)
    y = _reference.normalize(x, mean, var, weight, bias, eps, axis, activation)
    return _fill(y, x, out), mean, var, count


def _infer(x, mean, var, weight, bias, eps, axis, backend, out, relu):
    """Inference forward of a validated call, with ``mean`` and ``var`` given."""
    name = resolve(backend, x)
    _host_arrays(name, out=out)
    if name == "numpy":
        return _infer_reference(x, mean, var, weight, bias, eps, axis, out, relu)
    eng = _engine(name)
    x3, full, y3, _ = _views(eng, x, axis, out)
    kern = eng.kernels()
    if name == "cpu":
        # The coefficients computed in the kernel, from the caller's vectors as
        # they are: no host arithmetic, so no floating-point state to guard.
        kern.infer(x3, mean, var, weight, bias, eps, relu, y3)
    else:
        _device_infer(eng, kern, x3, mean, var, weight, bias, eps, relu, y3)
    return eng.finish(full, out, x)


@_quiet  # the cast to float16 may overflow, as it may in any backend: y is inf then
def _infer_reference(x, mean, var, weight, bias, eps, axis, out, relu):
    """:func:`_infer` on the ``"numpy"`` backend."""
    y = _reference.normalize(x, _Host.host(mean), _Host.host(var), weight, bias, eps, axis,
                             "relu" if relu else None)
    return _fill(y, x, out)


@_quiet
def _device_infer(eng, kern, x3, mean, var, weight, bias, eps, relu, y3):
    c = x3.shape[1]
    mean, var, weight, bias = eng.host(mean), eng.host(var), eng.host(weight), eng.host(bias)
    scale = _ones(weight, c) / np.sqrt(var + eps)
    kern.normalize(x3, mean, scale, _zeros(bias, c), relu, y3)


def _fill(y64: np.ndarray, x, out):
    if out is None:
        return y64.astype(x.dtype)
    out[...] = y64
    return out


def _check_forward(x, weight, bias, axis, out, activation):
    _checks.input_array(x)
    axis = _checks.channel_axis(axis, len(x.shape))
    c = x.shape[axis]
    _checks.vector(weight, c, "weight")
    _checks.vector(bias, c, "bias")
    _checks.output(out, x)
    return axis, _checks.activation(activation)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               axis: int = 1, backend: str = "auto", out=None, activation=None):
    """Batch Normalization with the meaning of ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : array, ndim >= 2
        Input; ``axis`` is its channel axis. float16, float32 or float64.
    running_mean, running_var : array of shape (C,), optional
        Running statistics. Required when ``training=False``; updated in place
        by a training call, ``r = (1 - momentum) * r + momentum * batch``, with
        the unbiased batch variance for ``running_var``.
    weight, bias : array of shape (C,), optional
        Affine parameters (ones and zeros when None).
    training : bool
        Normalise with the batch statistics (True) or the running ones.
    momentum : float
        Weight of the new batch in the running-statistics update.
    eps : float
        Added to the variance before the square root; 0 or more.
    axis : int
        The channel axis (negative counts from the end).
    backend : {"auto", "cpu", "cuda", "numpy"}
    out : array, optional
        Receives ``y``; may be ``x`` itself.
    activation : {None, "relu"}
        Apply ReLU to the result in the same pass.

    Returns
    -------
    y : array of x's shape, dtype and kind.

    Raises
    ------
    TypeError
        Non-floating dtypes or unsupported array types; an ``eps`` or a
        ``momentum`` that is not a real number (None included, in eval mode
        too, as in PyTorch).
    ValueError
        Wrong shapes, an axis out of range, fewer than two values per channel
        in training, eval mode without running statistics, one of the two
        running statistics without the other, a read-only running statistic
        in training, a negative ``eps``, an unknown ``backend`` or
        ``activation``, an ``out`` that is read-only or overlaps ``x``
        without being ``x``.
    BackendUnavailableError
        When the backend asked for cannot run here.

    Examples
    --------
    >>> import numpy as np, numbn
    >>> x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> y = numbn.batch_norm(x, rm, rv, training=True)
    >>> np.round(y[:, 0].ravel(), 3)
    array([-1.362, -1.059, -0.151,  0.151,  1.059,  1.362], dtype=float32)
    >>> rm, rv  # 0.1 of the batch mean (4.5, 6.5) and unbiased variance (13.1)
    (array([0.45, 0.65], dtype=float32), array([2.21, 2.21], dtype=float32))
    """
    # The common case of each check inline: a call costs about a microsecond
    # with the caches cold (_direct_channels).
    if type(eps) is not float or not eps >= 0.0:
        eps = _checks.eps(eps)
    if type(momentum) is not float:  # also in eval, as PyTorch's batch_norm checks it
        momentum = _checks.momentum(momentum)
    target = None if out is None else _direct_out(out, x)
    if target is not False:
        if training:
            y = _direct_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps,
                                   axis, backend, activation, target)
        else:
            y = _direct_infer(x, running_mean, running_var, weight, bias, eps, axis, backend,
                              activation, target)
        if y is not None:
            return y
    axis, relu = _check_forward(x, weight, bias, axis, out, activation)
    c = x.shape[axis]
    _checks.vector(running_mean, c, "running_mean", writable=training)
    _checks.vector(running_var, c, "running_var", writable=training)
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError("give both running_mean and running_var, or neither")
        _checks.training_count(x.shape, axis)
        y, mean, var, n = _train(x, weight, bias, eps, axis, backend, out, relu)
        if running_mean is not None:
            update_running(running_mean, running_var, mean, var, n, momentum, unbiased=True)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    return _infer(x, running_mean, running_var, weight, bias, eps, axis, backend, out, relu)


def _direct_out(out, x):
    """What the direct path writes into: None (no ``out``: a new array),
    ``out`` itself when it is a C-contiguous, writable NumPy array of x's
    shape and dtype sharing no memory with x, else False, and the general
    path checks and serves the call (in place, other layouts, or an error).
    Without this, ``out=`` cost the general path: 10-12 us more a call than
    without it (eval of (8, 64, 8, 8) float32: 27.6 against 18.0 us)."""
    if out is None:
        return None
    if (type(out) is np.ndarray and type(x) is np.ndarray and out.shape == x.shape
            and out.dtype == x.dtype and out.flags.c_contiguous and out.flags.writeable
            and not np.may_share_memory(out, x)):
        return out
    return False


def _stand_ins(weight, bias, c, like):
    """``weight`` and ``bias`` for the direct path's kernels: ones and zeros
    where None, of ``like``'s dtype when it is a NumPy array (float64
    otherwise), as the general path's kernels get them
    (``numbn._cpu._affine``). A call without them took the general path:
    5-8 us more than one with them (eval of (64, 64) float32: 14.6 against
    9.5 us)."""
    if weight is not None and bias is not None:
        return weight, bias
    return _cpu_kernels()._affine(weight, bias, c, like)


def _direct_infer(x, mean, var, weight, bias, eps, axis, backend, activation, out=None,
                  channels=None):
    """The eval forward by the direct path (:func:`_direct_channels`): ``y``
    (``out`` when given, :func:`_direct_out`), or None to leave the call to
    the general path. ``weight`` and ``bias`` may be None (:func:`_stand_ins`).
    ``channels``: the C that x must have (a layer's ``num_features``), if
    any; other input goes to the general path, which names the mismatch."""
    c = _direct_channels(x, axis, backend)
    relu = False if activation is None else _direct_activation(activation)
    if not c or relu is None or channels not in (None, c):
        return None
    if weight is None or bias is None:
        weight, bias = _stand_ins(weight, bias, c, mean)
    if not _checks.kernel_ready((mean, var, weight, bias), c):
        return None
    y = empty(x.shape, x.dtype) if out is None else out
    _cpu_kernels().infer_dense(x, axis, mean, var, weight, bias, eps, relu, y,
                               out is None or out.flags.aligned)
    return y


def _direct_train(x, weight, bias, eps, axis, backend, activation, *running, out=None,
                  channels=None):
    """The training forward by the direct path (:func:`_direct_channels`):
    ``(y, mean, var_biased, count)``, or None to leave the call to the
    general path. Takes ``weight`` and ``bias`` (None: :func:`_stand_ins`), two or more values per
    channel, and an input the one-call kernel serves (``numbn._cpu.train_dense``);
    ``running``, the running statistics the caller will update, must be as
    the kernels take them too. ``y`` is ``out`` when given (:func:`_direct_out`);
    ``channels`` as :func:`_direct_infer`'s."""
    c = _direct_channels(x, axis, backend)
    relu = False if activation is None else _direct_activation(activation)
    if not c or relu is None or channels not in (None, c):
        return None
    n = x.size // c
    if weight is None or bias is None:
        weight, bias = _stand_ins(weight, bias, c, weight if weight is not None else bias)
    if n < 2 or not _checks.kernel_ready((weight, bias), c) or (
            running and not _checks.kernel_ready(running, c)):
        return None
    y = empty(x.shape, x.dtype) if out is None else out
    # The launchers plan an output at an odd byte offset apart (no streamed stores).
    stats = _cpu_kernels().train_dense(x, axis, weight, bias, eps, relu, y,
                                       out is None or out.flags.aligned)
    if stats is None:
        return None
    return y, stats[0], stats[1], n


def _direct_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, axis,
                       backend, activation, out=None):
    """:func:`batch_norm` in training by the direct path: ``y`` (``out``
    when given, :func:`_direct_out`), or None to leave the call to the
    general path (running statistics both given or both None)."""
    track = running_mean is not None or running_var is not None
    done = _direct_train(x, weight, bias, eps, axis, backend, activation,
                         *((running_mean, running_var) if track else ()), out=out)
    if done is None:
        return None
    y, mean, var, n = done
    if track:  # as update_running, unbiased, without its conversions (momentum: a float)
        _cpu_kernels()._update_running(running_mean, running_var, mean, var, n / (n - 1),
                                       momentum)
    return y


def update_running(running_mean, running_var, mean, var, count, factor, *, unbiased):
    """``r = (1 - factor) * r + factor * batch`` in place, for mean and variance."""
    scale = count / (count - 1) if unbiased else 1.0
    if isinstance(running_mean, np.ndarray) and isinstance(running_var, np.ndarray):
        # One compiled loop: the NumPy form was 11 us at C=1024.
        _cpu_kernels().update_running(running_mean, running_var, np.asarray(mean, np.float64),
                                      np.asarray(var, np.float64), scale, float(factor))
    else:
        _update_device_running(running_mean, running_var, mean, var, scale, factor)


@_quiet
def _update_device_running(running_mean, running_var, mean, var, scale, factor):
    var = np.asarray(var, np.float64) * scale
    for r, batch in ((running_mean, mean), (running_var, var)):
        held = _Host.host(r) if isinstance(r, np.ndarray) else _engine("cuda").host(r)
        new = _reference.update_running(held, np.asarray(batch, np.float64), factor)
        if isinstance(r, np.ndarray):
            r[...] = new
        else:
            _engine("cuda").assign(r, new)


def batch_norm_forward(x, weight=None, bias=None, *, eps: float = 1e-5, axis: int = 1,
                       backend: str = "auto", out=None, activation=None):
    """Training-mode forward that also returns what the backward needs.

    Parameters
    ----------
    x, weight, bias, eps, axis, backend, out, activation
        As in :func:`batch_norm`.

    Returns
    -------
    y : array of x's shape and dtype.
    mean : ndarray (C,)
        Batch mean (float64 for float64 input, float32 otherwise).
    invstd : ndarray (C,)
        ``1 / sqrt(var_biased + eps)``, same dtype as ``mean``.

    Raises
    ------
    TypeError, ValueError, BackendUnavailableError
        As in :func:`batch_norm`.

    Examples
    --------
    >>> import numpy as np, numbn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, mean, invstd = numbn.batch_norm_forward(x, eps=0.0)
    >>> y
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> mean
    array([ 2., 20.])
    """
    eps = _checks.eps(eps)
    target = _direct_out(out, x)
    if target is not False:
        done = _direct_train(x, weight, bias, eps, axis, backend, activation, out=target)
        if done is not None:
            y, mean, var, _ = done
            dt = _stats_dtype(x)
            mean_out, invstd = np.empty(mean.shape, dt), np.empty(mean.shape, dt)
            _cpu_kernels().mean_invstd(mean, var, eps, mean_out, invstd)
            return y, mean_out, invstd
    return _forward(x, weight, bias, eps, axis, backend, out, activation)


@_quiet
def _forward(x, weight, bias, eps, axis, backend, out, activation):
    """:func:`batch_norm_forward` by the general path."""
    axis, relu = _check_forward(x, weight, bias, axis, out, activation)
    _checks.training_count(x.shape, axis)
    y, mean, var, _ = _train(x, weight, bias, eps, axis, backend, out, relu)
    dt = _stats_dtype(x)
    invstd = 1.0 / np.sqrt(var + eps)
    eng = _engine(resolve(backend, x))
    return y, eng.like(mean, dt, x), eng.like(invstd, dt, x)


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, bias=None, training: bool = True,
                        axis: int = 1, backend: str = "auto", activation=None):
    """Gradients of ``sum(dy * y)`` with respect to ``x``, ``weight`` and ``bias``.

    Parameters
    ----------
    dy : array of x's shape
        Gradient of the loss with respect to ``y``, of any float dtype; the
        ``"cpu"`` kernels take it in their arithmetic dtype (float32 for
        float16 and float32 x, float64 for float64 x; a copy when it is
        neither x's dtype nor float32 with float16 x).
    x : array
        The forward's input.
    mean, invstd : array (C,)
        From :func:`batch_norm_forward` (``training=True``), or the running
        mean and ``1 / sqrt(running_var + eps)`` (``training=False``: the
        backward of the inference form, statistics held constant).
    weight : array (C,), optional
    bias : array (C,), optional
        Needed only with ``activation="relu"``, to recompute the ReLU mask
        (the forward's bias: without it the mask is that of bias 0).
    training : bool
    axis, backend, activation
        As in :func:`batch_norm`. With ``activation="relu"`` the mask is
        recomputed from ``x``, ``mean``, ``invstd``, ``weight`` and ``bias``
        as given. :func:`batch_norm_forward` normalises with its float64
        statistics and returns them rounded to float32 for float16 and
        float32 input, as PyTorch returns its own, so a value within that
        rounding of the boundary (x equal to the rounded mean, say) can
        fall on the other side of it here than in the forward's ``y``
        (seen with data on a grid of 0.1 and 5 values a channel). The
        layer keeps the float64 statistics for its backward, and its masks
        agree with its outputs.

    Returns
    -------
    dx : array of x's shape and dtype.
    dweight, dbias : arrays (C,) of weight's dtype, or None when ``weight`` is None.

    Raises
    ------
    TypeError, ValueError, BackendUnavailableError
        As in :func:`batch_norm`.

    Examples
    --------
    >>> import numpy as np, numbn
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = numbn.batch_norm_forward(x, eps=0.0)
    >>> dx, dw, db = numbn.batch_norm_backward(np.array([[1.0], [0.0]]), x, mean, invstd,
    ...                                        np.ones(1))
    >>> dx.ravel(), dw, db
    (array([0., 0.]), array([-1.]), array([1.]))
    """
    grads = _direct_backward(dy, x, mean, invstd, weight, bias, training, axis, backend,
                             activation)
    if grads is not None:
        return grads
    _checks.input_array(x)
    axis = _checks.channel_axis(axis, len(x.shape))
    c = x.shape[axis]
    _checks.same_shape(dy, x, "dy")
    for v, nm in ((mean, "mean"), (invstd, "invstd")):
        if v is None:
            raise ValueError(f"{nm} is required")
        _checks.vector(v, c, nm)
    _checks.vector(weight, c, "weight")
    _checks.vector(bias, c, "bias")
    relu = _checks.activation(activation)
    if training:
        _checks.training_count(x.shape, axis)
    name = resolve(backend, x)
    _host_arrays(name, dy=dy)
    if name == "numpy":
        dx, dw, db = _backward_reference(dy, x, mean, invstd, weight, bias, training, axis,
                                         activation)
        eng = _Host
    else:
        eng = _engine(name)
        dx, dw, db = _kernel_backward(eng, dy, x, mean, invstd, weight, bias, training, axis, relu)
    if weight is None:
        return dx, None, None
    wdt = _checks.dtype_of(weight)
    return dx, eng.like(dw, wdt, weight), eng.like(db, wdt, weight)


def _direct_backward(dy, x, mean, invstd, weight, bias, training, axis, backend, activation):
    """:func:`batch_norm_backward` by the direct path (:func:`_direct_channels`):
    ``(dx, dweight, dbias)``, or None to leave the call to the general path.
    Takes ``dy`` of x's shape, dtype and layout, ``weight`` (None: :func:`_stand_ins`), a bool
    ``training`` (with two or more values per channel), and channels whose
    one-call kernel applies (``numbn._cpu.backward_dense``)."""
    c = _direct_channels(x, axis, backend)
    relu = False if activation is None else _direct_activation(activation)
    if (not c or relu is None or type(training) is not bool or type(dy) is not np.ndarray
            or dy.dtype != x.dtype or dy.shape != x.shape or not dy.flags.c_contiguous):
        return None
    if training and x.size // c < 2:
        return None
    # Without the ReLU the kernels read bias for nothing (it only places the
    # mask), so weight stands in for a missing one.
    if bias is None and not relu and weight is not None:
        w, b = weight, weight
    else:
        w, b = _stand_ins(weight, bias, c, mean)
    if not _checks.kernel_ready((mean, invstd, w, b), c):
        return None
    dx = empty(x.shape, x.dtype)
    # The gradients come in weight's dtype (w's: kernel_ready checked it), rounded
    # once from the kernel's float64.
    grads = _cpu_kernels().backward_dense(dy, x, axis, mean, invstd, w, b, relu, training, dx,
                                          w.dtype)
    if grads is None:
        return None
    if weight is None:  # as the general path: no parameters, no gradients for them
        return dx, None, None
    return dx, grads[0], grads[1]


@_quiet  # the cast to float16 may overflow (dx is inf then), as in the kernel backends
def _backward_reference(dy, x, mean, invstd, weight, bias, training, axis, activation):
    dx, dw, db = _reference.backward(dy, x, _Host.host(mean), _Host.host(invstd), weight,
                                     training, axis, bias, activation)
    return dx.astype(x.dtype), dw, db


def _kernel_backward(eng, dy, x, mean, invstd, weight, bias, training, axis, relu,
                     combine=None):
    """``(dx, dweight, dbias)`` from the kernels of engine ``eng``.

    ``combine(sum_g, sum_gx, count) -> (sum_g, sum_gx, count, shared)``, when
    given, turns this batch's sums into the global ones that ``dx`` uses
    (training only; ``shared`` as :func:`_train`'s); ``dweight`` and ``dbias``
    stay this batch's own contribution.
    """
    x3, full, dx3, plan = _views(eng, x, axis)
    dy3 = contiguous_view(dy, axis) if plan is None else None
    if dy3 is None:
        dy3 = eng.canonical(eng.adopt(dy), plan or Plan.of(x, axis))
        if eng is _Host and not dense_view(dy3):
            # As x's view is made dense (_dense_runs).
            dense = np.empty(dy3.shape, dy3.dtype)
            _cpu_kernels().copy_into(dense, dy3)
            dy3 = dense
    if eng is _Host and dy3.dtype != x3.dtype:
        # dy in the kernels' arithmetic dtype (float32 for float16 and
        # float32 x, float64 for float64 x): a copy but for float32 dy with
        # float16 x, which the kernels take as it is. float64 dy with float32
        # x failed to compile, float16 dy with float64 x crashed; rounded to
        # float16 instead, a dy of 1 + 1e-3 noise lost its noise.
        dy3 = dy3.astype(_cpu_kernels()._arith(x3), copy=False)
    kern = eng.kernels()
    if eng is _Host and combine is None:
        # One kernel call from the caller's vectors as they are (the
        # coefficients computed in the kernel): no host arithmetic.
        grads = kern.backward_fused(dy3, x3, mean, invstd, weight, bias, relu, training, dx3)
        if grads is not None:
            return eng.finish(full, None, x), grads[0], grads[1]
    dw, db = _backward_two_pass(eng, kern, dy3, x3, mean, invstd, weight, bias, training, relu,
                                dx3, combine, weight is not None)
    return eng.finish(full, None, x), dw, db


@_quiet
def _backward_two_pass(eng, kern, dy3, x3, mean, invstd, weight, bias, training, relu, dx3,
                       combine, want_grads):
    """The sums, ``combine``, then dx: two kernel calls; ``(dweight, dbias)``."""
    c = x3.shape[1]
    m, inv = eng.host(mean), eng.host(invstd)
    a = _ones(eng.host(weight), c) * inv
    t = _zeros(eng.host(bias), c)
    if training or want_grads or relu:
        sum_g, sum_gx = kern.backward_sums(dy3, x3, m, a, t, relu)
    else:
        sum_g = sum_gx = np.zeros(c)
    shared = 0
    if training:
        glob_g, glob_gx, n = sum_g, sum_gx, x3.shape[0] * x3.shape[2]
        if combine is not None:
            glob_g, glob_gx, n, shared = combine(sum_g, sum_gx, n)
        b = -a * inv * inv * glob_gx / n
        d = -a * glob_g / n
    else:
        b = d = np.zeros(c)
    kern.backward_apply(dy3, x3, m, a, t, relu, b, d, dx3, shared)
    return sum_gx * inv, sum_g
