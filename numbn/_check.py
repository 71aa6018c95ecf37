"""``numbn check``: every available backend against the reference."""

from __future__ import annotations

import numpy as np

import numbn
from numbn import _reference as ref

#: (rtol, atol) per input dtype for values of order one.
TOLERANCE = {np.float16: (3e-3, 3e-3), np.float32: (5e-5, 5e-5), np.float64: (1e-10, 1e-10)}

CASES = [
    ("NCHW", (4, 3, 6, 5), 1),
    ("NHWC", (4, 6, 5, 3), -1),
    ("2-D", (32, 7), 1),
    ("NCDHW", (2, 3, 3, 4, 2), 1),
    ("C=1 large", (8, 1, 32, 32), 1),
]

LAYOUTS = {
    "contiguous": lambda a: a,
    "transposed": lambda a: np.ascontiguousarray(a.T).T,
    "sliced": lambda a: np.repeat(a, 2, axis=0)[::2],
}


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0.0))


def run_cases(backends=None, rng=None, dtypes=(np.float16, np.float32, np.float64)):
    """Yield ``(name, passed, detail)`` for every backend x case x dtype x layout."""
    rng = rng or np.random.default_rng(0)
    for backend in backends or numbn.available_backends():
        for (label, shape, axis) in CASES:
            for dtype in dtypes:
                rtol, atol = TOLERANCE[dtype]
                for lay, make in LAYOUTS.items():
                    x = make((rng.standard_normal(shape) * 2 + 0.5).astype(dtype))
                    c = shape[axis]
                    pdt = np.float32 if dtype == np.float16 else dtype  # mixed precision
                    w = (1 + 0.3 * rng.standard_normal(c)).astype(pdt)
                    b = (0.3 * rng.standard_normal(c)).astype(pdt)
                    dy = make(rng.standard_normal(shape).astype(dtype))
                    name = f"{backend:<5} {label:<10} {np.dtype(dtype).name:<8} {lay:<10}"
                    try:
                        errs = _compare(x, axis, w, b, dy, backend)
                    except Exception as exc:  # noqa: BLE001 - reported as a FAIL
                        yield name, False, f"{type(exc).__name__}: {exc}"
                        continue
                    n = x.size // c
                    worst = max(e / (atol * (np.sqrt(n) if k.startswith("d") and k != "dx"
                                             else 1) + rtol * s)
                                for k, (e, s) in errs.items())
                    detail = ", ".join(f"{k} {e:.1e}" for k, (e, _) in errs.items())
                    yield name, bool(worst <= 1.0), detail


def _compare(x, axis, w, b, dy, backend):
    y, mean, invstd = numbn.batch_norm_forward(x, w, b, axis=axis, backend=backend)
    y_ref, mean_ref, invstd_ref, _, _ = ref.forward_train(x, w, b, 1e-5, axis)
    rm, rv = mean_ref.astype(np.float32), (1 / invstd_ref ** 2).astype(np.float32)
    y_eval = numbn.batch_norm(x, rm, rv, w, b, False, axis=axis, backend=backend)
    y_eval_ref = ref.normalize(x, rm, rv, w, b, 1e-5, axis)
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, backend=backend)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, True, axis)
    y_relu = numbn.batch_norm_forward(x, w, b, axis=axis, backend=backend, activation="relu")[0]
    return {
        "y": (_err(y, y_ref), np.max(np.abs(y_ref))),
        "mean": (_err(mean, mean_ref), np.max(np.abs(mean_ref))),
        "eval": (_err(y_eval, y_eval_ref), np.max(np.abs(y_eval_ref))),
        "relu": (_err(y_relu, np.maximum(y_ref, 0)), np.max(np.abs(y_ref))),
        "dx": (_err(dx, dx_ref), np.max(np.abs(dx_ref))),
        "dweight": (_err(dw, dw_ref), np.max(np.abs(dw_ref))),
        "dbias": (_err(db, db_ref), np.max(np.abs(db_ref))),
    }
