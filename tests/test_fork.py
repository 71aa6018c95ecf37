"""numbn in worker processes forked after the parent ran it: multiprocessing's
default start method on Linux, and GNU OpenMP's weak spot."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp
    import numba
    import numpy as np
    import numbn
    from numbn import _cpu

    x = np.random.default_rng(0).standard_normal((64, 64, 16, 16)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

    def step(_):
        y, mean, invstd = numbn.batch_norm_forward(x)
        dx = numbn.batch_norm_backward(dy, x, mean, invstd)[0]
        return y, dx, _cpu._forked_from_openmp

    parent = step(0)  # large enough for the parallel kernels: the pool starts here
    layer = numba.threading_layer()
    with mp.get_context("fork").Pool(2) as pool:
        children = pool.map(step, range(4))
    for y, dx, forked in children:
        np.testing.assert_allclose(y, parent[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, parent[1], rtol=1e-5, atol=1e-5)
        assert forked == (layer == "omp"), (forked, layer)
    assert not parent[2]
    print("ok", layer)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_forked_workers_run_after_the_parent_did(tmp_path):
    """Workers forked after the parent ran the parallel kernels compute the
    same results (Numba's omp layer ended each at its first parallel region,
    and the pool waited for them forever): with that layer they run the
    serial kernels."""
    script = tmp_path / "forked.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=180)  # without the fix, the pool waits forever
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
    assert "Terminating" not in r.stderr, r.stderr
