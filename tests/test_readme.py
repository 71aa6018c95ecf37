"""The README's Python examples run as they are written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example(index, capsys):
    code = BLOCKS[index]
    if "from mpi4py" in code:
        # One process is a communicator of one rank: the example runs as it is
        # (examples/mpi_train.py runs under mpiexec in tests/test_sync.py).
        pytest.importorskip("mpi4py", reason="mpi4py is not installed (numbn[mpi])")
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
