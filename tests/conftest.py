"""Shared fixtures: float64 via fixtures (never a global default-dtype change), seeded RNG, data sets.

Tests that need a data set carry ``@pytest.mark.data("bsd68", ...)``. They run when the data
set is present and valid under the data root (``$TORCHFPI_DATA``, else the per-user cache), checked
by the same code as ``torchfpi data check``, and are skipped otherwise with the command that fetches
it. ``pytest -m data`` runs only them; ``--require-data`` turns the skips into failures (for CI,
where the data must be there).
"""

from __future__ import annotations

import functools
from typing import Optional

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


def pytest_addoption(parser):  # noqa: D103
    parser.addoption("--require-data", action="store_true", default=False,
                     help="fail (instead of skip) tests whose data set is missing or corrupt")


def pytest_configure(config):  # noqa: D103
    config.addinivalue_line(
        "markers", "data(*names): needs the named data sets (bibtex, delicious, train400, bsd68, "
        "middlebury) under the data root; skipped with the command that fetches them otherwise",
    )


@functools.cache
def _data_status(name: str):
    from torchfpi.data import dataset_status

    return dataset_status(name)


def data_missing_reason(names) -> Optional[str]:
    """Why the data sets ``names`` cannot be used here, or ``None`` when they all can."""
    bad = [_data_status(name) for name in names]
    bad = [status for status in bad if not status.ok]
    if not bad:
        return None
    what = ", ".join(f"{status.name} ({status.state})" for status in bad)
    return (f"needs data set {what} under {bad[0].root}: run "
            f"`torchfpi data fetch {' '.join(status.name for status in bad)}` (or set TORCHFPI_DATA)")


@pytest.fixture
def data_root():
    """The data root the ``data``-marked tests read (``$TORCHFPI_DATA``, else the per-user cache)."""
    from torchfpi.data import resolve_root

    return resolve_root()


def pytest_runtest_setup(item):  # noqa: D103
    marker = item.get_closest_marker("data")
    if marker is not None and item.config.getoption("--require-data"):
        reason = data_missing_reason(marker.args)
        if reason is not None:
            pytest.fail(reason, pytrace=False)


def pytest_collection_modifyitems(config, items):  # noqa: D103
    if not config.getoption("--require-data"):
        for item in items:
            marker = item.get_closest_marker("data")
            reason = None if marker is None else data_missing_reason(marker.args)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", "torch"])
def host_backend(request, monkeypatch):
    """Run the loop's bookkeeping with numpy and with the torch-only fallback."""
    from torchfpi import _host

    ops = _host._HostOps()
    ops.np = request.param == "numpy"
    monkeypatch.setattr(_host, "_HOST", ops)
    return request.param
