"""The stateful ``BatchNorm`` layer and the framework conventions it reproduces."""

from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _checks
from ._dispatch import _check_name, is_device_array, resolve
from ._reference import _quiet
from .functional import (
    _check_forward,
    _cpu_kernels,
    _direct_infer,
    _direct_train,
    _engine,
    _infer,
    _train,
    batch_norm_backward,
    update_running,
)


@dataclass(frozen=True)
class Convention:
    """How one framework's BatchNorm keeps its running statistics.

    ``momentum_is_new`` is True when ``momentum`` weighs the new batch
    (PyTorch), False when it weighs the old value (Keras, Paddle, Flax).
    """

    name: str
    momentum: float
    eps: float
    axis: int
    momentum_is_new: bool
    unbiased_running_var: bool


class IncompatibleKeys(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` returns, as PyTorch's
    ``load_state_dict`` does: the layer's keys the state lacked, and the
    state's keys the layer has no use for."""

    missing_keys: list
    unexpected_keys: list


CONVENTIONS = {
    "torch": Convention("torch", 0.1, 1e-5, 1, True, True),
    "keras": Convention("keras", 0.99, 1e-3, -1, False, False),
    "paddle": Convention("paddle", 0.9, 1e-5, 1, False, False),
    "flax": Convention("flax", 0.99, 1e-5, -1, False, False),
}

_DEFAULT = object()
_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@_quiet  # var + eps may be 0 (inf), or negative when set by hand (NaN)
def _host_mean_invstd(running_mean, running_var, eps):
    """Float64 copies of a running mean held anywhere, and ``1 / sqrt(running_var + eps)``."""
    mean = np.array(_engine_host(running_mean), np.float64)
    return mean, 1.0 / np.sqrt(np.asarray(_engine_host(running_var), np.float64) + eps)


class BatchNorm:
    """Batch Normalization layer with a framework's conventions.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    convention : {"torch", "keras", "paddle", "flax"}
        Whose defaults and momentum meaning to reproduce (see ``CONVENTIONS``).
    momentum : float or None, optional
        The convention's default when omitted. ``None`` (torch only) gives a
        cumulative average, factor ``1 / num_batches_tracked``.
    eps : float, optional
        0 or more; the convention's default when omitted.
    axis : int, optional
        Channel axis (1 for torch and paddle, -1 for keras and flax).
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); None when False.
    track_running_stats : bool
        Keep running statistics; when False, batch statistics are used in eval
        mode too, as in PyTorch. As there, a layer whose ``running_mean`` and
        ``running_var`` are set to None uses batch statistics in both modes,
        and one switched to False after it has them still uses them in eval
        mode but no longer updates them. Running statistics set by hand are
        checked at the next forward (both or neither, C floats, writable when
        updated).
    dtype : numpy dtype
        Of the parameters and running statistics (float32 by default, and
        for None, as PyTorch's default dtype).
    backend : {"auto", "cpu", "cuda", "numpy"}
    activation : {None, "relu"}
        Fuse a ReLU after the normalisation.

    Raises
    ------
    ValueError
        Unknown convention or backend, ``num_features < 1``, a ``momentum``
        that is no number, ``momentum=None`` outside the torch convention, a
        negative ``eps``; the last three also when set after construction.
    TypeError
        A ``dtype`` other than float16, float32 and float64; an ``eps`` that
        is not a real number (also when set after).

    Examples
    --------
    >>> import numpy as np, numbn
    >>> bn = numbn.BatchNorm(3)
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> y = bn(x)
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.num_batches_tracked, y.shape, bn.grad_bias
    (1, (8, 3, 4, 4), array([128., 128., 128.], dtype=float32))
    """

    def __init__(self, num_features: int, *, convention: str = "torch", momentum=_DEFAULT,
                 eps=_DEFAULT, axis=_DEFAULT, affine: bool = True,
                 track_running_stats: bool = True, dtype=np.float32, backend: str = "auto",
                 activation=None):
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}; choose one of "
                             f"{', '.join(CONVENTIONS)}")
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        conv = CONVENTIONS[convention]
        self.convention = conv
        self.num_features = int(num_features)
        self.momentum = conv.momentum if momentum is _DEFAULT else momentum
        self.eps = conv.eps if eps is _DEFAULT else eps
        self.axis = conv.axis if axis is _DEFAULT else axis
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = np.dtype(np.float32 if dtype is None else dtype)  # None: as PyTorch's default
        if self.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, float32 or float64, not {self.dtype}")
        self.backend = _check_name(backend)
        _checks.activation(activation)
        self.activation = activation
        self.training = True
        self.weight = self.bias = None
        self.running_mean = self.running_var = None
        self.num_batches_tracked = 0 if track_running_stats else None
        self.grad_weight = self.grad_bias = None
        self._saved = None
        #: Called as ``observer(self, mean, var_biased, count)`` (float64 per-channel
        #: arrays) after every forward that computes batch statistics; used by
        #: ``numbn.recalibrate`` to accumulate exact population statistics.
        self._observer = None
        self.reset_parameters()

    # -- modes and state ---------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (batch statistics, running statistics updated)."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Inference mode (running statistics, nothing updated)."""
        return self.train(False)

    def reset_running_stats(self) -> None:
        """Running mean zeros, running variance ones, ``num_batches_tracked`` 0
        (in place, as :meth:`load_state_dict` writes)."""
        if self.track_running_stats:
            self._write("running_mean", np.zeros(self.num_features, self.dtype))
            self._write("running_var", np.ones(self.num_features, self.dtype))
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Running statistics reset, ``weight`` ones, ``bias`` zeros (in place)."""
        self.reset_running_stats()
        if self.affine:
            self._write("weight", np.ones(self.num_features, self.dtype))
            self._write("bias", np.zeros(self.num_features, self.dtype))

    def _write(self, key: str, value: np.ndarray) -> None:
        """Set parameter or buffer ``key`` to the NumPy vector ``value``: into
        the array the layer holds, in place (on its device, in its dtype), as
        PyTorch's ``copy_``, so that references held elsewhere (an
        optimiser's) stay the layer's; a new array when there is none yet or
        the held one cannot take it (read-only, or set to another shape)."""
        held = getattr(self, key)
        if held is None or tuple(held.shape) != value.shape \
                or (isinstance(held, np.ndarray) and not held.flags.writeable):
            setattr(self, key, value)
        elif isinstance(held, np.ndarray):
            held[...] = value
        else:
            _engine("cuda").assign(held, value)

    @property
    def momentum(self):
        """The convention's momentum (``CONVENTIONS``), checked when set, at
        construction or after: a real number, or None (cumulative average)
        in the torch convention. A ValueError otherwise, and the layer keeps
        the momentum it had."""
        return self._momentum

    @momentum.setter
    def momentum(self, value) -> None:
        if value is None:
            if not self.convention.momentum_is_new:
                raise ValueError(f"momentum=None (cumulative average) is a torch convention; "
                                 f"{self.convention.name} needs a number")
        else:
            try:
                _checks.momentum(value)
            except TypeError:
                raise ValueError(f"momentum must be a number (or None in the torch "
                                 f"convention), got {value!r}") from None
        self._momentum = value

    @property
    def eps(self) -> float:
        """Added to the variance; checked when set, at construction or after
        (a real number, 0 or more: TypeError, ValueError), so a bad one
        never reaches a forward."""
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps = _checks.eps(value)

    def _factor(self, tracked: int) -> float:
        """Weight of the new batch in the running-statistics update that
        makes ``num_batches_tracked`` equal ``tracked``."""
        if self._momentum is None:
            return 1.0 / tracked
        m = float(self._momentum)
        return m if self.convention.momentum_is_new else 1.0 - m

    # -- freezing for fine-tuning ------------------------------------------

    #: Set on the instance by :meth:`freeze`; the class default leaves layers unfrozen.
    _frozen = False

    @property
    def frozen(self) -> bool:
        """True between :meth:`freeze` and :meth:`unfreeze`."""
        return self._frozen

    def freeze(self) -> BatchNorm:
        """Freeze the layer for fine-tuning, as Keras's ``trainable = False`` does.

        A frozen layer normalises with its running statistics even in training
        mode and updates nothing: neither the running statistics nor
        ``num_batches_tracked``. Its backward is the inference-form backward
        (statistics held constant), and it sets ``grad_weight`` and
        ``grad_bias`` to None, as PyTorch leaves ``.grad`` of a parameter with
        ``requires_grad=False`` and as Keras leaves non-trainable weights out
        of the gradients: an optimiser loop that skips None gradients leaves
        ``weight`` and ``bias`` as they are. ``training`` is not changed, and
        :meth:`unfreeze` restores the usual behaviour. ``numbn.recalibrate``
        unfreezes a layer for the length of its block.

        Returns
        -------
        BatchNorm
            ``self``.

        Raises
        ------
        ValueError
            The layer has no running statistics (``track_running_stats=False``)
            to normalise with.

        Examples
        --------
        >>> import numpy as np, numbn
        >>> bn = numbn.BatchNorm(2).freeze()
        >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)
        >>> y = bn(x)                      # running statistics: mean 0, variance 1
        >>> dx = bn.backward(np.ones_like(y))
        >>> bn.training, bn.frozen, bn.num_batches_tracked, bn.grad_weight
        (True, True, 0, None)
        """
        if not self.track_running_stats:
            raise ValueError("cannot freeze a BatchNorm without running statistics "
                             "(track_running_stats=False): a frozen layer normalises with them")
        self._frozen = True
        return self

    def unfreeze(self) -> BatchNorm:
        """Undo :meth:`freeze`; returns ``self``."""
        self._frozen = False
        return self

    # -- forward and backward -----------------------------------------------

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """Normalise ``x``; in training mode, update the running statistics.

        Parameters
        ----------
        x : array with ``num_features`` channels along ``self.axis``

        Returns
        -------
        y : array of x's shape, dtype and kind.

        Raises
        ------
        TypeError, ValueError
            As in :func:`numbn.batch_norm`; nothing is changed then, but that
            :meth:`backward` has no forward to differentiate until the next
            one succeeds (it raises, where it would have used the forward
            before the failed one).
        """
        self._saved = None  # a forward that raises leaves backward() nothing
        y = self._direct_forward(x)
        return self._forward(x) if y is None else y

    def _use_batch(self) -> bool:
        """Whether a forward normalises with the batch's statistics: in
        training mode (a frozen layer uses its running statistics then too,
        freeze()), and in eval mode when there are no running statistics
        (``track_running_stats=False``, or both set to None), as in PyTorch,
        which decides by the buffers, not the flag."""
        return (self.training and not self._frozen) or (self.running_mean is None
                                                         and self.running_var is None)

    def _updates(self) -> bool:
        """Whether a forward with batch statistics updates the running ones
        (and counts the batch): in training mode, unfrozen, tracking."""
        return self.training and not self._frozen and self.track_running_stats

    def _updates_running(self) -> bool:
        """Whether a forward with batch statistics updates running statistics
        that exist (:meth:`_updates`; they may have been set to None)."""
        return self._updates() and self.running_mean is not None

    def _check_running(self) -> None:
        """Check the running statistics as the functions check theirs, before
        anything changes: they may have been set since the layer was made.
        Both None (no running statistics) or both vectors of ``num_features``
        floats, writable when this forward updates them."""
        rm, rv = self.running_mean, self.running_var
        if (rm is None) != (rv is None):
            raise ValueError("running_mean and running_var must both be arrays or both None "
                             "(None: batch statistics in every mode, as in PyTorch)")
        update = self._use_batch() and self._updates()
        _checks.vector(rm, self.num_features, "running_mean", writable=update)
        _checks.vector(rv, self.num_features, "running_var", writable=update)

    def _direct_forward(self, x):
        """:meth:`forward` by the functions' direct path
        (``numbn.functional._direct_channels``): ``y``, or None to leave the call
        to :meth:`_forward`. Takes parameters and running statistics as the
        kernels take them (NumPy float32/float64 vectors), so there is
        nothing to place. An input without ``num_features`` channels goes
        to :meth:`_forward`, which says so (``channels=``: a layer without
        vectors, no affine and no running statistics, has nothing else to
        check C by)."""
        axis = self.axis
        if (self.running_mean is None) != (self.running_var is None):
            return None  # set by hand, one of them: _forward says so
        if not self._use_batch():  # no NumPy arithmetic here: no error state to guard
            y = _direct_infer(x, self.running_mean, self.running_var, self.weight, self.bias,
                              self.eps, axis, self.backend, self.activation,
                              channels=self.num_features)
            if y is not None:
                self._save_running(x, axis % x.ndim, direct=True)
            return y
        return self._direct_train_step(x, axis)

    @_quiet  # _after_batch's NumPy arithmetic: eps=0 on a constant channel divides by 0
    def _direct_train_step(self, x, axis):
        """The training half of :meth:`_direct_forward`."""
        update = self._updates_running()
        done = _direct_train(x, self.weight, self.bias, self.eps, axis, self.backend,
                             self.activation,
                             *((self.running_mean, self.running_var) if update else ()),
                             channels=self.num_features)
        if done is None:
            return None
        y, mean, var, n = done
        self._after_batch(x, mean, var, n, axis % x.ndim)
        return y

    @_quiet
    def _forward(self, x):
        """:meth:`forward` by the general path."""
        _checks.input_array(x)
        # The channel count first: with the wrong one, the weight's own
        # check ("weight must have shape (4,)") would blame the layer's weight.
        if x.shape[_checks.channel_axis(self.axis, len(x.shape))] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels on axis {self.axis}, "
                             f"got input of shape {tuple(x.shape)}")
        axis, relu = _check_forward(x, self.weight, self.bias, self.axis, None,
                                    self.activation)
        self._check_running()
        if not self._use_batch():
            self._place(x)
            y = _infer(x, self.running_mean, self.running_var, self.weight, self.bias,
                       self.eps, axis, self.backend, None, relu)
            self._save_running(x, axis)
            return y
        n = _checks.training_count(x.shape, axis)
        self._place(x)
        y, mean, var, _ = _train(x, self.weight, self.bias, self.eps, axis, self.backend,
                                 None, relu)
        self._after_batch(x, mean, var, n, axis)
        return y

    def _save_running(self, x, axis: int, direct: bool = False) -> None:
        """What the backward of an eval-mode forward needs: x and the running
        statistics as float64 mean and invstd, copies (a float64 layer's
        running mean changed after the forward does not change the backward).
        After the direct path (``direct``; the ``"cpu"`` backend), NumPy
        vectors as the kernels take them go through one compiled call
        (``numbn._cpu.mean_invstd``, the same float64 arithmetic, no warnings):
        its five NumPy operations and their error-state guard took a third of
        an eval at (2, 64, 4, 4) with the caches cold (10 of 31 us). Other
        backends keep the NumPy form."""
        rm, rv = self.running_mean, self.running_var
        if direct and _checks.kernel_ready((rm, rv), self.num_features):
            mean, invstd = np.empty(rm.shape[0]), np.empty(rm.shape[0])
            _cpu_kernels().mean_invstd(rm, rv, float(self.eps), mean, invstd)
        else:
            mean, invstd = _host_mean_invstd(rm, rv, self.eps)
        self._saved = (x, mean, invstd, False, axis)

    def _after_batch(self, x, mean, var, n: int, axis: int) -> None:
        """After a forward with batch statistics (float64 ``mean`` and biased
        ``var`` of ``n`` values per channel): the observer, the running
        statistics, and what the backward needs."""
        count = self._updates() and self.num_batches_tracked is not None
        update = self._updates_running()
        factor = self._factor(self.num_batches_tracked + 1 if count else 1) if update else None
        if self._observer is not None:
            self._observer(self, mean, var, n)
        if count:  # as PyTorch, also when the running statistics were set to None
            self.num_batches_tracked += 1
        if update:
            update_running(self.running_mean, self.running_var, mean, var, n, factor,
                           unbiased=self.convention.unbiased_running_var)
        self._saved = (x, mean, 1.0 / np.sqrt(var + self.eps), True, axis)

    def _place(self, x) -> None:
        """Keep the parameters and running statistics where ``x`` lives.

        A device input (CuPy, torch, numba) moves NumPy ones to its device and
        kind on the first such forward, so later forwards and the in-place
        running-statistics updates stay on the device; a NumPy input for a
        host backend brings device ones back. Values are unchanged either way.
        """
        device = is_device_array(x)
        # Resolved first, so that a backend that cannot run here raises its
        # own error before anything moves (BackendUnavailableError, not the
        # driver's error from a copy to a device that is not there).
        if resolve(self.backend, x) == "cuda" and not device:
            return  # NumPy input on the cuda backend: either residency works
        for key in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(self, key)
            on_host = isinstance(value, np.ndarray)
            if value is None or on_host != device:  # absent, or already in place
                continue
            if device:
                setattr(self, key, _engine("cuda").to_device_like(value, x))
            else:
                setattr(self, key, np.asarray(_engine_host(value), self.dtype))

    def backward(self, dy):
        """Gradient with respect to the last forward's input.

        After a training forward this is the full BatchNorm backward; after an
        eval-mode forward it is the backward of the inference form (frozen
        statistics). Sets ``grad_weight`` and ``grad_bias`` (None without
        ``affine``, and None while :meth:`freeze` is in effect), replacing
        what a backward before set: sum them yourself to accumulate, as
        PyTorch's ``.grad`` does.

        The layer keeps what its last forward needs and nothing more, unlike
        an autograd graph: ``x`` itself (no copy) and the statistics. So a
        forward's backward must come before the layer's next forward (a
        layer applied twice in one step, ``bn(x1); bn(x2)``, gives the
        gradient of the second call for either ``dy``: use two layers that
        share ``weight`` and ``bias``), and ``x`` must not be changed in
        place in between (PyTorch raises there; here dx would be that of the
        changed ``x``). Only ``dy``'s shape is checked against ``x``'s.

        Raises
        ------
        RuntimeError
            When no forward came before, or the last one raised.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first (none was made, or the "
                               "last one raised)")
        x, mean, invstd, training, axis = self._saved
        # The float64 statistics the forward normalised with, not rounded to
        # x's dtype as batch_norm_forward returns them: with a mean far from
        # 0 against the spread, that rounding alone put float32 dx off by
        # 3e-3 (relative; 5e-8 in float64. tests/test_layer.py).
        eng = _engine(resolve(self.backend, x))
        dx, dw, db = batch_norm_backward(dy, x, eng.like(mean, np.float64, x),
                                         eng.like(invstd, np.float64, x),
                                         self.weight, bias=self.bias, training=training,
                                         axis=axis, backend=self.backend,
                                         activation=self.activation)
        self.grad_weight, self.grad_bias = (None, None) if self._frozen else (dw, db)
        return dx

    # -- state dict and files ----------------------------------------------

    def _expected_state(self) -> dict:
        """The state's keys and shapes: those of the parameters and buffers
        the layer has. As in PyTorch, one set to None is not part of the
        state (running statistics set to None, say), so such a layer's state
        loads back into it."""
        shapes = {}
        for key in ("weight", "bias", "running_mean", "running_var"):
            if getattr(self, key) is not None:
                shapes[key] = (self.num_features,)
        if self.num_batches_tracked is not None:
            shapes["num_batches_tracked"] = ()
        return shapes

    def state_dict(self) -> dict:
        """Copies of the parameters and buffers under PyTorch's keys, as NumPy arrays."""
        state = {}
        for key in self._expected_state():
            value = getattr(self, key)
            if key == "num_batches_tracked":
                state[key] = np.array(value, dtype=np.int64)
            else:
                state[key] = np.array(_engine_host(value), dtype=self.dtype)
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> IncompatibleKeys:
        """Load a state (PyTorch's keys); every entry is checked before any change.

        Values are copied into the arrays the layer holds, in place, as
        PyTorch's ``load_state_dict`` does: references to ``weight`` and the
        other arrays taken before (an optimiser's) see the loaded values.

        Parameters
        ----------
        state : mapping of str to array
        strict : bool
            As in PyTorch: True, the keys must be the layer's; False, keys the
            layer does not have are ignored and its keys that ``state`` lacks
            keep their values. Either way a state without
            ``num_batches_tracked`` (PyTorch's before 0.4.1) keeps the layer's
            count, as PyTorch does.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, lists, as PyTorch returns them
            (empty with ``strict=True``, which raises instead).

        Raises
        ------
        ValueError
            Missing or unexpected keys (``strict=True``), wrong shapes,
            values that are not floating (they are cast to the layer's
            dtype, as PyTorch's ``copy_`` casts), a ``num_batches_tracked``
            that is not one integer of int64's range; the layer is left
            untouched.
        """
        expected = self._expected_state()
        unexpected = sorted(set(state) - set(expected))
        if "num_batches_tracked" not in state:
            expected.pop("num_batches_tracked", None)
        missing = sorted(set(expected) - set(state))
        if strict and (missing or unexpected):
            raise ValueError(f"state does not match the layer: missing {missing}, "
                             f"unexpected {unexpected}")
        staged = {}
        for key, shape in expected.items():
            if key not in state:
                continue
            value = np.asarray(state[key])
            # PyTorch takes num_batches_tracked of shape (1,) too (old checkpoints).
            if value.shape != shape and not (key == "num_batches_tracked"
                                             and value.shape == (1,)):
                raise ValueError(f"{key} must have shape {shape}, got {value.shape}")
            if key == "num_batches_tracked":
                if value.dtype.kind not in "iu":
                    raise ValueError(f"num_batches_tracked must be an integer, got {value.dtype}")
                count = int(value.reshape(()))
                if not 0 <= count <= np.iinfo(np.int64).max:
                    raise ValueError(f"num_batches_tracked must be in 0..2**63-1 (int64), "
                                     f"got {count}")
                staged[key] = count
            elif value.dtype.kind != "f":
                raise ValueError(f"{key} must be a floating array, got {value.dtype}")
            else:
                staged[key] = value.astype(self.dtype)
        for key, value in staged.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                self._write(key, value)
        return IncompatibleKeys(missing, unexpected)

    def save(self, path) -> None:
        """Write ``state_dict()`` to an ``.npz`` file (no pickle); ``.npz`` is
        appended to a path without it, as ``np.savez`` does. ``path`` may be
        a file object open for binary writing."""
        np.savez(path, **self.state_dict())

    def load(self, path) -> None:
        """Read a file written by :meth:`save` (or any ``.npz`` of a state dict),
        by the path given to :meth:`save`: ``.npz`` appended when that path is
        not a file and does not end in it. ``path`` may be a file object
        open for binary reading, as :meth:`save` takes one.

        Raises
        ------
        ValueError
            The file is no ``.npz`` archive (a ``.npy`` array, text, a
            truncated zip), or holds a state that does not fit the layer
            (:meth:`load_state_dict`); the layer is left untouched.
        OSError
            The file cannot be read (``FileNotFoundError`` when it is missing).
        """
        with contextlib.ExitStack() as stack:
            fh = path
            if not hasattr(path, "read"):
                path = os.fsdecode(path)
                if not os.path.isfile(path) and not path.endswith(".npz"):
                    path += ".npz"
                # Opened here, so that it is closed also when NumPy cannot
                # read it (np.load left a truncated zip's file open).
                fh = stack.enter_context(open(path, "rb"))
            try:
                f = np.load(fh, allow_pickle=False)
            except (ValueError, zipfile.BadZipFile) as e:
                # NumPy's words for a file that is neither .npy nor .npz speak
                # of pickled data, which a state file never holds.
                raise ValueError(f"{path!r} is not an .npz file of a state (as save or "
                                 f"np.savez writes): {e}") from None
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise ValueError(f"{path!r} holds one array (.npy), not an .npz file of a state")
            with f:
                self.load_state_dict({k: f[k] for k in f.files})

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, convention={self.convention.name!r}, "
                f"momentum={self.momentum}, eps={self.eps}, axis={self.axis}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}"
                + (f", activation={self.activation!r}" if self.activation else "") + ")")


def _engine_host(value):
    """A parameter as a NumPy array, wherever it lives."""
    if isinstance(value, np.ndarray) or value is None:
        return value
    return _engine("cuda").host(value)
