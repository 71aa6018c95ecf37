"""Numba CPU kernels on the canonical ``(outer, C, inner)`` view.

Four primitives serve every operation and layout:

* :func:`stats`: per-channel mean and biased variance;
* :func:`normalize`: ``y = (x - m[c]) * a[c] + t[c]``, with an optional ReLU;
* :func:`backward_sums`: per-channel ``sum(g)`` and ``sum(g * (x - m))``,
  ``g`` being ``dy`` masked by the fused ReLU when there is one;
* :func:`backward_apply`: ``dx = g * a[c] + (x - m[c]) * b[c] + d[c]``.

Each has two loop orders. *Channel-major* (a long contiguous inner run, as in
NCHW) splits every channel's reduction into tasks; *row-major* (channels-last
and 2-D, inner run short) gives each task a block of rows over all channels,
so the innermost loop runs along contiguous channels. Either way a task owns
its partial results and the partials are merged afterwards; no two threads
write one location.

Variance: each task reduces blocks of ``_config.CPU_BLOCK`` elements by the
two-pass formula (the second pass hits the cache) and merges blocks and tasks
with Chan's formula, so there is no E[x^2] - E[x]^2 cancellation
(pinned by ``tests/test_numerics.py::test_large_mean_small_std``).

Arithmetic is float64 for every input dtype: accumulators, and the affine maps
too, and the affine maps subtract the mean first: ``x * scale + shift`` loses
the normalised signal when the mean is large beside the standard deviation
(same test), and ``(x - m) * a + t`` is exactly ``t`` where ``x == m``, which
makes the fused ReLU's boundary exact (``tests/test_activation.py``). NumPy has no
float16 in Numba, so float16 input is converted to float32 around the kernels.

``fastmath`` is limited to ``reassoc`` and ``contract``: reassociation lets
LLVM vectorise the reductions (a different summation order, as accurate), and
contraction forms fused multiply-adds. Neither changes NaN or Inf handling
(``tests/test_bad_input.py::test_nan_confined_to_channel``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from . import _config

_FLAGS = dict(parallel=True, cache=True, fastmath={"reassoc", "contract"})


@njit(inline="always")
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub and LeVeque)."""
    n = n_a + n_b
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    delta = mean_b - mean_a
    frac = n_b / n
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@njit(inline="always")
def _span(f0, f1, inner, o):
    """The part of row ``o`` that lies in the flat range ``[f0, f1)``."""
    start = o * inner
    return max(f0 - start, 0), min(f1 - start, inner)


