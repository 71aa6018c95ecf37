"""Re-estimated running statistics ("precise BN"): :func:`recalibrate`.

Running statistics kept by momentum are an exponential average of per-batch
statistics taken while the weights were still moving; after a domain shift,
after weight averaging (SWA) or with another batch size they no longer describe
what the network sees. ``recalibrate`` replaces them by the exact population
mean and variance of the data that passes through the layers inside a
``with`` block. Each batch's ``(count, mean, M2)`` is merged into a per-layer
float64 total with Chan's formula, so the result is the statistics of the
concatenated data, not an average of per-batch variances, which misses the
spread of the batch means (``tests/test_recalibrate.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .functional import _engine
from .layers import BatchNorm, _engine_host
from .sync import chan_merge

__all__ = ["recalibrate"]


def _host64(v) -> np.ndarray:
    return np.asarray(_engine_host(v), dtype=np.float64)


def _write(target, values: np.ndarray, dtype) -> None:
    """``target[...] = values`` in place, wherever ``target`` lives."""
    if isinstance(target, np.ndarray):
        target[...] = values.astype(dtype)
    else:
        _engine("cuda").assign(target, values)


@dataclass
class _Total:
    """Exact statistics of everything one layer has seen: count, mean, M2 (float64)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    batches: int = 0

    def add(self, mean, var_biased, count: int) -> None:
        # Chan, Golub and LeVeque's pairwise merge: exact up to rounding for
        # batches with different means, where averaging variances is not.
        if count == 0:
            return
        mean = _host64(mean)
        self.count, self.mean, self.m2 = chan_merge(
            np.array([self.count, count]), np.stack([self.mean, mean]),
            np.stack([self.m2, _host64(var_biased) * count]))
        self.batches += 1


#: What a block changes or may change, put back as it was at the end: the
#: running statistics' arrays too, should the block have replaced them.
_SAVED = ("training", "momentum", "_observer", "_frozen", "num_batches_tracked", "_saved",
          "grad_weight", "grad_bias", "running_mean", "running_var")


def _layers(layers) -> list[BatchNorm]:
    items = [layers] if isinstance(layers, BatchNorm) else list(layers)
    unique, seen = [], set()
    for bn in items:
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"recalibrate takes BatchNorm layers, got {type(bn).__name__}")
        if not bn.track_running_stats:
            raise ValueError(f"cannot recalibrate {bn!r}: it has no running statistics "
                             f"(track_running_stats=False)")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot recalibrate {bn!r}: it has no running statistics "
                             f"(running_mean and running_var set to None)")
        if id(bn) not in seen:
            seen.add(id(bn))
            unique.append(bn)
    return unique


def _observer(total: _Total, previous, held: list):
    """A layer observer that adds each batch to ``total`` and, when an
    enclosing block observes the layer too (``previous``), keeps the batch in
    ``held`` for it: handed on only when this block ends normally, so that an
    inner block that raises adds nothing to the outer one."""

    def observe(layer, mean, var, count):
        mean, var = _host64(mean), _host64(var)  # once, for both (a device copy, on CUDA)
        total.add(mean, var, count)
        if previous is not None:
            held.append((layer, mean.copy(), var.copy(), count))

    return observe


def _no_update_momentum(bn: BatchNorm) -> float:
    """The momentum whose running-statistics update changes nothing."""
    return 0.0 if bn.convention.momentum_is_new else 1.0


@contextmanager
def recalibrate(layers):
    """Re-estimate running statistics from the data seen inside a ``with`` block.

    Inside the block the layers normalise with batch statistics (training
    mode, frozen layers included) and accumulate the exact statistics of
    every batch they see. On a normal exit each layer's ``running_mean`` and
    ``running_var`` are the population mean and variance of all of it,
    merged across batches in float64 (variance unbiased, ``n / (n - 1)``, for
    the torch convention; biased for keras, paddle and flax), and
    ``num_batches_tracked`` is the number of batches that went into them, as
    ``torch.optim.swa_utils.update_bn`` leaves it. Mode, momentum, observer
    and frozen state are restored; a layer that saw no batch keeps its
    running statistics. The per-batch momentum updates inside the block
    never reach the result.

    If the block raises, every layer is left exactly as it was: running
    statistics (the same arrays, should the block have replaced them),
    ``num_batches_tracked``, mode, momentum, gradients.

    Blocks nest: the batches of an inner block over a layer also count in the
    enclosing block's result, once the inner block ends normally; an inner
    block that raises adds nothing to the enclosing one.

    Parameters
    ----------
    layers : BatchNorm or iterable of BatchNorm
        Every layer must keep running statistics. A layer listed twice counts
        once.

    Yields
    ------
    None

    Raises
    ------
    TypeError
        Something that is not a BatchNorm.
    ValueError
        A layer without running statistics (``track_running_stats=False``, or
        ``running_mean`` and ``running_var`` set to None); nothing is changed.

    Examples
    --------
    >>> import numpy as np, numbn
    >>> bn = numbn.BatchNorm(1, dtype=np.float64).eval()
    >>> batches = [np.array([[0.0], [2.0]]), np.array([[10.0], [12.0]])]
    >>> with numbn.recalibrate(bn):
    ...     for b in batches:
    ...         _ = bn(b)
    >>> bn.running_mean, bn.running_var, bn.training, bn.num_batches_tracked
    (array([6.]), array([34.66666667]), False, 2)
    """
    layers = _layers(layers)
    saved = {id(bn): ({k: getattr(bn, k) for k in _SAVED},
                      _host64(bn.running_mean).copy(), _host64(bn.running_var).copy())
             for bn in layers}
    totals = {id(bn): _Total(0, np.zeros(bn.num_features), np.zeros(bn.num_features))
              for bn in layers}
    held = {id(bn): [] for bn in layers}

    def restore(bn: BatchNorm) -> None:
        attrs, mean, var = saved[id(bn)]
        for key, value in attrs.items():
            setattr(bn, key, value)
        _write(bn.running_mean, mean, bn.dtype)
        _write(bn.running_var, var, bn.dtype)

    for bn in layers:
        bn._observer = _observer(totals[id(bn)], bn._observer, held[id(bn)])
        bn.momentum = _no_update_momentum(bn)
        bn._frozen = False
        bn.training = True
    try:
        yield
    except BaseException:
        for bn in layers:
            restore(bn)
        raise
    for bn in layers:
        restore(bn)
        for batch in held[id(bn)]:  # to the enclosing block's observer
            bn._observer(*batch)
        total = totals[id(bn)]
        if total.batches == 0:
            continue
        var = total.m2 / (total.count - 1 if bn.convention.unbiased_running_var
                          else total.count)
        _write(bn.running_mean, total.mean, bn.dtype)
        _write(bn.running_var, var, bn.dtype)
        bn.num_batches_tracked = total.batches
