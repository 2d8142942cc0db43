"""Every exception and warning torchfpi raises, in one place.

The solver's own (:class:`FixedPointError`, :class:`ConvergenceWarning`) and those of the
applications and the command line (:class:`UsageError`, :class:`DataError`,
:class:`MissingExtraError`). The CLI maps :class:`UsageError` to exit status 2 and the others to 1.
"""

from __future__ import annotations

__all__ = [
    "ConvergenceWarning",
    "DataError",
    "FixedPointError",
    "MissingExtraError",
    "UsageError",
]


class FixedPointError(RuntimeError):
    """A fixed-point solve failed: NaN/Inf met, divergence or non-convergence with ``on_failure="raise"``."""


class ConvergenceWarning(UserWarning):
    """A fixed-point solve (forward or backward) stopped before reaching its tolerance."""


class UsageError(ValueError):
    """A wrong or contradictory user argument. The CLI prints it in one line and exits with 2."""


class DataError(RuntimeError):
    """A missing, truncated or malformed data file. The CLI prints it and exits with 1."""


class MissingExtraError(ImportError):
    """A third-party package of an extra is not installed; the message names the extra."""
