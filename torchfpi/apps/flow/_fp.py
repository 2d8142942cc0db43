"""The fixed-point solve used by the flow models: a thin wrapper of ``torchfpi.fixed_point``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

import torchfpi


@dataclass
class FlowSolution:
    """What the flow models need of a fixed-point solve."""

    value: torch.Tensor
    iterations: torch.Tensor  # (B,) int64
    residual: torch.Tensor  # (B,)


def solve(f: Callable[..., torch.Tensor], z0: torch.Tensor, *inputs: Any, tol: float = 1e-3,
          max_iter: int = 50, backward_tol: float = 1e-3, backward_max_iter: int = 50) -> FlowSolution:
    """Fixed point ``z* = f(z*, *inputs)``, differentiable by the implicit (backward FPI) gradient.

    Plain forward FPI and backward FPI. Failures are not warned about: the flow models cap the
    iterations on purpose (a coarse-to-fine scheme does not need every warp converged), and
    report the iteration counts instead.
    """
    sol = torchfpi.fixed_point(f, z0, *inputs, solver="fpi", backward="fpi", tol=tol, max_iter=max_iter,
                               backward_tol=backward_tol, backward_max_iter=backward_max_iter,
                               on_failure="ignore")
    value = sol.value
    if not isinstance(value, torch.Tensor):  # pragma: no cover - a tensor z0 gives a tensor value
        raise TypeError("expected a tensor fixed point")
    return FlowSolution(value, sol.iterations.cpu(), sol.residual.detach().cpu())
