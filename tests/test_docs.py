"""Every docstring example of the core library is executed, and every module that defines a
public name of ``torchfpi`` has at least one."""

from __future__ import annotations

import doctest
import importlib

import pytest

import torchfpi

MODULES = [
    "torchfpi",
    "torchfpi._autograd",
    "torchfpi._solve",
    "torchfpi._adjoints",
    "torchfpi._broyden",
    "torchfpi._loop",
    "torchfpi._options",
    "torchfpi._solution",
    "torchfpi._solvers",
    "torchfpi._diagnostics",
    "torchfpi._spectral",
    "torchfpi._layers",
    "torchfpi.energies",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0


# Exception classes need no example: their messages are tested in test_errors.py.
WITHOUT_EXAMPLES = {"torchfpi.errors"}


def test_every_module_with_public_names_is_checked():
    homes = {getattr(getattr(torchfpi, n), "__module__", None) for n in torchfpi.__all__}
    homes = {h for h in homes if h and h.startswith("torchfpi")} - WITHOUT_EXAMPLES
    assert homes <= set(MODULES), f"add to MODULES (with an example): {sorted(homes - set(MODULES))}"
