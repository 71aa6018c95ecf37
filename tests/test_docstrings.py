"""The examples in numbn's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import numbn


def _modules_with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    names = []
    every = ["numbn"] + [info.name for info in pkgutil.iter_modules(numbn.__path__, "numbn.")]
    for name in every:
        if any(test.examples for test in finder.find(importlib.import_module(name))):
            names.append(name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_the_documented_modules_have_examples():
    """The table below is not empty by accident (a finder that found nothing)."""
    assert {"numbn.functional", "numbn.layers"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False, report=True)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
