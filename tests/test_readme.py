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
    if "mpiexec" in code or "from mpi4py" in code:
        pytest.skip("an MPI example: tests/test_sync.py runs it under mpiexec")
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
