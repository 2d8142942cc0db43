"""Exceptions and warnings raised by torchfpi."""

from __future__ import annotations


class FixedPointError(RuntimeError):
    """A fixed-point solve failed: NaN/Inf met, divergence or non-convergence with ``on_failure="raise"``."""


class ConvergenceWarning(UserWarning):
    """A fixed-point solve (forward or backward) stopped before reaching its tolerance."""
