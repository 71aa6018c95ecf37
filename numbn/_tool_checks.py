"""Self-checks of folding, recalibration and the fused ReLU, for ``numbn check``.

Each check builds a small case from ``rng``, computes it two independent ways
and reports ``(name, passed, detail)``; an exception inside a check is a
failed check, not a crash of the command.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .folding import fold_conv, fold_linear
from .functional import batch_norm_backward, batch_norm_forward
from .layers import BatchNorm
from .recalibrate import recalibrate

#: Largest relative error a float64 check accepts (results are ~1e-15 apart).
_TOL64 = 1e-10
#: Largest relative error of the float32 fused-ReLU check against the reference.
_TOL32 = 1e-5


def _conv(x, w, b, groups):
    """Reference cross-correlation, stride 1, no padding: ``x (N, Cin, *S)``,
    ``w (Cout, Cin/groups, *K)``; float64."""
    nd = w.ndim - 2
    cig, cog = x.shape[1] // groups, w.shape[0] // groups
    win = sliding_window_view(x, w.shape[2:], axis=tuple(range(2, 2 + nd)))
    axes = [1] + list(range(2 + nd, 2 + 2 * nd)), [1] + list(range(2, 2 + nd))
    parts = [np.tensordot(win[:, g * cig:(g + 1) * cig], w[g * cog:(g + 1) * cog], axes)
             for g in range(groups)]
    return np.moveaxis(np.concatenate(parts, axis=-1), -1, 1) + b.reshape((1, -1) + (1,) * nd)


def _conv_transpose(x, w, b, groups):
    """Reference transposed convolution: ``w (Cin, Cout/groups, *K)``; float64."""
    spatial, kernel = x.shape[2:], w.shape[2:]
    cig, cog = x.shape[1] // groups, w.shape[1]
    y = np.zeros((x.shape[0], cog * groups)
                 + tuple(s + k - 1 for s, k in zip(spatial, kernel, strict=True)))
    for g in range(groups):
        xg, wg = x[:, g * cig:(g + 1) * cig], w[g * cig:(g + 1) * cig]
        for k in np.ndindex(*kernel):
            at = tuple(slice(i, i + s) for i, s in zip(k, spatial, strict=True))
            y[(slice(None), slice(g * cog, (g + 1) * cog)) + at] += np.einsum(
                "nc...,co->no...", xg, wg[(slice(None), slice(None)) + k])
    return y + b.reshape((1, -1) + (1,) * len(kernel))


def _eval_bn(rng, c, **kw) -> BatchNorm:
    bn = BatchNorm(c, dtype=np.float64, **kw).eval()
    bn.running_mean[...] = rng.normal(0.0, 1.0, c)
    bn.running_var[...] = rng.uniform(0.3, 3.0, c)
    bn.weight[...] = rng.normal(1.0, 0.5, c)
    bn.bias[...] = rng.normal(0.0, 0.5, c)
    return bn


def _rel_err(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    diff = np.max(np.abs(np.asarray(actual, np.float64) - expected))
    return float(diff / max(1.0, float(np.max(np.abs(expected)))))


def _verdict(err: float, tol: float) -> tuple[bool, str]:
    return bool(err <= tol), f"max relative error {err:.1e} (tolerance {tol:.0e})"


def _check_fold_conv(rng):
    worst = 0.0
    # A grouped Conv2d with channels-last keras BatchNorm after it, then a grouped
    # ConvTranspose1d: fold uses the parameters per output channel whatever the axis.
    bn = _eval_bn(rng, 6, convention="keras")
    w, b = rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6)
    x = rng.standard_normal((2, 4, 6, 5))
    y = np.moveaxis(bn(np.ascontiguousarray(np.moveaxis(_conv(x, w, b, 2), 1, -1))), -1, 1)
    w2, b2 = fold_conv(w, b, bn)
    worst = max(worst, _rel_err(_conv(x, w2, b2, 2), y))
    bn = _eval_bn(rng, 6)
    w, b = rng.standard_normal((4, 3, 3)), rng.standard_normal(6)
    x = rng.standard_normal((2, 4, 7))
    w2, b2 = fold_conv(w, None, bn, transpose=True)
    worst = max(worst, _rel_err(_conv_transpose(x, w2, b2, 2),
                                bn(_conv_transpose(x, w, np.zeros(6), 2))))
    return _verdict(worst, _TOL64)


def _check_fold_linear(rng):
    bn = _eval_bn(rng, 5)
    w, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    x = rng.standard_normal((9, 7))
    w2, b2 = fold_linear(w, b, bn)
    return _verdict(_rel_err(x @ w2.T + b2, bn(x @ w.T + b)), _TOL64)


def _check_recalibrate(rng):
    bn = BatchNorm(3, dtype=np.float64).eval()
    batches = [rng.normal(20.0 * k, 1.0 + k, (n, 3, 4)) for k, n in enumerate((3, 8, 5))]
    with recalibrate(bn):
        for batch in batches:
            bn(batch)
    flat = np.concatenate([np.moveaxis(b, 1, -1).reshape(-1, 3) for b in batches])
    err = max(_rel_err(bn.running_mean, flat.mean(axis=0)),
              _rel_err(bn.running_var, flat.var(axis=0, ddof=1)))
    passed, detail = _verdict(err, _TOL64)
    if bn.training or bn.num_batches_tracked != len(batches):
        return False, detail + "; mode or num_batches_tracked not as documented"
    return passed, detail


def _check_fused_relu(rng):
    worst = 0.0
    # A random NCHW batch, and one whose ReLU input is exactly 0 (x at the mean, bias 0)
    # at a third of its points, where the gradient must be 0.
    boundary = np.resize(np.array([-1.0, 0.0, 1.0], np.float32), 4 * 3 * 6).reshape(3, 4, 6)
    for x in (rng.normal(0.5, 2.0, (4, 3, 5, 6)).astype(np.float32),
              np.ascontiguousarray(boundary.transpose(1, 0, 2))):
        c = x.shape[1]
        dy = rng.standard_normal(x.shape).astype(np.float32)
        w = rng.normal(0.5, 1.0, c).astype(np.float32)
        b = (np.zeros(c) if x.ndim == 3 else rng.normal(0.0, 0.5, c)).astype(np.float32)
        for backend in ("auto", "numpy"):  # the default backend against the reference
            y, mean, invstd = batch_norm_forward(x, w, b, backend=backend, activation="relu")
            grads = batch_norm_backward(dy, x, mean, invstd, w, bias=b, backend=backend,
                                        activation="relu")
            if backend == "auto":
                got = (y,) + grads
        worst = max([worst] + [_rel_err(g, e) for g, e in zip(got, (y,) + grads, strict=True)])
    return _verdict(worst, _TOL32)


def tool_checks(rng=None) -> list[tuple[str, bool, str]]:
    """Run the self-checks of folding, recalibration and the fused ReLU.

    Parameters
    ----------
    rng : numpy.random.Generator, int or None
        Source of the random cases (anything ``numpy.random.default_rng`` takes).

    Returns
    -------
    list of (str, bool, str)
        ``(case name, passed, detail)`` per check.

    Examples
    --------
    >>> import numpy as np
    >>> from numbn._tool_checks import tool_checks
    >>> all(passed for _, passed, _ in tool_checks(np.random.default_rng(0)))
    True
    """
    rng = np.random.default_rng(rng)
    results = []
    for name, check in (("fold_conv vs conv + eval BatchNorm", _check_fold_conv),
                        ("fold_linear vs linear + eval BatchNorm", _check_fold_linear),
                        ("recalibrate vs concatenated statistics", _check_recalibrate),
                        ("fused relu vs reference (float32)", _check_fused_relu)):
        try:
            passed, detail = check(rng)
        except Exception as exc:  # a failed check is reported, never raised
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        results.append((name, passed, detail))
    return results
