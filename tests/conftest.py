"""Shared fixtures: float64 via fixtures (never a global default-dtype change), seeded RNG."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def dtype() -> torch.dtype:
    return torch.float64


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):  # noqa: D103
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
