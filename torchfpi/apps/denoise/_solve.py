"""The fixed-point solve used by the denoisers: ``torchfpi.fixed_point`` with Anderson both ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor

import torchfpi


@dataclass
class SolveInfo:
    """Per-call statistics: mean forward iterations and final relative residual (batch means).

    ``solution`` is the core :class:`torchfpi.Solution` when the core solved it: after a
    backward pass, ``solution.backward`` holds the backward solve's statistics.
    """

    iterations: float
    residual: float
    solution: Optional[Any] = None

    def backward_iterations(self) -> float:
        """Mean iterations of the latest backward solve (NaN if none ran or unknown)."""
        sol = self.solution
        if sol is None or sol.backward is None:
            return float("nan")
        return float(sol.backward.iterations.float().mean())


def solve(
    f: Callable[..., Tensor],
    z0: Tensor,
    y: Tensor,
    tol: float = 1e-4,
    max_iter: int = 100,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``z = f(z, y)`` with the implicit gradient; see the module docstring.

    Forward and backward are both Anderson-accelerated: the backward fixed point
    ``u = g + (I - a H)^T u`` of a gradient step contracts only as fast as plain gradient descent
    (``1 - a mu``), which for a sharp learned energy needs hundreds of plain iterations; with
    plain backward FPI and 60 iterations the gradient is a truncated Neumann series.
    """
    sol = torchfpi.fixed_point(
        f, z0, y, solver="anderson", backward="anderson", tol=tol, max_iter=max_iter,
        backward_tol=tol, backward_max_iter=2 * max_iter, on_failure="ignore",
    )
    return sol.value, SolveInfo(float(sol.iterations.float().mean()), float(sol.residual.mean()), sol)