@njit(**_FLAGS)
def _stats_channel_major(x, nsplit, block, pn, pmean, pm2):
    outer, C, inner = x.shape
    total = outer * inner
    for task in prange(C * nsplit):
        c = task // nsplit
        s = task - c * nsplit
        f0 = s * total // nsplit
        f1 = (s + 1) * total // nsplit
        n, mean, m2 = 0.0, 0.0, 0.0
        for b0 in range(f0, f1, block):
            b1 = min(b0 + block, f1)
            acc = 0.0
            for o in range(b0 // inner, (b1 - 1) // inner + 1):
                i0, i1 = _span(b0, b1, inner, o)
                for i in range(i0, i1):
                    acc += np.float64(x[o, c, i])
            nb = np.float64(b1 - b0)
            mb = acc / nb
            acc = 0.0
            for o in range(b0 // inner, (b1 - 1) // inner + 1):
                i0, i1 = _span(b0, b1, inner, o)
                for i in range(i0, i1):
                    d = np.float64(x[o, c, i]) - mb
                    acc += d * d
            n, mean, m2 = _chan_merge(n, mean, m2, nb, mb, acc)
        pn[c, s] = n
        pmean[c, s] = mean
        pm2[c, s] = m2


@njit(**_FLAGS)
def _stats_row_major(x, nsplit, block_rows, pn, pmean, pm2, bsum, bm2):
    # Loop order o, i, c: with channels last (inner == 1) the innermost loop
    # runs along contiguous channels and vectorises across them.
    outer, C, inner = x.shape
    for s in prange(nsplit):
        o0 = s * outer // nsplit
        o1 = (s + 1) * outer // nsplit
        n = 0.0
        for c in range(C):
            pmean[c, s] = 0.0
            pm2[c, s] = 0.0
        for r0 in range(o0, o1, block_rows):
            r1 = min(r0 + block_rows, o1)
            nb = np.float64((r1 - r0) * inner)
            for c in range(C):
                bsum[s, c] = 0.0
                bm2[s, c] = 0.0
            for o in range(r0, r1):
                for i in range(inner):
                    for c in range(C):
                        bsum[s, c] += np.float64(x[o, c, i])
            for c in range(C):
                bsum[s, c] /= nb
            for o in range(r0, r1):
                for i in range(inner):
                    for c in range(C):
                        d = np.float64(x[o, c, i]) - bsum[s, c]
                        bm2[s, c] += d * d
            for c in range(C):
                _, pmean[c, s], pm2[c, s] = _chan_merge(n, pmean[c, s], pm2[c, s],
                                                        nb, bsum[s, c], bm2[s, c])
            n += nb
        for c in range(C):
            pn[c, s] = n


@njit(cache=True)
def _merge_partials(pn, pmean, pm2, mean, var):
    C, nsplit = pn.shape
    for c in range(C):
        n, mu, m2 = 0.0, 0.0, 0.0
        for s in range(nsplit):
            n, mu, m2 = _chan_merge(n, mu, m2, pn[c, s], pmean[c, s], pm2[c, s])
        mean[c] = mu
        var[c] = m2 / n if n > 0 else np.nan


@njit(inline="always")
def _bn_relu(xv, m, a, t, relu):
    """``(x - m) * a + t``, then ReLU when asked; NaN passes through."""
    v = (xv - m) * a + t
    if relu and v < 0.0:
        v = 0.0
    return v


@njit(inline="always")
def _masked(g, xv, m, a, t, relu):
    """``dy`` where the fused ReLU passed its input, else 0 (0 at the boundary,
    as torch's ``threshold_backward``)."""
    if relu and not ((xv - m) * a + t > 0.0):
        return 0.0
    return g


@njit(**_FLAGS)
def _affine_channel_major(x, m, a, t, relu, y, isplit):
    outer, C, inner = x.shape
    for task in prange(outer * C * isplit):
        row = task // isplit
        s = task - row * isplit
        o = row // C
        c = row - o * C
        mc, ac, tc = m[c], a[c], t[c]
        for i in range(s * inner // isplit, (s + 1) * inner // isplit):
            y[o, c, i] = _bn_relu(np.float64(x[o, c, i]), mc, ac, tc, relu)


@njit(**_FLAGS)
def _affine_row_major(x, m, a, t, relu, y, nsplit):
    outer, C, inner = x.shape
    for s in prange(nsplit):
        for o in range(s * outer // nsplit, (s + 1) * outer // nsplit):
            for i in range(inner):
                for c in range(C):
                    y[o, c, i] = _bn_relu(np.float64(x[o, c, i]), m[c], a[c], t[c], relu)


@njit(**_FLAGS)
def _sums_channel_major(dy, x, m, a, t, relu, nsplit, psum, pdot):
    outer, C, inner = x.shape
    total = outer * inner
    for task in prange(C * nsplit):
        c = task // nsplit
        s = task - c * nsplit
        f0 = s * total // nsplit
        f1 = (s + 1) * total // nsplit
        mc, ac, tc = m[c], a[c], t[c]
        acc_g = 0.0
        acc_gx = 0.0
        if f1 > f0:
            for o in range(f0 // inner, (f1 - 1) // inner + 1):
                i0, i1 = _span(f0, f1, inner, o)
                for i in range(i0, i1):
                    xv = np.float64(x[o, c, i])
                    g = _masked(np.float64(dy[o, c, i]), xv, mc, ac, tc, relu)
                    acc_g += g
                    acc_gx += g * (xv - mc)
        psum[c, s] = acc_g
        pdot[c, s] = acc_gx


@njit(**_FLAGS)
def _sums_row_major(dy, x, m, a, t, relu, nsplit, psum, pdot):
    outer, C, inner = x.shape
    for s in prange(nsplit):
        for c in range(C):
            psum[c, s] = 0.0
            pdot[c, s] = 0.0
        for o in range(s * outer // nsplit, (s + 1) * outer // nsplit):
            for i in range(inner):
                for c in range(C):
                    xv = np.float64(x[o, c, i])
                    g = _masked(np.float64(dy[o, c, i]), xv, m[c], a[c], t[c], relu)
                    psum[c, s] += g
                    pdot[c, s] += g * (xv - m[c])


@njit(**_FLAGS)
def _apply_channel_major(dy, x, m, a, t, relu, b, d, dx, isplit):
    outer, C, inner = x.shape
    for task in prange(outer * C * isplit):
        row = task // isplit
        s = task - row * isplit
        o = row // C
        c = row - o * C
        mc, ac, tc, bc, dc = m[c], a[c], t[c], b[c], d[c]
        for i in range(s * inner // isplit, (s + 1) * inner // isplit):
            xv = np.float64(x[o, c, i])
            g = _masked(np.float64(dy[o, c, i]), xv, mc, ac, tc, relu)
            dx[o, c, i] = g * ac + (xv - mc) * bc + dc


@njit(**_FLAGS)
def _apply_row_major(dy, x, m, a, t, relu, b, d, dx, nsplit):
    outer, C, inner = x.shape
    for s in prange(nsplit):
        for o in range(s * outer // nsplit, (s + 1) * outer // nsplit):
            for i in range(inner):
                for c in range(C):
                    xv = np.float64(x[o, c, i])
                    g = _masked(np.float64(dy[o, c, i]), xv, m[c], a[c], t[c], relu)
                    dx[o, c, i] = g * a[c] + (xv - m[c]) * b[c] + d[c]


# Host-side drivers ---------------------------------------------------------


def _channel_major(x3) -> bool:
    return x3.shape[2] >= _config.CPU_CHANNEL_MAJOR_MIN_INNER


def _tasks(total_elements: int, cap: int) -> int:
    """How many tasks to split ``total_elements`` of work into (1..cap)."""
    want = numba.get_num_threads() * _config.CPU_TASKS_PER_THREAD
    by_size = max(1, total_elements // _config.CPU_MIN_TASK)
    return int(max(1, min(want, by_size, cap)))


def _per_channel(x3) -> int:
    """Tasks per channel of a channel-major reduction: enough for every thread
    even when C is 1..3 (the partials are merged afterwards)."""
    outer, C, inner = x3.shape
    tasks = _tasks(x3.size, x3.size)
    return int(min(max(1, -(-tasks // max(C, 1))), max(outer * inner, 1)))


def _f32(a):
    """Numba has no float16: float16 arrays go through float32."""
    return a.astype(np.float32) if a.dtype == np.float16 else a


def stats(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (float64) of ``x3``."""
    x3 = _f32(x3)
    outer, C, inner = x3.shape
    if _channel_major(x3):
        per_channel = _per_channel(x3)
        pn, pmean, pm2 = (np.empty((C, per_channel)) for _ in range(3))
        _stats_channel_major(x3, per_channel, _config.CPU_BLOCK, pn, pmean, pm2)
    else:
        nsplit = _tasks(x3.size, outer)
        pn, pmean, pm2 = (np.empty((C, nsplit)) for _ in range(3))
        bsum, bm2 = np.empty((nsplit, C)), np.empty((nsplit, C))
        block_rows = max(1, _config.CPU_BLOCK // max(C * inner, 1))
        _stats_row_major(x3, nsplit, block_rows, pn, pmean, pm2, bsum, bm2)
    mean, var = np.empty(C), np.empty(C)
    _merge_partials(pn, pmean, pm2, mean, var)
    return mean, var


def _writer(out3):
    """Where a kernel writes ``out3``: itself, or a float32 buffer for float16."""
    return np.empty(out3.shape, np.float32) if out3.dtype == np.float16 else out3


def _elementwise_split(x3) -> int:
    outer, C, inner = x3.shape
    if _channel_major(x3):
        return max(1, _tasks(x3.size, inner) // max(outer * C, 1))
    return _tasks(x3.size, outer)


def normalize(x3, m, a, t, relu, y3) -> None:
    """``y3 = (x3 - m[c]) * a[c] + t[c]``, then ReLU if ``relu`` (vectors float64)."""
    x3, target = _f32(x3), _writer(y3)
    kernel = _affine_channel_major if _channel_major(x3) else _affine_row_major
    kernel(x3, m, a, t, relu, target, _elementwise_split(x3))
    if target is not y3:
        y3[...] = target


def backward_sums(dy3, x3, m, a, t, relu) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``sum(g)`` and ``sum(g * (x - m))`` (float64), where ``g`` is
    ``dy`` masked by the fused ReLU when ``relu`` (its input ``(x - m) * a + t``)."""
    dy3, x3 = _f32(dy3), _f32(x3)
    outer, C, inner = x3.shape
    nsplit = _per_channel(x3) if _channel_major(x3) else _tasks(x3.size, outer)
    psum, pdot = np.empty((C, nsplit)), np.empty((C, nsplit))
    kernel = _sums_channel_major if _channel_major(x3) else _sums_row_major
    kernel(dy3, x3, m, a, t, relu, nsplit, psum, pdot)
    return psum.sum(axis=1), pdot.sum(axis=1)


def backward_apply(dy3, x3, m, a, t, relu, b, d, dx3) -> None:
    """``dx3 = g * a[c] + (x3 - m[c]) * b[c] + d[c]`` with ``g`` as in
    :func:`backward_sums`."""
    dy3, x3, target = _f32(dy3), _f32(x3), _writer(dx3)
    kernel = _apply_channel_major if _channel_major(x3) else _apply_row_major
    kernel(dy3, x3, m, a, t, relu, b, d, target, _elementwise_split(x3))
    if target is not dx3:
        dx3[...] = target
