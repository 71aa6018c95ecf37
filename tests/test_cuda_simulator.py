"""The CUDA test table on Numba's CUDA simulator, inside the ordinary run.

The simulator has to be chosen before numba is imported, so this runs
``tests/test_cuda.py`` in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``. On a
machine with a real GPU, ``tests/test_cuda.py`` runs on the GPU directly
and this is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _skip_reason():
    if importlib.util.find_spec("numba.cuda") is None:
        return "numba-cuda is not installed (pip install -e '.[cuda]')"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "already on the simulator: tests/test_cuda.py runs directly"
    from numba import cuda

    if cuda.is_available():
        return "a real GPU is present: tests/test_cuda.py runs on it directly"
    return None


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_table_on_the_simulator():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", str(HERE / "test_cuda.py"), "-q",
                        "-p", "no:cacheprovider"], capture_output=True, text=True, env=env,
                       timeout=1800, cwd=HERE.parent)
    tail = "\n".join(r.stdout.splitlines()[-15:])
    assert r.returncode == 0, f"simulator pass failed:\n{tail}\n{r.stderr[-3000:]}"
    assert " passed" in tail and " failed" not in tail, tail
