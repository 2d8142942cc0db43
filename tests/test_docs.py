"""Every docstring example of the core library is executed."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "torchfpi",
    "torchfpi._autograd",
    "torchfpi._solve",
    "torchfpi._adjoints",
    "torchfpi._loop",
    "torchfpi._options",
    "torchfpi._solution",
    "torchfpi._solvers",
    "torchfpi._diagnostics",
    "torchfpi._layers",
    "torchfpi.energies",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
